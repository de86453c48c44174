"""Search over a sharded index (``indexer/shards.py``): one query fanned out to the shards, their hits merged.

Every score the pipeline gives a region depends on the query and that region (and its image) only, and
a shard holds whole images; so with each shard ranking its own candidates the merged ranking is the
unsharded one wherever the unsharded search is exact (stage 1 fetching every candidate it needs, a
flat FAISS index). The two things that look across regions are done across shards:

* a text-only query's SAN gate reads SAN's best match over ALL shards (:meth:`ShardSearcher.san_confidence`);
* stage 3 grounds the first images of the MERGED stage-2 ranking, each in the shard that holds it,
  and ranks them together (:func:`query.localize.rank_stage3`), exactly as :meth:`QueryPipeline.run`.

The query region is encoded once, by the shard that holds its region id (or shard 0 for an image), and
sent to every shard. :class:`ShardedSearch` talks to the shards through a :class:`ShardFanout`: the
shards' :class:`ShardSearcher` objects in this process (:class:`LocalShards`), or Ray actors holding one
each (``engine/distributed/ray_search.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from engine.errors import InvalidInputError
from engine.results import Hit
from indexer.shards import global_id, split_id
from indexer.store import SAN_ARRAY
from query.encode import EncodedQuery
from query.localize import Stage3Candidates, Stage3Weights, best_images, stage2_depth, stage3_hits
from query.pipeline import QueryPipeline
from query.request import SearchRequest
from query.search import SearchOptions

__all__ = ["ShardRanking", "ShardSearcher", "ShardFanout", "LocalShards", "ShardedSearch", "merge_hits"]


@dataclass(frozen=True)
class ShardRanking:
    """One shard's stage-1–2 hits (global ids, best first) and whether the query goes on to stage 3."""

    hits: list[Hit]
    grounds: bool


class ShardSearcher:
    """One shard's side of a fanned-out query: its :class:`QueryPipeline` and its position among the shards.

    Every method takes and returns plain values (requests, encoded queries, hits), so that a Ray actor
    can hold one."""

    def __init__(self, pipeline: QueryPipeline, position: int) -> None:
        self.pipeline = pipeline
        self.position = position

    def encode(self, request: SearchRequest) -> EncodedQuery:
        """The query region of ``request`` (an image, or a region id of this shard), with its SAN vector when a
        combined query's text would be checked against it (:meth:`QueryPipeline.san_relates`)."""
        text = request.text
        san = text is not None and not self.pipeline.through_concepts(text, combined=True) and self.pipeline.gates_with_san()
        if request.region_id is None:
            return self.pipeline.encode(request, san=san)
        local = replace(request, region_id=self._local(request.region_id))
        encoded = self.pipeline.encode(local)
        if san and encoded.san_vector is None:
            row = self.pipeline.region(local.region_id).row
            encoded = replace(encoded, san_vector=self.pipeline.store.read_arrays(SAN_ARRAY, np.asarray([row], np.int64))[0].astype(np.float32))
        return encoded

    def san_confidence(self, text: str) -> float | None:
        """The cosine of SAN's best match for a text-only query's ``text`` in this shard (``None``: SAN takes no
        part in such a query here, or the shard is empty)."""
        if not self.pipeline.through_concepts(text, combined=False):
            return None
        part = self.pipeline.san_part(text)
        if part is None or self.pipeline.store.vector_count(SAN_ARRAY) == 0:
            return None
        found, ids = self.pipeline.store.search(np.asarray(part.vector, np.float32)[None], 1, array=SAN_ARRAY)
        return float(found[0][0]) if ids[0][0] >= 0 else None

    def rank(self, request: SearchRequest, encoded: EncodedQuery | None, san_confidence: float | None = None, depth: int | None = None) -> ShardRanking:
        """Stages 1–2 in this shard: the request's ``k`` best hits, or, when stage 3 follows, the first
        ``depth`` (default: the shortlist)."""
        prepared = self.pipeline.prepare(request, encoded)
        if prepared.san is not None and san_confidence is not None:
            prepared = replace(prepared, san=replace(prepared.san, confidence=san_confidence))
        grounds = self.pipeline.grounds(prepared)
        shortlist = self.pipeline.config.shortlist
        hits = self.pipeline.rank(prepared, k=min(shortlist, depth or shortlist) if grounds else None)
        return ShardRanking(hits=[self._global(h) for h in hits], grounds=grounds)

    def ground(self, request: SearchRequest, encoded: EncodedQuery | None, paths: Sequence[str]) -> dict[str, Stage3Candidates]:
        """Stage 3 for the images at ``paths`` (all in this shard): their grounded candidates (global ids)."""
        prepared = self.pipeline.prepare(request, encoded)
        if prepared.rescore is None or request.text is None:
            raise InvalidInputError("stage 3 grounds the text of a combined query; give the query a text")
        found = self.pipeline.grounding_stage().candidates_many(list(paths), request.text, prepared.rescore, prepared.query.vector)
        return {path: replace(c, rows=[replace(r, id=global_id(self.position, r.id), image_id=global_id(self.position, r.image_id)) for r in c.rows]) for path, c in found.items()}

    def _local(self, region_id: int) -> int:
        shard, local = split_id(region_id)
        if shard != self.position:
            raise InvalidInputError(f"region {region_id} is not in shard {self.position}")
        return local

    def _global(self, hit: Hit) -> Hit:
        return replace(hit, region_id=global_id(self.position, hit.region_id))


