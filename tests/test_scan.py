import os
from pathlib import Path

import pytest

from engine.errors import InvalidInputError
from indexer.scan import content_hash, list_image_files, plan_scan, scan_corpus


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_lists_images_recursively_by_extension_any_case(tmp_path: Path) -> None:
    for name in ["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.webp", "e.bmp", "f.tif", "g.TIFF", "notes.txt", ".hidden.jpg", ".cache/h.jpg"]:
        _touch(tmp_path / name)
    names = [e.path.relative_to(tmp_path.resolve()).as_posix() for e in list_image_files(tmp_path)]
    assert names == sorted(["a.jpg", "b.JPEG", "sub/c.png", "sub/deeper/d.webp", "e.bmp", "f.tif", "g.TIFF"])


def test_skips_given_folders(tmp_path: Path) -> None:
    _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "index" / "b.jpg")
    names = [e.path.name for e in list_image_files(tmp_path, skip=(tmp_path / "index",))]
    assert names == ["a.jpg"]


def test_missing_or_file_corpus_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        list_image_files(tmp_path / "nope")
    with pytest.raises(InvalidInputError, match="not a folder"):
        list_image_files(_touch(tmp_path / "a.jpg"))


def test_plan_new_changed_touched_unchanged_deleted(tmp_path: Path) -> None:
    a, b, c = _touch(tmp_path / "a.jpg", b"aaa"), _touch(tmp_path / "b.jpg", b"bbb"), _touch(tmp_path / "c.jpg", b"ccc")
    known = {str(e.path): (e.size_bytes, e.mtime_ns, content_hash(e.path), "indexed") for e in list_image_files(tmp_path)}
    known[str(tmp_path.resolve() / "gone.jpg")] = (1, 1, "0", "indexed")
    b.write_bytes(b"BBBB")  # changed content
    st = c.stat()
    os.utime(c, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    _touch(tmp_path / "d.jpg", b"ddd")  # new
    plan = plan_scan(list_image_files(tmp_path), known)
    assert [e.path.name for e in plan.todo] == ["b.jpg", "d.jpg"]
    assert (plan.new, plan.changed, plan.unchanged) == (1, 1, 2)
    assert plan.deleted == [str(tmp_path.resolve() / "gone.jpg")]


# -- what the scan cannot take: issues, never a crash, a hang or a silent skip ------------------

def test_name_not_utf8_is_an_issue_with_a_printable_path(tmp_path: Path) -> None:
    _touch(tmp_path / "a.jpg")
    Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.jpg")).write_bytes(b"x")
    scan = scan_corpus(tmp_path)
    assert [e.path.name for e in scan.files] == ["a.jpg"]
    (issue,) = scan.issues
    assert issue.path == str(tmp_path.resolve() / "caf\\xe9.jpg") and "not UTF-8" in issue.reason
    issue.path.encode("utf-8")  # storable and printable


def test_fifo_named_jpg_is_an_issue_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    scan = scan_corpus(tmp_path)
    assert scan.files == []
    assert [(i.path, i.folder) for i in scan.issues] == [(str(tmp_path.resolve() / "pipe.jpg"), False)]
    assert "not a regular file (a FIFO)" in scan.issues[0].reason
    with pytest.raises(OSError, match="not a regular file"):  # opened without blocking
        content_hash(tmp_path / "pipe.jpg")


def test_dangling_and_looping_links_are_issues(tmp_path: Path) -> None:
    _touch(tmp_path / "real.jpg")
    os.symlink(tmp_path / "real.jpg", tmp_path / "good.jpg")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "dangling.jpg")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    scan = scan_corpus(tmp_path)
    assert [e.path.name for e in scan.files] == ["good.jpg", "real.jpg"]
    reasons = {Path(i.path).name: i.reason for i in scan.issues}
    assert set(reasons) == {"dangling.jpg", "loop.jpg"}
    assert reasons["dangling.jpg"].startswith("broken symbolic link") and "loop" in reasons["loop.jpg"]


def _unlistable(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Listing ``folder`` fails as without read permission (tests run as root, so chmod would not)."""
    real = os.scandir

    def scandir(path):  # noqa: ANN001, ANN202
        if Path(path) == folder.resolve():
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unlistable_folder_is_an_issue_and_keeps_its_known_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "locked" / "b.jpg")
    _touch(tmp_path / "lockedness" / "c.jpg")  # shares the name prefix, not the folder
    known = {str(e.path): (e.size_bytes, e.mtime_ns, content_hash(e.path), "indexed") for e in scan_corpus(tmp_path).files}
    _unlistable(monkeypatch, tmp_path / "locked")
    scan = scan_corpus(tmp_path)
    assert [e.path.name for e in scan.files] == ["a.jpg", "c.jpg"]
    (issue,) = scan.issues
    assert issue.folder and issue.path == str(tmp_path.resolve() / "locked") and "Permission denied" in issue.reason
    (tmp_path / "lockedness" / "c.jpg").unlink()
    plan = plan_scan([e for e in scan.files if e.path.name != "c.jpg"], known, scan.issues)
    assert plan.deleted == [str(tmp_path.resolve() / "lockedness" / "c.jpg")]  # b.jpg is kept
    assert plan.issues == [issue] and plan.unchanged == 1


def test_issue_paths_are_not_deleted_and_corpus_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    key = str(tmp_path.resolve() / "pipe.jpg")
    scan = scan_corpus(tmp_path)
    plan = plan_scan(scan.files, {key: (None, None, None, "error")}, scan.issues)
    assert plan.deleted == [] and [i.path for i in plan.issues] == [key]
    bad = Path(os.fsdecode(os.fsencode(tmp_path) + b"/d\xff"))
    bad.mkdir()
    with pytest.raises(InvalidInputError, match=r"d\\xff has a name that is not UTF-8"):
        scan_corpus(bad)
