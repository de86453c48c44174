"""Keeping one image from filling a result list with near-duplicate boxes: NMS per image."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import nms

__all__ = ["suppress_per_image"]


def suppress_per_image(boxes: np.ndarray, scores: np.ndarray, image_ids: np.ndarray, *, iou_threshold: float = 0.5) -> np.ndarray:
    """Indices of the hits to keep, best score first.

    Within one image, a box whose IoU with a better-scored box of the same image exceeds
    ``iou_threshold`` is dropped; boxes of different images never suppress each other.

    Args:
        boxes: ``[N, 4]`` xyxy pixels. scores: ``[N]``. image_ids: ``[N]`` integer image ids.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    # One NMS call with each image's boxes moved to a region of their own (the "coordinate trick"
    # of torchvision's batched_nms, which on the CPU switches to one call per image above 1000
    # boxes: 500 calls for a 2000-candidate shortlist, ~80 ms instead of ~5).
    b = np.asarray(boxes, np.float64)
    _, group = np.unique(np.asarray(image_ids, np.int64), return_inverse=True)
    span = float(b.max() - min(b.min(), 0.0)) + 1.0
    shifted = b + (group.reshape(-1) * span)[:, None]
    keep = nms(torch.as_tensor(shifted), torch.as_tensor(np.asarray(scores, np.float64)), iou_threshold)
    return keep.numpy()
