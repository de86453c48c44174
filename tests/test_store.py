"""IndexStore facade: commits, search with catch-up, removal, errors, locking, open errors."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest

from engine.errors import (
    EngineError,
    IndexLockedError,
    IndexNotFoundError,
    IndexVersionError,
    InvalidBoxError,
    InvalidInputError,
)
from indexer.faiss_store import read_header
from indexer.store import ImageRecord, IndexStore, RegionBatch, StoreConfig

DIM = 12
SHAPES = {"visual": (DIM,), "maps": (3, 2, 2)}


class Corpus:
    """Seeded fake images with regions; remembers every vector by path for brute-force checks."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.vectors: dict[str, np.ndarray] = {}

    def item(self, name: str, n: int = 3, *, version: int = 0) -> tuple[ImageRecord, RegionBatch]:
        path = f"/corpus/{name}"
        record = ImageRecord(path, f"{version:064x}", 1000 + version, 10**9 + version, 64, 48)
        xy = self.rng.uniform(0, 30, (n, 2))
        visual = self.rng.standard_normal((n, DIM)).astype(np.float16)
        self.vectors[path] = visual
        batch = RegionBatch(
            boxes=np.hstack([xy, xy + 10]),
            objectness=self.rng.uniform(size=n),
            source="rpn",
            arrays={"visual": visual, "maps": self.rng.standard_normal((n, 3, 2, 2))},
        )
        return record, batch

    def brute_force(self, query: np.ndarray, k: int) -> list[tuple[str, int]]:
        """(path, index within image) of the k nearest live vectors by cosine."""
        keys, rows = [], []
        for path, visual in self.vectors.items():
            for i, v in enumerate(visual.astype(np.float32)):
                keys.append((path, i))
                rows.append(v / np.linalg.norm(v))
        scores = np.stack(rows) @ (query / np.linalg.norm(query))
        return [keys[i] for i in np.argsort(-scores, kind="stable")[:k]]


def _create(path: Path, **kwargs) -> IndexStore:
    return IndexStore.open(path, create=True, writable=True, array_shapes=SHAPES, **kwargs)


def _hits(store: IndexStore, ids: np.ndarray) -> list[tuple[str, int]]:
    """Map region ids to (path, index within image)."""
    out = []
    for region in store.regions(ids):
        same = store.regions_of_image(region.image_path)
        out.append((region.image_path, [r.id for r in same].index(region.id)))
    return out


def test_commit_then_search_matches_brute_force(tmp_path: Path) -> None:
    corpus = Corpus(0)
    with _create(tmp_path / "idx") as store:
        run = store.begin_run("/corpus", {"backbone": "lite0@1", "grn": "grn@2"})
        ids = store.commit_images(run, [corpus.item(f"{i}.jpg", 3 + i % 2) for i in range(6)])
        assert ids == [1, 2, 3, 4, 5, 6]
        store.commit_images(run, [corpus.item("6.jpg", 0)])  # an image without regions is fine
        query = corpus.rng.standard_normal(DIM).astype(np.float32)
        scores, found = store.search(query[None], k=8)
        assert found.shape == scores.shape == (1, 8)
        assert _hits(store, found[0]) == corpus.brute_force(query, 8)
        assert np.all(np.diff(scores[0]) <= 1e-6)

        region = store.regions([int(found[0, 0])])[0]
        np.testing.assert_array_equal(
            store.read_arrays("visual", np.array([region.row]))[0],
            corpus.vectors[region.image_path][_hits(store, [region.id])[0][1]],
        )
        assert store.read_arrays("maps", np.array([region.row, 0])).shape == (2, 3, 2, 2)
        assert region.source == "rpn" and (region.width, region.height) == (64, 48)
        assert store.all_region_ids().tolist() == list(range(1, 22))
        store.finish_run(run, status="completed", processed=7, unchanged=0, removed=0,
                         regions_added=21, errors=0, seconds=0.5)
        info = store.info()
        assert (info.images, info.regions, info.errors, info.vectors, info.runs) == (7, 21, 0, 21, 1)
        assert (info.index_type, info.device) == ("Flat", "cpu")
        assert info.dims == {"visual": (DIM,), "maps": (3, 2, 2)}
        assert info.models == {"backbone": "lite0@1", "grn": "grn@2"}
    with sqlite3.connect(tmp_path / "idx" / "engine.db") as con:
        assert con.execute("SELECT status, processed, seconds FROM index_runs").fetchall() == [("completed", 7, 0.5)]


