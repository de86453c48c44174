"""``engine remove`` / ``engine compact``: removal by path, re-indexing changed files, crash-safe compaction."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.api import Engine
from engine.cli import main
from engine.config import EngineConfig, IndexConfig
from engine.datasets.annotations import read_annotations
from engine.errors import InvalidInputError
from engine.synth import SynthConfig, generate_corpus
from indexer.faiss_store import read_header
from indexer.store import IndexStore

REPO = Path(__file__).resolve().parents[1]
SUB = ("000004.jpg", "000005.jpg")  # moved into images/sub/ so that a folder can be removed
TEXT = "a red circle"


def _make_corpus(root: Path) -> Path:
    """6 synthetic 128x128 scenes; two of them in ``images/sub/`` (annotations follow them)."""
    generate_corpus(root, SynthConfig(images=6, size=128, seed=3))
    (root / "images" / "sub").mkdir()
    for name in SUB:
        (root / "images" / name).rename(root / "images" / "sub" / name)
    lines = []
    for line in (root / "annotations.jsonl").read_text().splitlines():
        ann = json.loads(line)
        if Path(ann["image"]).name in SUB:
            ann["image"] = f"images/sub/{Path(ann['image']).name}"
        lines.append(json.dumps(ann))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _engine(index_dir: Path) -> Engine:
    return Engine(index_dir, config=EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, index) built once; tests work on copies of the index (see ``index``)."""
    base = tmp_path_factory.mktemp("remove")
    corpus = _make_corpus(base / "corpus")
    with _engine(base / "idx") as engine:
        engine.index(corpus, config=IndexConfig(proposals="gt"))
    return corpus, base / "idx"


@pytest.fixture()
def corpus(built: tuple[Path, Path]) -> Path:
    return built[0]