class ShardFanout(Protocol):
    """How a :class:`ShardedSearch` reaches its shards: ``call`` one shard's :class:`ShardSearcher` method,
    ``call_many`` a method on several shards at once (arguments per shard), answers in the same order."""

    def __len__(self) -> int: ...

    def call(self, position: int, method: str, *args: object) -> object: ...

    def call_many(self, calls: Sequence[tuple[int, str, tuple[object, ...]]]) -> list[object]: ...


class LocalShards:
    """The shards' searchers in this process, called one after the other."""

    def __init__(self, searchers: Sequence[ShardSearcher]) -> None:
        self.searchers = list(searchers)

    def __len__(self) -> int:
        return len(self.searchers)

    def call(self, position: int, method: str, *args: object) -> object:
        return getattr(self.searchers[position], method)(*args)

    def call_many(self, calls: Sequence[tuple[int, str, tuple[object, ...]]]) -> list[object]:
        return [self.call(position, method, *args) for position, method, args in calls]


def merge_hits(rankings: Sequence[Sequence[Hit]]) -> list[Hit]:
    """The shards' rankings merged by score, best first (ties in shard order)."""
    merged = [h for hits in rankings for h in hits]
    order = np.argsort(-np.asarray([h.score for h in merged], np.float64), kind="stable")
    return [merged[i] for i in order.tolist()]


class ShardedSearch:
    """Stages 1–3 of a query over all shards (module doc).

    Args:
        shards: the fan-out to the shards.
        shortlist: the stage-2 shortlist (``EngineConfig.shortlist``) ranked before stage 3.
        stage3_weights: stage 3's fitted weights (``None``: stage 3 is off), read for combined queries.
    """

    def __init__(self, shards: ShardFanout, *, shortlist: int, stage3_weights: Callable[[], Stage3Weights | None]) -> None:
        self.shards = shards
        self.shortlist = shortlist
        self.stage3_weights = stage3_weights

    def run(self, request: SearchRequest, encoded: EncodedQuery | None = None) -> list[Hit]:
        request.validate()
        options = SearchOptions(k=request.k, shortlist=self.shortlist, filters=request.filters)
        if encoded is None and (request.image is not None or request.region_id is not None):
            encoded = self.shards.call(self.owner(request), "encode", request)
        confidence = None
        if encoded is None:  # text only: SAN's gate reads its best match over every shard
            values = [c for c in self.shards.call_many([(i, "san_confidence", (request.text,)) for i in range(len(self.shards))]) if c is not None]
            confidence = max(values) if values else None
        weights = self.stage3_weights() if request.text is not None and encoded is not None else None
        depth = self.shortlist if weights is None else stage2_depth(request.k, weights.images, options.filters.max_per_image, self.shortlist)
        rankings = self.shards.call_many([(i, "rank", (request, encoded, confidence, depth)) for i in range(len(self.shards))])
        merged = merge_hits([r.hits for r in rankings])
        if not any(r.grounds for r in rankings):
            return merged[: request.k]
        if weights is None:
            raise InvalidInputError("the shards ground this query but stage 3 is off in this engine's configuration")
        ranked = merged[:depth]
        paths = best_images(ranked, weights.images)
        grounded = self._ground(request, encoded, paths, ranked)
        hits = stage3_hits(ranked, grounded, weights, options.filters)
        if len(hits) < request.k and len(ranked) == depth < self.shortlist:
            # copies of a picture removed as duplicates: the rest of the shortlist (the grounded images stay the first ones)
            rankings = self.shards.call_many([(i, "rank", (request, encoded, confidence)) for i in range(len(self.shards))])
            hits = stage3_hits(merge_hits([r.hits for r in rankings])[: self.shortlist], grounded, weights, options.filters)
        return hits[: request.k]

    def owner(self, request: SearchRequest) -> int:
        """The shard that encodes a visual query: the one holding its region id, else the first."""
        if request.region_id is None:
            return 0
        shard, _ = split_id(request.region_id)
        if shard >= len(self.shards):
            raise InvalidInputError(f"region {request.region_id} is not in this index (it names shard {shard} of {len(self.shards)}); region ids come from earlier hits (engine query --json)")
        return shard

    def _ground(self, request: SearchRequest, encoded: EncodedQuery | None, paths: list[str], ranked: Sequence[Hit]) -> dict[str, Stage3Candidates]:
        """Stage 3 for the images ``paths``, each asked of its shard; in ``paths`` order."""
        shard_of = {h.image: split_id(h.region_id)[0] for h in ranked}
        by_shard: dict[int, list[str]] = {}
        for path in paths:
            by_shard.setdefault(shard_of[path], []).append(path)
        answers: list[Mapping[str, Stage3Candidates]] = self.shards.call_many([(s, "ground", (request, encoded, p)) for s, p in by_shard.items()])
        found = {path: cand for answer in answers for path, cand in answer.items()}
        return {path: found[path] for path in paths if path in found}
