"""Region search, stages 1–2 of :class:`query.pipeline.QueryPipeline`: stage-1 FAISS candidates
(:class:`Candidates`), optional stage-2 rescoring (:class:`query.rerank.StageScores`), per-image
duplicate suppression, self-exclusion, the hit filters (by default one hit per image), top k."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.errors import InvalidInputError
from engine.results import Hit
from indexer.region_table import Regions
from indexer.store import VECTOR_ARRAY, IndexStore
from query.filters import HitFilter
from query.grouping import suppress_per_image
from query.rerank import Rescorer, StageScores

__all__ = ["SearchOptions", "Candidates", "Rescorer", "search_regions", "stage1_candidates", "ranked_hits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOptions:
    """Options of one search.

    ``shortlist``: stage-1 candidates handed to stage 2 (when there is one). ``nms_iou``: boxes of one
    image overlapping more than this collapse to the best one. ``filters``: applied to the ranked
    hits (without stage 2 the fetch grows until ``k`` hits pass; with it, to the shortlist); the
    default :class:`HitFilter` keeps one hit per image (``HitFilter(max_per_image=0)``: no limit).
    """

    k: int = 10
    exclude_self_hash: str | None = None
    nms_iou: float = 0.5
    first_fetch: int = 100
    shortlist: int = 1000
    filters: HitFilter = field(default_factory=HitFilter)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {self.k!r}; e.g. -k 10")
        if self.shortlist <= 0:
            raise InvalidInputError(f"shortlist must be a positive integer, got {self.shortlist!r}")
        if self.filters is None:  # ``filters=None``: the default filter
            object.__setattr__(self, "filters", HitFilter())


@dataclass(frozen=True)
class Candidates:
    """Stage 1's candidates: rows of the region table and their stage-1 score, named ``stage1`` in the
    hits (``visual``: the cosine of the visual vectors; ``san_text``: SAN's text vector against theirs)."""

    regions: Regions
    stage1: np.ndarray
    stage1_name: str = "visual"

    def take(self, keep: np.ndarray) -> "Candidates":
        return Candidates(self.regions.take(keep), self.stage1[keep], self.stage1_name)

    def __len__(self) -> int:
        return len(self.regions)


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
    and ranked by the ``final`` score. Candidates are handled as columns of the store's region
    table; image paths are read for the hits returned only.
    """
    total = store.vector_count(array)
    if total == 0:
        return []
    query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
    fetch = min(total, options.shortlist if rescore else max(options.first_fetch, 8 * options.k))
    excluded = store.image_ids_with_hash(options.exclude_self_hash) if options.exclude_self_hash is not None else None
    while True:
        found = stage1_candidates(store, query, fetch, array=array, stage1=stage1, extra_ids=extra_ids if rescore is not None else (), excluded_images=excluded)
        scores = rescore(found.regions.rows) if rescore is not None and len(found) else None
        hits = ranked_hits(store, found, scores, options)
        if len(hits) >= options.k or fetch >= total or rescore is not None:
            return hits[: options.k]
        fetch = min(total, fetch * 4)


def stage1_candidates(store: IndexStore, query: np.ndarray, fetch: int, *, array: str, stage1: str, extra_ids: Sequence[int] = (), excluded_images: np.ndarray | None = None) -> Candidates:
    """FAISS's ``fetch`` best regions of ``query`` ``[1, D]`` (file of array ``array``), joined by the regions
    ``extra_ids``, less those of the images ``excluded_images``."""
    scores, ids = store.search(query, fetch, array=array)
    found = store.lookup_regions(ids[0])
    visual = _stage1_scores(scores[0], ids[0], found)
    if extra_ids:
        found, visual = _join(store, found, visual, extra_ids, query[0], array)
    candidates = Candidates(found, visual, stage1)
    if excluded_images is not None and excluded_images.shape[0]:
        candidates = candidates.take(~np.isin(found.image_ids, excluded_images))
    return candidates


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


def ranked_hits(store: IndexStore, found: Candidates, scores: StageScores | None, options: SearchOptions) -> list[Hit]:
    """The candidates ranked by their final score (stage 2's, else stage 1's) after per-image suppression
    and the filters, as hits; with stage 2 a hit's ``scores`` holds its stage-1 score and stage 2's parts.

    Greedy NMS keeps a box or not by the better-scored boxes only, so suppressing the best ``m``
    candidates gives the first hits of suppressing them all: ``m`` grows (×4) until ``k`` hits pass the
    filters, and only those candidates' rows (paths, content hashes) are read from the database.
    """
    final = scores.final if scores is not None else found.stage1
    parts = {found.stage1_name: found.stage1, **scores.parts()} if scores is not None else {}
    regions = found.regions
    order = np.argsort(-final, kind="stable")
    order = order[np.isfinite(final[order])]  # a stage 2 that cascades leaves the candidates it dropped at -inf
    wanted = options.k
    m = min(len(order), max(4 * wanted, 64))
    while True:
        head = order[:m]
        kept = head[suppress_per_image(regions.boxes[head], final[head], regions.image_ids[head], iou_threshold=options.nms_iou)]
        hits = options.filters.apply(_hits(store, regions, kept, final, parts))
        if len(hits) >= wanted or m == len(order):
            return hits
        m = min(len(order), 4 * m)


def _hits(store: IndexStore, found: Regions, index: np.ndarray, final: np.ndarray, parts: dict[str, np.ndarray]) -> list[Hit]:
    """Hits for the candidates at positions ``index`` (in that order), with their image rows from the database."""
    rows = {r.id: r for r in store.regions(found.ids[index])}
    hits = []
    for i in index.tolist():
        row = rows.get(int(found.ids[i]))
        if row is None:  # deleted since the table was read
            continue
        hits.append(Hit(image=row.image_path, box=row.box, score=float(final[i]), region_id=row.id, scores={name: float(v[i]) for name, v in parts.items()}, content_hash=row.content_hash))
    return hits
