"""Box helpers on numpy arrays. Boxes are ``(x1, y1, x2, y2)`` in pixels everywhere inside the engine.

Torch code uses :mod:`torchvision.ops`; these helpers serve the data layer and metrics, which
must not need torch.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np

from engine.errors import InvalidBoxError

__all__ = ["Box", "as_boxes", "box_area", "box_iou", "parse_box", "validate_box", "clip_box"]

Box = tuple[float, float, float, float]


def as_boxes(boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Return ``boxes`` as a float64 array of shape ``[N, 4]`` (``N`` may be 0)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InvalidBoxError(f"boxes must have shape [N, 4], got {tuple(arr.shape)}")
    return arr


def box_area(boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Area of each box, shape ``[N]``; degenerate boxes have area 0."""
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: Sequence[Sequence[float]] | np.ndarray, b: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Pairwise IoU, shape ``[N, M]`` for ``a: [N, 4]`` and ``b: [M, 4]`` (xyxy). Empty unions give 0."""
    a, b = as_boxes(a), as_boxes(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def validate_box(box: Sequence[float], width: int | None = None, height: int | None = None, *, what: str = "box") -> Box:
    """Check that ``box`` is a finite, non-empty xyxy box inside a ``width`` x ``height`` image.

    ``box`` is any sequence (or iterable) of four numbers. Returns the box as a tuple of floats;
    raises :class:`InvalidBoxError` naming the problem (also for a string, a mapping or a value
    that is no sequence at all: use :func:`parse_box` for ``"x1,y1,x2,y2"`` text).
    """
    values = _box_values(box, what)
    if len(values) != 4:
        raise InvalidBoxError(f"{what} must have 4 numbers x1,y1,x2,y2, got {len(values)}: {_show(values)}")
    try:
        x1, y1, x2, y2 = (float(v) for v in values)
    except (TypeError, ValueError, OverflowError):
        raise InvalidBoxError(f"{what} must hold numbers, got {_show(values)}") from None
    if not all(np.isfinite(v) for v in (x1, y1, x2, y2)):
        raise InvalidBoxError(f"{what} {_show(values)} holds a non-finite number")
    if x2 <= x1 or y2 <= y1:
        raise InvalidBoxError(f"{what} {_fmt((x1, y1, x2, y2))} is empty: need x2 > x1 and y2 > y1")
    if width is not None and height is not None:
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise InvalidBoxError(
                f"{what} {_fmt((x1, y1, x2, y2))} lies outside the {width}x{height} image: "
                f"need 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height}"
            )
    return (x1, y1, x2, y2)


def _box_values(box: object, what: str) -> list[object]:
    """The elements of ``box`` as a list; strings, mappings, sets and non-iterables are refused."""
    if isinstance(box, (str, bytes, Mapping, AbstractSet)) or not isinstance(box, Iterable):
        raise InvalidBoxError(f"{what} must be 4 numbers x1,y1,x2,y2, got {type(box).__name__} {_show(box)}")
    return list(box)


def _show(value: object, limit: int = 80) -> str:
    """A short, one-line ``repr`` for messages (numpy scalars print as plain numbers)."""
    if isinstance(value, list):
        text = "[" + ", ".join(repr(v.item()) if isinstance(v, np.generic) else repr(v) for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_box(text: str, *, what: str = "region") -> Box:
    """Parse ``"x1,y1,x2,y2"`` into a box (not yet checked against an image size)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or any(p == "" for p in parts):
        raise InvalidBoxError(f"{what} {text!r} must be four comma-separated numbers x1,y1,x2,y2, e.g. 40,60,200,220")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InvalidBoxError(f"{what} {text!r} must be four comma-separated numbers x1,y1,x2,y2, e.g. 40,60,200,220") from None
    return validate_box(values, what=what)


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    """Clip a box to the image ``[0, width] x [0, height]``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))


def _fmt(box: Box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"
