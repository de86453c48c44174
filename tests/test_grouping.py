"""Per-image duplicate suppression (query/grouping.py) against torchvision's batched_nms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from query.grouping import suppress_per_image


@pytest.mark.parametrize("n, images", [(1, 1), (40, 3), (2500, 600)])  # 2500 boxes: batched_nms's per-image path
def test_suppression_matches_batched_nms(n: int, images: int) -> None:
    rng = np.random.default_rng(n)
    xy = rng.uniform(0, 600, (n, 2))
    wh = rng.uniform(5, 300, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.standard_normal(n).astype(np.float32)
    image_ids = rng.integers(10**6, 10**6 + images, n)
    want = batched_nms(torch.as_tensor(boxes), torch.as_tensor(scores), torch.as_tensor(image_ids), 0.5).numpy()
    got = suppress_per_image(boxes, scores, image_ids, iou_threshold=0.5)
    np.testing.assert_array_equal(got, want)
    assert list(scores[got]) == sorted(scores[got], reverse=True)


def test_boxes_of_different_images_never_suppress_each_other() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], np.float32)
    keep = suppress_per_image(boxes, np.array([0.9, 0.8, 0.7], np.float32), np.array([1, 2, 1]))
    assert keep.tolist() == [0, 1]
    assert suppress_per_image(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)).size == 0


class _Rows:
    """A stand-in for the store's SQLite side: image rows of region ids (image i lives at /img/i.jpg)."""

    def __init__(self, image_ids: np.ndarray, boxes: np.ndarray) -> None:
        self.image_ids, self.boxes, self.calls = image_ids, boxes, []

    def regions(self, ids):  # noqa: ANN001, ANN201
        from indexer.store import RegionRow

        self.calls.append(len(ids))
        return [RegionRow(int(i), int(self.image_ids[i]), f"/img/{self.image_ids[i]}.jpg", f"h{self.image_ids[i]}", tuple(map(float, self.boxes[i])), 1.0, "rpn", int(i), 640, 480) for i in ids]


@pytest.mark.parametrize("k, filters", [(10, None), (25, "max1"), (5, "glob")])
def test_ranked_hits_over_the_best_candidates_equal_suppressing_them_all(k: int, filters: str | None) -> None:
    from indexer.region_table import Regions
    from query.filters import HitFilter
    from query.rerank import StageScores
    from query.search import Candidates, SearchOptions, ranked_hits

    rng = np.random.default_rng(k)
    n = 2000
    xy = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 120, (n, 2))], axis=1).astype(np.float32)
    image_ids = rng.integers(0, 40, n)
    final = rng.standard_normal(n).astype(np.float32)
    found = Regions(np.arange(n), np.arange(n), image_ids, boxes, np.ones(n, np.float32))
    hit_filter = {"max1": HitFilter(max_per_image=1), "glob": HitFilter(path_glob="/img/3?.jpg", max_per_image=0), None: HitFilter(max_per_image=0)}[filters]
    rows = _Rows(image_ids, boxes)
    got = ranked_hits(rows, Candidates(found, final), StageScores(final=final), SearchOptions(k=k, filters=hit_filter))[:k]
    everything = suppress_per_image(boxes, final, image_ids, iou_threshold=0.5)
    want = [int(i) for i in everything if hit_filter.matches(f"/img/{image_ids[i]}.jpg")]
    if filters == "max1":
        seen: set[int] = set()
        want = [i for i in want if not (image_ids[i] in seen or seen.add(image_ids[i]))]
    assert [h.region_id for h in got] == want[:k]
    assert max(rows.calls) < n or filters == "glob"  # paths were read for a head of the candidates, not all
