"""The limited pool of region meanings that images share, and their one-change variants (hard negatives).

Positives only exist when several images show the same meaning, so every corpus draws a pool of
meanings from its seed and plants them into images with Zipf-like frequencies; a planted *variant*
changes one named attribute or flips the relation, so a near-miss of a pool meaning appears in
other images.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from engine.synth.meaning import canonical_key
from engine.synth.relations import CONVERSE
from engine.synth.vocabulary import COLORS, PATTERNS, SHAPES, SIZES

__all__ = ["MeaningPool", "random_named_attributes", "random_meaning", "make_variant"]

_VALUES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "pattern": PATTERNS}
_DIRECTIONAL = ("left_of", "right_of", "above", "below")


def _pick(rng: np.random.Generator, seq: tuple[str, ...]) -> str:
    return seq[int(rng.integers(len(seq)))]


def random_named_attributes(rng: np.random.Generator, attributes: dict[str, str] | None = None) -> dict[str, str]:
    """Which attributes a description names: always the shape, plus at least one of colour/size/pattern.

    With ``attributes`` (a real object's), the values are taken from it; otherwise they are drawn.
    """
    def value(attr: str) -> str:
        return attributes[attr] if attributes is not None else _pick(rng, _VALUES[attr])

    named = {"shape": value("shape")}
    extra = [a for a, p in (("color", 0.8), ("size", 0.35), ("pattern", 0.35)) if rng.random() < p]
    if not extra:
        extra = [("color", "size", "pattern")[int(rng.choice(3, p=[0.6, 0.2, 0.2]))]]
    for attr in ("size", "pattern", "color"):
        if attr in extra:
            named[attr] = value(attr)
    return named


def random_meaning(rng: np.random.Generator) -> dict[str, Any]:
    """A random meaning: 2 roles with a relation, an identical pair, or 3 roles with ``between``."""
    r = rng.random()
    if r < 0.15:
        role = random_named_attributes(rng)
        relation = "next_to" if rng.random() < 0.7 else _pick(rng, _DIRECTIONAL)
        return {"objects": [role, dict(role)], "relation": relation}
    if r < 0.30:
        return {"objects": [random_named_attributes(rng) for _ in range(3)], "relation": "between"}
    relation = ("left_of", "right_of", "above", "below", "next_to")[int(rng.choice(5, p=[0.22, 0.22, 0.22, 0.22, 0.12]))]
    return {"objects": [random_named_attributes(rng), random_named_attributes(rng)], "relation": relation}


def make_variant(rng: np.random.Generator, meaning: dict[str, Any]) -> dict[str, Any]:
    """``meaning`` with exactly one change: the relation flipped to its converse, or one named attribute value."""
    roles = [dict(r) for r in meaning["objects"]]
    relation = meaning["relation"]
    if relation in _DIRECTIONAL and roles[0] != roles[1] and rng.random() < 0.4:
        return {"objects": roles, "relation": CONVERSE[relation]}
    i = int(rng.integers(len(roles)))
    attrs = list(roles[i])
    # prefer changing colour (the classic "same pair, one colour changed"), then any named attribute
    attr = "color" if "color" in attrs and rng.random() < 0.6 else attrs[int(rng.integers(len(attrs)))]
    choices = tuple(v for v in _VALUES[attr] if v != roles[i][attr])
    roles[i][attr] = _pick(rng, choices)
    return {"objects": roles, "relation": relation}


class MeaningPool:
    """``size`` distinct meanings drawn from ``rng`` with Zipf-like weights ``1 / (k + 1) ** exponent``."""

    def __init__(self, rng: np.random.Generator, size: int, *, exponent: float = 0.6) -> None:
        meanings: list[dict[str, Any]] = []
        seen: set[str] = set()
        while len(meanings) < size:
            m = random_meaning(rng)
            key = canonical_key(m)
            if key not in seen:
                seen.add(key)
                meanings.append(m)
        self.meanings = meanings
        w = 1.0 / np.arange(1, size + 1) ** exponent
        self.weights = w / w.sum()

    def draw(self, rng: np.random.Generator) -> dict[str, Any]:
        """A pool meaning, drawn by weight (a fresh copy)."""
        m = self.meanings[int(rng.choice(len(self.meanings), p=self.weights))]
        return {"objects": [dict(r) for r in m["objects"]], "relation": m["relation"]}
