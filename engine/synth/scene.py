"""Scene layout: which objects an image holds and where they go, with limited overlap.

Planted groups (the objects of a pool meaning or its variant) are laid out first, in an
arrangement that makes their relation hold clearly; free objects then fill the image by rejection
sampling. Two boxes may overlap by at most ``max_overlap`` of the smaller one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.synth.relations import relation_is_clear
from engine.synth.vocabulary import COLORS, PATTERNS, SHAPES, SIZE_FRACTION, SIZES

__all__ = ["ObjectSpec", "Plant", "PlacedObject", "random_spec", "spec_for_role", "object_dims", "layout_scene"]

IntBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class ObjectSpec:
    """The four attributes of an object."""

    shape: str
    color: str
    size: str
    pattern: str

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "pattern": self.pattern}


@dataclass
class Plant:
    """A meaning planted into an image: its roles' objects must be laid out so the relation holds."""

    meaning: dict[str, Any]
    source: str  # "pool" or "variant"
    specs: list[ObjectSpec]
    placed: list[int] = field(default_factory=list)  # indices into the placed objects, in role order


@dataclass
class PlacedObject:
    spec: ObjectSpec
    box: IntBox  # the box the shape is drawn into (the final box is the tight box of visible pixels)


def _pick(rng: np.random.Generator, seq: tuple[str, ...], cumulative: tuple[float, ...] | None = None) -> str:
    """A uniform draw from ``seq``, or one by the cumulative weights ``cumulative`` (cheaper than ``rng.choice``)."""
    if cumulative is None:
        return seq[int(rng.integers(len(seq)))]
    u = rng.random()
    return seq[next((i for i, c in enumerate(cumulative) if u < c), len(seq) - 1)]


def random_spec(rng: np.random.Generator, *, size: str | None = None) -> ObjectSpec:
    """An object with random attributes (sizes skewed towards small, patterns towards solid)."""
    return ObjectSpec(
        shape=_pick(rng, SHAPES),
        color=_pick(rng, COLORS),
        size=size or _pick(rng, SIZES, (0.4, 0.75, 1.0)),
        pattern=_pick(rng, PATTERNS, (0.5, 0.75, 1.0)),
    )


def spec_for_role(rng: np.random.Generator, role: dict[str, str]) -> ObjectSpec:
    """An object whose named attributes are ``role``'s and the others random."""
    free = random_spec(rng)
    return ObjectSpec(
        shape=role.get("shape", free.shape),
        color=role.get("color", free.color),
        size=role.get("size", free.size),
        pattern=role.get("pattern", free.pattern),
    )


def object_dims(rng: np.random.Generator, spec: ObjectSpec, image_size: int) -> tuple[int, int]:
    """Width and height of the box an object is drawn into."""
    lo, hi = SIZE_FRACTION[spec.size]
    long_side = max(6, int(round(rng.uniform(lo, hi) * image_size)))
    short_side = max(6, int(round(long_side * rng.uniform(0.82, 1.0))))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _overlap_ok(box: IntBox, others: list[IntBox], max_overlap: float) -> bool:
    x1, y1, x2, y2 = box
    area = (x2 - x1) * (y2 - y1)
    for ox1, oy1, ox2, oy2 in others:
        iw = min(x2, ox2) - max(x1, ox1)
        ih = min(y2, oy2) - max(y1, oy1)
        if iw > 0 and ih > 0:
            if iw * ih > max_overlap * min(area, (ox2 - ox1) * (oy2 - oy1)):
                return False
    return True


def _arrange(rng: np.random.Generator, relation: str, dims: list[tuple[int, int]], size: int) -> list[IntBox] | None:
    """Boxes for a planted group so that ``relation`` (over the roles in order) holds clearly."""
    n = len(dims)
    if relation in ("left_of", "right_of", "above", "below"):
        axis = 0 if relation in ("left_of", "right_of") else 1
        order = [0, 1] if relation in ("left_of", "above") else [1, 0]
        gaps = [rng.uniform(0.02, 0.2) * size]
    elif relation == "next_to":
        axis = int(rng.integers(2))
        order = [0, 1] if rng.random() < 0.5 else [1, 0]
        gaps = [rng.uniform(0.0, 0.04) * size]
    elif relation == "between":
        axis = int(rng.integers(2))
        order = [1, 0, 2] if rng.random() < 0.5 else [2, 0, 1]
        gaps = list(rng.uniform(0.02, 0.1, size=2) * size)
    else:
        raise KeyError(relation)
    along = [dims[i][axis] for i in order]
    across = [dims[i][1 - axis] for i in order]
    total = sum(along) + sum(gaps)
    if total > size or max(across) > size:
        return None
    pos = rng.uniform(0, size - total)
    centre = rng.uniform(max(across) / 2, size - max(across) / 2)
    boxes: list[IntBox | None] = [None] * n
    for k, i in enumerate(order):
        jitter = rng.uniform(-0.12, 0.12) * min(across)
        a0 = int(round(pos))
        c0 = int(round(min(max(centre + jitter - across[k] / 2, 0), size - across[k])))
        if axis == 0:
            boxes[i] = (a0, c0, a0 + along[k], c0 + across[k])
        else:
            boxes[i] = (c0, a0, c0 + across[k], a0 + along[k])
        pos += along[k] + (gaps[k] if k < len(gaps) else 0.0)
    out = [b for b in boxes if b is not None]
    if any(b[0] < 0 or b[1] < 0 or b[2] > size or b[3] > size for b in out):
        return None
    if not relation_is_clear(relation, out, size, size):
        return None
    return out


def layout_scene(
    rng: np.random.Generator,
    size: int,
    plants: list[Plant],
    n_objects: int,
    *,
    min_objects: int,
    max_overlap: float,
    tries: int = 40,
) -> list[PlacedObject]:
    """Place the plants' objects, then free objects up to ``n_objects``; fills ``plant.placed``.

    A plant that cannot be laid out is dropped (its ``placed`` stays empty). At least
    ``min_objects`` objects are placed (falling back to small free objects).
    """
    placed: list[PlacedObject] = []
    for plant in plants:
        dims = [object_dims(rng, s, size) for s in plant.specs]
        for _ in range(tries):
            boxes = _arrange(rng, plant.meaning["relation"], dims, size)
            if boxes is not None and all(_overlap_ok(b, [p.box for p in placed], max_overlap) for b in boxes):
                plant.placed = list(range(len(placed), len(placed) + len(boxes)))
                placed.extend(PlacedObject(s, b) for s, b in zip(plant.specs, boxes))
                break
    attempts = 0
    while len(placed) < n_objects and attempts < tries * n_objects:
        attempts += 1
        spec = random_spec(rng, size="small" if attempts > tries * 2 and len(placed) < min_objects else None)
        w, h = object_dims(rng, spec, size)
        x1 = int(rng.integers(0, size - w + 1))
        y1 = int(rng.integers(0, size - h + 1))
        box = (x1, y1, x1 + w, y1 + h)
        if _overlap_ok(box, [p.box for p in placed], max_overlap):
            placed.append(PlacedObject(spec, box))
    return placed