def test_delete_images_removes_from_search(tmp_path: Path) -> None:
    corpus = Corpus(1)
    with _create(tmp_path / "idx") as store:
        run = store.begin_run("/corpus", {})
        store.commit_images(run, [corpus.item(f"{i}.jpg") for i in range(5)])
        store.save_vectors()
        gone = store.regions_of_image("/corpus/2.jpg")
        assert store.delete_images(["/corpus/2.jpg", "/corpus/2.jpg", "/corpus/missing.jpg"]).images == 1
        del corpus.vectors["/corpus/2.jpg"]
        assert store.regions_of_image("/corpus/2.jpg") == []
        assert store.regions([r.id for r in gone]) == []
        for region in gone:  # each removed region's own vector no longer finds it
            query = store.read_arrays("visual", np.array([region.row])).astype(np.float32)
            _, found = store.search(query, k=15)
            assert region.id not in found
        assert (found >= 0).sum() == 12
        with sqlite3.connect(tmp_path / "idx" / "engine.db") as con:
            assert con.execute("SELECT count(*) FROM regions").fetchone() == (12,)
            tombstoned = [r[0] for r in con.execute("SELECT region_id FROM tombstones ORDER BY seq")]
        assert tombstoned == [r.id for r in gone]
        store.save_vectors()  # applies and prunes the tombstones
        with sqlite3.connect(tmp_path / "idx" / "engine.db") as con:
            assert con.execute("SELECT count(*) FROM tombstones").fetchone() == (0,)
        assert read_header(tmp_path / "idx" / "vectors.faiss")["count"] == 12


def test_changed_image_is_replaced_atomically(tmp_path: Path) -> None:
    corpus = Corpus(2)
    with _create(tmp_path / "idx") as store:
        run = store.begin_run("/corpus", {})
        store.commit_images(run, [corpus.item("a.jpg", 3), corpus.item("b.jpg", 2)])
        old = store.regions_of_image("/corpus/a.jpg")
        (new_id,) = store.commit_images(run, [corpus.item("a.jpg", 4, version=1)])
        new = store.regions_of_image("/corpus/a.jpg")
        assert len(new) == 4 and min(r.id for r in new) > max(r.id for r in old)  # ids never reused
        assert {r.image_id for r in new} == {new_id}
        assert store.known_images("/corpus")["/corpus/a.jpg"] == (1001, 10**9 + 1, f"{1:064x}", "indexed")
        for region in old:
            query = store.read_arrays("visual", np.array([region.row])).astype(np.float32)
            assert region.id not in store.search(query, k=10)[1]
        assert store.info().vectors == 6


def test_record_error_replaces_and_lists(tmp_path: Path) -> None:
    corpus = Corpus(3)
    with _create(tmp_path / "idx") as store:
        run = store.begin_run("/corpus", {})
        record, batch = corpus.item("a.jpg")
        store.commit_images(run, [(record, batch), corpus.item("b.jpg")])
        store.record_error(run, record, record.path, "cannot identify image file")
        store.record_error(run, None, "/corpus/c.jpg", "truncated JPEG")
        assert store.errors() == [
            ("/corpus/a.jpg", "cannot identify image file"),
            ("/corpus/c.jpg", "truncated JPEG"),
        ]
        assert store.regions_of_image("/corpus/a.jpg") == []
        known = store.known_images("/corpus")
        assert known["/corpus/a.jpg"][3] == "error" and known["/corpus/c.jpg"] == (None, None, None, "error")
        info = store.info()
        assert (info.images, info.errors, info.regions, info.vectors) == (1, 2, 3, 3)
        store.commit_images(run, [corpus.item("c.jpg")])  # fixed file indexes over its error row
        assert [p for p, _ in store.errors()] == ["/corpus/a.jpg"]
        with pytest.raises(InvalidInputError, match="pass the same path"):
            store.record_error(run, record, "/corpus/other.jpg", "x")


def test_known_images_matches_directory_prefix_only(tmp_path: Path) -> None:
    corpus = Corpus(4)
    with _create(tmp_path / "idx") as store:
        run = store.begin_run("/corpus", {})
        items = [corpus.item(n) for n in ("a.jpg", "sub/b.jpg")]
        items.append((ImageRecord("/corpus2/c.jpg", "c" * 64, 1, 2, 3, 4), items[0][1]))
        items.append((ImageRecord("/corpus-x.jpg", "d" * 64, 1, 2, 3, 4), items[1][1]))
        store.commit_images(run, items)
        assert sorted(store.known_images("/corpus")) == ["/corpus/a.jpg", "/corpus/sub/b.jpg"]
        assert sorted(store.known_images("/corpus/sub/")) == ["/corpus/sub/b.jpg"]
        assert len(store.known_images("/")) == 4


