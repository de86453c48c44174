"""``engine eval matching``: SAN's image↔sentence protocol (SAN §4.1) and its region↔sentence twin.

For a split, the gallery of sentences is the set of distinct sentences (captions for images,
descriptions for regions). A sentence is a match of an image (region) when the image carries it as
a caption (the region's meaning equals the meaning the sentence was written for; without meanings,
the same description). Generic captions shared by many images thus match all of them, and two
wordings of one region meaning match every region of that meaning.

* ``image->text``: each image ranks all sentences; the rank of its best-ranked match counts.
* ``text->image``: each sentence ranks all images; the rank of its best-ranked match counts.
* ``region->text`` / ``text->region``: the same over the split's regions and their descriptions.

R@K is the percentage of queries whose match is within the top K; ``mR`` is the paper's: the mean
of the six recalls (R@1/5/10 of both directions) of the pair, so both rows of a pair carry it.
Saliency quality: mean MAE and IoU (prediction ≥ 0.5) against the masks at image resolution.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import InvalidInputError

__all__ = ["KS", "DIRECTIONS", "MatchingResult", "default_checkpoints", "evaluate_items", "evaluate_matching", "rows_to_markdown", "score_items"]

log = logging.getLogger(__name__)

KS = (1, 5, 10)
DIRECTIONS = ("image->text", "text->image", "region->text", "text->region")


@dataclass
class MatchingResult:
    """Recalls (percent) per direction: ``recalls[direction][K]``."""

    recalls: dict[str, dict[int, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def m_r(self, direction: str) -> float:
        """The paper's mR of the pair ``direction`` belongs to."""
        kind = "image" if "image" in direction else "region"
        pair = [d for d in DIRECTIONS if kind in d and d in self.recalls]
        values = [self.recalls[d][k] for d in pair for k in KS]
        return float(np.mean(values)) if values else float("nan")

    def rows(self, method: str = "") -> list[dict[str, Any]]:
        out = []
        for d in DIRECTIONS:
            if d in self.recalls:
                row: dict[str, Any] = {"method": method, "direction": d}
                row.update({f"R@{k}": round(self.recalls[d][k], 2) for k in KS})
                row["mR"] = round(self.m_r(d), 2)
                row["queries"] = self.counts.get(d, 0)
                out.append(row)
        return out

    def summary(self) -> dict[str, float]:
        """Flat metrics for training logs: ``mR`` (both pairs averaged) and each direction's R@K."""
        out = {f"{d}_R@{k}": v for d, rec in self.recalls.items() for k, v in rec.items()}
        pairs = [self.m_r(d) for d in ("image->text", "region->text") if d in self.recalls]
        out["mR"] = float(np.mean(pairs)) if pairs else 0.0
        return out


def _first_match_ranks(scores: np.ndarray, positives: list[np.ndarray]) -> np.ndarray:
    """1-based rank of each row's best-scored positive column (ties count against it)."""
    ranks = np.empty(len(scores), np.int64)
    for i, pos in enumerate(positives):
        best = scores[i, pos].max()
        ranks[i] = int((scores[i] > best).sum()) + 1
    return ranks


def _recalls(ranks: np.ndarray) -> dict[int, float]:
    return {k: 100.0 * float((ranks <= k).mean()) for k in KS}


@torch.no_grad()
def score_items(net: Any, vocab: Any, maps: torch.Tensor, saliency: torch.Tensor, texts: Sequence[str], *, chunk: int = 128) -> np.ndarray:
    """SAN cosine similarities ``[V, T]`` of the visual items and the texts (chunks of ``chunk`` items)."""
    ids, lengths = vocab.encode_batch(list(texts))
    out = []
    for start in range(0, len(maps), chunk):
        v = net.visual(maps[start : start + chunk], saliency[start : start + chunk])
        out.append(net.score_matrix(v, ids, lengths).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(texts)), np.float32)


