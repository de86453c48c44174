"""GRN Table 2–5: expressional region retrieval R@1/10/50/100 and median rank, with ground-truth
boxes and with RPN proposals.

Protocol (GRN §4.2, documented in ``docs/grn.md``):

* **Queries**: the split's queries (``queries.jsonl``): a region of an image with its description.
  The query region's map is pooled from its ground-truth box in both settings.
* **Candidates**: every ground-truth region box of the split's images (``gt``), or each image's top
  100 RPN proposals (``rpn``). Candidates from the query's own image are excluded, so a query is
  answered by other images; a query whose positives all lie in its own image cannot be answered and
  is left out (the count is reported as ``skipped``).
* **Scoring**: every candidate is scored exhaustively by the method (the query text gates the query
  region and each candidate), ranked by cosine similarity; ties count against the query.
* **Hits**: ``gt``: a candidate whose region id is a positive; ``rpn``: a proposal in a positive's
  image with IoU > 0.5 with its box (:func:`engine.metrics.proposal_retrieval_recall`).
* **Numbers**: R@K is the percentage (0–100, as in the paper's tables) of queries with a hit in the
  top K; ``med_r`` the median rank of the first hit (``None`` in JSON when more than half miss).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.datasets.types import Dataset, ImageAnn, RetrievalQuery
from engine.errors import InvalidInputError
from engine.metrics import RetrievalResult, proposal_retrieval_recall, retrieval_recall
from engine.models.retrieval import RegionRetrievalModel

__all__ = [
    "KS",
    "PROPOSAL_SETTINGS",
    "RPN_TOP",
    "Candidates",
    "RetrievalBenchmark",
    "RetrievalRow",
    "build_benchmark",
    "gt_candidates",
    "rpn_candidates",
    "score_benchmark",
    "resolve_models",
    "evaluate_retrieval",
    "rows_to_markdown",
]

log = logging.getLogger(__name__)

KS = (1, 10, 50, 100)
PROPOSAL_SETTINGS = ("gt", "rpn")
RPN_TOP = 100
"""Proposals per image in the ``rpn`` setting."""

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


@dataclass(frozen=True)
class RetrievalRow:
    """One row of the table: a method in one proposal setting."""

    method: str
    proposals: str
    result: RetrievalResult
    skipped: int = 0
    version: str = ""
    candidates: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON row: recalls in percent, ``med_r`` a number or ``None`` (infinite)."""
        med = self.result.median_rank
        return {
            "method": self.method,
            "proposals": self.proposals,
            **{f"R@{k}": round(100.0 * self.result.r_at[k], 3) for k in KS},
            "med_r": None if math.isinf(med) else med,
            "queries": self.result.n,
            "skipped": self.skipped,
            "candidates": self.candidates,
            "version": self.version,
            "seconds": round(self.seconds, 2),
        }


# --------------------------------------------------------------------------- benchmark parts


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


# --------------------------------------------------------------------------- the command's work


def resolve_models(specs: Sequence[str | Path] | None, *, device: str = "cpu") -> list[RegionRetrievalModel]:
    """Models from ``specs``: ``visual``, a checkpoint file, or the name of an installed checkpoint
    (``grn-fc`` → ``engine/checkpoints/grn-fc.pt``). ``None`` or empty: ``visual`` plus every installed
    GRN-family checkpoint, in the order of GRN Table 2 and the ablations."""
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS, installed_checkpoints
    from engine.models.grn import METHODS
    from engine.models.retrieval import MODEL_NAME

    if not specs:
        found = [(p, m) for p, m in installed_checkpoints() if m.model == MODEL_NAME]
        order = list(METHODS)
        found.sort(key=lambda pm: (order.index(pm[1].config.get("method")) if pm[1].config.get("method") in order else len(order), pm[0].name))
        models = [] if any(m.config.get("method") == "visual" for _, m in found) else [RegionRetrievalModel.visual(device=device)]
        return models + [RegionRetrievalModel.from_checkpoint(p, device=device) for p, _ in found]
    models = []
    for spec in specs:
        path = Path(spec)
        if str(spec) == "visual":
            models.append(RegionRetrievalModel.visual(device=device))
        elif path.suffix in (".pt", ".json") or path.exists():
            models.append(RegionRetrievalModel.from_checkpoint(path, device=device))
        elif (PACKAGE_CHECKPOINTS / f"{spec}.pt").is_file():
            models.append(RegionRetrievalModel.from_checkpoint(PACKAGE_CHECKPOINTS / f"{spec}.pt", device=device))
        else:
            installed = sorted(p.stem for p, m in installed_checkpoints() if m.model == MODEL_NAME)
            raise InvalidInputError(f"--model {spec!r} is neither a checkpoint file nor an installed model; give a .pt file, 'visual', or one of {', '.join(installed) or '(none installed)'}")
    return models


