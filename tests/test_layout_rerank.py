"""Stage 2 of a region-only query: the visual key's cosine plus the aligned 7×7 layout similarity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.api import Engine
from engine.config import INSTANCE_WEIGHT, LAYOUT_WEIGHT, EngineConfig
from engine.datasets.annotations import read_queries
from engine.errors import InvalidInputError
from indexer.store import INSTANCE_ARRAY, MAPS_ARRAY, VECTOR_ARRAY, IndexStore
from query.filters import HitFilter
from query.request import SearchRequest
from query.rerank import LayoutRescorer, layout_similarity


def _maps(seed: int, n: int = 1, c: int = 6, s: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, c, s, s)).astype(np.float32)


def test_layout_similarity_is_one_for_the_same_layout_and_lower_for_a_part() -> None:
    whole = _maps(0)[0]
    same_content_scaled = whole * 3.0  # per-cell cosine ignores each cell's magnitude
    part = np.roll(whole, 3, axis=2)  # the same content, moved: a box on another part of the object
    other = _maps(1)[0]
    sims = layout_similarity(whole, np.stack([whole, same_content_scaled, part, other]))
    assert sims.dtype == np.float32 and sims.shape == (4,)
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and sims[1] == pytest.approx(1.0, abs=1e-5)
    assert sims[2] < 0.5 and abs(sims[3]) < 0.3
    # the mean over cells of per-cell cosines, by hand for one cell pair
    q, m = whole.reshape(6, -1), other.reshape(6, -1)
    by_hand = np.mean([q[:, i] @ m[:, i] / (np.linalg.norm(q[:, i]) * np.linalg.norm(m[:, i])) for i in range(49)])
    assert sims[3] == pytest.approx(by_hand, abs=1e-5)
    with pytest.raises(InvalidInputError, match="same C, S"):
        layout_similarity(whole, _maps(2, c=5))


def _query(tiny_corpus: Path):  # noqa: ANN202
    q = read_queries(tiny_corpus)[0]
    return tiny_corpus / q.image, q.region


def test_region_only_search_reranks_by_visual_plus_weighted_layout(tiny_engine: Engine, tiny_corpus: Path) -> None:
    image, region = _query(tiny_corpus)
    hits = tiny_engine.search(image=image, region=region, k=8, filters=HitFilter(max_per_image=0))
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)  # the query region itself (indexed): a perfect match still scores 1
    assert hits and all(set(h.scores) == {"visual", "layout", "instance"} for h in hits)
    for h in hits:
        total = h.scores["visual"] + LAYOUT_WEIGHT * h.scores["layout"] + INSTANCE_WEIGHT * h.scores["instance"]
        assert h.score == pytest.approx(total / (1 + LAYOUT_WEIGHT + INSTANCE_WEIGHT), abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # the rescorer scores the stored rows as the hits show them
    encoded = tiny_engine.pipeline.encode(SearchRequest(image=image, region=region))
    with IndexStore.open(tiny_engine.index_dir) as store:
        regions = store.lookup_regions(np.asarray([h.region_id for h in hits], np.int64))
        scores = LayoutRescorer(store=store, vector=encoded.vector, query_map=encoded.query_map, weight=LAYOUT_WEIGHT)(regions.rows)
        vectors = store.read_arrays(VECTOR_ARRAY, regions.rows)
        maps = store.read_arrays(MAPS_ARRAY, regions.rows)
    np.testing.assert_allclose(scores.layout, layout_similarity(encoded.query_map, maps), atol=1e-6)
    np.testing.assert_allclose(scores.final, (vectors @ encoded.vector + LAYOUT_WEIGHT * scores.layout) / (1 + LAYOUT_WEIGHT), atol=1e-4)
    order = {int(i): j for j, i in enumerate(regions.ids)}
    assert [h.scores["layout"] for h in hits] == pytest.approx([float(scores.layout[order[h.region_id]]) for h in hits], abs=1e-5)


def test_layout_weight_zero_ranks_by_the_visual_key_alone(tiny_engine: Engine, tiny_corpus: Path) -> None:
    image, region = _query(tiny_corpus)
    with Engine(tiny_engine.index_dir, config=EngineConfig(device="cpu", layout_weight=0.0, instance_weight=0.0)) as plain:
        hits = plain.search(image=image, region=region, k=5)
    assert hits and all(h.scores == {} for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_instance_head_alone_still_reranks(tiny_engine: Engine, tiny_corpus: Path) -> None:
    """layout_weight 0 with the instance head on: the stage keeps the head's part (weight 0 for the layout)."""
    image, region = _query(tiny_corpus)
    with Engine(tiny_engine.index_dir, config=EngineConfig(device="cpu", layout_weight=0.0)) as engine:
        hits = engine.search(image=image, region=region, k=5)
    assert hits and all(set(h.scores) == {"visual", "layout", "instance"} for h in hits)
    for h in hits:
        assert h.score == pytest.approx((h.scores["visual"] + INSTANCE_WEIGHT * h.scores["instance"]) / (1 + INSTANCE_WEIGHT), abs=1e-4)


