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

import numpy as np

from engine.errors import InvalidInputError
from engine.protocols.proposals import DEFAULT_NS, propose_images, recall_table

__all__ = ["PROPOSAL_SOURCES", "rpn_recall", "proposal_recall", "mix_proposals"]

PROPOSAL_SOURCES: tuple[str, ...] = ("rpn", "selective-search", "mix")

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
    data = Path(data)
    images = _split_images(data, split)
    proposals = _rpn_proposals(data, images, checkpoint=checkpoint, top=max(int(n) for n in ns), device=device, progress=progress)
    table = recall_table(proposals, images, ns)
    log.info("RPN on %s:%s (%d images): regions %s, objects %s", data, split, len(images), table["regions"], table["objects"])
    return table


def _split_images(data: Path, split: str, limit: int | None = None) -> list:
    """The ``split`` images of ``data`` (``all``: every image), the first ``limit`` of them when given."""
    from engine.datasets.annotations import read_dataset

    dataset = read_dataset(Path(data))
    images = dataset.images if split == "all" else dataset.split(split).images
    if not images:
        splits = sorted({im.split or "none" for im in dataset.images})
        raise InvalidInputError(f"split {split!r} of {data} holds no images; choose one of {splits} or 'all'")
    return images[:limit] if limit is not None else images


def mix_proposals(rpn: tuple[np.ndarray, np.ndarray], selective: tuple[np.ndarray, np.ndarray], n: int, *, iou: float = 0.7) -> np.ndarray:
    """The first ``n`` boxes of a mix: the RPN's and selective search's lists taken alternately (RPN first),
    a box dropped when it overlaps one already taken with IoU > ``iou``. ``float32 [<= n, 4]``."""
    from torchvision.ops import box_iou
    import torch

    a, b = np.asarray(rpn[0], np.float32).reshape(-1, 4), np.asarray(selective[0], np.float32).reshape(-1, 4)
    order = [x for pair in zip(a, b) for x in pair] + list(a[len(b):]) + list(b[len(a):])
    taken: list[np.ndarray] = []
    for box in order:
        if len(taken) == n:
            break
        if taken and float(box_iou(torch.from_numpy(box[None]), torch.from_numpy(np.stack(taken))).max()) > iou:
            continue
        taken.append(box)
    return np.stack(taken) if taken else np.zeros((0, 4), np.float32)


def proposal_recall(
    data: Path,
    *,
    source: str,
    checkpoint: Path | None = None,
    split: str = "test",
    ns: Sequence[int] = DEFAULT_NS,
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Like :func:`rpn_recall` for any proposal ``source`` of :data:`PROPOSAL_SOURCES`: the RPN, selective search
    (OpenCV fast mode, ~2 s per 640 px image here: ``limit`` takes the split's first images only) or their
    :func:`mix_proposals`. Returns :func:`rpn_recall`'s table plus ``"source"``."""
    from tqdm import tqdm

    from indexer.images import load_image
    from indexer.proposals import selective_search

    if source not in PROPOSAL_SOURCES:
        raise InvalidInputError(f"proposal source {source!r} is not known; choose one of {', '.join(PROPOSAL_SOURCES)}")
    data = Path(data)
    images = _split_images(data, split, limit)
    top = max(int(n) for n in ns)
    rpn: list[tuple[np.ndarray, np.ndarray]] = []
    if source in ("rpn", "mix"):
        rpn = _rpn_proposals(data, images, checkpoint=checkpoint, top=top, device=device, progress=progress)
    if source == "rpn":
        return {**recall_table(rpn, images, ns), "source": source}
    found = []
    for ann in tqdm(images, desc="selective search", unit="img", disable=not progress, dynamic_ncols=True):
        found.append(selective_search(np.asarray(load_image(data / ann.image)), max_proposals=top))
    if source == "selective-search":
        return {**recall_table(found, images, ns), "source": source}
    table: dict[str, Any] = {"images": len(images), "source": source, "regions": {}, "objects": {}}
    for n in ns:
        mixed = [mix_proposals(r, f, int(n)) for r, f in zip(rpn, found)]
        part = recall_table(mixed, images, (int(n),))
        for kind in ("regions", "objects"):
            table[kind][int(n)] = part[kind][int(n)]
    return table


def _rpn_proposals(data: Path, images: Sequence, *, checkpoint: Path | None, top: int, device: str, progress: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    from engine.device import resolve_device
    from engine.models.registry import load_model
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor

    target = resolve_device(device)
    network = load_model(checkpoint, device=target, family="rpn")
    backbone = create_backbone(BackboneConfig(max_size=network.config.max_size), device=target)
    network.check_backbone(backbone.version, backbone.max_size)
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), levels=network.config.levels)
    return propose_images(network, cache, images, max_proposals=top, progress=progress)
