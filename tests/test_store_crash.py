"""Crash safety: uncommitted feature rows stay invisible and get overwritten; kill -9 is survivable."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from indexer.faiss_store import read_header
from indexer.store import ImageRecord, IndexStore, RegionBatch

DIM = 8
SHAPES = {"visual": (DIM,), "maps": (2, 2, 2)}
REPO = Path(__file__).resolve().parents[1]


def _item(rng: np.random.Generator, name: str, n: int = 3) -> tuple[ImageRecord, RegionBatch]:
    xy = rng.uniform(0, 20, (n, 2))
    return (
        ImageRecord(f"/corpus/{name}", "e" * 64, 10, 20, 32, 32),
        RegionBatch(
            np.hstack([xy, xy + 5]),
            rng.uniform(size=n),
            "gt",
            {"visual": rng.standard_normal((n, DIM)), "maps": rng.standard_normal((n, 2, 2, 2))},
        ),
    )


def _feature_rows(index_dir: Path) -> int:
    return (index_dir / "features" / "visual.f16").stat().st_size // (DIM * 2)


def test_uncommitted_append_is_invisible_and_overwritten(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    index_dir = tmp_path / "idx"
    store = IndexStore.open(index_dir, create=True, writable=True, array_shapes=SHAPES)
    run = store.begin_run("/corpus", {})
    store.commit_images(run, [_item(rng, "a.jpg"), _item(rng, "b.jpg")])
    # the first half of commit_images, then "kill -9": arrays on disk, no database commit
    _, garbage = _item(rng, "c.jpg", 4)
    assert store.features.append(garbage.arrays) == 6
    store.features.flush()
    store.close()
    assert _feature_rows(index_dir) == 10

    with IndexStore.open(index_dir) as reader:  # readers never touch the tail
        info = reader.info()
        assert (info.images, info.regions, info.vectors, info.next_row) == (2, 6, 6, 6)
        query = garbage.arrays["visual"][:1].astype(np.float32)
        assert sorted(reader.search(query, k=10)[1][0, :6].tolist()) == list(range(1, 7))
    assert _feature_rows(index_dir) == 10

    with IndexStore.open(index_dir, writable=True) as store:
        assert _feature_rows(index_dir) == 6  # the writer cut the uncommitted tail
        record, batch = _item(rng, "c.jpg", 2)
        store.commit_images(run, [(record, batch)])
        rows = [r.row for r in store.regions_of_image(record.path)]
        assert rows == [6, 7]
        np.testing.assert_array_equal(
            store.read_arrays("visual", np.array(rows)), batch.arrays["visual"].astype(np.float16)
        )
        assert store.info().next_row == 8


def test_failed_transaction_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import indexer.catalog as catalog_module

    rng = np.random.default_rng(1)
    with IndexStore.open(tmp_path / "idx", create=True, writable=True, array_shapes=SHAPES) as store:
        run = store.begin_run("/corpus", {})
        store.commit_images(run, [_item(rng, "a.jpg")])
        real = catalog_module.set_meta

        def failing(session, key, value):  # type: ignore[no-untyped-def]
            if key == "next_row":
                raise OSError("disk I/O error")
            real(session, key, value)

        monkeypatch.setattr(catalog_module, "set_meta", failing)
        with pytest.raises(OSError):
            store.commit_images(run, [_item(rng, "b.jpg"), _item(rng, "c.jpg")])
        monkeypatch.undo()
        assert sorted(store.known_images("/corpus")) == ["/corpus/a.jpg"]
        assert store.all_region_ids().tolist() == [1, 2, 3]
        record, batch = _item(rng, "b.jpg")
        store.commit_images(run, [(record, batch)])
        assert [r.row for r in store.regions_of_image(record.path)] == [3, 4, 5]
        np.testing.assert_array_equal(
            store.read_arrays("maps", np.array([3, 4, 5])), batch.arrays["maps"].astype(np.float16)
        )


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_store_crash import SHAPES, _item
    from indexer.store import IndexStore
    rng = np.random.default_rng(2)
    store = IndexStore.open({index!r}, create=True, writable=True, array_shapes=SHAPES)
    run = store.begin_run("/corpus", {{"backbone": "x"}})
    store.commit_images(run, [_item(rng, f"{{i}}.jpg") for i in range(3)])
    store.save_vectors()
    store.commit_images(run, [_item(rng, "3.jpg"), _item(rng, "4.jpg")])
    store.delete_images(["/corpus/0.jpg"])
    store.features.append(_item(rng, "5.jpg", 7)[1].arrays)  # in flight when killed
    store.features.flush()
    open({index!r} + "/.vectors.faiss.tmp-99999", "wb").write(b"half a save")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_kill_9_mid_run(tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(tests=str(REPO / "tests"), index=str(index_dir))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert read_header(index_dir / "vectors.faiss")["count"] == 9  # the save before the kill

    with IndexStore.open(index_dir) as reader:  # answers over everything committed
        info = reader.info()
        assert (info.images, info.regions, info.vectors) == (4, 12, 12)
        ids = reader.all_region_ids()
        assert ids.tolist() == list(range(4, 16))
        query = reader.read_arrays("visual", np.array([13])).astype(np.float32)
        scores, found = reader.search(query, k=20)
        assert found[0, 0] == 14 and sorted(found[0, :12].tolist()) == ids.tolist()

    with IndexStore.open(index_dir, writable=True) as store:  # the lock died with the process
        assert not list(index_dir.glob(".vectors.faiss.tmp-*"))
        assert _feature_rows(index_dir) == 15
        # a re-run: 0.jpg came back, 4.jpg changed; no duplicates, rows continue at next_row
        rng = np.random.default_rng(3)
        run = store.begin_run("/corpus", {"backbone": "x"})
        store.commit_images(run, [_item(rng, "0.jpg"), _item(rng, "4.jpg", 2)])
        store.save_vectors()
        store.finish_run(run, status="completed", processed=2, unchanged=3, removed=0,
                         regions_added=5, errors=0, seconds=0.1)
        assert sorted(store.known_images("/corpus")) == [f"/corpus/{i}.jpg" for i in range(5)]
        assert store.info().vectors == 14
    with sqlite3.connect(index_dir / "engine.db") as con:
        assert con.execute("SELECT id, status FROM index_runs ORDER BY id").fetchall() == [
            (1, "failed"), (2, "completed")
        ]
        assert con.execute("SELECT count(*), count(DISTINCT row) FROM regions").fetchone() == (14, 14)
        assert con.execute("SELECT min(row), max(row) FROM regions WHERE image_id > 5").fetchone() == (15, 19)
        assert con.execute("SELECT count(*) FROM images").fetchone() == (5,)


def test_kill_releases_lock_for_same_process_reopen(tmp_path: Path) -> None:
    """flock belongs to the open file: closing (or dying) frees it, no stale lock files."""
    store = IndexStore.open(tmp_path / "idx", create=True, writable=True, array_shapes=SHAPES)
    pid_in_lock = (tmp_path / "idx" / ".lock").read_text().strip()
    assert pid_in_lock == str(os.getpid())
    store.close()
    store.close()  # idempotent
    IndexStore.open(tmp_path / "idx", writable=True).close()
