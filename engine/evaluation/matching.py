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
from pathlib import Path
from typing import Any

from engine.errors import InvalidInputError
from engine.protocols.matching import build_matching_items, evaluate_items
from engine.protocols.saliency import evaluate_saliency, load_saliency_items

__all__ = ["default_checkpoints", "evaluate_matching", "rows_to_markdown"]

log = logging.getLogger(__name__)


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
    device: str = "cpu",
    progress: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every SAN checkpoint's rows on ``split`` of ``data``, and the saliency network's quality there
    (the backbone and every model on ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``).

    Returns ``(rows, saliency)``; rows as in :meth:`MatchingResult.rows` with the checkpoint's method name.
    """
    from engine.datasets.annotations import read_dataset
    from engine.device import resolve_device
    from engine.models.registry import load_model
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor
    from indexer.san_features import SALIENCY_LEVELS, SaliencyPooler

    data = Path(data)
    dataset = read_dataset(data)
    images = dataset.split(split).images
    if not images:
        raise InvalidInputError(f"{data} has no images in split {split!r}; choose train, val or test")
    target = resolve_device(device)
    models = [load_model(p, device=target, family="san") for p in checkpoints]
    backbone = create_backbone(BackboneConfig(), device=target)
    saliency = load_model(saliency_checkpoint, device=target, family="saliency")
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
