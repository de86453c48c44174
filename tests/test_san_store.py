"""The ``san`` array's own FAISS file: search, catch-up, removal, tombstone pruning, rebuild."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import IndexVersionError
from indexer.store import ImageRecord, IndexStore, RegionBatch

SHAPES = {"visual": (6,), "maps": (2, 1, 1), "san": (5,)}


def _item(rng: np.random.Generator, name: str, n: int, version: int = 0) -> tuple[ImageRecord, RegionBatch]:
    record = ImageRecord(f"/c/{name}", f"{version:064x}", 10, 10 + version, 40, 40)
    xy = rng.uniform(0, 20, (n, 2))
    arrays = {"visual": rng.standard_normal((n, 6)), "maps": rng.standard_normal((n, 2, 1, 1)), "san": rng.standard_normal((n, 5))}
    return record, RegionBatch(boxes=np.hstack([xy, xy + 5]), objectness=np.ones(n), source="gt", arrays=arrays)


def _exact_top(store: IndexStore, query: np.ndarray, k: int) -> list[int]:
    ids = store.all_region_ids()
    rows = [r.row for r in store.regions(ids.tolist())]
    v = store.read_arrays("san", np.asarray(rows)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return [int(ids[i]) for i in np.argsort(-(v @ (query / np.linalg.norm(query))), kind="stable")[:k]]


def test_san_vectors_have_their_own_faiss_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with IndexStore.open(tmp_path, create=True, writable=True, array_shapes=SHAPES) as store:
        assert store.vector_arrays == ("visual", "san")
        run = store.begin_run("/c", {})
        store.commit_images(run, [_item(rng, f"{i}.jpg", 4) for i in range(5)])
        store.save_vectors()
        assert (tmp_path / "vectors-san.faiss").is_file() and (tmp_path / "vectors.faiss").is_file()
        q = rng.standard_normal(5).astype(np.float32)
        _, ids = store.search(q[None], 6, array="san")
        assert ids[0].tolist() == _exact_top(store, q, 6)
        # removal and replacement reach the SAN file too, and the tombstones are pruned after the save
        store.delete_images(["/c/0.jpg"])
        store.commit_images(run, [_item(rng, "1.jpg", 2, version=1)])
        _, ids = store.search(q[None], 40, array="san")
        live = set(store.all_region_ids().tolist())
        assert set(ids[0][ids[0] >= 0].tolist()) == live and len(live) == 14
        store.save_vectors()
        with store._db.read() as s:  # noqa: SLF001
            from sqlalchemy import func, select

            from indexer.db.models import Tombstone

            assert s.scalar(select(func.count()).select_from(Tombstone)) == 0
        store.finish_run(run, status="completed", processed=6, unchanged=0, removed=1, regions_added=22, errors=0, seconds=0.1)
    (tmp_path / "vectors-san.faiss").unlink()
    with IndexStore.open(tmp_path) as reader:  # a lost SAN file is rebuilt from the feature store
        _, ids = reader.search(q[None], 6, array="san")
        assert ids[0].tolist() == _exact_top(reader, q, 6)


def test_an_index_without_san_refuses_san_searches(tmp_path: Path) -> None:
    with IndexStore.open(tmp_path, create=True, writable=True, array_shapes={"visual": (6,), "maps": (2, 1, 1)}) as store:
        assert store.vector_arrays == ("visual",) and not store.has_array("san")
        with pytest.raises(IndexVersionError, match="re-index"):
            store.search(np.ones((1, 5), np.float32), 3, array="san")
