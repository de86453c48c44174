"""Checksums recorded at commit and save, ``engine check`` and ``--repair``, and readers that refuse damaged
rows (reliability defect D8: same-size garbage in a feature file used to give exit 0 and NaN scores)."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.errors import IndexCorruptError
from indexer.db.session import downgrade_database, upgrade_database
from indexer.checksums import SEGMENT_ROWS, check_scores
from indexer.integrity import ReindexJob, check_index, repair_index
from indexer.store import ImageRecord, IndexStore, RegionBatch

DIM = 8
SHAPES = {"visual": (DIM,), "maps": (3, 2, 2)}
ROW_BYTES = {"visual": DIM * 2, "maps": 12 * 2}


# ----------------------------------------------------------------------------------------------
# store level: synthetic features, no models
# ----------------------------------------------------------------------------------------------
def _item(rng: np.random.Generator, name: str, n: int = 3) -> tuple[ImageRecord, RegionBatch]:
    record = ImageRecord(f"/corpus/{name}", f"{abs(hash(name)):064x}", 1000, 10**9, 64, 48)
    xy = rng.uniform(0, 30, (n, 2))
    arrays = {"visual": rng.standard_normal((n, DIM)), "maps": rng.standard_normal((n, 3, 2, 2))}
    return record, RegionBatch(boxes=np.hstack([xy, xy + 10]), objectness=rng.uniform(size=n), source="rpn", arrays=arrays)


def _build(path: Path, commits: int = 3, per_commit: int = 2) -> Path:
    """An index of ``commits`` commits of ``per_commit`` images with 3 regions each (6 rows per commit)."""
    rng = np.random.default_rng(0)
    with IndexStore.open(path, create=True, writable=True, array_shapes=SHAPES) as store:
        run = store.begin_run("/corpus", {})
        for c in range(commits):
            store.commit_images(run, [_item(rng, f"{c}-{i}.jpg") for i in range(per_commit)])
        store.save_vectors()
    return path


def _overwrite(index_dir: Path, array: str, first_row: int, data: bytes, generation: int = 0) -> None:
    name = f"{array}.f16" if generation == 0 else f"{array}.g{generation}.f16"
    with open(index_dir / "features" / name, "r+b") as handle:
        handle.seek(first_row * ROW_BYTES[array])
        handle.write(data)


def _no_reindex(store: IndexStore, job: ReindexJob) -> None:
    raise AssertionError(f"nothing should be re-extracted here, got {job}")


def test_commits_record_one_segment_per_array_and_check_is_clean(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    with sqlite3.connect(index / "engine.db") as con:
        segments = con.execute("SELECT array, generation, first_row, n_rows FROM feature_segments ORDER BY array, first_row").fetchall()
        files = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta WHERE key LIKE 'file:%'")}
    assert segments == [(a, 0, r, 6) for a in ("maps", "visual") for r in (0, 6, 12)]
    assert set(files) == {"file:vectors.faiss", "file:regions.npz"}
    assert files["file:vectors.faiss"]["size"] == (index / "vectors.faiss").stat().st_size
    report = check_index(index)
    assert report.clean and report.ok and not report.notes
    assert (report.segments_checked, report.committed_rows, report.unrecorded_rows, report.files_checked) == (6, 18, 0, 4)


@pytest.mark.parametrize("array", ["visual", "maps"])
def test_same_size_garbage_is_reported_with_its_file_and_rows(tmp_path: Path, array: str) -> None:
    index = _build(tmp_path / "idx")
    garbage = np.random.default_rng(1).standard_normal(ROW_BYTES[array] // 2).astype(np.float16).tobytes()  # finite
    _overwrite(index, array, 7, garbage)  # row 7: in the second commit's segment, rows 6-11
    report = check_index(index)
    assert not report.ok
    (part,) = report.damaged
    assert (part.kind, part.file, part.rows, len(part.image_ids)) == ("features", f"features/{array}.f16", (6, 12), 2)
    assert "checksum mismatch" in part.problem and "NaN" not in part.problem
    assert part.line().startswith(f"features/{array}.f16 rows 6-11: checksum mismatch")


@pytest.mark.slow  # the first import of engine.cli takes seconds on a loaded machine
def test_cli_check_prints_one_line_per_damaged_part_and_exits_1(tmp_path: Path) -> None:
    from engine.cli import main

    index = _build(tmp_path / "idx")
    runner = CliRunner()
    result = runner.invoke(main, ["check", "--index", str(index)])
    assert result.exit_code == 0 and result.output.strip().endswith("no damage"), result.output
    _overwrite(index, "visual", 13, b"\x3c" * ROW_BYTES["visual"])
    _overwrite(index, "maps", 1, b"\x00" * ROW_BYTES["maps"])
    result = runner.invoke(main, ["check", "--index", str(index)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines[:-1]] == ["features/maps.f16 rows 0-5", "features/visual.f16 rows 12-17"]
    assert "2 damaged part(s); repair with `engine check --index" in lines[-1]
    result = runner.invoke(main, ["check", "--index", str(index), "--json"])
    payload = json.loads(result.output)
    assert result.exit_code == 1 and not payload["ok"] and payload["repair"] is None
    assert [(d["file"], d["rows"], d["images"]) for d in payload["damaged"]] == [("features/maps.f16", [0, 6], 2), ("features/visual.f16", [12, 18], 2)]


def test_a_reader_meeting_nan_rows_raises_a_clear_error(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    _overwrite(index, "maps", 13, np.full(12, np.nan, np.float16).tobytes())
    with IndexStore.open(index) as store:
        store.read_arrays("maps", np.arange(13))  # rows before the damage read fine
        with pytest.raises(IndexCorruptError, match=rf"maps\.f16 holds NaN/inf values in 1 of the rows read \(rows 13\).*`engine check --index {index} --repair`"):
            store.read_arrays("maps", np.array([2, 13, 5]))
    (part,) = check_index(index).damaged
    assert part.rows == (12, 18) and "1 row(s) hold NaN/inf" in part.problem


def test_a_truncated_feature_file_is_a_clear_error_and_is_reported(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    path = index / "features" / "visual.f16"
    with open(path, "r+b") as handle:
        handle.truncate(10 * ROW_BYTES["visual"])
    with IndexStore.open(index) as store, pytest.raises(IndexCorruptError, match=r"holds 10 rows but the index refers to 18.*engine check --index"):
        store.read_arrays("visual", np.array([17]))
    (part,) = check_index(index).damaged
    assert (part.file, part.rows) == ("features/visual.f16", (6, 18))  # the segment the cut runs through, and the rest
    assert "holds 10 rows, the database refers to 18 rows" in part.problem


def test_repair_extends_a_truncated_file_and_re_extracts_the_images_of_its_missing_rows(tmp_path: Path) -> None:
    """Store level, with a stand-in for the pipeline: it commits each image's original features again."""
    from indexer.scan import content_hash

    rng = np.random.default_rng(3)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    items = {}
    for i in range(4):
        file = corpus / f"{i}.jpg"
        file.write_bytes(f"image {i}".encode())
        record, batch = _item(rng, file.name)
        items[str(file)] = (ImageRecord(str(file), content_hash(file), 7, 8, 64, 48), batch)
    index = tmp_path / "idx"
    with IndexStore.open(index, create=True, writable=True, array_shapes=SHAPES) as store:
        run = store.begin_run(str(corpus), {"proposals": "gt"})
        paths = sorted(items)
        store.commit_images(run, [items[p] for p in paths[:2]])
        store.commit_images(run, [items[p] for p in paths[2:]])  # rows 6-11
        store.save_vectors()
    with open(index / "features" / "maps.f16", "r+b") as handle:
        handle.truncate(8 * ROW_BYTES["maps"])
    (index / "features" / "visual.f16").unlink()
    jobs = []

    def reindex(store: IndexStore, job: ReindexJob) -> None:
        jobs.append(job)
        run = store.begin_run(str(job.corpus), job.models)
        store.commit_images(run, [items[str(p)] for p in job.paths])
        store.save_vectors()

    report = repair_index(index, reindex=reindex)
    assert {(p.file, p.rows) for p in report.damaged} == {("features/maps.f16", (6, 12)), ("features/visual.f16", (0, 12))}
    assert report.repair is not None and report.ok, report.repair
    assert sorted(report.repair.padded) == ["features/maps.f16", "features/visual.f16"]
    assert [(j.corpus, j.proposals, len(j.paths)) for j in jobs] == [(corpus, "gt", 4)]
    assert check_index(index).clean
    with IndexStore.open(index) as store:
        for path, (_, batch) in items.items():
            rows = np.asarray([r.row for r in store.regions_of_image(path)])
            assert rows.min() >= 12  # new rows; the padded NaN rows are dead
            np.testing.assert_array_equal(store.read_arrays("maps", rows), batch.arrays["maps"].astype(np.float16))


