"""Visual region search: FAISS candidates, per-image duplicate suppression, self-exclusion, top k."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidInputError
from engine.results import Hit
from indexer.store import IndexStore
from query.grouping import suppress_per_image

__all__ = ["SearchOptions", "visual_search"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOptions:
    """Options of one search. ``nms_iou``: boxes of one image overlapping more than this collapse to the best."""

    k: int = 10
    exclude_self_hash: str | None = None
    nms_iou: float = 0.5
    first_fetch: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {self.k!r}; e.g. -k 10")


def visual_search(store: IndexStore, vector: np.ndarray, options: SearchOptions) -> list[Hit]:
    """The ``options.k`` best regions for a query vector ``[D]``.

    FAISS is asked for more candidates than ``k`` (duplicates of one image and the query image itself
    are dropped afterwards), doubling the fetch until ``k`` hits survive or the index is exhausted.
    """
    total = store.info().regions
    if total == 0:
        return []
    fetch = min(total, max(options.first_fetch, 8 * options.k))
    query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
    while True:
        scores, ids = store.search(query, fetch)
        hits = _filter(store, scores[0], ids[0], options)
        if len(hits) >= options.k or fetch >= total:
            return hits[: options.k]
        fetch = min(total, fetch * 4)


def _filter(store: IndexStore, scores: np.ndarray, ids: np.ndarray, options: SearchOptions) -> list[Hit]:
    valid = ids >= 0
    rows = store.regions(ids[valid].tolist())
    by_id = {r.id: r for r in rows}
    kept = [(float(s), by_id[int(i)]) for s, i in zip(scores[valid], ids[valid]) if int(i) in by_id]
    if options.exclude_self_hash is not None:
        kept = [(s, r) for s, r in kept if r.content_hash != options.exclude_self_hash]
    if not kept:
        return []
    boxes = np.asarray([r.box for _, r in kept], np.float32)
    order = suppress_per_image(boxes, np.asarray([s for s, _ in kept]), np.asarray([r.image_id for _, r in kept]), iou_threshold=options.nms_iou)
    return [Hit(image=kept[i][1].image_path, box=kept[i][1].box, score=kept[i][0], region_id=kept[i][1].id) for i in order]
