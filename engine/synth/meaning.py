"""Structured meanings of region descriptions, and when a set of objects satisfies one.

A meaning is a JSON-able dict::

    {"objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "pattern": "striped"}],
     "relation": "left_of"}

``objects`` are the roles, each naming only some attributes (``shape`` always); ``relation`` applies
to the roles in order (``between``: role 0 between roles 1 and 2). A set of objects satisfies a
meaning when distinct objects can be assigned to the roles so that every named attribute matches
and the relation holds geometrically (:mod:`engine.synth.relations`).
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.synth.relations import RELATION_ARITY, relation_holds
from engine.synth.vocabulary import COLORS, PATTERNS, SHAPES, SIZES

__all__ = [
    "SceneObject",
    "CONTAIN_FRACTION",
    "attributes_match",
    "satisfies",
    "objects_in_region",
    "canonical_key",
    "one_change_neighbours",
]

#: An object belongs to a region when at least this fraction of its box area lies inside the region box.
CONTAIN_FRACTION = 0.9

_VALUES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLORS, "size": SIZES, "pattern": PATTERNS}


@dataclass(frozen=True)
class SceneObject:
    """What meanings are evaluated on: an object id, its attributes and its pixel box."""

    id: int
    attributes: Mapping[str, str]
    box: tuple[float, float, float, float]


def attributes_match(named: Mapping[str, str], attributes: Mapping[str, str]) -> bool:
    """Whether every attribute that ``named`` mentions has the same value in ``attributes``."""
    return all(attributes.get(k) == v for k, v in named.items())


def satisfies(meaning: Mapping[str, Any], objects: Sequence[SceneObject], width: int, height: int) -> bool:
    """Whether some assignment of distinct ``objects`` to the meaning's roles makes it true."""
    roles = meaning["objects"]
    candidates = [[o for o in objects if attributes_match(role, o.attributes)] for role in roles]
    if any(not c for c in candidates):
        return False
    for assignment in itertools.product(*candidates):
        if len({o.id for o in assignment}) != len(assignment):
            continue
        if relation_holds(meaning["relation"], [o.box for o in assignment], width, height):
            return True
    return False


def objects_in_region(region_box: Sequence[float], objects: Sequence[SceneObject]) -> list[SceneObject]:
    """The objects with at least :data:`CONTAIN_FRACTION` of their box area inside ``region_box``."""
    rx1, ry1, rx2, ry2 = region_box
    inside = []
    for o in objects:
        x1, y1, x2, y2 = o.box
        iw = max(0.0, min(x2, rx2) - max(x1, rx1))
        ih = max(0.0, min(y2, ry2) - max(y1, ry1))
        area = (x2 - x1) * (y2 - y1)
        if area > 0 and iw * ih >= CONTAIN_FRACTION * area:
            inside.append(o)
    return inside


def _role_key(role: Mapping[str, str]) -> str:
    return json.dumps(dict(role), sort_keys=True)


def _canonical(meaning: Mapping[str, Any]) -> tuple[str, list[dict[str, str]]]:
    rel = meaning["relation"]
    roles = [dict(r) for r in meaning["objects"]]
    if rel == "right_of":
        rel, roles = "left_of", roles[::-1]
    elif rel == "below":
        rel, roles = "above", roles[::-1]
    elif rel == "next_to":
        roles = sorted(roles, key=_role_key)
    elif rel == "between":
        roles = [roles[0]] + sorted(roles[1:], key=_role_key)
    return rel, roles


def canonical_key(meaning: Mapping[str, Any]) -> str:
    """A string equal for equivalent meanings ("A right of B" == "B left of A", next_to symmetric)."""
    rel, roles = _canonical(meaning)
    return json.dumps({"objects": roles, "relation": rel}, sort_keys=True)


def one_change_neighbours(meaning: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every meaning that differs from ``meaning`` in exactly one named attribute value or in the relation.

    The attribute sets named by each role stay the same; the relation may change to any other
    relation of the same arity (for two roles: the converse, the other axis, or ``next_to``).
    """
    roles = [dict(r) for r in meaning["objects"]]
    rel = meaning["relation"]
    for i, role in enumerate(roles):
        for attr, value in role.items():
            for other in _VALUES[attr]:
                if other != value:
                    changed = [dict(r) for r in roles]
                    changed[i][attr] = other
                    yield {"objects": changed, "relation": rel}
    for other_rel, arity in RELATION_ARITY.items():
        if other_rel != rel and arity == len(roles):
            yield {"objects": [dict(r) for r in roles], "relation": other_rel}

