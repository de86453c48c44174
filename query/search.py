"""Region search: stage 1 FAISS candidates, optional stage 2 rescoring, per-image duplicate suppression,
self-exclusion, top k."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidInputError
from engine.results import Hit
from indexer.store import VECTOR_ARRAY, IndexStore, RegionRow
from query.filters import HitFilter
from query.grouping import suppress_per_image

__all__ = ["SearchOptions", "Rescorer", "search_regions"]

log = logging.getLogger(__name__)

Rescorer = Callable[[list[RegionRow]], dict[str, np.ndarray]]
"""Stage 2: scores the shortlisted regions; returns named score arrays, ``"final"`` among them."""


@dataclass(frozen=True)
class SearchOptions:
    """Options of one search.

    ``shortlist``: stage-1 candidates handed to stage 2 (when there is one). ``nms_iou``: boxes of one
    image overlapping more than this collapse to the best one. ``filters``: applied to the ranked
    hits (without stage 2 the fetch grows until ``k`` hits pass; with it, to the shortlist).
    """

    k: int = 10
    exclude_self_hash: str | None = None
    nms_iou: float = 0.5
    first_fetch: int = 100
    shortlist: int = 1000
    filters: HitFilter | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {self.k!r}; e.g. -k 10")
        if self.shortlist <= 0:
            raise InvalidInputError(f"shortlist must be a positive integer, got {self.shortlist!r}")


def search_regions(
    store: IndexStore,
    vector: np.ndarray,
    options: SearchOptions,
    rescore: Rescorer | None = None,
    *,
    array: str = VECTOR_ARRAY,
    stage1: str = "visual",
    extra_ids: Sequence[int] = (),
) -> list[Hit]:
    """The ``options.k`` best regions for a query vector ``[D]``.

    Stage 1 asks FAISS (the file of feature array ``array``; its score is named ``stage1``) for
    candidates. Without ``rescore`` the FAISS score is the score, and the fetch doubles until ``k``
    hits survive the filters (duplicates within an image, the query image itself). With ``rescore``
    the top ``options.shortlist`` candidates, plus the regions ``extra_ids`` (e.g. SAN's matches of the
    query text; their stage-1 score is computed from their stored vectors), are rescored (stage 2)
    and ranked by the ``"final"`` score.
    """
    total = store.vector_count(array)
    if total == 0:
        return []
    query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
    fetch = min(total, options.shortlist if rescore else max(options.first_fetch, 8 * options.k))
    while True:
        scores, ids = store.search(query, fetch, array=array)
        rows, visual = _rows(store, scores[0], ids[0])
        if rescore is not None and extra_ids:
            rows, visual = _join(store, rows, visual, extra_ids, query[0], array)
        parts = {stage1: visual}
        if rescore is not None and rows:
            parts.update(rescore(rows))
        final = parts.get("final", visual)
        hits = _filter(rows, final, parts, options)
        if len(hits) >= options.k or fetch >= total or rescore is not None:
            return hits[: options.k]
        fetch = min(total, fetch * 4)


def _join(store: IndexStore, rows: list[RegionRow], scores: np.ndarray, extra_ids: Sequence[int], query: np.ndarray, array: str) -> tuple[list[RegionRow], np.ndarray]:
    """``rows`` plus the regions ``extra_ids`` not among them, with their stage-1 cosine from the stored vectors."""
    have = {r.id for r in rows}
    extra = [r for r in store.regions([i for i in dict.fromkeys(extra_ids) if i not in have])]
    if not extra:
        return rows, scores
    vectors = store.read_arrays(array, np.asarray([r.row for r in extra], np.int64)).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    return rows + extra, np.concatenate([scores, vectors @ q]).astype(np.float32)


def _rows(store: IndexStore, scores: np.ndarray, ids: np.ndarray) -> tuple[list[RegionRow], np.ndarray]:
    valid = ids >= 0
    by_id = {r.id: r for r in store.regions(ids[valid].tolist())}
    pairs = [(by_id[int(i)], float(s)) for s, i in zip(scores[valid], ids[valid]) if int(i) in by_id]
    return [r for r, _ in pairs], np.asarray([s for _, s in pairs], np.float32)


def _filter(rows: list[RegionRow], final: np.ndarray, parts: dict[str, np.ndarray], options: SearchOptions) -> list[Hit]:
    keep = [i for i, r in enumerate(rows) if options.exclude_self_hash is None or r.content_hash != options.exclude_self_hash]
    if not keep:
        return []
    boxes = np.asarray([rows[i].box for i in keep], np.float32)
    order = suppress_per_image(boxes, final[keep], np.asarray([rows[i].image_id for i in keep]), iou_threshold=options.nms_iou)
    hits = []
    for j in order:
        i = keep[j]
        named = {name: float(values[i]) for name, values in parts.items() if name != "final"} if len(parts) > 1 else {}
        hits.append(Hit(image=rows[i].image_path, box=rows[i].box, score=float(final[i]), region_id=rows[i].id, scores=named, content_hash=rows[i].content_hash))
    return options.filters.apply(hits) if options.filters is not None else hits
