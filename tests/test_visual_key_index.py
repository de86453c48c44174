"""The visual key an index records (``meta.visual_key``, migration 0005) and the refusal of an index
built with another key: one IndexVersionError line, for search and for indexing, never mixed dims."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.api import Engine
from engine.cli import main
from engine.config import EngineConfig, IndexConfig
from engine.errors import IndexVersionError
from engine.datasets.annotations import read_annotations
from indexer.component_configs import BackboneConfig, RegionFeatureConfig, visual_key_version
from indexer.db.session import downgrade_database
from indexer.store import IndexStore

OLD_KEY = "efficientnet_lite0/640:c4:mean:roi7:s2"
OLD_FEATURES = "efficientnet_lite0@imagenet-tf+roi_align:c4:7x7:s2:max640"
CURRENT_KEY = visual_key_version(BackboneConfig(), RegionFeatureConfig())  # c4+c5, whitened by the shipped key-whitening


def _config() -> EngineConfig:
    return EngineConfig(device="cpu", san=False, stage3=False)


@pytest.fixture(scope="module")
def small_corpus(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three images of the tiny corpus with their annotations."""
    root = tmp_path_factory.mktemp("vkey") / "corpus"
    root.mkdir()
    keep = read_annotations(tiny_corpus)[:3]
    for ann in keep:
        (root / ann.image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_corpus / ann.image, root / ann.image)
    lines = (tiny_corpus / "annotations.jsonl").read_text().splitlines()
    wanted = {a.image for a in keep}
    (root / "annotations.jsonl").write_text("\n".join(line for line in lines if json.loads(line).get("image") in wanted) + "\n")
    return root


