"""``indexer.db_state``: atomic, resumable index creation (D1) and read-only index folders (D7)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.errors import IndexLockedError, IndexNotFoundError, IndexReadOnlyError, IndexVersionError
from indexer.db.session import downgrade_database, upgrade_database
from indexer.db_state import Creation, creation_state
from indexer.index_dir import WriterLock
from indexer.store import IndexStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_store_crash import SHAPES, _item  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_RECREATE = r"engine index CORPUS --index .*idx`"


def _fill(index_dir: Path, *, save: bool = True) -> None:
    """An index of 4 images; with ``save``, 3 of them are in the saved FAISS file and region table and the
    4th only in the database (so readers catch up), and then the writer closes (no -wal left)."""
    rng = np.random.default_rng(3)
    with IndexStore.open(index_dir, create=True, writable=True, array_shapes=SHAPES) as store:
        run = store.begin_run("/corpus", {"backbone": "x"})
        store.commit_images(run, [_item(rng, f"{i}.jpg") for i in range(3)])
        if save:
            store.save_vectors()
        store.commit_images(run, [_item(rng, "3.jpg", 2)])
        store.finish_run(run, status="completed", processed=4, unchanged=0, removed=0, regions_added=11, errors=0, seconds=0.1)


def _answers(index_dir: Path) -> tuple:
    with IndexStore.open(index_dir) as store:
        q = np.random.default_rng(9).standard_normal((2, SHAPES["visual"][0])).astype(np.float32)
        scores, ids = store.search(q, 5)
        rows = store.regions(ids[0])
        table = store.lookup_regions(ids[1])
        info = store.info()
        return (
            ids.tolist(),
            np.round(scores, 4).tolist(),
            [(r.image_path, r.box, r.row) for r in rows],
            table.rows.tolist(),
            [(r.id, r.row) for r in store.regions_of_image("/corpus/3.jpg")],
            store.read_arrays("maps", np.asarray([0, 5])).tolist(),
            (info.images, info.regions, info.vectors, info.runs),
        )


def _listing(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` (itself included) -> (mode, size, mtime_ns)."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _act_without_write_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    """Act as a user who may not write any index file (tests run as root, whom chmod does not stop)."""
    import indexer.index_dir

    monkeypatch.setattr(indexer.index_dir, "_may_write", lambda path: False)


# ----------------------------------------------------------------------------------------------
# D1: creation is atomic, and an unfinished one is redone
# ----------------------------------------------------------------------------------------------
def _leave_unfinished(index_dir: Path, how: str) -> None:
    """What an older engine killed while creating ``index_dir`` left behind."""
    index_dir.mkdir(parents=True)
    (index_dir / ".lock").write_text("12345\n")
    if how == "empty database":
        (index_dir / "engine.db").touch()
    else:  # migrated, killed before the feature arrays were recorded
        upgrade_database(index_dir / "engine.db")


@pytest.mark.parametrize("how", ["empty database", "no arrays recorded"])
def test_an_unfinished_creation_is_a_clear_error_for_readers_and_redone_by_indexing(tmp_path: Path, how: str) -> None:
    index_dir = tmp_path / "idx"
    _leave_unfinished(index_dir, how)
    assert creation_state(index_dir / "engine.db") is Creation.UNFINISHED
    with pytest.raises(IndexNotFoundError, match=r"never completely created .*run `" + _RECREATE + " to create it again"):
        IndexStore.open(index_dir)
    with pytest.raises(IndexNotFoundError, match="never completely created"):
        IndexStore.open(index_dir, writable=True)  # remove / compact: nothing to change
    _fill(index_dir)  # what `engine index` does: create=True, writable=True
    assert creation_state(index_dir / "engine.db") is Creation.CREATED
    assert _answers(index_dir)[-1] == (4, 11, 11, 1)


def test_a_readers_open_of_an_unfinished_creation_writes_nothing(tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    _leave_unfinished(index_dir, "empty database")
    before = _listing(index_dir)
    with pytest.raises(IndexNotFoundError):
        IndexStore.open(index_dir)
    assert _listing(index_dir) == before


_KILLED_CREATOR = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import indexer.db_state as db_state
    from test_store_crash import SHAPES
    from indexer.store import IndexStore
    point = {point!r}
    def die(*args, **kwargs):
        os._exit(9)  # like kill -9: no cleanup, no finally blocks
    if point == "before the rename":
        db_state.os.replace = die
    else:
        db_state.set_meta = die
    IndexStore.open({index!r}, create=True, writable=True, array_shapes=SHAPES)
    """
)


@pytest.mark.parametrize("point", ["migrated", "before the rename"])
def test_a_creator_killed_at_any_point_leaves_no_index_and_the_next_creates_it(tmp_path: Path, point: str) -> None:
    index_dir = tmp_path / "idx"
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CREATOR.format(tests=str(REPO / "tests"), index=str(index_dir), point=point)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == 9, child.stderr
    assert not (index_dir / "engine.db").exists()
    assert any(p.name.startswith(".engine.db.tmp-") for p in index_dir.iterdir())
    with pytest.raises(IndexNotFoundError, match=r"no index at .*; create one with `" + _RECREATE):
        IndexStore.open(index_dir)
    _fill(index_dir)
    assert sorted(p.name for p in index_dir.iterdir() if p.name.startswith(".engine")) == []
    assert _answers(index_dir)[-1] == (4, 11, 11, 1)


