"""An index built without the 7×7 maps (``engine index --no-maps``): what it stores, that stage 2 uses
grn-fc on the pooled means, that stage 3 recomputes the maps of the images it grounds from their files
(and skips an image whose file changed), and a clear error for the conv GRN."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.api import Engine
from engine.cli import main
from engine.config import EngineConfig, IndexConfig
from engine.datasets.annotations import read_queries
from engine.errors import IndexVersionError
from engine.models.checkpoint import checkpoint_path
from indexer.store import IndexStore


@pytest.fixture(scope="module")
def no_maps_index(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    index_dir = tmp_path_factory.mktemp("no-maps") / "idx"
    with Engine(index_dir, config=EngineConfig(device="cpu")) as engine:
        engine.index(tiny_corpus, config=IndexConfig(proposals="gt", maps=False))
    return index_dir


def _query(tiny_corpus: Path):  # noqa: ANN202
    q = read_queries(tiny_corpus)[0]
    return tiny_corpus / q.image, q.region, q.text


def _feature_bytes(index_dir: Path) -> int:
    return sum(p.stat().st_size for p in (index_dir / "features").iterdir())


def test_the_index_keeps_no_maps_and_is_seven_times_smaller(no_maps_index: Path, tiny_engine: Engine) -> None:
    with IndexStore.open(no_maps_index) as store, IndexStore.open(tiny_engine.index_dir) as full:
        assert "maps" not in store.array_specs and {"visual", "pooled", "san"} <= set(store.array_specs)
        assert store.info().regions == full.info().regions > 0
        ids = store.all_region_ids()
        np.testing.assert_array_equal(store.read_arrays("pooled", store.all_regions().rows), full.read_arrays("pooled", full.lookup_regions(ids).rows))
    assert not (no_maps_index / "features" / "maps.f16").exists()
    # 10,976 bytes of maps a region against 864 of the 432-d visual key + 224 pooled + SAN + Ref-NMS (~7.9x;
    # ~12x with the old 112-d key)
    assert _feature_bytes(no_maps_index) * 7 < _feature_bytes(tiny_engine.index_dir)


def test_stage_2_and_3_answer_as_an_index_with_maps_does(no_maps_index: Path, tiny_engine: Engine, tiny_corpus: Path) -> None:
    image, region, text = _query(tiny_corpus)
    fc = checkpoint_path("grn-fc", default="grn")
    with Engine(no_maps_index, config=EngineConfig(device="cpu")) as engine, Engine(tiny_engine.index_dir, config=replace(tiny_engine.config, grn_checkpoint=fc)) as full:
        hits = engine.search(image=image, region=region, text=text, k=8)
        assert engine.retrieval_model.method == "grn-fc"  # the default on an index without maps
        expected = full.search(image=image, region=region, text=text, k=8)
        assert [h.region_id for h in hits] == [h.region_id for h in expected]
        assert any("grounding" in h.scores for h in hits)  # stage 3 ran, on maps computed from the files
        for got, want in zip(hits, expected):
            assert got.scores.keys() == want.scores.keys()
            np.testing.assert_allclose([got.scores[k] for k in want.scores], [want.scores[k] for k in want.scores], atol=2e-3)
        more = engine.search(region_id=hits[0].region_id, text=text, k=5)  # "more like this": its pooled features
        assert [h.region_id for h in more] == [h.region_id for h in full.search(region_id=hits[0].region_id, text=text, k=5)]
        # a region-only query has no maps to compare layouts with here: the visual key alone ranks it
        visual = engine.search(image=image, region=region, k=5)
        assert visual and all(h.scores == {} for h in visual)
        assert all("layout" in h.scores for h in full.search(image=image, region=region, k=5))


def test_the_conv_grn_gets_a_clear_error(no_maps_index: Path, tiny_corpus: Path) -> None:
    image, region, text = _query(tiny_corpus)
    config = EngineConfig(device="cpu", grn_checkpoint=checkpoint_path("grn", default="grn"), stage3=False)
    with Engine(no_maps_index, config=config) as engine:
        with pytest.raises(IndexVersionError, match="without the 7x7 region maps .*--no-maps"):
            engine.search(image=image, region=region, text=text, k=5)
        assert engine.search(image=image, region=region, k=5)  # visual-only queries need no GRN


def test_stage_3_skips_an_image_whose_file_changed(corpus_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    index_dir = tmp_path / "idx"
    # san_gate=-1: the query stays on the first-wave path (with stage 3) even when its own image is one of those replaced
    with Engine(index_dir, config=EngineConfig(device="cpu", san_gate=-1.0)) as engine:
        engine.index(corpus_copy, config=IndexConfig(proposals="gt", maps=False))
        image, region, text = _query(corpus_copy)
        before = engine.search(image=image, region=region, text=text, k=5)
        grounded = {h.image for h in before if "grounding" in h.scores}
        assert grounded
        for path in grounded:  # another picture under the same name, not re-indexed
            Image.new("RGB", Image.open(path).size, (30, 60, 90)).save(path)
        with caplog.at_level("WARNING"):
            after = engine.search(image=image, region=region, text=text, k=5)
        assert after and "file is gone or changed" in caplog.text
        assert not {h.image for h in after if "grounding" in h.scores} & grounded


def test_cli_index_no_maps(tiny_corpus: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    result = CliRunner().invoke(main, ["index", str(corpus), "--index", str(tmp_path / "idx"), "--proposals", "gt", "--no-maps", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["processed"] == 16
    with IndexStore.open(tmp_path / "idx") as store:
        assert "maps" not in store.array_specs
