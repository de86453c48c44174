"""Keeping one image from filling a result list with near-duplicate boxes: NMS per image."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms

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
    keep = batched_nms(
        torch.as_tensor(np.asarray(boxes, np.float32)),
        torch.as_tensor(np.asarray(scores, np.float32)),
        torch.as_tensor(np.asarray(image_ids, np.int64)),
        iou_threshold,
    )
    return keep.numpy()