def test_index_stores_the_instance_heads_embeddings(tiny_engine: Engine) -> None:
    head = tiny_engine.instance_head
    with IndexStore.open(tiny_engine.index_dir) as store:
        assert store.has_array(INSTANCE_ARRAY) and store.models()["instance_head"] == head.version != "instance-head:unsaved"
        rows = store.all_regions().rows[:30]
        stored = store.read_arrays(INSTANCE_ARRAY, rows).astype(np.float32)
        computed = head.embed(store.read_arrays(MAPS_ARRAY, rows), store.read_arrays(VECTOR_ARRAY, rows))
    np.testing.assert_allclose(stored, computed, atol=2e-3)  # float16 storage of unit vectors
    with Engine(tiny_engine.index_dir.parent / "no-head", config=EngineConfig(device="cpu", instance_head=None)) as plain:
        assert INSTANCE_ARRAY not in plain._array_shapes()
    assert INSTANCE_ARRAY not in tiny_engine._array_shapes(maps=False)  # the head reads the maps: --no-maps leaves it out


def test_stored_embeddings_cascade_keeps_the_best_by_key_and_instance(tiny_engine: Engine, tiny_corpus: Path) -> None:
    image, region = _query(tiny_corpus)
    encoded = tiny_engine.pipeline.encode(SearchRequest(image=image, region=region))
    head = tiny_engine.instance_head
    with IndexStore.open(tiny_engine.index_dir) as store:
        rows = store.all_regions().rows[:40]
        kwargs = dict(store=store, vector=encoded.vector, query_map=encoded.query_map, weight=LAYOUT_WEIGHT, head=head, head_weight=INSTANCE_WEIGHT)
        full = LayoutRescorer(**kwargs)(rows)  # the head run on the stored maps
        stored = LayoutRescorer(**kwargs, stored=True)(rows)
        cascade = LayoutRescorer(**kwargs, stored=True, keep=10)(rows)
    np.testing.assert_allclose(stored.final, full.final, atol=2e-3)
    kept = np.isfinite(cascade.final)
    assert kept.sum() == 10
    pre = stored.visual + INSTANCE_WEIGHT * stored.instance
    assert pre[kept].min() >= pre[~kept].max() - 1e-6  # the best 10 by key and instance get the layout
    np.testing.assert_allclose(cascade.final[kept], stored.final[kept], atol=1e-6)


def test_a_cascading_query_shows_only_scored_hits(tiny_engine: Engine, tiny_corpus: Path) -> None:
    image, region = _query(tiny_corpus)
    with Engine(tiny_engine.index_dir, config=EngineConfig(device="cpu", layout_shortlist=3, instance_shortlist=50)) as engine:
        prepared = engine.pipeline.prepare(SearchRequest(image=image, region=region, k=10))
        hits = engine.search(image=image, region=region, k=10, filters=HitFilter(max_per_image=0))
    assert prepared.options.shortlist == 50 and prepared.rescore.keep == 3
    assert 0 < len(hits) <= 3 and all(np.isfinite(h.score) for h in hits)


def test_another_head_ignores_the_stored_embeddings_and_cannot_add_to_them(tiny_engine: Engine, tiny_corpus: Path, tmp_path: Path) -> None:
    from engine.errors import IndexVersionError
    from engine.models.instance_head import InstanceHead

    from engine.models.checkpoint import Manifest
    from engine.models.instance_head import MODEL_NAME, MODEL_VERSION

    other = InstanceHead(tiny_engine.instance_head.config)  # untrained: other weights
    path = tmp_path / "other-head.pt"
    other.save(path, Manifest(model=MODEL_NAME, version=MODEL_VERSION, config=other.config.to_dict(), command="test", data=[], seed=0, metrics={}))
    image, region = _query(tiny_corpus)
    with Engine(tiny_engine.index_dir, config=EngineConfig(device="cpu", instance_head=path)) as engine:
        prepared = engine.pipeline.prepare(SearchRequest(image=image, region=region, k=5))
        assert not prepared.rescore.stored and prepared.options.shortlist == engine.config.layout_shortlist  # computed from the maps
        with pytest.raises(IndexVersionError, match="holds instance embeddings of instance-head:"):
            engine._indexing_instance_head(engine.pipeline.store)


@pytest.mark.parametrize(("field", "value", "message"), [("layout_weight", -1.0, "--weight-layout must be a finite number"), ("layout_weight", float("nan"), "--weight-layout"), ("layout_shortlist", 0, "layout_shortlist must be a positive integer"), ("instance_shortlist", -3, "instance_shortlist must be a positive integer")])
def test_layout_settings_are_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        EngineConfig(**{field: value})
