import os
from pathlib import Path

import pytest

from engine.errors import InvalidInputError
from indexer.scan import content_hash, list_image_files, plan_scan


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