def test_damage_in_dead_rows_only_is_a_note(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    with IndexStore.open(index, writable=True) as store:
        store.delete_images(["/corpus/0-0.jpg", "/corpus/0-1.jpg"])  # rows 0-5 become dead
        store.save_vectors()
    _overwrite(index, "visual", 2, b"\x00" * ROW_BYTES["visual"])
    report = check_index(index)
    assert report.clean and report.ok
    assert any("visual.f16 rows 0-5" in note and "dead rows only" in note for note in report.notes)


def test_damaged_faiss_file_and_region_table_are_detected_and_rebuilt(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    with IndexStore.open(index) as store:
        query = store.read_arrays("visual", np.array([4])).astype(np.float32)
        before = store.search(query, k=18)
    for name, offset in (("vectors.faiss", -200), ("regions.npz", 700)):
        data = bytearray((index / name).read_bytes())
        data[offset : offset + 64] = bytes(range(64))  # same size, other bytes
        (index / name).write_bytes(bytes(data))
    report = check_index(index)
    assert {(p.kind, p.file) for p in report.damaged} == {("vectors", "vectors.faiss"), ("region-table", "regions.npz")}
    assert not report.ok

    repaired = repair_index(index, reindex=_no_reindex)
    assert repaired.repair is not None and repaired.ok
    assert sorted(repaired.repair.rebuilt) == ["regions.npz", "vectors.faiss"]
    assert check_index(index).clean
    with IndexStore.open(index) as store:
        after = store.search(query, k=18)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], atol=1e-6)


