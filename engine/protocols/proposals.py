"""Region proposals from cached backbone maps, and their recall (IoU > 0.5).

:func:`propose_images` runs the RPN over maps from a :class:`~indexer.feature_cache.FeatureCache`
(or :class:`~indexer.feature_cache.ImageMaps` for one image); :func:`image_proposals` keeps the
:data:`POOL` boxes Ref-NMS starts from. Recall follows Ref-NMS Table 1 / GRN's "with RPN proposals"
setting, per box: a region (or object) box is recalled when one of the image's first N proposals
overlaps it with IoU > 0.5 (:func:`engine.metrics.object_recall`).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from engine.datasets.types import ImageAnn
from engine.errors import InvalidInputError
from engine.metrics import object_recall

__all__ = ["DEFAULT_NS", "POOL", "REAL_THRESHOLD", "RPN_TOP", "image_proposals", "propose_images", "recall_table"]


DEFAULT_NS = (10, 50, 100, 300)
"""Numbers of proposals at which recall is reported."""

POOL = 100
"""RPN boxes per image that Ref-NMS starts from."""

REAL_THRESHOLD = 0.5
"""Objectness above which plain NMS's boxes count as the detector's output in the ``real`` setting."""

RPN_TOP = 100
"""Proposals per image in GRN's ``rpn`` setting (retrieval candidates and training proposals)."""


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
    returning a :class:`~indexer.feature_cache.CachedImage` (a ``FeatureCache`` or ``ImageMaps``). Images with maps
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


def image_proposals(network: Any, cache: Any, images: Sequence[ImageAnn], *, progress: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``image -> (boxes [N, 4], objectness [N])``: the RPN's top :data:`POOL` boxes of each image."""
    proposals = propose_images(network, cache, images, max_proposals=POOL, progress=progress)
    return {im.image: (np.asarray(b, np.float64), np.asarray(s, np.float32)) for im, (b, s) in zip(images, proposals)}