def test_reader_in_another_store_sees_commits(tmp_path: Path) -> None:
    corpus = Corpus(5)
    writer = _create(tmp_path / "idx")
    run = writer.begin_run("/corpus", {})
    writer.commit_images(run, [corpus.item("a.jpg")])
    with IndexStore.open(tmp_path / "idx") as reader:
        assert reader.info().vectors == 3
        record, batch = corpus.item("b.jpg")
        writer.commit_images(run, [(record, batch)])
        query = batch.arrays["visual"][1:2].astype(np.float32)
        _, found = reader.search(query, k=1)  # catches up without reopening
        assert reader.regions(found[0])[0].image_path == "/corpus/b.jpg"
        writer.delete_images(["/corpus/b.jpg"])
        _, found = reader.search(query, k=6)
        assert {r.image_path for r in reader.regions(found[0])} == {"/corpus/a.jpg"}
        # the writer saves and prunes tombstones the reader never saw: it reloads the file
        writer.commit_images(run, [corpus.item("c.jpg")])
        writer.delete_images(["/corpus/a.jpg"])
        writer.save_vectors()
        _, found = reader.search(query, k=6)
        assert {r.image_path for r in reader.regions(found[0])} == {"/corpus/c.jpg"}
        assert (found[0] >= 0).sum() == 3
        with pytest.raises(EngineError, match="read-only"):
            reader.delete_images(["/corpus/c.jpg"])
    writer.close()


def test_save_reopen_catches_up(tmp_path: Path) -> None:
    corpus = Corpus(6)
    with _create(tmp_path / "idx") as store:
        run = store.begin_run("/corpus", {})
        store.commit_images(run, [corpus.item(f"{i}.jpg") for i in range(4)])
        store.save_vectors()
        store.commit_images(run, [corpus.item("late.jpg")])  # after the save
        store.delete_images(["/corpus/0.jpg"])
    del corpus.vectors["/corpus/0.jpg"]
    header = read_header(tmp_path / "idx" / "vectors.faiss")
    assert (header["count"], header["max_region_id"], header["max_tombstone_seq"]) == (12, 12, 0)
    with IndexStore.open(tmp_path / "idx") as store:
        late = store.regions_of_image("/corpus/late.jpg")
        query = store.read_arrays("visual", np.array([late[0].row])).astype(np.float32)
        _, found = store.search(query, k=20)
        assert found[0, 0] == late[0].id
        assert sorted(i for i in found[0] if i >= 0) == store.all_region_ids().tolist()
        assert not {1, 2, 3} & set(found[0].tolist())  # 0.jpg's regions: tombstones applied
        assert _hits(store, found[0, :5]) == corpus.brute_force(query[0], 5)


def test_switches_to_ivf_past_the_threshold(tmp_path: Path) -> None:
    corpus = Corpus(7)
    config = StoreConfig(flat_threshold=100)
    with _create(tmp_path / "idx", config=config) as store:
        run = store.begin_run("/corpus", {})
        store.commit_images(run, [corpus.item(f"{i}.jpg", 5) for i in range(16)])
        store.save_vectors()
        assert store.info().index_type == "Flat"
        store.commit_images(run, [corpus.item(f"more{i}.jpg", 5) for i in range(8)])
        store.save_vectors()
        assert store.info().index_type.startswith("IVF")
    assert read_header(tmp_path / "idx" / "vectors.faiss")["factory"].startswith("IVF")
    with IndexStore.open(tmp_path / "idx", config=config) as store:
        info = store.info()
        assert info.index_type.startswith("IVF") and info.vectors == 120 and info.nprobe
        region = store.regions_of_image("/corpus/more3.jpg")[2]
        query = store.read_arrays("visual", np.array([region.row])).astype(np.float32)
        assert store.search(query, k=1)[1][0, 0] == region.id
    with IndexStore.open(tmp_path / "idx") as store:  # readers keep the saved type
        assert store.info().index_type.startswith("IVF")
    with IndexStore.open(tmp_path / "idx", writable=True) as store:  # the writer re-decides
        store.save_vectors()
        assert store.info().index_type == "Flat"