def test_a_faiss_header_that_still_parses_but_differs_from_its_record_is_damage(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    data = (index / "vectors.faiss").read_bytes()
    tampered = data.replace(b'"metric": "inner_product"', b'"metric": "inner_produkt"')
    assert len(tampered) == len(data) and tampered != data
    (index / "vectors.faiss").write_bytes(tampered)
    (part,) = check_index(index).damaged
    assert part.file == "vectors.faiss" and "size/checksum mismatch" in part.problem


def test_a_save_newer_than_its_record_is_not_damage(tmp_path: Path) -> None:
    """A writer killed between replacing the FAISS file and recording its checksum leaves a newer, healthy file."""
    index = _build(tmp_path / "idx")
    with sqlite3.connect(index / "engine.db") as con:
        record = json.loads(con.execute("SELECT value FROM meta WHERE key='file:vectors.faiss'").fetchone()[0])
        record.update(crc32=1, state=[record["state"][0] - 1, 0])
        con.execute("UPDATE meta SET value=? WHERE key='file:vectors.faiss'", (json.dumps(record),))
    report = check_index(index)
    assert report.clean
    assert any("vectors.faiss: saved after its checksum was recorded" in note for note in report.notes)


def test_nan_scores_from_faiss_are_refused(tmp_path: Path) -> None:
    check_scores(np.array([[0.5, -np.inf]], np.float32), np.array([[3, -1]]), tmp_path)  # a missing hit is fine
    with pytest.raises(IndexCorruptError, match=rf"returned NaN scores.*`engine check --index {tmp_path} --repair`"):
        check_scores(np.array([[np.nan, 0.2]], np.float32), np.array([[3, 4]]), tmp_path)


def test_compaction_records_the_new_generation_and_refuses_damaged_rows(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    with IndexStore.open(index, writable=True) as store:
        store.delete_images(["/corpus/1-0.jpg"])
        summary = store.compact()
    assert summary.compacted and summary.generation == 1
    with sqlite3.connect(index / "engine.db") as con:
        segments = con.execute("SELECT array, generation, first_row, n_rows FROM feature_segments ORDER BY array").fetchall()
    assert segments == [("maps", 1, 0, 15), ("visual", 1, 0, 15)]  # the old generation's are gone
    report = check_index(index)
    assert report.clean and (report.generation, report.segments_checked) == (1, 2)

    _overwrite(index, "maps", 3, np.zeros(12, np.float16).tobytes(), generation=1)
    with IndexStore.open(index, writable=True) as store:
        store.delete_images(["/corpus/2-0.jpg"])
        with pytest.raises(IndexCorruptError, match=r"features/maps\.g1\.f16 rows 0-14: checksum mismatch.*compaction would keep the damage"):
            store.compact()
    assert SEGMENT_ROWS >= 1024


# ----------------------------------------------------------------------------------------------
# migration: indexes from before the checksums
# ----------------------------------------------------------------------------------------------
def test_an_index_from_before_the_migration_upgrades_with_unrecorded_segments(tmp_path: Path) -> None:
    index = _build(tmp_path / "idx")
    db = index / "engine.db"
    downgrade_database(db, revision="0003_image_vectors")
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT name FROM sqlite_master WHERE name='feature_segments'").fetchone() is None
        regions = con.execute("SELECT id, row FROM regions ORDER BY id").fetchall()
    upgrade_database(db)
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM feature_segments").fetchone() == (0,)
        assert con.execute("SELECT id, row FROM regions ORDER BY id").fetchall() == regions
    report = check_index(index)
    assert report.clean and report.segments_checked == 0 and report.unrecorded_rows == 2 * 18  # unrecorded, not damaged

    _overwrite(index, "visual", 8, np.full(2 * DIM, np.inf, np.float16).tobytes())  # rows 8-9
    (part,) = check_index(index).damaged
    assert (part.file, part.rows) == ("features/visual.f16", (8, 10))
    assert "NaN/inf values (rows without a checksum" in part.problem

    with IndexStore.open(index, writable=True) as store:  # new commits are recorded again
        store.commit_images(store.begin_run("/corpus", {}), [_item(np.random.default_rng(5), "new.jpg")])
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT array, first_row, n_rows FROM feature_segments ORDER BY array").fetchall() == [("maps", 18, 3), ("visual", 18, 3)]


# ----------------------------------------------------------------------------------------------
# engine level: a real index of the tiny corpus, repair re-extracts from the image files
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def engine_index(tiny_engine, tmp_path: Path) -> Path:
    """A private copy of the session's tiny index (GT boxes; its images are the session's tiny corpus)."""
    tiny_engine.close()
    dst = tmp_path / "idx"
    shutil.copytree(tiny_engine.index_dir, dst)
    return dst


def _queries(engine, corpus: Path) -> list[list[tuple]]:  # noqa: ANN001 - engine.api.Engine
    """Visual whole-image queries and a text-only query: (image, box, score) of every hit (region ids change
    when an image is re-extracted)."""
    total = engine.info().regions
    runs = [engine.search(image=image, k=total) for image in sorted((corpus / "images").glob("*.jpg"))[::5]]
    runs.append(engine.search(text="a red circle", k=total))
    return [[(h.image, h.box, round(h.score, 5)) for h in hits] for hits in runs]


def _rows_of(index_dir: Path, image: Path) -> list[int]:
    with IndexStore.open(index_dir) as store:
        return sorted(r.row for r in store.regions_of_image(str(image.resolve())))


@pytest.mark.slow
def test_engine_check_finds_damaged_san_maps_refnms_and_repair_restores_the_results(engine_index: Path, tiny_corpus: Path) -> None:
    from engine.api import Engine
    from engine.cli import main
    from engine.config import EngineConfig

    engine = Engine(engine_index, config=EngineConfig(device="cpu"))  # one engine: its models load once
    before = _queries(engine, tiny_corpus)
    images = sorted((tiny_corpus / "images").glob("*.jpg"))
    with IndexStore.open(engine_index) as store:
        specs = store.array_specs
    damage = {"san": images[1], "maps": images[6], "refnms": images[12]}
    for array, image in damage.items():
        rows = _rows_of(engine_index, image)
        count = int(np.prod(specs[array].shape))
        nan = np.full(count, np.nan, np.float16).tobytes()
        garbage = np.random.default_rng(2).standard_normal(count).astype(np.float16).tobytes()
        with open(engine_index / "features" / f"{array}.f16", "r+b") as handle:
            handle.seek(rows[0] * specs[array].row_bytes)
            handle.write(nan + garbage)  # the image's first region NaN, its second finite garbage

    runner = CliRunner()
    result = runner.invoke(main, ["check", "--index", str(engine_index)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("damaged: ")]
    assert sorted(line.split(" ")[1] for line in lines) == ["features/maps.f16", "features/refnms.f16", "features/san.f16"]
    report = check_index(engine_index)
    for part in report.damaged:
        array = Path(part.file).stem
        rows = _rows_of(engine_index, damage[array])
        assert part.rows[0] <= rows[0] and rows[1] < part.rows[1]  # the segment holding the damaged rows
        assert "1 row(s) hold NaN/inf" in part.problem

    with pytest.raises(IndexCorruptError, match="engine check --index"):  # never NaN scores
        _queries(engine, tiny_corpus)

    payload = engine.check(repair=True).to_dict()  # what `engine check --repair --json` prints
    assert payload["ok"] and len(payload["damaged"]) == 3 and payload["repair"]["after"]["damaged"] == []
    assert {str(image.resolve()) for image in damage.values()} <= set(payload["repair"]["reindexed"])
    assert runner.invoke(main, ["check", "--index", str(engine_index)]).exit_code == 0
    assert _queries(engine, tiny_corpus) == before
    engine.close()


@pytest.mark.slow
def test_repair_reports_an_image_whose_file_changed_as_unrepairable(engine_index: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    from engine.api import Engine
    from engine.config import EngineConfig

    # the index refers to the session corpus: point one image at a private copy that then changes
    image = sorted((tiny_corpus / "images").glob("*.jpg"))[3].resolve()
    moved = tmp_path / "moved.jpg"
    shutil.copy(image, moved)
    with sqlite3.connect(engine_index / "engine.db") as con:
        con.execute("UPDATE images SET path=? WHERE path=?", (str(moved), str(image)))
    rows = _rows_of(engine_index, moved)
    with IndexStore.open(engine_index) as store:
        row_bytes = store.array_specs["visual"].row_bytes
    with open(engine_index / "features" / "visual.f16", "r+b") as handle:
        handle.seek(rows[0] * row_bytes)
        handle.write(b"\x01" * row_bytes)
    moved.write_bytes(moved.read_bytes() + b"changed")

    report = Engine(engine_index, config=EngineConfig(device="cpu")).check(repair=True)
    assert not report.ok and report.repair is not None
    unrepairable = dict(report.repair.unrepairable)
    assert "changed since it was indexed" in unrepairable[str(moved)]
    assert all(str(moved) != p for p in report.repair.reindexed)
