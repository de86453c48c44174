"""COCO uncompressed run-length encoding of binary masks.

``{"size": [h, w], "counts": [n0, n1, ...]}``: the mask is read in column-major (Fortran) order,
``counts`` alternate runs of 0s and 1s and always start with a run of 0s (possibly of length 0),
so ``sum(counts) == h * w``. This is what ``pycocotools.mask.frPyObjects`` accepts.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["rle_encode", "rle_decode", "rle_area"]


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
