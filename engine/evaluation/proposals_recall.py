"""Recall of ground-truth regions and objects by the proposal network's top-N proposals (IoU > 0.5).

The protocol of Ref-NMS Table 1 / GRN's "with RPN proposals" setting, applied per box: a region (or
object) box is recalled when one of the image's first N proposals overlaps it with IoU > 0.5
(:func:`engine.metrics.object_recall`). Regions and objects are reported separately.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import InvalidInputError
from engine.protocols.proposals import DEFAULT_NS, propose_images, recall_table

__all__ = ["rpn_recall"]

log = logging.getLogger(__name__)


def rpn_recall(
    data: Path,
    *,
    checkpoint: Path | None,
    split: str = "test",
    ns: Sequence[int] = DEFAULT_NS,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Recall of the ``split`` images' region and object boxes by the RPN's top-``n`` proposals, for each ``n`` in ``ns``.

    Args:
        data: dataset folder with ``annotations.jsonl`` (image paths relative to it).
        checkpoint: an RPN checkpoint; ``None`` is the shipped one.
        split: ``train``, ``val`` or ``test``; ``all`` uses every image.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns ``{"regions": {n: recall}, "objects": {n: recall}, "images": count}`` (recalls are fractions in [0, 1]).
    Backbone maps come from (and go into) the dataset's feature cache, ``DATA/.engine-cache/``.
    """
    from engine.datasets.annotations import read_dataset
    from engine.device import resolve_device
    from engine.models.registry import load_model
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor

    data = Path(data)
    dataset = read_dataset(data)
    images = dataset.images if split == "all" else dataset.split(split).images
    if not images:
        splits = sorted({im.split or "none" for im in dataset.images})
        raise InvalidInputError(f"split {split!r} of {data} holds no images; choose one of {splits} or 'all'")
    target = resolve_device(device)
    network = load_model(checkpoint, device=target, family="rpn")
    backbone = create_backbone(BackboneConfig(max_size=network.config.max_size), device=target)
    network.check_backbone(backbone.version, backbone.max_size)
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), levels=network.config.levels)
    proposals = propose_images(network, cache, images, max_proposals=max(int(n) for n in ns), progress=progress)
    table = recall_table(proposals, images, ns)
    log.info("RPN %s on %s:%s (%d images): regions %s, objects %s", network.version, data, split, len(images), table["regions"], table["objects"])
    return table
