"""``engine train saliency``: stage 1 of SAN training (SAN §3.5), the saliency network on the dataset's masks.

The targets are each image's ``saliency`` mask of ``annotations.jsonl`` (for the synthetic corpus the
union of its object masks), as soft targets on the ``c3`` grid (:func:`~engine.models.saliency.mask_targets`).
The backbone never runs: its ``c3`` / ``c4`` / ``c5`` maps come from the dataset's
:class:`~indexer.feature_cache.FeatureCache`. Images of the ``train`` split train; the ``val``
split's IoU (prediction ≥ 0.5 against the mask, at image resolution) picks the best epoch; the
``test`` split's MAE and IoU go into the manifest.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.datasets.annotations import read_annotations
from engine.datasets.types import ImageAnn
from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest, save_checkpoint
from engine.models.saliency import MODEL_NAME, MODEL_VERSION, SaliencyConfig, SaliencyNet, saliency_loss
from engine.protocols.saliency import LEVELS, SaliencyItem, evaluate_saliency, load_saliency_items, shape_batches
from engine.training.loop import fit
from engine.training.options import TrainOptions
from indexer.feature_cache import FeatureCache

__all__ = ["SaliencyTrainConfig", "train_saliency"]

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 8


@dataclass(frozen=True)
class SaliencyTrainConfig:
    """Optimisation settings of :func:`train_saliency` (the architecture is :class:`SaliencyConfig`)."""

    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 32


def train_saliency(options: TrainOptions, *, train_config: SaliencyTrainConfig = SaliencyTrainConfig()) -> Manifest:
    """Train a :class:`SaliencyNet` on ``options.data``'s masks and save the best epoch to ``options.out``
    (default ``saliency.pt``). The manifest's metrics hold the validation and test MAE / IoU."""
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.region_features import RegionFeatureExtractor

    started = time.perf_counter()
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    data = Path(options.data)
    epochs = options.epochs if options.epochs is not None else DEFAULT_EPOCHS
    images = read_annotations(data)
    by_split: dict[str, list[ImageAnn]] = defaultdict(list)
    for ann in images:
        by_split[ann.split or "none"].append(ann)
    if not any(im.saliency is not None for im in by_split.get("train", [])):
        raise InvalidInputError(f"{data} has no train-split images with a saliency mask; generate a corpus with `engine synth` (its annotations carry masks)")
    backbone = create_backbone(BackboneConfig(), device=device)
    config = SaliencyConfig(
        in_channels=tuple(backbone.channels[lvl] for lvl in LEVELS),  # type: ignore[arg-type]
        width=train_config.width,
        stride=backbone.strides["c3"],
        offset=backbone.offsets["c3"],
        backbone=backbone.version,
        max_size=backbone.max_size,
    )
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), levels=LEVELS, cache_dir=options.cache_dir)
    cache.build(images, progress=options.progress)
    split_items = {s: load_saliency_items(cache, by_split.get(s, []), config) for s in ("train", "val", "test")}
    train_items = split_items["train"]
    val_items = split_items["val"] or train_items
    net = SaliencyNet(config)
    with torch.no_grad():  # per-level input scale 1 / RMS, so that every level starts on an equal footing
        for i, lvl in enumerate(LEVELS):
            sample = torch.stack([it.maps[lvl] for it in train_items[:: max(1, len(train_items) // 200)]]).float()
            net.input_scale[i] = 1.0 / max(sample.pow(2).mean().sqrt().item(), 1e-6)
    net.to(device)
    log.info("saliency: %d train / %d val / %d test images, %d epochs, device %s", len(train_items), len(val_items), len(split_items["test"]), epochs, device)

    optimizer = torch.optim.AdamW(net.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=train_config.lr * 0.05)

    def loss_fn(model: SaliencyNet, batch: list[SaliencyItem]) -> torch.Tensor:
        s0, s1 = model({lvl: torch.stack([it.maps[lvl] for it in batch]).to(device).float() for lvl in LEVELS})
        return saliency_loss(s0, s1, torch.stack([it.target for it in batch]).to(device), torch.stack([it.valid for it in batch]).to(device))

    result = fit(
        net,
        batches=lambda e: list(shape_batches(train_items, train_config.batch_size, np.random.default_rng([options.seed, e]))),
        loss_fn=loss_fn,
        validate=lambda m: evaluate_saliency(m, val_items),
        metric="iou",
        epochs=epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=options.progress,
        desc="saliency",
        device=device,
    )
    net.eval()
    test = evaluate_saliency(net, split_items["test"])
    seconds = time.perf_counter() - started
    log.info("saliency: val %s, test %s, %.0f s", result.best_metrics, test, seconds)
    out = Path(options.out) if options.out is not None else Path("saliency.pt")
    metrics: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        **{f"val_{k}": v for k, v in result.best_metrics.items()},
        **{f"test_{k}": v for k, v in test.items()},
        "test_images": len(split_items["test"]),
        "train_seconds": round(seconds, 1),
        "history": result.history,
    }
    manifest = Manifest(
        model=MODEL_NAME,
        version=MODEL_VERSION,
        config={**config.to_dict(), "train": {**train_config.__dict__, "epochs": epochs}},
        command=options.command or f"engine train saliency --data {data} --seed {options.seed}",
        data=f"{data} ({len(train_items)} train / {len(val_items)} val / {len(split_items['test'])} test images with masks)",
        seed=options.seed,
        metrics=metrics,
    )
    return save_checkpoint(out, manifest, net.payload())
