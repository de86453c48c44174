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
