"""Exhaustive stage-2 scoring of every indexed region (the GRN paper's procedure) and recall@k of the
two-stage search against it.

:func:`exhaustive_search` streams the feature store in chunks of rows. For each chunk the GRN's
text-independent work (:meth:`RetrievalNet.prepare`) runs once and is shared by all queries; each
query then gates the chunk with its text (:meth:`RetrievalNet.embed_prepared`) and, when the engine
fuses SAN, ranks by the engine's fused score ``image_weight · grn + text_weight · san``
(:func:`query.rerank.fuse_scores`). A query's *exhaustive latency* is the time of exactly
the work one query alone would need: reading and preparing every chunk plus its own gating and
scoring — the queries are only interleaved to read the 7×7 maps once. The CPU time of the same work
(``extra["cpu_seconds"]``) is kept too: other processes on the machine do not inflate it.

The ranking then goes through the same filters as the engine's search: the query image's regions
are left out (``exclude_self``) and boxes of one image overlapping by more than ``nms_iou`` collapse
to the best one (:func:`query.grouping.suppress_per_image`). Every region may be a hit (no limit per
image: the GRN paper's protocol), where a user's search shows one hit per image by default; the
two-stage search it is compared with (``engine bench``) passes ``HitFilter(max_per_image=0)``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from engine.errors import InvalidInputError
from indexer.region_table import Regions
from query.rerank import fuse_scores, read_grn_inputs

__all__ = ["ExhaustiveQuery", "ExhaustiveResult", "exhaustive_search", "recall_at_k", "mean_recall_at_k"]


@dataclass(frozen=True)
class ExhaustiveQuery:
    """One query: its region map ``[C, 7, 7]``, its text, and the content hash of its image (left out)."""

    query_map: np.ndarray
    text: str
    exclude_hash: str | None = None


@dataclass
class ExhaustiveResult:
    """The exhaustive top ``k`` region ids of one query (after the engine's filters) and its latency;
    with SAN fused, also the top ``k`` by the GRN alone (``top_ids_grn``: the paper's procedure)."""

    top_ids: list[int]
    seconds: float
    scored: int
    extra: dict[str, float] = field(default_factory=dict)
    top_ids_grn: list[int] | None = None


@torch.no_grad()
def exhaustive_search(
    store: Any,
    model: Any,
    queries: Sequence[ExhaustiveQuery],
    *,
    san_model: Any | None = None,
    text_weight: float = 0.0,
    image_weight: float = 1.0,
    k: int = 10,
    nms_iou: float = 0.5,
    table: Regions | None = None,
    chunk: int = 4096,
    keep: int = 1000,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    checkpoint: Path | None = None,
    progress: bool = False,
) -> list[ExhaustiveResult]:
    """Score every region of ``store`` for every query; return each query's top ``k`` after the filters.

    ``model``: the :class:`~engine.models.retrieval.RegionRetrievalModel` of stage 2; ``san_model`` with
    ``text_weight > 0``: the final score is ``image_weight · grn + text_weight · san`` as in the engine's
    fused stage 2 (without SAN the GRN's score alone, as the engine ranks then).
    ``transform``: applied to each chunk of stored float16 maps ``[n, C, 7, 7]`` before scoring (e.g. a
    smaller storage format and back); the query maps are left as they are. ``table``: the regions to
    score (default: every live region, :meth:`indexer.store.IndexStore.all_regions`). ``checkpoint``: a file where
    the running state is saved every few chunks, so that an interrupted run resumes there (removed at the end).
    """
    if not queries:
        return []
    table = table if table is not None else store.all_regions()
    use_san = san_model is not None and text_weight > 0 and store.has_array("san")
    state = _State.load(checkpoint, len(queries), len(table.ids), chunk) if checkpoint is not None else None
    state = state or _State.fresh(len(queries))
    texts, anchors = _anchors(model, queries, state.clock)
    net, device = model.net, model.device
    order = np.argsort(table.rows, kind="stable")
    starts = range(state.next_start, len(order), chunk)
    for step, start in enumerate(tqdm(starts, desc=f"exhaustive {model.method}", unit="chunk", disable=not progress, dynamic_ncols=True), start=1):
        part = order[start : start + chunk]
        with state.clock.shared():
            if transform is None:  # what the engine's stage 2 reads for this model
                stored = read_grn_inputs(store, model, table.rows[part])
            else:
                stored = np.ascontiguousarray(transform(store.read_arrays("maps", table.rows[part])))
            maps = torch.from_numpy(stored).to(device).float()  # torch converts float16 fast
            prepared = net.prepare(maps)
            san_vectors = store.read_arrays("san", table.rows[part]).astype(np.float32) if use_san else None
        for i, q in enumerate(queries):
            with state.clock.own(i):
                grn = (net.embed_prepared(prepared, texts[i]) @ anchors[i]).cpu().numpy().astype(np.float32)
                scores = grn if san_vectors is None else fuse_scores(grn, san_model.score(q.text, san_vectors), image_weight=image_weight, text_weight=text_weight)
                state.best[i] = _merge(state.best[i], scores, part, keep)
            if san_vectors is not None:  # the GRN-alone ranking too (not part of the fused query's work)
                state.best_grn[i] = _merge(state.best_grn[i], grn, part, keep)
        state.next_start = start + chunk
        if checkpoint is not None and step % _CHECKPOINT_EVERY == 0:
            state.save(checkpoint, len(table.ids), chunk)
    excluded = [store.image_ids_with_hash(q.exclude_hash) if q.exclude_hash is not None else np.zeros(0, np.int64) for q in queries]
    results = []
    for i, q in enumerate(queries):
        with state.clock.own(i):
            top = _filtered_top(table, state.best[i], excluded[i], k, nms_iou)
        grn_only = _filtered_top(table, state.best_grn[i], excluded[i], k, nms_iou) if use_san else None
        results.append(ExhaustiveResult(top_ids=top, seconds=state.clock.seconds(i), scored=len(table.ids), extra=state.clock.extra(i), top_ids_grn=grn_only))
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return results


_CHECKPOINT_EVERY = 8  # chunks


def _anchors(model: Any, queries: Sequence[ExhaustiveQuery], clock: "_Clock") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each query's text representation and its own gated embedding (the query side of the cosine)."""
    texts, anchors = [], []
    for i, q in enumerate(queries):
        with clock.own(i):
            text_vec = model.encode_text(q.text)[None].to(model.device)
            qmap = torch.as_tensor(np.asarray(q.query_map))[None].float().to(model.device)
            anchors.append(model.net.embed(qmap, text_vec)[0])
            texts.append(text_vec)
    return texts, anchors


class _Clock:
    """Wall and CPU seconds of the work shared by all queries and of each query's own work."""

    def __init__(self, queries: int) -> None:
        self.wall = np.zeros(queries + 1)  # last slot: shared
        self.cpu = np.zeros(queries + 1)

    @contextmanager
    def own(self, query: int) -> Iterator[None]:
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[query] += time.perf_counter() - start
            self.cpu[query] += time.process_time() - start_cpu

    def shared(self) -> Any:
        return self.own(len(self.wall) - 1)

    def seconds(self, query: int) -> float:
        """Wall seconds one query alone would take: the shared work plus its own."""
        return float(self.wall[-1] + self.wall[query])

    def extra(self, query: int) -> dict[str, float]:
        return {
            "shared_seconds": float(self.wall[-1]),
            "own_seconds": float(self.wall[query]),
            "cpu_seconds": float(self.cpu[-1] + self.cpu[query]),
        }


Best = tuple[np.ndarray, np.ndarray]
"""The running best (scores, table positions) of one query."""


@dataclass
class _State:
    """Where an exhaustive pass is: the next chunk, each query's running best (fused and GRN alone), the clock."""

    best: list[Best]
    best_grn: list[Best]
    clock: _Clock
    next_start: int = 0

    @classmethod
    def fresh(cls, queries: int) -> "_State":
        empty = (np.zeros(0, np.float32), np.zeros(0, np.int64))
        return cls(best=[empty] * queries, best_grn=[empty] * queries, clock=_Clock(queries))

    def save(self, path: Path, regions: int, chunk: int) -> None:
        """Write the state atomically (temp file, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"meta": np.asarray([len(self.best), regions, chunk, self.next_start], np.int64), "wall": self.clock.wall, "cpu": self.clock.cpu}
        for name, bests in (("best", self.best), ("grn", self.best_grn)):
            for i, (values, positions) in enumerate(bests):
                arrays[f"{name}_v{i}"], arrays[f"{name}_p{i}"] = values, positions
        temp = path.with_name(path.name + ".tmp.npz")
        np.savez(temp, **arrays)
        os.replace(temp, path)

    @classmethod
    def load(cls, path: Path, queries: int, regions: int, chunk: int) -> "_State | None":
        """The saved state of the same pass (same number of queries, regions and chunk size), else ``None``."""
        if not Path(path).is_file():
            return None
        with np.load(path) as saved:
            meta = saved["meta"].tolist()
            if meta[:3] != [queries, regions, chunk]:
                return None
            clock = _Clock(queries)
            clock.wall, clock.cpu = saved["wall"].copy(), saved["cpu"].copy()
            best = [(saved[f"best_v{i}"].copy(), saved[f"best_p{i}"].copy()) for i in range(queries)]
            grn = [(saved[f"grn_v{i}"].copy(), saved[f"grn_p{i}"].copy()) for i in range(queries)]
        return cls(best=best, best_grn=grn, clock=clock, next_start=int(meta[3]))


def recall_at_k(found: Sequence[int], exact: Sequence[int], k: int = 10) -> float:
    """``|found[:k] ∩ exact[:k]| / min(k, |exact[:k]|)``; 1.0 when ``exact`` is empty (nothing to find)."""
    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    truth = set(int(i) for i in list(exact)[:k])
    if not truth:
        return 1.0
    return len(truth & set(int(i) for i in list(found)[:k])) / len(truth)


def mean_recall_at_k(found: Sequence[Sequence[int]], exact: Sequence[Sequence[int]], k: int = 10) -> float:
    """Mean of :func:`recall_at_k` over paired queries."""
    if len(found) != len(exact):
        raise InvalidInputError(f"got {len(found)} two-stage rankings but {len(exact)} exhaustive ones; pair them per query")
    if not found:
        return float("nan")
    return float(np.mean([recall_at_k(f, e, k) for f, e in zip(found, exact)]))


def _merge(best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, positions: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` best (score, table position) pairs of the running best and a new chunk."""
    values = np.concatenate([best[0], scores])
    where = np.concatenate([best[1], positions])
    if len(values) > keep:
        top = np.argpartition(-values, keep - 1)[:keep]
        values, where = values[top], where[top]
    return values, where


def _filtered_top(table: Regions, best: tuple[np.ndarray, np.ndarray], excluded_images: np.ndarray, k: int, nms_iou: float) -> list[int]:
    """The ``k`` best region ids after leaving out the images ``excluded_images`` and per-image suppression."""
    from query.grouping import suppress_per_image

    scores, positions = best
    order = np.argsort(-scores, kind="stable")
    scores, positions = scores[order], positions[order]
    mask = ~np.isin(table.image_ids[positions], excluded_images)
    scores, positions = scores[mask], positions[mask]
    keep = suppress_per_image(table.boxes[positions], scores, table.image_ids[positions], iou_threshold=nms_iou)
    return [int(table.ids[positions[j]]) for j in keep[:k]]
