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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidInputError
from engine.metrics import RetrievalResult
from engine.models.retrieval import RegionRetrievalModel
from engine.protocols.proposals import RPN_TOP, propose_images
from engine.protocols.retrieval import KS, build_benchmark, gt_candidates, rpn_candidates, score_benchmark

__all__ = [
    "PROPOSAL_SETTINGS",
    "RetrievalRow",
    "resolve_models",
    "evaluate_retrieval",
    "rows_to_markdown",
]

log = logging.getLogger(__name__)

PROPOSAL_SETTINGS = ("gt", "rpn")


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


# --------------------------------------------------------------------------- the command's work


def resolve_models(specs: Sequence[str | Path] | None, *, device: str = "cpu") -> list[RegionRetrievalModel]:
    """Models from ``specs``: ``visual``, a checkpoint file, or the name of an installed checkpoint
    (``grn-fc`` → ``engine/checkpoints/grn-fc.pt``). ``None`` or empty: ``visual`` plus every installed
    GRN-family checkpoint, in the order of GRN Table 2 and the ablations. All on ``device``."""
    from engine.device import resolve_device
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS, installed_checkpoints
    from engine.models.grn import METHODS
    from engine.models.registry import load_model
    from engine.models.retrieval import MODEL_NAME

    device = resolve_device(device) if isinstance(device, str) else device
    if not specs:
        found = [(p, m) for p, m in installed_checkpoints() if m.model == MODEL_NAME]
        order = list(METHODS)
        found.sort(key=lambda pm: (order.index(pm[1].config.get("method")) if pm[1].config.get("method") in order else len(order), pm[0].name))
        models = [] if any(m.config.get("method") == "visual" for _, m in found) else [RegionRetrievalModel.visual(device=device)]
        return models + [load_model(p, device=device, family=MODEL_NAME) for p, _ in found]
    models = []
    for spec in specs:
        path = Path(spec)
        if str(spec) == "visual":
            models.append(RegionRetrievalModel.visual(device=device))
        elif path.suffix in (".pt", ".json") or path.exists():
            models.append(load_model(path, device=device, family=MODEL_NAME))
        elif (PACKAGE_CHECKPOINTS / f"{spec}.pt").is_file():
            models.append(load_model(str(spec), device=device, family=MODEL_NAME))
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
    from engine.device import resolve_device
    from engine.models.registry import load_model
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor

    device = resolve_device(device) if isinstance(device, str) else device
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
        network = load_model(rpn_checkpoint, device=device, family="rpn")
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
