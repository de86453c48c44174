"""Stage 2 of a combined query: the text gates query and candidates (shipped GRN checkpoint)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.api import Engine
from engine.config import EngineConfig, IndexConfig
from engine.synth import SynthConfig, generate_corpus
from engine.evaluation.fusion import first_positive_rank
from engine.datasets.annotations import read_annotations, read_queries
from query.encode import VisualQueryEncoder, load_query_region
from query.grouping import suppress_per_image


@pytest.mark.parametrize("text_weight, image_weight", [(0.0, 1.0), (1.5, 1.0), (1.5, 0.5)])
def test_stage2_equals_exhaustive_scoring(tiny_engine: Engine, tiny_corpus: Path, text_weight: float, image_weight: float) -> None:
    """The shortlist is honest: the top 10 (every region a possible hit) equal exhaustive scoring of
    every indexed region by the brute-force formula ``image_weight · grn + text_weight · san`` (the GRN
    alone at text weight 0), and each hit's score and parts are that formula's."""
    from query.filters import HitFilter

    q = read_queries(tiny_corpus)[0]
    image = tiny_corpus / q.image
    engine = Engine(tiny_engine.index_dir, config=replace(tiny_engine.config, text_weight=text_weight, image_weight=image_weight, stage3=False))  # stage 2 only
    try:
        hits = engine.search(image=image, region=q.region, text=q.text, k=10, filters=HitFilter(max_per_image=0))
        store = engine._open_reader()
        rows = store.regions(store.all_region_ids().tolist())
        row_index = np.asarray([r.row for r in rows])
        query_map = VisualQueryEncoder(engine.extractor).encode(load_query_region(image, q.region)).query_map
        grn = np.asarray(engine.retrieval_model.score(query_map, q.text, store.read_arrays("maps", row_index)), np.float64)
        san = np.asarray(engine.san_encoder.model.score(q.text, store.read_arrays("san", row_index).astype(np.float32)), np.float64)
        scores = image_weight * grn + text_weight * san if text_weight else grn
    finally:
        engine.close()
    keep = suppress_per_image(np.asarray([r.box for r in rows]), scores, np.asarray([r.image_id for r in rows]))[:10]
    assert [h.region_id for h in hits] == [rows[i].id for i in keep]
    assert [h.score for h in hits] == pytest.approx([float(scores[i]) for i in keep], abs=1e-5)
    assert [h.scores["grn"] for h in hits] == pytest.approx([float(grn[i]) for i in keep], abs=1e-5)
    if text_weight:
        assert [h.scores["san"] for h in hits] == pytest.approx([float(san[i]) for i in keep], abs=1e-5)
    assert all(set(h.scores) == ({"visual", "grn", "san"} if text_weight else {"visual", "grn"}) for h in hits)


@pytest.fixture(scope="module")
def engine320(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Path]:
    """40 synthetic scenes at the training resolution (320 px), indexed with their GT boxes."""
    root = tmp_path_factory.mktemp("tp") / "corpus"
    generate_corpus(root, SynthConfig(images=40, seed=11, size=320))
    # san_gate=-1: every shapes-words text is read by the first-wave models (what these tests are about)
    engine = Engine(tmp_path_factory.mktemp("tpidx") / "idx", config=EngineConfig(device="cpu", san_gate=-1.0))
    engine.index(root, config=IndexConfig(proposals="gt"))
    yield engine, root
    engine.close()


@pytest.mark.slow
def test_same_region_two_texts_rank_the_matching_positives(engine320: tuple[Engine, Path]) -> None:
    """From the same query region, its own description finds its positives earlier than another description.

    For every benchmark query with positives in other images, compare the rank of the first positive
    found with the query's text against the rank with the text of a query of another meaning.
    """
    engine, root = engine320

    def elsewhere(q) -> set[int]:  # positives in other images (region ids are 1000 * image index + k)
        return {p for p in q.positives if p // 1000 != q.region_id // 1000}

    meaning = {}
    for line in (root / "queries.jsonl").read_text().splitlines():
        obj = json.loads(line)
        meaning[obj["region_id"]] = json.dumps(obj["meaning"], sort_keys=True)
    queries = [q for q in read_queries(root) if elsewhere(q)]
    boxes = {r.id: (ann.image, r.box) for ann in read_annotations(root) for r in ann.regions}
    wins = losses = 0
    for i, a in enumerate(queries):
        b = next(q for q in queries[i + 1 :] + queries[:i] if meaning[q.region_id] != meaning[a.region_id])
        image = root / a.image
        own = engine.search(image=image, region=a.region, text=a.text, k=100, exclude_self=True)
        other = engine.search(image=image, region=a.region, text=b.text, k=100, exclude_self=True)
        assert [h.region_id for h in own] != [h.region_id for h in other]
        rank_own, rank_other = first_positive_rank(own, elsewhere(a), boxes), first_positive_rank(other, elsewhere(a), boxes)
        wins += rank_own < rank_other
        losses += rank_own > rank_other
    assert len(queries) >= 10
    assert wins >= len(queries) / 2 and wins >= 3 * losses, (wins, losses, len(queries))


def test_unknown_words_do_not_crash_but_wordless_text_is_an_error(tiny_engine: Engine, tiny_corpus: Path) -> None:
    q = read_queries(tiny_corpus)[0]
    hits = tiny_engine.search(image=tiny_corpus / q.image, region=q.region, text="a zorblax quuxly thing", k=3)
    assert len(hits) == 3
    from engine.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        tiny_engine.search(image=tiny_corpus / q.image, region=q.region, text="?!", k=3)


def test_grn_fc_reads_the_pooled_array_and_scores_as_from_the_maps(tiny_engine: Engine, tiny_corpus: Path) -> None:
    """A non-spatial stage 2 (grn-fc) reads the 224-byte ``pooled`` rows, not the 7×7 maps, and scores
    the same (float16 rounding apart); the conv GRN keeps reading the maps."""
    from engine.models.checkpoint import checkpoint_path
    from indexer.region_features import mean_maps
    from query.rerank import GrnRescorer

    q = read_queries(tiny_corpus)[0]
    image = tiny_corpus / q.image
    engine = Engine(tiny_engine.index_dir, config=replace(tiny_engine.config, grn_checkpoint=checkpoint_path("grn-fc", default="grn"), stage3=False))
    try:
        store = engine._open_reader()
        assert store.has_array("pooled")
        rows = store.regions(store.all_region_ids().tolist())
        row_index = np.asarray([r.row for r in rows])
        maps = store.read_arrays("maps", row_index)
        np.testing.assert_allclose(store.read_arrays("pooled", row_index).astype(np.float32), mean_maps(maps).astype(np.float32), rtol=1e-3, atol=1e-3)
        model = engine.retrieval_model
        assert model.method == "grn-fc" and not model.spatial and tiny_engine.retrieval_model.spatial
        query_map = VisualQueryEncoder(engine.extractor).encode(load_query_region(image, q.region)).query_map
        read: list[str] = []
        original = store.read_arrays
        store.read_arrays = lambda name, r: read.append(name) or original(name, r)  # type: ignore[method-assign]
        try:
            scores = GrnRescorer(store=store, model=model, query_map=query_map, text=q.text)(row_index).grn
        finally:
            store.read_arrays = original  # type: ignore[method-assign]
        assert read == ["pooled"]
        np.testing.assert_allclose(scores, model.score(query_map, q.text, maps), atol=2e-3)
        hits = engine.search(image=image, region=q.region, text=q.text, k=5)
        assert len(hits) == 5 and hits[0].scores["grn"] == pytest.approx(float(scores[[r.id for r in rows].index(hits[0].region_id)]), abs=1e-5)
    finally:
        engine.close()


def test_the_default_stage2_model_is_chosen_by_index_size_on_the_cpu(tiny_engine: Engine) -> None:
    """No GRN configured: the conv ``grn`` under ``fc_from_regions`` regions, ``grn-fc`` from there on
    (CPU); a configured checkpoint always wins."""
    from engine.models.checkpoint import checkpoint_path

    regions = tiny_engine._open_reader().vector_count()
    assert tiny_engine.retrieval_model.method == "grn"  # the tiny index is far below the default 100,000
    for config, method in [
        (replace(tiny_engine.config, fc_from_regions=regions), "grn-fc"),
        (replace(tiny_engine.config, fc_from_regions=regions + 1), "grn"),
        (replace(tiny_engine.config, fc_from_regions=regions, grn_checkpoint=checkpoint_path("grn", default="grn")), "grn"),
    ]:
        with Engine(tiny_engine.index_dir, config=config) as engine:
            assert engine.retrieval_model.method == method
