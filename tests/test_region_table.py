"""The in-memory region table: lookups in the asked order, catch-up with a writer (new regions,
removals, pruned tombstones), and a full re-read after a compaction renumbered the feature rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.region_table import Regions, RegionTable
from indexer.store import ImageRecord, IndexStore, RegionBatch

DIM = 6
SHAPES = {"visual": (DIM,), "maps": (2, 2, 2)}


def _regions(ids: list[int]) -> Regions:
    n = len(ids)
    records = np.column_stack([ids, np.arange(n) + 100, np.asarray(ids) // 10, np.tile([1.0, 2.0, 3.0, 4.0], (n, 1)), np.asarray(ids) / 100.0])
    return Regions.from_records(records)


def test_lookup_keeps_the_asked_order_and_drops_unknown_ids() -> None:
    table = RegionTable(_regions([2, 5, 9, 14]), generation=0, region_seq=14, tomb_seq=0)
    found = table.lookup([14, -1, 2, 7, 99, 5])
    assert found.ids.tolist() == [14, 2, 5]
    assert found.rows.tolist() == [103, 100, 101] and found.image_ids.tolist() == [1, 0, 0]
    assert found.boxes.dtype == np.float32 and found.boxes.shape == (3, 4)
    np.testing.assert_allclose(found.scores, np.asarray([14, 2, 5]) / 100.0, rtol=1e-6)  # each region's proposal score travels with it
    assert len(table.lookup([])) == 0 and len(RegionTable(Regions.empty(), generation=0, region_seq=0, tomb_seq=0).lookup([1])) == 0


def test_updated_appends_newer_regions_and_drops_removed_ones() -> None:
    table = RegionTable(_regions([1, 2, 3]), generation=0, region_seq=3, tomb_seq=0)
    newer = table.updated(_regions([7, 8]), [2, 42], region_seq=8, tomb_seq=2)
    assert newer.regions.ids.tolist() == [1, 3, 7, 8] and (newer.region_seq, newer.tomb_seq) == (8, 2)
    assert table.regions.ids.tolist() == [1, 2, 3]  # the old table is left as it was
    with pytest.raises(ValueError, match="not newer"):
        table.updated(_regions([3]), [], region_seq=3, tomb_seq=0)


def _item(rng: np.random.Generator, name: str, n: int = 3) -> tuple[ImageRecord, RegionBatch]:
    xy = rng.uniform(0, 20, (n, 2))
    arrays = {"visual": rng.standard_normal((n, DIM)), "maps": rng.standard_normal((n, 2, 2, 2))}
    return ImageRecord(f"/corpus/{name}", name[0] * 64, 10, 20, 32, 32), RegionBatch(np.hstack([xy, xy + 5]), rng.uniform(size=n), "gt", arrays)


def _expected(store: IndexStore) -> dict[int, tuple]:
    """Every region by id from SQLite (the slow path): image id, box, and its visual features."""
    regions = store.regions(store.all_region_ids())
    visual = store.read_arrays("visual", np.asarray([r.row for r in regions], np.int64))
    return {r.id: (r.image_id, tuple(np.float32(v) for v in r.box), np.float32(r.objectness), visual[i].tobytes()) for i, r in enumerate(regions)}


def _from_table(store: IndexStore) -> dict[int, tuple]:
    table = store.all_regions()
    visual = store.read_arrays("visual", table.rows)  # rows are valid in the generation open after the call
    return {int(i): (int(img), tuple(box), score, visual[j].tobytes()) for j, (i, img, box, score) in enumerate(zip(table.ids, table.image_ids, table.boxes, table.scores))}


def test_a_reader_table_follows_commits_removals_pruning_and_compaction(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    writer = IndexStore.open(tmp_path / "idx", create=True, writable=True, array_shapes=SHAPES)
    run = writer.begin_run("/corpus", {})
    writer.commit_images(run, [_item(rng, f"{i}.jpg") for i in range(4)])
    with IndexStore.open(tmp_path / "idx") as reader:
        assert _from_table(reader) == _expected(writer) and len(reader.all_regions()) == 12
        writer.commit_images(run, [_item(rng, "new.jpg", 2)])
        writer.delete_images(["/corpus/1.jpg"])
        assert _from_table(reader) == _expected(writer) and len(reader.all_regions()) == 11
        writer.delete_images(["/corpus/2.jpg"])
        writer.save_vectors()  # prunes tombstones the reader never saw: it reads the table again
        writer.commit_images(run, [_item(rng, "later.jpg", 1)])
        assert _from_table(reader) == _expected(writer) and len(reader.all_regions()) == 9
        before = _expected(writer)
        assert writer.compact().generation == 1  # rows renumbered
        assert _from_table(reader) == before and reader.features.generation == 1
        assert sorted(reader.all_regions().rows.tolist()) == list(range(9))
        gone = reader.regions_of_image("/corpus/0.jpg")
        assert len(reader.lookup_regions([r.id for r in gone])) == 3
        writer.delete_images(["/corpus/0.jpg"])
        assert len(reader.lookup_regions([r.id for r in gone])) == 0
    writer.close()


def test_self_exclusion_finds_every_copy_of_a_picture(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    with IndexStore.open(tmp_path / "idx", create=True, writable=True, array_shapes=SHAPES) as store:
        store.commit_images(store.begin_run("/corpus", {}), [_item(rng, "a1.jpg"), _item(rng, "a2.jpg"), _item(rng, "b.jpg")])
        copies = store.image_ids_with_hash("a" * 64)
        assert sorted(r.image_path for r in store.regions(store.all_region_ids()) if r.image_id in set(copies.tolist())) == ["/corpus/a1.jpg"] * 3 + ["/corpus/a2.jpg"] * 3
        assert store.image_ids_with_hash("f" * 64).shape == (0,)


def test_readers_load_the_saved_table_and_fall_back_to_the_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import indexer.table_sync as table_sync

    rng = np.random.default_rng(5)
    writer = IndexStore.open(tmp_path / "idx", create=True, writable=True, array_shapes=SHAPES)
    run = writer.begin_run("/corpus", {})
    writer.commit_images(run, [_item(rng, f"{i}.jpg") for i in range(3)])
    writer.save_vectors()
    saved = writer.layout.region_table_path
    assert saved.is_file()
    writer.commit_images(run, [_item(rng, "after.jpg", 2)])  # not in the saved file: caught up from SQLite
    expected = _expected(writer)
    full_reads: list[int] = []
    real = table_sync.read_regions
    monkeypatch.setattr(table_sync, "read_regions", lambda cursor, after_id=0: full_reads.append(after_id) or real(cursor, after_id))

    def read_table() -> dict[int, tuple]:
        with IndexStore.open(tmp_path / "idx") as reader:
            return _from_table(reader)

    assert read_table() == expected and full_reads == [9]  # loaded the file, read only the regions after it
    full_reads.clear()
    saved.write_bytes(saved.read_bytes()[:100])  # a torn file (cannot happen with atomic writes, but a disk can lie)
    with caplog.at_level("WARNING"):
        assert read_table() == expected and full_reads == [0]
    assert "unreadable" in caplog.text
    writer.delete_images(["/corpus/0.jpg"])
    assert writer.compact().generation == 1  # saves the table of the new generation
    full_reads.clear()
    expected = _expected(writer)
    assert read_table() == expected and full_reads == []
    writer.close()
