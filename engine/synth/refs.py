"""Choosing what a referring expression says so that it picks out exactly its target in the image.

An expression names some attributes of the target (always its shape) and optionally a relation
to one context object described by some of its attributes. Its *selection* is the set of objects
``x`` that match the target attributes and, when a relation is given, have some other object
``y`` matching the context attributes with ``relation(x, y)``; it must be exactly ``{target}``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.synth.meaning import attributes_match
from engine.synth.relations import relation_holds, relation_is_clear

__all__ = ["RefChoice", "choose_reference", "selection"]

_REF_RELATIONS = ("left_of", "right_of", "above", "below", "next_to")
_SUBSETS: tuple[tuple[str, ...], ...] = (
    (),
    ("color",),
    ("size",),
    ("pattern",),
    ("size", "color"),
    ("pattern", "color"),
    ("size", "pattern"),
    ("size", "pattern", "color"),
)


@dataclass(frozen=True)
class RefChoice:
    """What an expression for object ``target`` (an index) says; ``meaning()`` is its JSON form."""

    target: int
    target_attrs: dict[str, str]
    relation: str | None = None
    context: int | None = None
    context_attrs: dict[str, str] | None = None

    def meaning(self) -> dict[str, Any]:
        return {"target": self.target_attrs, "relation": self.relation, "context": self.context_attrs}


def _named(attrs: Mapping[str, str], subset: tuple[str, ...]) -> dict[str, str]:
    out = {a: attrs[a] for a in subset}
    out["shape"] = attrs["shape"]
    return out


def selection(
    meaning: Mapping[str, Any],
    attrs: Sequence[Mapping[str, str]],
    boxes: Sequence[Sequence[float]],
    width: int,
    height: int,
) -> set[int]:
    """Indices of the objects a referring-expression meaning selects (see the module doc)."""
    target, relation, context = meaning["target"], meaning.get("relation"), meaning.get("context")
    out = set()
    for x, ax in enumerate(attrs):
        if not attributes_match(target, ax):
            continue
        if relation is None:
            out.add(x)
            continue
        for y, ay in enumerate(attrs):
            if y != x and attributes_match(context, ay) and relation_holds(relation, [boxes[x], boxes[y]], width, height):
                out.add(x)
                break
    return out


def choose_reference(
    target: int,
    attrs: Sequence[Mapping[str, str]],
    boxes: Sequence[Sequence[float]],
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    relational_prob: float = 0.3,
) -> RefChoice | None:
    """A unique description of object ``target``, or ``None`` when no attribute/relation combination is unique.

    Prefers the fewest attributes (sometimes one more, as people over-specify); uses a relation to
    a context object when attributes alone are ambiguous, and with probability ``relational_prob``
    otherwise.
    """
    n = len(attrs)
    # objects sharing the target's values on each subset (shape always included)
    def same(i: int, subset: tuple[str, ...]) -> set[int]:
        key = tuple(attrs[i][a] for a in subset)
        return {j for j in range(n) if attrs[j]["shape"] == attrs[i]["shape"] and tuple(attrs[j][a] for a in subset) == key}

    unique = [s for s in _SUBSETS if same(target, s) == {target}]
    plain: RefChoice | None = None
    if unique:
        smallest = min(len(s) for s in unique)
        pool = [s for s in unique if len(s) == smallest]
        if rng.random() < 0.3:  # people over-specify now and then
            pool = [s for s in unique if len(s) == smallest + 1] or pool
        plain = RefChoice(target, _named(attrs[target], pool[int(rng.integers(len(pool)))]))
        if rng.random() >= relational_prob:
            return plain

    relational: list[RefChoice] = []
    for c in rng.permutation(n).tolist():
        if c == target:
            continue
        rels = [r for r in _REF_RELATIONS if relation_is_clear(r, [boxes[target], boxes[c]], width, height)]
        if not rels:
            continue
        rel = rels[int(rng.integers(len(rels)))]
        c_unique = [s for s in _SUBSETS if s and same(c, s) == {c}]
        c_subset = c_unique[0] if c_unique else ("color",)
        contexts = same(c, c_subset)
        # objects x with some context object y != x such that rel(x, y)
        related = {x for x in range(n) if any(y != x and relation_holds(rel, [boxes[x], boxes[y]], width, height) for y in contexts)}
        for s in _SUBSETS:
            if same(target, s) & related == {target}:
                relational.append(RefChoice(target, _named(attrs[target], s), rel, c, _named(attrs[c], c_subset)))
                break
        if len(relational) >= 3:
            break
    if relational:
        return relational[int(rng.integers(len(relational)))]
    return plain
