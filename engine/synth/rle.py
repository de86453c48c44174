"""COCO uncompressed run-length encoding of binary masks.

``{"size": [h, w], "counts": [n0, n1, ...]}``: the mask is read in column-major (Fortran) order,
``counts`` alternate runs of 0s and 1s and always start with a run of 0s (possibly of length 0),
so ``sum(counts) == h * w``. This is what ``pycocotools.mask.frPyObjects`` accepts.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["rle_encode", "rle_encode_box", "rle_decode", "rle_area"]


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode a boolean ``[H, W]`` mask as COCO uncompressed RLE (column-major)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    flat = m.T.ravel()  # column-major order
    if flat.size == 0:
        return {"size": [h, w], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": [int(h), int(w)], "counts": counts}


def rle_encode_box(local: np.ndarray, x1: int, y1: int, height: int, width: int) -> dict[str, Any]:
    """:func:`rle_encode` of a ``height x width`` mask that is zero outside the box whose top-left corner is
    ``(x1, y1)`` and whose pixels are ``local`` (``[h, w]`` bool), without building the whole mask."""
    m = np.asarray(local, dtype=bool)
    bh, bw = m.shape
    if not (0 <= x1 and 0 <= y1 and x1 + bw <= width and y1 + bh <= height):
        raise ValueError(f"box at ({x1}, {y1}) of {bw}x{bh} is outside the {width}x{height} mask")
    strip = np.zeros((bw, height), dtype=bool)  # the box's columns, column-major
    strip[:, y1 : y1 + bh] = m.T
    flat = strip.ravel()
    lead, trail = x1 * height, (width - x1 - bw) * height
    if flat.size == 0 or not flat.any():
        return {"size": [int(height), int(width)], "counts": [int(height * width)]}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat[0]:
        counts.insert(0, 0)
    counts[0] += lead
    if flat[-1]:
        if trail:
            counts.append(trail)
    else:
        counts[-1] += trail
    return {"size": [int(height), int(width)], "counts": counts}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode COCO uncompressed RLE to a boolean ``[H, W]`` mask."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.zeros(counts.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected h*w = {h * w}")
    return flat.reshape(w, h).T


def rle_area(rle: Mapping[str, Any]) -> int:
    """Number of foreground pixels of an RLE mask (without decoding it)."""
    return int(sum(rle["counts"][1::2]))