@torch.no_grad()
def evaluate_items(net: Any, vocab: Any, items: Any) -> MatchingResult:
    """Both pairs of directions over :class:`~engine.training.san.MatchingItems` (see the module doc)."""
    was_training = net.training
    net.eval()
    result = MatchingResult()
    for kind, (v2t, t2v) in (("image", DIRECTIONS[:2]), ("region", DIRECTIONS[2:])):
        rows = items.rows(kind)
        if len(rows) == 0:
            continue
        gallery: dict[str, int] = {}
        text_key: list[str] = []
        for r in rows:
            for t, key in zip(items.texts[r], items.keys[r]):
                if t not in gallery:
                    gallery[t] = len(gallery)
                    text_key.append(key)
        texts = list(gallery)
        key_arr = np.asarray(text_key, dtype=object)
        scores = score_items(net, vocab, items.maps[torch.as_tensor(rows)], items.saliency[torch.as_tensor(rows)], texts)
        pos_v = [np.flatnonzero(np.isin(key_arr, list(set(items.keys[r])))) for r in rows]
        item_keys = [set(items.keys[r]) for r in rows]
        pos_t = [np.asarray([i for i, ks in enumerate(item_keys) if k in ks], np.int64) for k in text_key]
        result.recalls[v2t] = _recalls(_first_match_ranks(scores, pos_v))
        result.recalls[t2v] = _recalls(_first_match_ranks(scores.T, pos_t))
        result.counts[v2t], result.counts[t2v] = len(rows), len(texts)
    net.train(was_training)
    return result


def rows_to_markdown(rows: Sequence[dict[str, Any]], saliency: dict[str, float] | None = None) -> str:
    lines = ["| method | direction | R@1 | R@5 | R@10 | mR |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['direction']} | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['R@10']:.1f} | {r['mR']:.1f} |")
    text = "\n".join(lines) + "\n"
    if saliency:
        text += f"\nsaliency network ({saliency.get('images', 0)} images): MAE {saliency['mae']:.4f}, IoU {saliency['iou']:.4f}\n"
    return text


def evaluate_matching(
    data: Path,
    checkpoints: Sequence[Path],
    *,
    split: str = "test",
    saliency_checkpoint: Path | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every SAN checkpoint's rows on ``split`` of ``data``, and the saliency network's quality there.

    Returns ``(rows, saliency)``; rows as in :meth:`MatchingResult.rows` with the checkpoint's method name.
    """
    from engine.datasets.annotations import read_dataset
    from engine.models.saliency import SaliencyNet
    from engine.models.san import SANModel
    from engine.training.feature_cache import FeatureCache
    from engine.training.saliency import evaluate_saliency, load_saliency_items
    from engine.training.san import build_matching_items
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.region_features import RegionFeatureExtractor
    from indexer.san_features import SALIENCY_LEVELS, SaliencyPooler

    data = Path(data)
    dataset = read_dataset(data)
    images = dataset.split(split).images
    if not images:
        raise InvalidInputError(f"{data} has no images in split {split!r}; choose train, val or test")
    models = [SANModel.from_checkpoint(p) for p in checkpoints]
    backbone = create_backbone(BackboneConfig(), device="cpu")
    saliency = SaliencyNet.from_checkpoint(saliency_checkpoint)
    saliency.check_backbone(backbone.version, backbone.max_size)
    for m in models:
        m.check_saliency(saliency)
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), levels=SALIENCY_LEVELS)
    cache.build(images, progress=progress)
    items = build_matching_items(images, cache, SaliencyPooler(backbone=backbone, network=saliency), progress=progress)
    rows: list[dict[str, Any]] = []
    for m in models:
        rows += evaluate_items(m.net, m.vocab, items).rows(m.method)
    sal_items = load_saliency_items(cache, images, saliency.config)
    quality = evaluate_saliency(saliency, sal_items) if sal_items else {}
    if quality:
        quality["images"] = len(sal_items)
    return rows, quality


def default_checkpoints() -> list[Path]:
    """The installed SAN checkpoints of the ablation rows, in SAN Tables 4–6's order (``gv+gt`` … ``fv+ft``)."""
    from engine.errors import CheckpointError
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS
    from engine.models.san import METHODS

    paths = [PACKAGE_CHECKPOINTS / ("san.pt" if m == "fv+ft" else f"san-{m}.pt") for m in METHODS]
    found = [p for p in paths if p.is_file()]
    if not found:
        raise CheckpointError(f"no SAN checkpoint is installed in {PACKAGE_CHECKPOINTS}; train them with `engine train san` (and san-gv+gt, …) and pass them with --checkpoint")
    return found