def test_search_rescores_with_the_stored_vectors_where_calibrated_and_saving_can_release(tmp_path: Path) -> None:
    """Where the FAISS calibration chose exact re-scoring, the store ranks FAISS's candidates by the
    feature store's vectors (brute force's order and cosines); a builder's save can drop each index."""
    corpus = Corpus(8)
    config = StoreConfig(flat_threshold=100)
    with _create(tmp_path / "idx", config=config) as store:
        run = store.begin_run("/corpus", {})
        store.commit_images(run, [corpus.item(f"{i}.jpg", 5) for i in range(30)])
        store.save_vectors(release=True)
        assert not store._vectors._vectors  # nothing held once written
        vectors = store._vectors.synced("visual", allow_rebuild=False)  # loaded again from its file
        assert vectors.index_type.startswith("IVF")
        lists = faiss.extract_index_ivf(vectors._cpu).nlist
        vectors.nprobe_at = {k: lists for k in vectors.nprobe_at}  # every list, 40x candidates: all regions,
        vectors.refine_at = {k: 40 for k in vectors.nprobe_at}  # as if the codes capped recall
        for seed in range(5):
            query = np.random.default_rng(seed).standard_normal((1, DIM)).astype(np.float32)
            scores, found = store.search(query, k=5)
            assert _hits(store, found[0]) == corpus.brute_force(query[0], 5)
            stored = store.read_arrays("visual", np.array([r.row for r in store.regions(found[0])])).astype(np.float32)
            expected = stored @ query[0] / np.linalg.norm(stored, axis=1) / np.linalg.norm(query[0])
            np.testing.assert_allclose(scores[0], expected, rtol=1e-5)


def test_writer_lock(tmp_path: Path) -> None:
    with _create(tmp_path / "idx"):
        with pytest.raises(IndexLockedError, match=r"being written by another process.*\.lock"):
            IndexStore.open(tmp_path / "idx", writable=True)
        with IndexStore.open(tmp_path / "idx") as reader:  # readers take no lock
            assert reader.info().images == 0
    with IndexStore.open(tmp_path / "idx", writable=True):  # released on close
        pass


def test_open_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(IndexNotFoundError, match=r"no index at .*nowhere; create one with `engine index CORPUS --index"):
        IndexStore.open(missing)
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="no index at"):
        IndexStore.open(tmp_path / "empty", writable=True)
    with pytest.raises(InvalidInputError, match="array_shapes is required"):
        IndexStore.open(tmp_path / "empty", create=True, writable=True)
    with pytest.raises(InvalidInputError, match="1-d 'visual'"):
        IndexStore.open(tmp_path / "empty", create=True, array_shapes={"maps": (2, 2)})
    _create(tmp_path / "idx").close()
    with pytest.raises(IndexVersionError, match=r"stores feature arrays \[maps\(3, 2, 2\), visual\(12,\)\] but this engine writes"):
        IndexStore.open(tmp_path / "idx", array_shapes={"visual": (64,), "maps": (3, 2, 2)})
    IndexStore.open(tmp_path / "idx", array_shapes=SHAPES).close()  # matching shapes are fine
    with pytest.raises(InvalidInputError, match="faiss_device"):
        StoreConfig(faiss_device="gpu")
    with pytest.raises(InvalidInputError, match="flat_threshold"):
        StoreConfig(flat_threshold=0)


def test_bad_batches_are_refused_before_writing(tmp_path: Path) -> None:
    corpus = Corpus(8)
    with _create(tmp_path / "idx") as store:
        run = store.begin_run("/corpus", {})
        record, batch = corpus.item("a.jpg")
        cases = [
            ((ImageRecord("rel.jpg", "a" * 64, 1, 1, 1, 1), batch), InvalidInputError, "not absolute"),
            ((record, RegionBatch(batch.boxes[:, :3], batch.objectness, "rpn", batch.arrays)), InvalidBoxError, r"\[n, 4\]"),
            ((record, RegionBatch(batch.boxes[:, [2, 1, 0, 3]], batch.objectness, "rpn", batch.arrays)), InvalidBoxError, "inverted"),
            ((record, RegionBatch(batch.boxes, batch.objectness, "edgeboxes", batch.arrays)), InvalidInputError, "source 'edgeboxes'"),
            ((record, RegionBatch(batch.boxes, batch.objectness[:2], "rpn", batch.arrays)), InvalidInputError, "one finite score per box"),
            ((record, RegionBatch(batch.boxes, batch.objectness, "rpn", {"visual": batch.arrays["visual"]})), InvalidInputError, "pass exactly those"),
            ((record, RegionBatch(batch.boxes, batch.objectness, "rpn", {**batch.arrays, "visual": np.full((3, DIM), 1e6)})), InvalidInputError, "float16"),
        ]
        for item, error, message in cases:
            with pytest.raises(error, match=message):
                store.commit_images(run, [item])
        with pytest.raises(InvalidInputError, match="more than once"):
            store.commit_images(run, [(record, batch), (record, batch)])
        assert store.info().next_row == 0
        assert (tmp_path / "idx" / "features" / "visual.f16").stat().st_size == 0
        with pytest.raises(InvalidInputError, match="k=0"):
            store.search(np.ones((1, DIM)), k=0)
