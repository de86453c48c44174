"""GRN's expressional region retrieval protocol (GRN §4.2, ``docs/grn.md``): the answerable queries
of a split with their positives in other images, the candidates (ground-truth boxes or RPN
proposals) and the exhaustive scoring of every candidate by a method; ``engine eval retrieval``
turns the result into GRN Table 2–5 rows.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.datasets.types import Dataset, ImageAnn, RetrievalQuery
from engine.errors import InvalidInputError
from engine.metrics import RetrievalResult, proposal_retrieval_recall, retrieval_recall
from engine.models.retrieval import RegionRetrievalModel
from engine.protocols.proposals import RPN_TOP

__all__ = ["KS", "Candidates", "RegionMaps", "RetrievalBenchmark", "build_benchmark", "gt_candidates", "rpn_candidates", "score_benchmark"]

log = logging.getLogger(__name__)

KS = (1, 10, 50, 100)
"""The ranks at which recall is reported (R@K)."""


RegionMaps = Callable[[str, np.ndarray], np.ndarray]
"""``region_maps(image, boxes [n, 4]) -> float [n, C, 7, 7]``, e.g. :meth:`FeatureCache.region_maps`."""


@dataclass(frozen=True)
class Candidates:
    """The regions a query is ranked against: per candidate its image, box, region id (-1 for a proposal) and map."""

    setting: str
    images: np.ndarray  # int [N]: index into ``image_names``
    image_names: tuple[str, ...]
    boxes: np.ndarray  # float [N, 4]
    region_ids: np.ndarray  # int64 [N]
    maps: np.ndarray  # float16 [N, C, 7, 7]

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class RetrievalBenchmark:
    """The answerable queries of a split, their maps, and their positives outside their own image."""

    queries: tuple[RetrievalQuery, ...]
    query_maps: np.ndarray  # float16 [Q, C, 7, 7]
    positives: tuple[tuple[int, ...], ...]  # region ids, other images only
    positive_boxes: tuple[np.ndarray, ...]  # float [P_q, 4]
    positive_images: tuple[tuple[str, ...], ...]
    skipped: int


def build_benchmark(split: Dataset, region_maps: RegionMaps) -> RetrievalBenchmark:
    """The answerable queries of ``split`` (positives outside the query image), with their region maps."""
    where: dict[int, tuple[str, tuple[float, float, float, float]]] = {r.id: (im.image, r.box) for im in split.images for r in im.regions}
    kept: list[RetrievalQuery] = []
    positives, boxes, images = [], [], []
    skipped = 0
    for q in split.queries:
        pos = tuple(p for p in q.positives if p in where and where[p][0] != q.image)
        if not pos:
            skipped += 1
            continue
        kept.append(q)
        positives.append(pos)
        boxes.append(np.asarray([where[p][1] for p in pos], np.float64))
        images.append(tuple(where[p][0] for p in pos))
    if not kept:
        raise InvalidInputError(f"{split.name or 'the split'} holds no query with a positive region in another image; check queries.jsonl and the split name")
    if skipped:
        log.info("%s: %d of %d queries have positives only in their own image and are left out", split.name, skipped, len(split.queries))
    maps = np.concatenate([np.asarray(region_maps(q.image, np.asarray([q.region], np.float64)), np.float32) for q in kept]).astype(np.float16)
    return RetrievalBenchmark(tuple(kept), maps, tuple(positives), tuple(boxes), tuple(images), skipped)


def gt_candidates(images: Sequence[ImageAnn], region_maps: RegionMaps) -> Candidates:
    """Every ground-truth region box of ``images``."""
    return _candidates("gt", [(im.image, np.asarray([r.box for r in im.regions], np.float64).reshape(-1, 4), [r.id for r in im.regions]) for im in images], region_maps)


def rpn_candidates(images: Sequence[ImageAnn], proposals: Sequence[np.ndarray], region_maps: RegionMaps, *, top: int = RPN_TOP) -> Candidates:
    """The first ``top`` proposals ``[N_i, 4]`` (best first) of each image."""
    if len(proposals) != len(images):
        raise InvalidInputError(f"got proposals for {len(proposals)} images but {len(images)} images")
    parts = []
    for im, props in zip(images, proposals):
        b = np.asarray(props, np.float64).reshape(-1, 4)[:top]
        b = b[(b[:, 2] - b[:, 0] >= 1.0) & (b[:, 3] - b[:, 1] >= 1.0)]
        parts.append((im.image, b, [-1] * len(b)))
    return _candidates("rpn", parts, region_maps)


def _candidates(setting: str, parts: Sequence[tuple[str, np.ndarray, Sequence[int]]], region_maps: RegionMaps) -> Candidates:
    names = tuple(p[0] for p in parts)
    maps = [np.asarray(region_maps(name, b), np.float32).astype(np.float16) for name, b, _ in parts if len(b)]
    if not maps:
        raise InvalidInputError(f"no {setting} candidates: the images hold no boxes")
    return Candidates(
        setting=setting,
        images=np.concatenate([np.full(len(b), i, np.int64) for i, (_, b, _) in enumerate(parts)]),
        image_names=names,
        boxes=np.concatenate([b for _, b, _ in parts]),
        region_ids=np.concatenate([np.asarray(ids, np.int64).reshape(-1) for _, _, ids in parts]),
        maps=np.concatenate(maps),
    )


def score_benchmark(model: RegionRetrievalModel, bench: RetrievalBenchmark, cands: Candidates, *, progress: bool = False) -> RetrievalResult:
    """Score every candidate for every query with ``model`` and compute R@K / median rank (fractions)."""
    scores = model.score_matrix(bench.query_maps, [q.text for q in bench.queries], cands.maps, progress=progress)
    name_index = {n: i for i, n in enumerate(cands.image_names)}
    keep_lists, score_lists = [], []
    for q, query in enumerate(bench.queries):
        keep = cands.images != name_index.get(query.image, -1)  # candidates of the query image are excluded
        order = np.argsort(-scores[q][keep], kind="stable")
        keep_lists.append(np.flatnonzero(keep)[order])
        score_lists.append(scores[q][keep][order])
    if cands.setting == "gt":
        return retrieval_recall([cands.region_ids[k] for k in keep_lists], [set(p) for p in bench.positives], score_lists, ks=KS)
    return proposal_retrieval_recall(
        [cands.boxes[k] for k in keep_lists],
        [cands.images[k] for k in keep_lists],
        list(bench.positive_boxes),
        [[name_index.get(n, -1) for n in names] for names in bench.positive_images],
        score_lists,
        ks=KS,
    )
