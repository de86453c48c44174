"""Region search: stage 1 FAISS candidates, optional stage 2 rescoring, per-image duplicate suppression,
self-exclusion, top k."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidInputError
from engine.results import Hit
from indexer.region_table import Regions
from indexer.store import VECTOR_ARRAY, IndexStore
from query.filters import HitFilter
from query.grouping import suppress_per_image

__all__ = ["SearchOptions", "Rescorer", "search_regions", "ranked_hits"]

log = logging.getLogger(__name__)

Rescorer = Callable[[np.ndarray], dict[str, np.ndarray]]
"""Stage 2: scores the shortlisted regions, given by their feature rows (int64 ``[n]``); returns named
score arrays, ``"final"`` among them."""


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
    and ranked by the ``"final"`` score. Candidates are handled as columns of the store's region
    table; image paths are read for the hits returned only.
    """
    total = store.vector_count(array)
    if total == 0:
        return []
    query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
    fetch = min(total, options.shortlist if rescore else max(options.first_fetch, 8 * options.k))
    excluded = store.image_ids_with_hash(options.exclude_self_hash) if options.exclude_self_hash is not None else None
    while True:
        scores, ids = store.search(query, fetch, array=array)
        found = store.lookup_regions(ids[0])
        visual = _stage1_scores(scores[0], ids[0], found)
        if rescore is not None and extra_ids:
            found, visual = _join(store, found, visual, extra_ids, query[0], array)
        if excluded is not None and excluded.shape[0]:
            keep = ~np.isin(found.image_ids, excluded)
            found, visual = found.take(keep), visual[keep]
        parts = {stage1: visual}
        if rescore is not None and len(found):
            parts.update(rescore(found.rows))
        hits = ranked_hits(store, found, parts, options, stage1)
        if len(hits) >= options.k or fetch >= total or rescore is not None:
            return hits[: options.k]
        fetch = min(total, fetch * 4)


def _stage1_scores(scores: np.ndarray, ids: np.ndarray, found: Regions) -> np.ndarray:
    """FAISS's scores of the regions ``found`` (``ids`` minus -1 and regions deleted since), in their order."""
    valid = ids >= 0
    by_id = dict(zip(ids[valid].tolist(), scores[valid].tolist()))
    return np.asarray([by_id[i] for i in found.ids.tolist()], np.float32)


def _join(store: IndexStore, found: Regions, scores: np.ndarray, extra_ids: Sequence[int], query: np.ndarray, array: str) -> tuple[Regions, np.ndarray]:
    """``found`` plus the regions ``extra_ids`` not among them, with their stage-1 cosine from the stored vectors."""
    extra_ids = np.asarray(list(dict.fromkeys(extra_ids)), np.int64)
    extra = store.lookup_regions(extra_ids[~np.isin(extra_ids, found.ids)])
    if not len(extra):
        return found, scores
    vectors = store.read_arrays(array, extra.rows).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    return found.concat(extra), np.concatenate([scores, vectors @ q]).astype(np.float32)


def ranked_hits(store: IndexStore, found: Regions, parts: dict[str, np.ndarray], options: SearchOptions, stage1: str) -> list[Hit]:
    """The candidates ranked by their final score after per-image suppression and the filters, as hits.

    Greedy NMS keeps a box or not by the better-scored boxes only, so suppressing the best ``m``
    candidates gives the first hits of suppressing them all: ``m`` grows (×4) until ``k`` hits pass the
    filters, and only those candidates' rows (paths, content hashes) are read from the database.
    """
    final = parts.get("final", parts[stage1])
    order = np.argsort(-final, kind="stable")
    wanted = options.k
    m = min(len(order), max(4 * wanted, 64))
    while True:
        head = order[:m]
        kept = head[suppress_per_image(found.boxes[head], final[head], found.image_ids[head], iou_threshold=options.nms_iou)]
        hits = _hits(store, found, kept, final, parts)
        if options.filters is not None:
            hits = options.filters.apply(hits)
        if len(hits) >= wanted or m == len(order):
            return hits
        m = min(len(order), 4 * m)


def _hits(store: IndexStore, found: Regions, index: np.ndarray, final: np.ndarray, parts: dict[str, np.ndarray]) -> list[Hit]:
    """Hits for the candidates at positions ``index`` (in that order), with their image rows from the database."""
    rows = {r.id: r for r in store.regions(found.ids[index])}
    named = [name for name in parts if name != "final"] if len(parts) > 1 else []
    hits = []
    for i in index.tolist():
        row = rows.get(int(found.ids[i]))
        if row is None:  # deleted since the table was read
            continue
        hits.append(Hit(image=row.image_path, box=row.box, score=float(final[i]), region_id=row.id, scores={name: float(parts[name][i]) for name in named}, content_hash=row.content_hash))
    return hits
