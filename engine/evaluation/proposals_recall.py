"""Recall of ground-truth regions and objects by the proposal network's top-N proposals (IoU > 0.5).

The protocol of Ref-NMS Table 1 / GRN's "with RPN proposals" setting, applied per box: a region (or
object) box is recalled when one of the image's first N proposals overlaps it with IoU > 0.5
(:func:`engine.metrics.object_recall`). Regions and objects are reported separately.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from engine.datasets.types import ImageAnn
from engine.errors import InvalidInputError
from engine.metrics import object_recall

__all__ = ["DEFAULT_NS", "propose_images", "recall_table", "rpn_recall"]

log = logging.getLogger(__name__)

DEFAULT_NS = (10, 50, 100, 300)


class _MapSource(Protocol):
    def get(self, image: str) -> Any: ...  # a CachedImage: .maps {level: [C, H, W]}, .size (w, h)


def propose_images(
    network: Any,
    cache: _MapSource,
    images: Sequence[ImageAnn],
    *,
    max_proposals: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Proposals ``(boxes [N, 4] original pixels, objectness [N])`` of each image, from its cached maps.

    ``network`` is a :class:`~engine.models.rpn.ProposalNetwork`; ``cache`` anything with ``get(image)``
    returning a :class:`~engine.training.feature_cache.CachedImage` (a ``FeatureCache``). Images with maps
    of the same shape are batched.
    """
    levels = network.config.levels
    device = next(network.parameters()).device
    groups: dict[tuple, list[int]] = defaultdict(list)
    cached = {}
    for i, ann in enumerate(images):
        item = cache.get(ann.image)
        cached[i] = item
        groups[tuple(item.maps[lvl].shape for lvl in levels)].append(i)
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(images)
    with tqdm(total=len(images), desc="proposals", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                maps = {
                    lvl: torch.stack([torch.as_tensor(cached[i].maps[lvl]) for i in chunk]).to(device=device, dtype=torch.float32)
                    for lvl in levels
                }
                results = network.propose(maps, [cached[i].size for i in chunk], max_proposals=max_proposals)
                for i, result in zip(chunk, results):
                    out[i] = result
                bar.update(len(chunk))
    return [r for r in out if r is not None]


def recall_table(proposals: Sequence[tuple[np.ndarray, np.ndarray] | np.ndarray], images: Sequence[ImageAnn], ns: Sequence[int] = DEFAULT_NS) -> dict[str, Any]:
    """``{"regions": {n: recall}, "objects": {n: recall}, "images": count}`` of ``proposals`` (one per image, best first).

    Recall is the fraction of boxes (regions, objects) hit with IoU > 0.5 by the image's first ``n`` proposals;
    ``nan`` when the images hold no box of that kind.
    """
    if len(proposals) != len(images):
        raise InvalidInputError(f"got proposals for {len(proposals)} images but {len(images)} images; give one proposal array per image")
    if not ns or any(int(n) < 1 for n in ns):
        raise InvalidInputError(f"numbers of proposals must be positive integers, got {list(ns)}")
    boxes = [p[0] if isinstance(p, tuple) else p for p in proposals]
    table: dict[str, Any] = {"images": len(images)}
    for kind in ("regions", "objects"):
        per_box_props: list[np.ndarray] = []
        targets: list[tuple[float, float, float, float]] = []
        for props, ann in zip(boxes, images):
            for item in getattr(ann, kind):
                per_box_props.append(props)
                targets.append(item.box)
        if not targets:
            table[kind] = {int(n): math.nan for n in ns}
            continue
        table[kind] = {int(n): object_recall(per_box_props, np.asarray(targets, np.float64), top_n=int(n)).referent for n in ns}
    return table


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
    from engine.models.rpn import ProposalNetwork
    from engine.training.feature_cache import FeatureCache
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.region_features import RegionFeatureExtractor

    data = Path(data)
    dataset = read_dataset(data)
    images = dataset.images if split == "all" else dataset.split(split).images
    if not images:
        splits = sorted({im.split or "none" for im in dataset.images})
        raise InvalidInputError(f"split {split!r} of {data} holds no images; choose one of {splits} or 'all'")
    target = resolve_device(device)
    network = ProposalNetwork.from_checkpoint(checkpoint, device=target)
    backbone = create_backbone(BackboneConfig(max_size=network.config.max_size), device=target)
    network.check_backbone(backbone.version, backbone.max_size)
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), levels=network.config.levels)
    proposals = propose_images(network, cache, images, max_proposals=max(int(n) for n in ns), progress=progress)
    table = recall_table(proposals, images, ns)
    log.info("RPN %s on %s:%s (%d images): regions %s, objects %s", network.version, data, split, len(images), table["regions"], table["objects"])
    return table
