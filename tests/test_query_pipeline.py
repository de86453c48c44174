"""The query pipeline (query/pipeline.py): typed values between its steps, one fusion formula, one GRN policy."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.datasets.annotations import read_queries
from engine.errors import InvalidInputError
from query.localize import best_images
from query.filters import HitFilter
from query.pipeline import EncodedQuery, PreparedQuery
from query.request import SearchRequest
from query.rerank import LayoutRescorer, StageScores, default_grn_checkpoint, fuse_scores


def test_fuse_scores_is_the_weighted_sum() -> None:
    grn, san = np.asarray([0.9, 0.5, 0.1], np.float32), np.asarray([0.0, 0.4, 0.8], np.float32)
    fused = fuse_scores(grn, san, image_weight=0.5, text_weight=2.0)
    assert fused.dtype == np.float32
    np.testing.assert_allclose(fused, 0.5 * grn + 2.0 * san, rtol=1e-6)
    assert StageScores(final=fused, grn=grn).parts().keys() == {"grn"}


class _Store:
    def __init__(self, *, maps: bool, regions: int) -> None:
        self.maps, self.regions = maps, regions

    def has_array(self, name: str) -> bool:
        return name != "maps" or self.maps

    def vector_count(self) -> int:
        return self.regions


def test_default_grn_policy() -> None:
    assert default_grn_checkpoint(None, on_gpu=False, fc_from_regions=10) is None  # no index yet: the conv GRN
    assert default_grn_checkpoint(_Store(maps=True, regions=5), on_gpu=False, fc_from_regions=10) is None
    assert default_grn_checkpoint(_Store(maps=True, regions=50), on_gpu=True, fc_from_regions=10) is None
    assert default_grn_checkpoint(_Store(maps=True, regions=50), on_gpu=False, fc_from_regions=10).stem == "grn-fc"
    assert default_grn_checkpoint(_Store(maps=False, regions=5), on_gpu=True, fc_from_regions=10).stem == "grn-fc"


def test_the_steps_hand_typed_values_down(tiny_engine, tiny_corpus: Path) -> None:  # noqa: ANN001
    from engine.api import Engine
    from query.rerank import FusedRescorer

    q = read_queries(tiny_corpus)[0]
    image = tiny_corpus / q.image
    with Engine(tiny_engine.index_dir, config=replace(tiny_engine.config, image_weight=0.5, text_weight=1.5)) as engine:
        pipeline = engine.pipeline
        assert engine.pipeline is pipeline  # built once
        visual = pipeline.prepare(SearchRequest(image=image, region=q.region, k=5))
        assert isinstance(visual, PreparedQuery) and isinstance(visual.query, EncodedQuery)
        assert isinstance(visual.rescore, LayoutRescorer) and visual.rescore.stored  # the index holds this head's embeddings
        assert visual.options.shortlist == engine.config.instance_shortlist and visual.rescore.keep == engine.config.layout_shortlist
        assert visual.query.visual and visual.query.query_map is not None and not pipeline.grounds(visual)
        combined = pipeline.prepare(SearchRequest(image=image, region=q.region, text=q.text, k=5, exclude_self=True))
        assert isinstance(combined.rescore, FusedRescorer) and combined.extra_ids and pipeline.grounds(combined)
        assert combined.options.exclude_self_hash == combined.query.content_hash
        rows = pipeline.store.all_regions().rows[:20]
        scores = combined.rescore(rows)
        assert isinstance(scores, StageScores) and scores.grn is not None and scores.san is not None
        np.testing.assert_allclose(scores.final, 0.5 * scores.grn + 1.5 * scores.san, rtol=1e-5, atol=1e-6)
        text = pipeline.prepare(SearchRequest(text=q.text, k=5))
        assert text.query.stage1 == "concept" and text.relevance is not None and text.san is not None and not pipeline.grounds(text)  # a MiniLM SAN joins the open vocabulary
        by_region = pipeline.prepare(SearchRequest(region_id=int(pipeline.store.all_region_ids()[0]), text=q.text))
        assert by_region.query.query_map is not None and pipeline.grounds(by_region)
        # Engine.search is the pipeline's run
        request = SearchRequest(image=image, region=q.region, text=q.text, k=5, exclude_self=True, filters=HitFilter(max_per_image=2))
        assert engine.search(image=image, region=q.region, text=q.text, k=5, exclude_self=True, filters=HitFilter(max_per_image=2)) == pipeline.run(request)
        ranked = pipeline.rank(combined, k=50)
        grounded = pipeline.ground(combined, ranked, 2)
        assert set(grounded) <= set(best_images(ranked, 2)) and grounded
        with pytest.raises(InvalidInputError, match="text"):
            pipeline.ground(visual, ranked, 2)
