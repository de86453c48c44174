"""Pasting stamps onto a background with exact visible masks.

A stamp's *mask* is its pixels with alpha >= 50 %; it is blended with its soft alpha. Objects are
pasted one after another; a position is accepted only if every earlier object keeps at least
``1 - max_occlusion`` of its own mask visible. ``labels[y, x]`` is 1 + the index of the object seen
at that pixel (0: background), so each object's visible mask and tight box come from it exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.synth.stamps.catalog import Stamp

__all__ = ["Cutout", "StampCache", "make_cutout", "Visible", "Canvas", "max_stamp_side"]

_ALPHA_CUT = 128


@dataclass(frozen=True)
class Cutout:
    """A stamp ready to paste: ``rgb`` uint8 ``[h, w, 3]``, ``alpha`` float32 ``[h, w]`` in [0, 1], ``mask`` bool ``[h, w]``."""

    rgb: np.ndarray
    alpha: np.ndarray
    mask: np.ndarray


class StampCache:
    """Each stamp decoded once, cropped to its opaque pixels and shrunk so that its long side is at most ``max_side``."""

    def __init__(self, max_side: int) -> None:
        self.max_side = max_side
        self._images: dict[str, Image.Image] = {}

    def get(self, stamp: Stamp) -> Image.Image:
        img = self._images.get(stamp.key)
        if img is None:
            with Image.open(stamp.path) as raw:
                img = raw.convert("RGBA")
            bbox = img.getchannel("A").point(lambda a: 255 if a >= _ALPHA_CUT else 0).getbbox()
            if bbox is not None:
                img = img.crop(bbox)
            if max(img.size) > self.max_side:
                img.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
            self._images[stamp.key] = img
        return img


def make_cutout(base: Image.Image, long_side: int, *, mirror: bool, contrast: float, brightness: float) -> Cutout:
    """``base`` (RGBA) scaled so its long side is ``long_side``, maybe mirrored, with contrast/brightness changed:
    ``v -> (v - 128) * contrast + 128 + brightness``."""
    w, h = base.size
    scale = long_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = base.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0) if size != base.size else base
    if mirror:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    v = np.arange(256, dtype=np.float64)
    lut = np.clip((v - 128.0) * contrast + 128.0 + brightness, 0, 255).astype(np.uint8)
    rgba = np.asarray(img)
    rgb = lut[rgba[..., :3]]
    a = rgba[..., 3]
    return Cutout(rgb=rgb, alpha=a.astype(np.float32) * np.float32(1.0 / 255.0), mask=a >= _ALPHA_CUT)


@dataclass(frozen=True)
class Visible:
    """The visible part of a pasted object: its tight ``box``, its ``mask`` inside that box, the fraction of its own mask seen."""

    box: tuple[int, int, int, int]
    mask: np.ndarray
    fraction: float


class Canvas:
    """A background being pasted on; tracks which object each pixel shows."""

    def __init__(self, background: np.ndarray) -> None:
        self.pixels = np.array(background, dtype=np.uint8, copy=True)
        self.height, self.width = self.pixels.shape[:2]
        self.labels = np.zeros((self.height, self.width), dtype=np.int16)
        self._boxes: list[tuple[int, int, int, int]] = []
        self._full: list[int] = []
        self._seen: list[int] = []

    def __len__(self) -> int:
        return len(self._boxes)

    def try_paste(self, cutout: Cutout, rng: np.random.Generator, *, max_occlusion: float, tries: int = 12) -> bool:
        """Paste ``cutout`` at the first of ``tries`` random positions where no earlier object would lose more
        than ``max_occlusion`` of its mask; ``False`` (nothing pasted) when there is none."""
        h, w = cutout.mask.shape
        full = int(cutout.mask.sum())
        if full == 0 or h > self.height or w > self.width:
            return False
        keep = np.asarray(self._full, dtype=np.float64) * (1.0 - max_occlusion)
        seen = np.asarray(self._seen, dtype=np.int64)
        for _ in range(tries):
            x = int(rng.integers(0, self.width - w + 1))
            y = int(rng.integers(0, self.height - h + 1))
            covered = np.bincount(self.labels[y : y + h, x : x + w][cutout.mask], minlength=len(self) + 1)[1:]
            if np.all(seen - covered >= keep):
                self._paste(cutout, x, y, full, covered)
                return True
        return False

    def _paste(self, cutout: Cutout, x: int, y: int, full: int, covered: np.ndarray) -> None:
        h, w = cutout.mask.shape
        region = self.pixels[y : y + h, x : x + w].astype(np.float32)
        a = cutout.alpha[..., None]
        self.pixels[y : y + h, x : x + w] = (region + (cutout.rgb.astype(np.float32) - region) * a + 0.5).astype(np.uint8)
        self.labels[y : y + h, x : x + w][cutout.mask] = len(self) + 1
        for j, c in enumerate(covered.tolist()):
            self._seen[j] -= c
        self._boxes.append((x, y, x + w, y + h))
        self._full.append(full)
        self._seen.append(full)

    def visible(self, k: int) -> Visible | None:
        """Object ``k``'s visible mask and tight box (``None`` when nothing of it is seen)."""
        x1, y1, x2, y2 = self._boxes[k]
        local = self.labels[y1:y2, x1:x2] == k + 1
        rows, cols = np.flatnonzero(local.any(axis=1)), np.flatnonzero(local.any(axis=0))
        if rows.size == 0:
            return None
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        box = (x1 + c0, y1 + r0, x1 + c1, y1 + r1)
        return Visible(box=box, mask=local[r0:r1, c0:c1], fraction=float(local.sum()) / max(self._full[k], 1))


def max_stamp_side(size: int, max_scale: float) -> int:
    """The long side the stamp cache keeps: the largest paste size."""
    return int(math.ceil(size * max_scale))