def evaluate_retrieval(
    data: Path,
    models: Sequence[RegionRetrievalModel],
    *,
    split: str = "test",
    proposals: Sequence[str] = PROPOSAL_SETTINGS,
    rpn_checkpoint: Path | None = None,
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: bool = False,
) -> list[RetrievalRow]:
    """The rows of GRN Table 2 for ``models`` on the ``split`` of the dataset at ``data``.

    Region maps come from the dataset's feature cache (``DATA/.engine-cache/``, built on first use),
    so they equal the maps indexing stores. ``rpn`` needs the RPN checkpoint (``None``: the shipped one).
    """
    from engine.datasets.annotations import read_dataset
    from engine.training.feature_cache import FeatureCache
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.region_features import RegionFeatureExtractor

    bad = [p for p in proposals if p not in PROPOSAL_SETTINGS]
    if bad or not proposals:
        raise InvalidInputError(f"--proposals {','.join(proposals)!r} is not allowed; give a comma list of {', '.join(PROPOSAL_SETTINGS)}")
    if not models:
        raise InvalidInputError("no models to evaluate; pass --model FILE or install checkpoints")
    dataset = read_dataset(Path(data)).split(split)
    if not dataset.images or not dataset.queries:
        raise InvalidInputError(f"split {split!r} of {data} holds {len(dataset.images)} images and {len(dataset.queries)} queries; choose a split with both (train, val, test)")
    network = None
    max_size = BackboneConfig().max_size
    if "rpn" in proposals:
        from engine.models.rpn import ProposalNetwork

        network = ProposalNetwork.from_checkpoint(rpn_checkpoint, device=device)
        max_size = network.config.max_size
    backbone = create_backbone(BackboneConfig(max_size=max_size), device=device)
    if network is not None:
        network.check_backbone(backbone.version, backbone.max_size)
    cache = FeatureCache(Path(data), RegionFeatureExtractor(backbone=backbone), cache_dir=cache_dir)
    cache.build(dataset.images, progress=progress)
    bench = build_benchmark(dataset, cache.region_maps)
    rows: list[RetrievalRow] = []
    for setting in proposals:
        if setting == "gt":
            cands = gt_candidates(dataset.images, cache.region_maps)
        else:
            from engine.evaluation.proposals_recall import propose_images

            props = propose_images(network, cache, dataset.images, max_proposals=RPN_TOP, progress=progress)
            cands = rpn_candidates(dataset.images, [p[0] for p in props], cache.region_maps)
        log.info("%s: %d queries (%d skipped), %d %s candidates", dataset.name, len(bench.queries), bench.skipped, len(cands), setting)
        for model in models:
            start = time.perf_counter()
            result = score_benchmark(model, bench, cands, progress=progress)
            seconds = time.perf_counter() - start
            rows.append(RetrievalRow(model.method, setting, result, bench.skipped, model.version, len(cands), seconds))
            log.info("%s %s: %s", model.method, setting, rows[-1].to_dict())
    return rows


def rows_to_markdown(rows: Sequence[RetrievalRow]) -> str:
    """A markdown table of ``rows`` (recalls in percent)."""
    lines = ["| method | proposals | R@1 | R@10 | R@50 | R@100 | med r | queries |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        d = row.to_dict()
        med = "inf" if d["med_r"] is None else f"{d['med_r']:g}"
        lines.append(f"| {d['method']} | {d['proposals']} | " + " | ".join(f"{d[f'R@{k}']:.2f}" for k in KS) + f" | {med} | {d['queries']} |")
    return "\n".join(lines) + "\n"
