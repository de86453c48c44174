"""Saliency quality (SAN §4): the dataset's saliency masks as soft targets on the ``c3`` grid, and the
mean MAE and IoU (prediction ≥ 0.5) of a saliency network at each image's resolution."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.datasets.types import ImageAnn
from engine.imaging import resized_size
from engine.models.saliency import SaliencyConfig, SaliencyNet, mask_targets, saliency_quality, saliency_to_image
from engine.synth.rle import rle_decode

if TYPE_CHECKING:
    from indexer.feature_cache import FeatureCache

__all__ = ["LEVELS", "SaliencyItem", "evaluate_saliency", "load_saliency_items", "shape_batches"]


LEVELS = ("c3", "c4", "c5")


@dataclass(frozen=True)
class SaliencyItem:
    """One image's cached maps (float16 ``[C, H, W]`` per level), its mask and soft targets on the ``c3`` grid."""

    image: str
    size: tuple[int, int]
    maps: dict[str, torch.Tensor]
    mask: np.ndarray  # bool [h, w]
    target: torch.Tensor  # float32 [1, H3, W3]
    valid: torch.Tensor  # bool [1, H3, W3]


def load_saliency_items(cache: FeatureCache, images: Sequence[ImageAnn], config: SaliencyConfig) -> list[SaliencyItem]:
    """The cached maps and targets of every image with a saliency mask (others are skipped)."""
    from engine.imaging import resized_size

    items = []
    for ann in images:
        if ann.saliency is None:
            continue
        cached = cache.get(ann.image)
        mask = rle_decode(ann.saliency)
        grid = cached.maps["c3"].shape[-2:]
        target, valid = mask_targets(mask, resized_size(*cached.size, config.max_size), grid, stride=config.stride, offset=config.offset)
        maps = {lvl: torch.from_numpy(np.ascontiguousarray(cached.maps[lvl])) for lvl in LEVELS}
        items.append(SaliencyItem(ann.image, cached.size, maps, mask, torch.from_numpy(target)[None], torch.from_numpy(valid)[None]))
    return items


@torch.no_grad()
def evaluate_saliency(net: SaliencyNet, items: Sequence[SaliencyItem]) -> dict[str, float]:
    """Mean MAE and IoU (prediction ≥ 0.5) of ``net`` over ``items`` at each image's resolution."""
    if not items:
        return {}
    maes, ious = [], []
    cfg = net.config
    device = net.input_scale.device
    for batch in shape_batches(items, 32, None):
        _, s1 = net({lvl: torch.stack([it.maps[lvl] for it in batch]).to(device).float() for lvl in LEVELS})
        probs = torch.sigmoid(s1[:, 0]).cpu().numpy()
        for it, p in zip(batch, probs):
            mae, iou = saliency_quality(saliency_to_image(p, it.size, stride=cfg.stride, offset=cfg.offset, max_size=cfg.max_size), it.mask)
            maes.append(mae)
            ious.append(iou)
    return {"mae": float(np.mean(maes)), "iou": float(np.mean(ious))}


def shape_batches(items: Sequence[SaliencyItem], size: int, rng: np.random.Generator | None) -> Iterator[list[SaliencyItem]]:
    """Batches of items whose maps share one shape (shuffled when ``rng`` is given)."""
    groups: dict[tuple, list[SaliencyItem]] = defaultdict(list)
    for it in items:
        groups[tuple(m.shape for m in it.maps.values())].append(it)
    chunks = []
    for group in groups.values():
        order = rng.permutation(len(group)) if rng is not None else np.arange(len(group))
        chunks.extend([group[j] for j in order[i : i + size]] for i in range(0, len(group), size))
    for k in rng.permutation(len(chunks)) if rng is not None else range(len(chunks)):
        yield chunks[k]
