"""Selective search proposals: recall of obvious objects, box validity, determinism, argument checks."""
from __future__ import annotations

import numpy as np
import pytest

from engine.boxes import box_iou
from engine.errors import EngineError, InvalidInputError
from indexer import proposals as proposals_module
from indexer.proposals import PROPOSAL_SOURCES, selective_search

_OBJECTS = np.array([[40, 30, 120, 100], [180, 140, 300, 220], [200, 50, 260, 90]], dtype=np.float64)
_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 220)]


def _scene(scale: int = 1) -> np.ndarray:
    """A 320 x 240 (times ``scale``) grey noise image with three solid rectangles (:data:`_OBJECTS`)."""
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 256, (240, 320, 3)) * 0.3 + 100).astype(np.uint8)
    for (x1, y1, x2, y2), colour in zip(_OBJECTS.astype(int), _COLOURS):
        image[y1:y2, x1:x2] = colour
    if scale > 1:
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    return image


@pytest.fixture(scope="module")
def scene_result() -> tuple[np.ndarray, np.ndarray]:
    return selective_search(_scene(), max_proposals=100)


def test_recalls_every_object(scene_result: tuple[np.ndarray, np.ndarray]) -> None:
    boxes, _ = scene_result
    best = box_iou(_OBJECTS, boxes).max(axis=1)
    assert (best > 0.5).all(), f"best IoU per object: {best}"


def test_boxes_scores_and_shapes(scene_result: tuple[np.ndarray, np.ndarray]) -> None:
    boxes, scores = scene_result
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and 0 < len(boxes) <= 100 and scores.shape == (len(boxes),)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 240).all()
    assert (boxes[:, 2] - boxes[:, 0] >= 8).all() and (boxes[:, 3] - boxes[:, 1] >= 8).all()
    assert ((scores > 0) & (scores <= 1)).all()
    assert (np.diff(scores) < 0).all()  # sorted, best first


def test_nms_removes_heavy_overlaps(scene_result: tuple[np.ndarray, np.ndarray]) -> None:
    boxes, _ = scene_result
    iou = box_iou(boxes, boxes)
    np.fill_diagonal(iou, 0)
    assert iou.max() <= 0.7 + 1e-6


def test_deterministic(scene_result: tuple[np.ndarray, np.ndarray]) -> None:
    boxes, scores = selective_search(_scene(), max_proposals=100)
    np.testing.assert_array_equal(boxes, scene_result[0])
    np.testing.assert_array_equal(scores, scene_result[1])


def test_large_image_is_searched_downscaled_and_boxes_scaled_back() -> None:
    boxes, _ = selective_search(_scene(scale=2), max_proposals=100, max_side=320)
    assert (boxes[:, 2] <= 640).all() and (boxes[:, 3] <= 480).all()
    best = box_iou(_OBJECTS * 2, boxes).max(axis=1)
    assert (best > 0.5).all(), f"best IoU per object: {best}"


def test_max_proposals_and_min_size() -> None:
    boxes, scores = selective_search(_scene(), max_proposals=5, min_size=30)
    assert len(boxes) == 5 and len(scores) == 5
    assert (boxes[:, 2] - boxes[:, 0] >= 30).all() and (boxes[:, 3] - boxes[:, 1] >= 30).all()


def test_tiny_image_gives_no_boxes_rather_than_failing() -> None:
    boxes, scores = selective_search(np.full((6, 6, 3), 128, np.uint8), min_size=8)
    assert boxes.shape == (0, 4) and scores.shape == (0,)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((10, 10), np.uint8), r"needs an RGB array \[H, W, 3\], got shape \(10, 10\)"),
        (np.zeros((10, 10, 4), np.uint8), r"got shape \(10, 10, 4\)"),
        (np.zeros((10, 10, 3), np.float32), "needs a uint8 array, got float32"),
        ([[0]], "needs a numpy array"),
    ],
)
def test_bad_image(image: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        selective_search(image)


def test_bad_arguments() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(InvalidInputError, match="max_proposals must be >= 1, got 0"):
        selective_search(image, max_proposals=0)
    with pytest.raises(InvalidInputError, match=r"nms_iou must be in \(0, 1\], got 1.5"):
        selective_search(image, nms_iou=1.5)


def test_missing_opencv_contrib(monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    monkeypatch.delattr(cv2, "ximgproc")
    with pytest.raises(EngineError, match="pip install opencv-contrib-python-headless"):
        selective_search(_scene())


def test_proposal_sources() -> None:
    assert PROPOSAL_SOURCES == ("gt", "selective-search", "rpn")
    assert proposals_module.__all__ == ["PROPOSAL_SOURCES", "selective_search"]