def test_a_second_creator_is_told_another_process_is_creating_the_index(tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    index_dir.mkdir()
    with WriterLock(index_dir / ".lock"):  # the first creator, still creating
        with pytest.raises(IndexLockedError, match=r"is being created by another process .*wait for that `engine index` run"):
            IndexStore.open(index_dir, create=True, writable=True, array_shapes=SHAPES)
        with pytest.raises(IndexNotFoundError, match="no index at"):
            IndexStore.open(index_dir)
    _fill(index_dir)
    with IndexStore.open(index_dir, writable=True):  # a writer of a created index gets the usual message
        with pytest.raises(IndexLockedError, match=r"is being written by another process"):
            IndexStore.open(index_dir, create=True, writable=True, array_shapes=SHAPES)


@pytest.mark.slow
def test_engine_index_repairs_an_unfinished_creation(tmp_path: Path) -> None:
    """The CLI end to end: `engine info` names `engine index`, which then works."""
    from click.testing import CliRunner

    from engine.cli import main
    from engine.synth import SynthConfig, generate_corpus

    corpus = tmp_path / "corpus"
    generate_corpus(corpus, SynthConfig(images=2, size=96, seed=1))
    index_dir = tmp_path / "idx"
    _leave_unfinished(index_dir, "empty database")
    runner = CliRunner()
    result = runner.invoke(main, ["info", "--index", str(index_dir)])
    assert result.exit_code != 0 and f"engine index CORPUS --index {index_dir}" in result.output
    result = runner.invoke(main, ["index", str(corpus), "--index", str(index_dir), "--device", "cpu", "--proposals", "gt", "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["info", "--index", str(index_dir), "--json"])
    assert result.exit_code == 0 and '"images": 2' in result.output


# ----------------------------------------------------------------------------------------------
# D7: a read-only index folder can be queried, and nothing is written to it
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("save", [True, False])
def test_a_reader_of_a_read_only_folder_answers_and_writes_nothing(tmp_path: Path, save: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    index_dir = tmp_path / "idx"
    _fill(index_dir, save=save)
    expected = _answers(index_dir)
    for wal in ("engine.db-wal", "engine.db-shm"):
        assert not (index_dir / wal).exists()
    before = _listing(index_dir)
    _act_without_write_permission(monkeypatch)
    assert _answers(index_dir) == expected
    with IndexStore.open(index_dir) as store:
        assert store._db.read_only  # noqa: SLF001
        assert len(store.all_regions()) == 11 and store.errors() == [] and store.models() == {"backbone": "x"}
    with IndexStore.open(index_dir, create=True, array_shapes=SHAPES) as store:  # exists: nothing to create
        assert store.info().images == 4
    assert _listing(index_dir) == before


def test_a_writer_of_a_read_only_folder_gets_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index_dir = tmp_path / "idx"
    _fill(index_dir)
    _act_without_write_permission(monkeypatch)
    before = _listing(index_dir)
    for kwargs in ({"writable": True}, {"create": True, "writable": True, "array_shapes": SHAPES}):
        with pytest.raises(IndexReadOnlyError) as caught:
            IndexStore.open(index_dir, **kwargs)
        message = str(caught.value)
        assert "\n" not in message and "is read-only for this user" in message and "chmod -R u+w" in message
    assert _listing(index_dir) == before


def test_an_old_schema_in_a_read_only_folder_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index_dir = tmp_path / "idx"
    _fill(index_dir)
    downgrade_database(index_dir / "engine.db", revision="0002_tombstones")
    _act_without_write_permission(monkeypatch)
    with pytest.raises(IndexVersionError, match=r"folder is read-only so it cannot be upgraded; open it once with write access"):
        IndexStore.open(index_dir)
    monkeypatch.undo()
    with IndexStore.open(index_dir) as store:  # with write access a reader upgrades it, as before
        assert store.info().images == 4


def _mount_read_only(folder: Path) -> str | None:
    """Bind-mount ``folder`` over itself read-only (writes fail with EROFS, even for root); the reason
    when this machine does not allow it."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8) to make a folder truly read-only"
    for args in (["mount", "--bind", str(folder), str(folder)], ["mount", "-o", "remount,ro,bind", str(folder)]):
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            subprocess.run(["umount", str(folder)], capture_output=True, timeout=60)
            return f"this machine does not allow a read-only bind mount: {done.stderr.strip()}"
    return None


def test_an_index_on_a_read_only_mount_answers_and_writes_nothing() -> None:
    """A healthy index on a read-only filesystem (a real one, not a mocked permission check): queries and
    ``engine check`` work and change nothing; a writer gets one clear line (D7)."""
    from indexer.integrity import check_index

    top = Path(tempfile.mkdtemp(prefix="ro-index-"))
    index_dir = top / "idx"
    try:
        _fill(index_dir)
        before = _listing(index_dir)
        why = _mount_read_only(index_dir)
        if why is not None:
            pytest.skip(why)
        try:
            with IndexStore.open(index_dir) as store:
                _, ids = store.search(np.ones((1, SHAPES["visual"][0]), np.float32), 3)
                assert (store.info().images, len(store.regions(ids[0]))) == (4, 3)
            assert check_index(index_dir).clean
            with pytest.raises(IndexReadOnlyError, match="read-only"):
                IndexStore.open(index_dir, writable=True)
            assert _listing(index_dir) == before
        finally:
            subprocess.run(["umount", str(index_dir)], check=True, timeout=60)
    finally:
        shutil.rmtree(top)
