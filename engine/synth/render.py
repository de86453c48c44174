"""Drawing one object: its shape mask (Pillow ImageDraw) and its coloured, patterned pixels (numpy).

Everything works on the object's own box, so the cost is proportional to the object, not the image.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from engine.synth.vocabulary import COLOR_RGB

__all__ = ["shape_mask", "object_pixels", "paint_object"]

_MAX_TILT = {  # degrees of random rotation per shape (squares must not become diamonds)
    "circle": 0.0,
    "square": 8.0,
    "triangle": 15.0,
    "star": 25.0,
    "pentagon": 20.0,
    "hexagon": 20.0,
    "diamond": 8.0,
    "cross": 10.0,
    "heart": 12.0,
    "crescent": 0.0,
}


def _regular(n: int, phase: float = -math.pi / 2, radius: float = 1.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart(n: int = 40) -> list[tuple[float, float]]:
    out = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        out.append((x / 16.0, -y / 16.0))
    return out


_CROSS_ARM = 0.34
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": _regular(3),
    "star": _star(),
    "pentagon": _regular(5),
    "hexagon": _regular(6, phase=0.0),
    "diamond": [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)],
    "cross": [
        (-_CROSS_ARM, -1), (_CROSS_ARM, -1), (_CROSS_ARM, -_CROSS_ARM), (1, -_CROSS_ARM), (1, _CROSS_ARM),
        (_CROSS_ARM, _CROSS_ARM), (_CROSS_ARM, 1), (-_CROSS_ARM, 1), (-_CROSS_ARM, _CROSS_ARM),
        (-1, _CROSS_ARM), (-1, -_CROSS_ARM), (-_CROSS_ARM, -_CROSS_ARM),
    ],
    "heart": _heart(),
}


def shape_mask(shape: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``[height, width]`` mask of ``shape`` filling a ``width x height`` box (randomly tilted)."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    tilt = math.radians(rng.uniform(-1.0, 1.0) * _MAX_TILT[shape])
    if shape == "circle":
        draw.ellipse((0, 0, width - 1, height - 1), fill=255)
    elif shape == "crescent":
        draw.ellipse((0, 0, width - 1, height - 1), fill=255)
        angle = rng.uniform(0, 2 * math.pi)
        dx, dy = 0.38 * width * math.cos(angle), 0.38 * height * math.sin(angle)
        draw.ellipse((dx, dy, width - 1 + dx, height - 1 + dy), fill=0)
    else:
        pts = np.asarray(_POLYGONS[shape], dtype=np.float64)
        c, s = math.cos(tilt), math.sin(tilt)
        pts = pts @ np.array([[c, s], [-s, c]])
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        pts = (pts - lo) / np.maximum(hi - lo, 1e-9) * np.array([width - 1, height - 1])
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(img) > 0


def _shade(rgb: np.ndarray) -> np.ndarray:
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb + (255 - rgb) * 0.5 if luma < 90 else rgb * 0.5


def object_pixels(color: str, pattern: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """``uint8 [height, width, 3]`` fill for an object: its colour, pattern (in a shade of it) and light."""
    base = np.asarray(COLOR_RGB[color], dtype=np.float32) + rng.uniform(-12, 12, size=3).astype(np.float32)
    base = np.clip(base, 0, 255)
    xs = np.arange(width, dtype=np.float32)[None, :]
    ys = np.arange(height, dtype=np.float32)[:, None]
    theta = rng.uniform(0, math.pi)
    ramp = xs * np.float32(math.cos(theta)) + ys * np.float32(math.sin(theta))
    light = 0.9 + 0.2 * (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    side = min(width, height)
    if pattern == "striped":
        period = max(4.0, rng.uniform(0.18, 0.3) * side)
        second = (ramp % period) < period * 0.5
    elif pattern == "dotted":
        period = max(5.0, rng.uniform(0.2, 0.28) * side)
        radius = period * 0.3
        ox, oy = rng.uniform(0, period, size=2)
        dx = (xs + np.float32(ox)) % period - period / 2
        dy = (ys + np.float32(oy)) % period - period / 2
        second = dx * dx + dy * dy < radius * radius
    else:
        second = None
    pix = base * light[..., None] if second is None else np.where(second[..., None], _shade(base), base) * light[..., None]
    return np.clip(pix, 0, 255).astype(np.uint8)


def paint_object(
    canvas: np.ndarray,
    labels: np.ndarray,
    label: int,
    box: tuple[int, int, int, int],
    mask: np.ndarray,
    pixels: np.ndarray,
) -> None:
    """Paint ``pixels`` where ``mask`` is set into ``canvas`` at ``box`` and mark them ``label`` in ``labels``."""
    x1, y1, x2, y2 = box
    np.copyto(canvas[y1:y2, x1:x2], pixels, where=mask[..., None])
    np.copyto(labels[y1:y2, x1:x2], label, where=mask)
