"""Spatial relations between object boxes: the geometric definitions used for truth and for positives.

Boxes are pixel ``(x1, y1, x2, y2)``; ``c = ((x1 + x2) / 2, (y1 + y2) / 2)`` is a box centre.

* ``left_of(a, b)``:  ``c_b.x - c_a.x > |c_b.y - c_a.y|`` (a's centre in the 90° wedge left of b's);
  ``right_of(a, b) = left_of(b, a)``.
* ``above(a, b)``:    ``c_b.y - c_a.y > |c_b.x - c_a.x|``; ``below(a, b) = above(b, a)``.
* ``next_to(a, b)``:  the gap between the boxes, ``max(0, gap_x, gap_y)``, is at most
  ``NEXT_TO_GAP * max(width, height)`` (symmetric).
* ``between(a, b, c)``: a lies between b and c along one axis: ``left_of(b, a) and left_of(a, c)``,
  or ``left_of(c, a) and left_of(a, b)``, or the same with ``above``.

The generator describes only relations that hold *clearly* (:func:`relation_is_clear`: a wider
margin), so descriptions look right; truth and positives use :func:`relation_holds`.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "RELATIONS",
    "RELATION_ARITY",
    "CONVERSE",
    "NEXT_TO_GAP",
    "relation_holds",
    "relation_is_clear",
    "box_gap",
]

RELATION_ARITY: dict[str, int] = {
    "left_of": 2,
    "right_of": 2,
    "above": 2,
    "below": 2,
    "next_to": 2,
    "between": 3,
}
RELATIONS: tuple[str, ...] = tuple(RELATION_ARITY)
CONVERSE: dict[str, str] = {
    "left_of": "right_of",
    "right_of": "left_of",
    "above": "below",
    "below": "above",
    "next_to": "next_to",
}
#: ``next_to`` holds when the box gap is at most this fraction of the longer image side.
NEXT_TO_GAP = 0.1
_CLEAR_RATIO = 1.5  # a clear left/right/above/below needs the main offset >= 1.5x the cross offset
_CLEAR_NEXT_TO_GAP = 0.05

Box = Sequence[float]


def _centre(b: Box) -> tuple[float, float]:
    return (b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0


def box_gap(a: Box, b: Box) -> float:
    """Chebyshev gap between two boxes in pixels (0 when they touch or overlap)."""
    gx = max(a[0], b[0]) - min(a[2], b[2])
    gy = max(a[1], b[1]) - min(a[3], b[3])
    return max(0.0, gx, gy)


def _left(a: Box, b: Box) -> bool:
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return bx - ax > abs(by - ay)


def _above(a: Box, b: Box) -> bool:
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return by - ay > abs(bx - ax)


def relation_holds(relation: str, boxes: Sequence[Box], width: int, height: int) -> bool:
    """Whether ``relation(boxes[0], boxes[1][, boxes[2]])`` holds by the definitions above."""
    if relation == "left_of":
        return _left(boxes[0], boxes[1])
    if relation == "right_of":
        return _left(boxes[1], boxes[0])
    if relation == "above":
        return _above(boxes[0], boxes[1])
    if relation == "below":
        return _above(boxes[1], boxes[0])
    if relation == "next_to":
        return box_gap(boxes[0], boxes[1]) <= NEXT_TO_GAP * max(width, height)
    if relation == "between":
        a, b, c = boxes
        return (
            (_left(b, a) and _left(a, c))
            or (_left(c, a) and _left(a, b))
            or (_above(b, a) and _above(a, c))
            or (_above(c, a) and _above(a, b))
        )
    raise KeyError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")


def _clear_left(a: Box, b: Box) -> bool:
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return bx - ax >= _CLEAR_RATIO * abs(by - ay) and a[2] <= b[0]


def _clear_above(a: Box, b: Box) -> bool:
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return by - ay >= _CLEAR_RATIO * abs(bx - ax) and a[3] <= b[1]


def relation_is_clear(relation: str, boxes: Sequence[Box], width: int, height: int) -> bool:
    """Stricter version of :func:`relation_holds` used when choosing what to describe.

    Clear implies holds, so every generated description is true by the documented definitions.
    """
    if relation == "left_of":
        return _clear_left(boxes[0], boxes[1])
    if relation == "right_of":
        return _clear_left(boxes[1], boxes[0])
    if relation == "above":
        return _clear_above(boxes[0], boxes[1])
    if relation == "below":
        return _clear_above(boxes[1], boxes[0])
    if relation == "next_to":
        return box_gap(boxes[0], boxes[1]) <= _CLEAR_NEXT_TO_GAP * max(width, height)
    if relation == "between":
        a, b, c = boxes
        return (
            (_clear_left(b, a) and _clear_left(a, c))
            or (_clear_left(c, a) and _clear_left(a, b))
            or (_clear_above(b, a) and _clear_above(a, c))
            or (_clear_above(c, a) and _clear_above(a, b))
        )
    raise KeyError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
