"""The retrieval benchmark: query regions, their positives and their hard negatives.

A *positive* of a query is any other region of the same split whose contents satisfy the query's
structured meaning (:func:`engine.synth.meaning.satisfies` over the objects with at least 90 % of
their box inside the region box). A *hard negative* is a region of the same split whose own
meaning differs from the query's in exactly one named attribute value or in the relation, and
which is not a positive.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.synth.meaning import SceneObject, canonical_key, one_change_neighbours, satisfies

__all__ = ["RegionRecord", "SplitIndex", "build_queries"]


@dataclass(frozen=True)
class RegionRecord:
    """What the benchmark needs to know about one region of the corpus."""

    id: int
    image: str
    split: str
    box: tuple[int, int, int, int]
    description: str
    meaning: dict[str, Any]
    source: str  # "pool", "variant" or "random"
    contents: tuple[SceneObject, ...]  # the objects in the region (>= 90 % of their box inside)
    width: int
    height: int


class SplitIndex:
    """The regions of one split, indexed by the attribute values of their contents and by meaning."""

    def __init__(self, records: Iterable[RegionRecord]) -> None:
        self.records: dict[int, RegionRecord] = {}
        self._by_value: dict[tuple[str, str], set[int]] = defaultdict(set)
        self._by_meaning: dict[str, list[int]] = defaultdict(list)
        for rec in records:
            self.records[rec.id] = rec
            for obj in rec.contents:
                for attr, value in obj.attributes.items():
                    self._by_value[(attr, value)].add(rec.id)
            self._by_meaning[canonical_key(rec.meaning)].append(rec.id)

    def positives(self, meaning: dict[str, Any], *, exclude: int) -> list[int]:
        """Ids of the regions (other than ``exclude``) whose contents satisfy ``meaning``, sorted."""
        needed = {(a, v) for role in meaning["objects"] for a, v in role.items()}
        sets = sorted((self._by_value.get(k, set()) for k in needed), key=len)
        candidates = set.intersection(*sets) if sets else set(self.records)
        out = []
        for rid in candidates:
            if rid == exclude:
                continue
            rec = self.records[rid]
            if satisfies(meaning, rec.contents, rec.width, rec.height):
                out.append(rid)
        return sorted(out)

    def hard_negatives(self, meaning: dict[str, Any], positives: Sequence[int], *, exclude: int) -> list[int]:
        """Ids of the regions whose meaning is a one-change neighbour of ``meaning`` and that are not positives."""
        own = canonical_key(meaning)
        skip = set(positives) | {exclude}
        out: set[int] = set()
        for neighbour in one_change_neighbours(meaning):
            key = canonical_key(neighbour)
            if key == own:
                continue
            out.update(rid for rid in self._by_meaning.get(key, ()) if rid not in skip)
        return sorted(out)


def build_queries(records: Sequence[RegionRecord], rng: np.random.Generator, *, per_meaning: int) -> list[dict[str, Any]]:
    """Benchmark queries as ``queries.jsonl`` dicts.

    Per split and per planted meaning (pool meanings and their variants, grouped by canonical
    meaning), up to ``per_meaning`` regions become queries: drawn in a random order, a region whose
    positives all lie in its own image (or that has none) is passed over for the next one, so every
    query can be answered by another image. Positives and hard negatives come from the query's split
    only; the positives list keeps those in the query's own image too.
    """
    by_split: dict[str, list[RegionRecord]] = defaultdict(list)
    for rec in records:
        by_split[rec.split].append(rec)
    queries: list[dict[str, Any]] = []
    for split in sorted(by_split):
        index = SplitIndex(by_split[split])
        groups: dict[str, list[RegionRecord]] = defaultdict(list)
        for rec in by_split[split]:
            if rec.source != "random":
                groups[canonical_key(rec.meaning)].append(rec)
        for key in sorted(groups):
            members = sorted(groups[key], key=lambda r: r.id)
            for rec, positives in _pick_queries(members, index, rng.permutation(len(members)), per_meaning):
                queries.append(
                    {
                        "id": len(queries),
                        "image": rec.image,
                        "region": list(rec.box),
                        "text": rec.description,
                        "region_id": rec.id,
                        "positives": positives,
                        "split": split,
                        "meaning": rec.meaning,
                        "hard_negatives": index.hard_negatives(rec.meaning, positives, exclude=rec.id),
                    }
                )
    return queries


def _pick_queries(
    members: Sequence[RegionRecord], index: SplitIndex, order: np.ndarray, per_meaning: int
) -> list[tuple[RegionRecord, list[int]]]:
    """Up to ``per_meaning`` of ``members`` (taken in ``order``) with a positive in another image, and
    their positives, in ``members``' order."""
    picked: list[tuple[int, RegionRecord, list[int]]] = []
    for i in order.tolist():
        if len(picked) == per_meaning:
            break
        rec = members[i]
        positives = index.positives(rec.meaning, exclude=rec.id)
        if any(index.records[p].image != rec.image for p in positives):
            picked.append((i, rec, positives))
    return [(rec, positives) for _, rec, positives in sorted(picked, key=lambda t: t[0])]
