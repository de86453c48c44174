"""Region proposals computed from pixels: selective search (opencv-contrib, fast mode).

Every indexed region records where its box came from, one of :data:`PROPOSAL_SOURCES`:
``"gt"`` (boxes given with the corpus), ``"selective-search"`` (:func:`selective_search`, the
fallback for corpora without annotations or a trained proposal network) and ``"rpn"`` (the
trained region proposal network, added later).
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np
import torch
from torchvision.ops import nms

from engine.errors import EngineError, InvalidInputError

__all__ = ["PROPOSAL_SOURCES", "selective_search"]

log = logging.getLogger(__name__)

PROPOSAL_SOURCES = ("gt", "selective-search", "rpn")
"""Names recorded with each region for where its box came from."""

_RANK_SEED = 0
_CONTRIB_FIX = (
    "selective search needs cv2.ximgproc from opencv-contrib; "
    "pip uninstall -y opencv-python opencv-python-headless && pip install opencv-contrib-python-headless"
)


def selective_search(
    image: np.ndarray,
    *,
    max_proposals: int = 100,
    nms_iou: float = 0.7,
    min_size: int = 8,
    max_side: int = 320,
) -> tuple[np.ndarray, np.ndarray]:
    """Class-agnostic object proposals by selective search (Uijlings et al. 2013, OpenCV fast mode).

    Args:
        image: ``uint8`` array ``[H, W, 3]``, RGB.
        max_proposals: keep at most this many boxes (the best ranked after NMS).
        nms_iou: boxes overlapping a better-ranked box with IoU above this are dropped.
        min_size: boxes narrower or lower than this many original pixels are dropped.
        max_side: the image is downscaled so that its longest side is at most this before the search
            (the cost grows quickly with size); boxes are scaled back to original pixels.

    Returns:
        ``(boxes, scores)``: ``boxes`` is ``float32 [N, 4]`` ``(x1, y1, x2, y2)`` in original pixels,
        inside the image; ``scores`` is ``float32 [N]`` in ``(0, 1]``, a rank-based objectness
        ``1 - rank / R`` where ``rank`` is the box's position in selective search's own ranking of
        its ``R`` boxes (before NMS); rows are sorted by decreasing score. ``N`` may be 0.

    The result is deterministic: OpenCV draws the random factor of its ranking from the C library's
    ``rand()``, which is seeded with a fixed value before each search (so concurrent searches in
    several threads of one process may still interleave). OpenCV's thread setting is left alone
    (the search gains little from threads); it takes about 0.4-0.5 s per search at ``max_side=320``
    on one of the project's CPU cores.
    """
    image = _check_image(image)
    if max_proposals < 1:
        raise InvalidInputError(f"max_proposals must be >= 1, got {max_proposals}")
    if not 0.0 < nms_iou <= 1.0:
        raise InvalidInputError(f"nms_iou must be in (0, 1], got {nms_iou}")
    if min_size < 0:
        raise InvalidInputError(f"min_size must be >= 0, got {min_size}")
    if max_side < 16:
        raise InvalidInputError(f"max_side must be >= 16, got {max_side}")
    cv2 = _opencv_contrib()

    height, width = image.shape[:2]
    longest = max(height, width)
    if longest > max_side:
        scale = max_side / longest
        small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)
    else:
        small = image
    bgr = np.ascontiguousarray(small[:, :, ::-1])

    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    search.switchToSelectiveSearchFast()
    _seed_c_rand(_RANK_SEED)
    rects = np.asarray(search.process(), dtype=np.float64).reshape(-1, 4)  # x, y, w, h in search pixels

    boxes = np.empty((len(rects), 4), dtype=np.float64)
    sx, sy = width / small.shape[1], height / small.shape[0]
    boxes[:, 0] = rects[:, 0] * sx
    boxes[:, 1] = rects[:, 1] * sy
    boxes[:, 2] = (rects[:, 0] + rects[:, 2]) * sx
    boxes[:, 3] = (rects[:, 1] + rects[:, 3]) * sy
    np.clip(boxes[:, [0, 2]], 0, width, out=boxes[:, [0, 2]])
    np.clip(boxes[:, [1, 3]], 0, height, out=boxes[:, [1, 3]])
    keep = ((boxes[:, 2] - boxes[:, 0]) >= max(min_size, 1e-6)) & ((boxes[:, 3] - boxes[:, 1]) >= max(min_size, 1e-6))
    boxes = boxes[keep]
    count = len(boxes)
    log.debug("selective search on %dx%d (searched at %dx%d): %d boxes, %d after min_size %d",
              width, height, small.shape[1], small.shape[0], len(rects), count, min_size)
    if count == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)

    scores = 1.0 - np.arange(count, dtype=np.float64) / count
    order = nms(torch.from_numpy(boxes), torch.from_numpy(scores), nms_iou).numpy()[:max_proposals]
    return boxes[order].astype(np.float32), scores[order].astype(np.float32)


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(f"selective_search needs a numpy array [H, W, 3] uint8 RGB, got {type(image).__name__}; use np.asarray(pil_image)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"selective_search needs an RGB array [H, W, 3], got shape {image.shape}; convert the image to RGB first")
    if image.dtype != np.uint8:
        raise InvalidInputError(f"selective_search needs a uint8 array, got {image.dtype}; convert with np.clip(x, 0, 255).astype(np.uint8)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidInputError(f"selective_search needs a non-empty image, got shape {image.shape}")
    return image


def _opencv_contrib():  # noqa: ANN202 - returns the cv2 module
    try:
        import cv2
    except ImportError:
        raise EngineError(_CONTRIB_FIX) from None
    if getattr(cv2, "ximgproc", None) is None:
        raise EngineError(_CONTRIB_FIX)
    return cv2


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's ``rand()``, which OpenCV's selective search uses to rank its boxes."""
    try:
        libc = ctypes.CDLL(None)
        libc.srand(ctypes.c_uint(seed))
    except (OSError, AttributeError, TypeError) as exc:
        log.warning("cannot seed the C library's rand() (%s); selective search box order may vary between runs", exc)