@pytest.fixture(scope="module")
def built(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    index_dir = tmp_path_factory.mktemp("vkey-index") / "idx"
    with Engine(index_dir, config=_config()) as engine:
        engine.index(small_corpus, config=IndexConfig(proposals="gt"))
    return index_dir


def _meta(index_dir: Path, key: str) -> object:
    with sqlite3.connect(index_dir / "engine.db") as con:
        row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def _copy(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "idx"
    shutil.copytree(built, dst)
    return dst


def _query(corpus: Path) -> tuple[Path, list[float]]:
    ann = read_annotations(corpus)[0]
    return corpus / ann.image, list(ann.regions[0].box)


def test_a_new_index_records_its_key_and_searches(built: Path, small_corpus: Path) -> None:
    with Engine(built, config=_config()) as engine:
        assert _meta(built, "visual_key") == engine.visual_key == CURRENT_KEY
        assert engine.info().dims["visual"] == (432,) and engine.info().dims["maps"] == (112, 7, 7)
        image, box = _query(small_corpus)
        hits = engine.search(image=image, region=box, k=2)
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    with IndexStore.open(built) as store:
        assert store.visual_key == CURRENT_KEY
        assert "+key:c4+c5:mean" in store.models()["region_features"]


def _expected(index_dir: Path, stored: str) -> str:
    return (
        f"index {index_dir.resolve()} was built with visual key {stored}; this engine uses "
        f"{CURRENT_KEY}: re-index into a new directory (engine index CORPUS --index NEW)"
    )


def test_an_index_with_the_old_key_is_refused_for_search_and_indexing(built: Path, small_corpus: Path, tmp_path: Path) -> None:
    index_dir = _copy(built, tmp_path)
    with sqlite3.connect(index_dir / "engine.db") as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'visual_key'", (json.dumps(OLD_KEY),))
    image, box = _query(small_corpus)
    with Engine(index_dir, config=_config()) as engine:
        with pytest.raises(IndexVersionError) as search_error:
            engine.search(image=image, region=box, k=2)
        assert str(search_error.value) == _expected(index_dir, OLD_KEY)
        with pytest.raises(IndexVersionError) as index_error:
            engine.index(small_corpus, config=IndexConfig(proposals="gt"))
        assert str(index_error.value) == _expected(index_dir, OLD_KEY)
    assert _meta(index_dir, "visual_key") == OLD_KEY  # nothing written
    # the command line: one line, no traceback
    result = CliRunner().invoke(main, ["query", "--index", str(index_dir), "--image", str(image), "--region", ",".join(f"{v:g}" for v in box), "--device", "cpu"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output and _expected(index_dir, OLD_KEY) in result.output
    # tools that read no query vectors still open it
    with IndexStore.open(index_dir) as store:
        assert store.visual_key == OLD_KEY


def test_an_index_from_before_the_key_was_recorded_gets_its_old_key_from_the_runs(built: Path, small_corpus: Path, tmp_path: Path) -> None:
    """An index at revision 0004 (what the engine wrote before): migration 0005 records the key its last
    run's region features imply, the c4 mean, and the engine refuses it."""
    index_dir = _copy(built, tmp_path)
    db = index_dir / "engine.db"
    downgrade_database(db, revision="0004_feature_segments")
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT 1 FROM meta WHERE key = 'visual_key'").fetchone() is None
        for run_id, models in con.execute("SELECT id, models FROM index_runs").fetchall():
            m = json.loads(models)
            m["region_features"] = OLD_FEATURES
            con.execute("UPDATE index_runs SET models = ? WHERE id = ?", (json.dumps(m), run_id))
    image, box = _query(small_corpus)
    with Engine(index_dir, config=_config()) as engine, pytest.raises(IndexVersionError) as err:
        engine.search(image=image, region=box, k=2)
    assert str(err.value) == _expected(index_dir, OLD_KEY)
    assert _meta(index_dir, "visual_key") == OLD_KEY


def test_an_index_without_runs_to_read_is_unrecorded(built: Path, tmp_path: Path) -> None:
    index_dir = _copy(built, tmp_path)
    db = index_dir / "engine.db"
    downgrade_database(db, revision="0004_feature_segments")
    with sqlite3.connect(db) as con:
        con.execute("UPDATE index_runs SET models = '{}'")
    with pytest.raises(IndexVersionError, match=r"built with visual key unrecorded \(built before visual key versions\); this engine uses"):
        IndexStore.open(index_dir, visual_key=CURRENT_KEY)


def test_migration_reads_both_version_formats() -> None:
    import importlib

    m = importlib.import_module("migrations.versions.0005_visual_key")
    assert m.key_of_run(OLD_FEATURES) == OLD_KEY
    assert m.key_of_run(OLD_FEATURES + "+key:c4+c5:gem") == "efficientnet_lite0/640:c4+c5:gem:roi7:s2"
    assert m.key_of_run("resnet18@torchvision-imagenet-x+roi_align:c4:7x7:s2:max512") == "resnet18/512:c4:mean:roi7:s2"
    assert m.key_of_run(None) == m.key_of_run("something else") == m.UNRECORDED


def test_an_index_built_with_another_key_config_is_refused(small_corpus: Path, tmp_path: Path) -> None:
    """Built with the old recipe (the c4 mean, 112-d) by configuration: the default engine refuses it."""
    from indexer.component_configs import RegionFeatureConfig

    index_dir = tmp_path / "old"
    one = tmp_path / "one"
    one.mkdir()
    ann = read_annotations(small_corpus)[0]
    (one / ann.image).parent.mkdir(parents=True)
    shutil.copy(small_corpus / ann.image, one / ann.image)
    lines = [line for line in (small_corpus / "annotations.jsonl").read_text().splitlines() if json.loads(line).get("image") == ann.image]
    (one / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    old = EngineConfig(device="cpu", san=False, stage3=False, instance_head=None, features=RegionFeatureConfig(key_levels=("c4",), key_whitening=None))
    with Engine(index_dir, config=old) as engine:
        engine.index(one, config=IndexConfig(proposals="gt"))
        assert engine.info().dims["visual"] == (112,)
        hits = engine.search(image=one / ann.image, region=list(ann.regions[0].box), k=1)
        assert np.isclose(hits[0].score, 1.0, atol=1e-3)
    assert _meta(index_dir, "visual_key") == OLD_KEY
    with Engine(index_dir, config=_config()) as engine, pytest.raises(IndexVersionError) as err:
        engine.index(one, config=IndexConfig(proposals="gt"))
    assert str(err.value) == _expected(index_dir, OLD_KEY)