@pytest.fixture()
def index(built: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the built index (no writer runs, so copying the directory copies it)."""
    dst = tmp_path / "idx"
    shutil.copytree(built[1], dst)
    return dst


def _images(corpus: Path) -> list[Path]:
    return sorted(corpus.rglob("*.jpg"))


def _results(index_dir: Path, corpus: Path) -> list[list[tuple]]:
    """Whole-image queries and a text-only query over everything: (id, image, box, score)."""
    with _engine(index_dir) as engine:
        total = engine.info().regions
        runs = [engine.search(image=image, k=total) for image in _images(corpus)[::2]]
        runs.append(engine.search(text=TEXT, k=total))
    return [[(h.region_id, h.image, h.box, h.score) for h in hits] for hits in runs]


def _assert_same(a: list[list[tuple]], b: list[list[tuple]]) -> None:
    assert [[r[:3] for r in run] for run in a] == [[r[:3] for r in run] for run in b]
    for run_a, run_b in zip(a, b):
        assert [r[3] for r in run_a] == pytest.approx([r[3] for r in run_b], abs=1e-6)


def _features_by_region(index_dir: Path) -> dict[int, dict[str, np.ndarray]]:
    """Every live region's row of every feature array, keyed by region id."""
    with IndexStore.open(index_dir) as store:
        ids = store.all_region_ids()
        regions = store.regions(ids)
        rows = np.asarray([r.row for r in regions], np.int64)
        arrays = {name: store.read_arrays(name, rows) for name in store.array_specs}
    return {r.id: {name: a[i] for name, a in arrays.items()} for i, r in enumerate(regions)}


def _assert_same_features(a: dict[int, dict[str, np.ndarray]], b: dict[int, dict[str, np.ndarray]]) -> None:
    assert sorted(a) == sorted(b)
    for rid in a:
        for name in a[rid]:
            np.testing.assert_array_equal(a[rid][name], b[rid][name])


def _region_ids(index_dir: Path, image: Path) -> set[int]:
    with IndexStore.open(index_dir) as store:
        return {r.id for r in store.regions_of_image(str(image))}


def _feature_files(index_dir: Path) -> list[str]:
    return sorted(p.name for p in (index_dir / "features").iterdir())


# ----------------------------------------------------------------------------------------------
# remove
# ----------------------------------------------------------------------------------------------
def test_removed_image_is_never_returned(index: Path, corpus: Path) -> None:
    gone = _images(corpus)[0]
    own = _region_ids(index, gone)
    with _engine(index) as engine:
        before = engine.info()
        summary = engine.remove([gone])
        assert (summary.images, summary.errors, summary.paths) == (1, 0, (str(gone),))
        assert summary.regions == len(own) > 0
        after = engine.info()
        assert (after.images, after.regions) == (before.images - 1, before.regions - len(own))
        assert after.dead_rows == len(own) and after.dead_bytes > 0
        for image in _images(corpus):
            hits = engine.search(image=image, k=before.regions)
            assert hits and all(h.image != str(gone) and h.region_id not in own for h in hits)
        assert all(h.image != str(gone) for h in engine.search(text=TEXT, k=before.regions))
    for name in ("vectors.faiss", "vectors-san.faiss"):  # the saved files dropped them too
        assert read_header(index / name)["count"] == after.regions


def test_remove_a_folder(index: Path, corpus: Path) -> None:
    sub = corpus / "images" / "sub"
    with _engine(index) as engine:
        total = engine.info().regions
        summary = engine.remove([sub])
        assert summary.paths == tuple(str(sub / name) for name in SUB)
        assert summary.images == 2
        assert engine.info().images == 4
        hits = engine.search(image=sub / SUB[0], k=total)
        assert hits and all(not h.image.startswith(str(sub)) for h in hits)


def test_relative_and_unresolved_paths_match(index: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(corpus / "images")
    with _engine(index) as engine:
        summary = engine.remove([Path("sub") / ".." / "000001.jpg", "sub/"])
    assert summary.paths == (str(corpus / "images" / "000001.jpg"), *(str(corpus / "images" / "sub" / n) for n in SUB))


def test_unknown_path_is_a_clear_error_and_changes_nothing(index: Path, corpus: Path, tmp_path: Path) -> None:
    before = _results(index, corpus)
    with _engine(index) as engine:
        with pytest.raises(InvalidInputError, match=r"nowhere\.jpg is not in the index .*nothing was removed"):
            engine.remove([_images(corpus)[0], tmp_path / "nowhere.jpg"])
        with pytest.raises(InvalidInputError, match="no paths to remove"):
            engine.remove([])
        assert engine.info().images == 6
    _assert_same(_results(index, corpus), before)


def test_reindexing_a_changed_image_replaces_its_regions(corpus: Path, tmp_path: Path) -> None:
    own_corpus = tmp_path / "corpus"
    shutil.copytree(corpus, own_corpus)
    changed = own_corpus / "images" / "000002.jpg"
    original = tmp_path / "original.jpg"
    shutil.copy(changed, original)
    with _engine(tmp_path / "idx") as engine:
        engine.index(own_corpus, config=IndexConfig(proposals="gt"))
        total = engine.info().regions
        old = _region_ids(tmp_path / "idx", changed)
        box = next(a for a in read_annotations(own_corpus) if a.image.endswith(changed.name)).regions[0].box
        assert engine.search(image=original, region=box, k=1)[0].score == pytest.approx(1.0, abs=1e-3)
        with Image.open(changed) as im:
            Image.fromarray(255 - np.asarray(im.convert("RGB"))).save(changed)  # new pixels
        summary = engine.index(own_corpus, config=IndexConfig(proposals="gt"))
        assert (summary.processed, summary.unchanged) == (1, 5)
        info = engine.info()
        assert (info.images, info.regions, info.dead_rows) == (6, total, len(old))
        for query in (original, changed):
            hits = engine.search(image=query, k=total)
            assert not {h.region_id for h in hits} & old  # the old regions are gone
        new = _region_ids(tmp_path / "idx", changed)
        assert len(new) == len(old) and not new & old
        top = engine.search(image=changed, region=box, k=1)[0]  # the new ones are found
        assert top.image == str(changed) and top.region_id in new
        assert top.score == pytest.approx(1.0, abs=1e-3)
        assert engine.search(image=original, region=box, k=1)[0].score < 0.999


# ----------------------------------------------------------------------------------------------
# compact
# ----------------------------------------------------------------------------------------------
def test_compact_shrinks_files_and_keeps_results(index: Path, corpus: Path) -> None:
    with _engine(index) as engine:
        engine.remove([corpus / "images" / "sub", _images(corpus)[0]])
        dead, dead_bytes = engine.info().dead_rows, engine.info().dead_bytes
    before = _results(index, corpus)
    features = _features_by_region(index)
    with _engine(index) as engine:
        summary = engine.compact()
        assert summary.compacted and summary.generation == 1
        assert summary.dead_rows == dead > 0
        row_map = 8 * summary.rows_after  # previous-rows.g1.i64
        assert summary.feature_bytes_before - summary.feature_bytes_after == dead_bytes - row_map
        assert summary.bytes_after < summary.bytes_before
        info = engine.info()
        assert (info.dead_rows, info.dead_bytes, info.next_row) == (0, 0, info.regions)
    assert _feature_files(index) == ["concepts.g1.f16", "instance.g1.f16", "maps.g1.f16", "pooled.g1.f16", "previous-rows.g1.i64", "refnms.g1.f16", "san.g1.f16", "visual.g1.f16"]
    _assert_same(_results(index, corpus), before)
    _assert_same_features(_features_by_region(index), features)
    with _engine(index) as engine:  # nothing left to do
        again = engine.compact()
        assert not again.compacted and again.generation == 1 and again.bytes_after == again.bytes_before
        engine.index(corpus, config=IndexConfig(proposals="gt"))  # the removed images come back
        assert engine.info().images == 6
    assert len(_results(index, corpus)[0]) > len(before[0])


def _crash_points():  # type: ignore[no-untyped-def]
    """name -> (target, attribute, replacement): each makes one step of compaction raise."""
    import indexer.store as store_module
    from indexer.catalog import Catalog
    from indexer.feature_store import FeatureStore

    def raising_after(func):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            func(*args, **kwargs)
            raise KeyboardInterrupt("simulated interruption")

        return wrapper

    def raising(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("simulated disk error")

    cleanup = store_module.remove_stale_generations

    def cleanup_raising(layout, names, current: int):  # type: ignore[no-untyped-def]
        if current == 1:  # the cleanup after compaction, not the one when a writer opens
            raise OSError("simulated disk error")
        return cleanup(layout, names, current)

    return {
        "write_generation: before fsync": (FeatureStore, "flush", raising),
        "commit: before it": (Catalog, "commit_generation", raising),
        "commit: after it": (Catalog, "commit_generation", raising_after(Catalog.commit_generation)),
        "cleanup: before it": (store_module, "remove_stale_generations", cleanup_raising),
    }


@pytest.mark.parametrize("point", list(_crash_points()))
def test_interrupted_compaction_leaves_a_working_index(index: Path, corpus: Path, point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with _engine(index) as engine:
        engine.remove([_images(corpus)[1]])
    before = _results(index, corpus)
    features = _features_by_region(index)
    target, name, patch = _crash_points()[point]
    with _engine(index) as engine:
        monkeypatch.setattr(target, name, patch)
        with pytest.raises((OSError, KeyboardInterrupt)):
            engine.compact()
        monkeypatch.undo()
    _assert_same(_results(index, corpus), before)  # readers: everything answers as before
    _assert_same_features(_features_by_region(index), features)
    committed = point in ("commit: after it", "cleanup: before it")
    with IndexStore.open(index, writable=True) as store:  # the next writer removes the leftovers
        assert store.features.generation == (1 if committed else 0)
        assert (store.info().dead_rows == 0) == committed
    expected = ["concepts", "instance", "maps", "pooled", "refnms", "san", "visual"]
    if committed:
        expected = sorted([*(f"{n}.g1.f16" for n in expected), "previous-rows.g1.i64"])
    else:
        expected = [f"{n}.f16" for n in expected]
    assert _feature_files(index) == expected
    with _engine(index) as engine:  # and compaction completes on the next try
        assert engine.compact().generation == 1
    _assert_same(_results(index, corpus), before)
    _assert_same_features(_features_by_region(index), features)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def test_cli_remove_and_compact(index: Path, corpus: Path) -> None:
    runner = CliRunner()
    gone = _images(corpus)[0]
    result = runner.invoke(main, ["remove", str(gone), "--index", str(index)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("removed 1 images (") and "engine compact" in result.output
    info = json.loads(runner.invoke(main, ["info", "--index", str(index), "--json"]).output)
    assert info["dead_rows"] > 0 and info["dead_bytes"] > 0
    result = runner.invoke(main, ["remove", str(corpus / "images" / "sub"), "--index", str(index), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "images": 2, "errors": 0, "regions": json.loads(result.output)["regions"],
        "paths": [str(corpus / "images" / "sub" / n) for n in SUB],
    }
    result = runner.invoke(main, ["compact", "--index", str(index)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"compacted {index}: dropped ") and " -> " in result.output
    result = runner.invoke(main, ["compact", "--index", str(index), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["compacted"] is False and summary["bytes_before"] == summary["bytes_after"]
    info = json.loads(runner.invoke(main, ["info", "--index", str(index), "--json"]).output)
    assert (info["images"], info["dead_rows"], info["dead_bytes"]) == (3, 0, 0)


def test_cli_errors_are_one_line(index: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["remove", str(tmp_path / "nope.jpg"), "--index", str(index)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'nope.jpg'} is not in the index at {index.resolve()}: no image is indexed at "
        f"or under {tmp_path / 'nope.jpg'}; nothing was removed"
    ]
    result = runner.invoke(main, ["remove", "--index", str(index)])
    assert result.exit_code == 2 and "Missing argument" in result.output
    result = runner.invoke(main, ["compact", "--index", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no index at" in result.output
    with IndexStore.open(index, writable=True):  # a writer (e.g. `engine index`) holds the lock
        for args in (["compact"], ["remove", str(tmp_path)]):
            result = runner.invoke(main, [*args, "--index", str(index)])
            assert result.exit_code == 1 and "being written by another process" in result.output
            assert len(result.output.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# store level (fake features, no models): readers across a compaction, kill -9, renumbering
# ----------------------------------------------------------------------------------------------
DIM = 6
SHAPES = {"visual": (DIM,), "maps": (2, 2, 2)}


def _item(rng: np.random.Generator, name: str, n: int = 3):  # type: ignore[no-untyped-def]
    from indexer.store import ImageRecord, RegionBatch

    xy = rng.uniform(0, 20, (n, 2))
    arrays = {"visual": rng.standard_normal((n, DIM)), "maps": rng.standard_normal((n, 2, 2, 2))}
    return ImageRecord(f"/corpus/{name}", "e" * 64, 10, 20, 32, 32), RegionBatch(np.hstack([xy, xy + 5]), rng.uniform(size=n), "gt", arrays)


def _store_with_holes(index_dir: Path) -> IndexStore:
    """A writable store of 8 images whose images 0, 3, 4 and 7 were removed (dead rows at both ends)."""
    rng = np.random.default_rng(5)
    store = IndexStore.open(index_dir, create=True, writable=True, array_shapes=SHAPES)
    run = store.begin_run("/corpus", {})
    for i in range(0, 8, 2):
        store.commit_images(run, [_item(rng, f"{i}.jpg", 2 + i % 3), _item(rng, f"{i + 1}.jpg", 3)])
    store.save_vectors()
    assert store.delete_images([f"/corpus/{i}.jpg" for i in (0, 3, 4, 7)]).indexed == 4
    return store


def _snapshot(store: IndexStore) -> dict[int, tuple]:
    regions = store.regions(store.all_region_ids())
    rows = np.asarray([r.row for r in regions], np.int64)
    visual, maps = store.read_arrays("visual", rows), store.read_arrays("maps", rows)
    return {r.id: (r.image_path, r.box, visual[i].tobytes(), maps[i].tobytes()) for i, r in enumerate(regions)}


def _search(store: IndexStore) -> tuple[list, list]:
    query = np.linspace(-1, 1, DIM, dtype=np.float32)[None]
    scores, ids = store.search(query, 50)
    return ids[0].tolist(), scores[0].tolist()


def test_store_compaction_renumbers_rows_and_keeps_everything(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    with _store_with_holes(tmp_path / "idx") as store:
        before, found = _snapshot(store), _search(store)
        summary = store.compact()
        assert (summary.rows_before, summary.rows_after, summary.generation) == (23, 12, 1)
        assert sorted(r.row for r in store.regions(store.all_region_ids())) == list(range(12))
        assert _snapshot(store) == before and _search(store) == found
        record, batch = _item(rng, "new.jpg", 4)  # appends continue after the compacted rows
        store.commit_images(store.begin_run("/corpus", {}), [(record, batch)])
        assert [r.row for r in store.regions_of_image(record.path)] == [12, 13, 14, 15]
        store.delete_images(["/corpus/1.jpg"])
        after_second_round = _snapshot(store)
        assert store.compact().generation == 2
        assert _snapshot(store) == after_second_round
    assert _feature_files(tmp_path / "idx") == ["maps.g2.f16", "previous-rows.g2.i64", "visual.g2.f16"]
    with IndexStore.open(tmp_path / "idx") as reader:
        assert _snapshot(reader) == after_second_round and reader.info().dead_rows == 0


def test_a_reader_open_during_compaction_keeps_reading_the_right_rows(tmp_path: Path) -> None:
    writer = _store_with_holes(tmp_path / "idx")
    reader = IndexStore.open(tmp_path / "idx")
    expected, found = _snapshot(reader), _search(reader)
    ids = reader.all_region_ids()
    writer.compact()  # the reader's files are deleted under it; its descriptors keep them
    assert "visual.f16" not in _feature_files(tmp_path / "idx")
    # rows looked up after the commit but before the reader's next search are translated back
    regions = reader.regions(ids)
    assert reader.features.generation == 0 and max(r.row for r in regions) > 11
    assert _snapshot(reader) == expected
    assert _search(reader) == found  # a search moves it to the new generation
    assert reader.features.generation == 1 and _snapshot(reader) == expected
    writer.delete_images(["/corpus/1.jpg"])
    writer.compact()
    writer.commit_images(writer.begin_run("/corpus", {}), [_item(np.random.default_rng(1), "x.jpg")])
    current = _snapshot(writer)
    assert _snapshot(reader) == current  # rows added after the compaction: the reader switches
    assert reader.features.generation == 2
    writer.close()
    reader.close()


_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import indexer.store as store_module
    from indexer.catalog import Catalog
    from indexer.store import IndexStore
    point = {point!r}
    def crash(real):
        def wrapper(*args, **kwargs):
            real(*args, **kwargs)
            os._exit(9)  # like kill -9: no cleanup, no finally blocks
        return wrapper
    if point == "written":
        store_module.write_generation = crash(store_module.write_generation)
    else:
        Catalog.commit_generation = crash(Catalog.commit_generation)
    IndexStore.open({index!r}, writable=True).compact()
    """
)


@pytest.mark.parametrize("point", ["written", "committed"])
def test_kill_9_during_compaction(tmp_path: Path, point: str) -> None:
    index_dir = tmp_path / "idx"
    with _store_with_holes(index_dir) as store:
        store.save_vectors()
        expected, found = _snapshot(store), _search(store)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(tests=str(REPO / "tests"), index=str(index_dir), point=point)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == 9, child.stderr
    generation = 1 if point == "committed" else 0
    names = _feature_files(index_dir)
    assert "visual.g1.f16" in names and "visual.f16" in names  # both generations on disk
    with IndexStore.open(index_dir) as reader:  # a reader answers over everything
        assert reader.features.generation == generation
        assert _snapshot(reader) == expected and _search(reader) == found
    with IndexStore.open(index_dir, writable=True) as writer:  # the next writer cleans up
        assert _feature_files(index_dir) == (
            ["maps.g1.f16", "previous-rows.g1.i64", "visual.g1.f16"] if generation else ["maps.f16", "visual.f16"]
        )
        assert writer.compact().generation == 1
        assert _snapshot(writer) == expected and _search(writer) == found
