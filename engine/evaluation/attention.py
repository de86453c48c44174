"""``engine eval attention``: weakly supervised phrase localization (MCB attention paper, Tables 1–2).

Every phrase of the split is grounded on its own image: a region's ``description`` (ground truth:
the region box) and a referring expression (ground truth: its object's box). The predicted box is
:func:`engine.models.mcb.map_to_box` of the phrase's attention map; localization accuracy is the
fraction of phrases with IoU > 0.3 / 0.4 / 0.5, and the mean IoU (:func:`engine.metrics.localization_accuracy`).

Baseline ``center-box``: the same box for every phrase, centred on the image, its width and height
the median width and height (as fractions of the image's) of the training split's phrase boxes.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.datasets.types import Dataset
from engine.errors import InvalidInputError
from engine.protocols.attention import THRESHOLDS, AttentionRow, ground_split, image_phrases, localization_row

if TYPE_CHECKING:
    import torch

__all__ = ["center_box", "center_box_size", "evaluate_attention", "rows_to_markdown"]


def center_box_size(split: Dataset) -> tuple[float, float]:
    """Median phrase-box width and height of ``split`` as fractions of the image's width and height."""
    rel = [((p.box[2] - p.box[0]) / im.width, (p.box[3] - p.box[1]) / im.height) for im in split.images for p in image_phrases(im)]
    if not rel:
        raise InvalidInputError(f"{split.name or 'the split'} has no phrases (region descriptions or referring expressions) to size the centre box")
    arr = np.asarray(rel)
    return float(np.median(arr[:, 0])), float(np.median(arr[:, 1]))


def center_box(size: tuple[int, int], rel: tuple[float, float]) -> tuple[float, float, float, float]:
    """The box of relative size ``rel`` (w, h fractions) centred on an image of ``size`` (w, h)."""
    w, h = size
    bw, bh = rel[0] * w, rel[1] * h
    return ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)


def evaluate_attention(data: Path, models: Sequence[Any], *, split: str = "test", device: "str | torch.device" = "cpu", progress: bool = True) -> list[AttentionRow]:
    """Rows for ``center-box`` and each :class:`~engine.models.mcb.GroundingModel` over every phrase of
    ``split``, followed by the same rows restricted to each phrase kind (``phrases`` = ``region`` / ``ref``).
    The backbone runs on ``device`` (the models where they were loaded, e.g. by ``load_model(..., device=...)``)."""
    from engine.datasets.annotations import read_dataset
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor

    dataset = read_dataset(Path(data))
    part = dataset.split(split)
    if not part.images:
        raise InvalidInputError(f"{data} has no images in the {split!r} split; choose train, val or test")
    train = dataset.split("train")
    rel = center_box_size(train if train.images else part)
    per_method: list[tuple[str, list, list, list]] = []
    gt_all = [(p.box, p.kind) for im in part.images for p in image_phrases(im)]
    if not gt_all:
        raise InvalidInputError(f"the {split!r} split of {data} has no phrases (region descriptions or referring expressions)")
    center = [center_box((im.width, im.height), rel) for im in part.images for _ in image_phrases(im)]
    per_method.append(("center-box", center, [b for b, _ in gt_all], [k for _, k in gt_all]))
    if models:
        backbone = create_backbone(BackboneConfig(max_size=models[0].config.max_size), device=device)
        cache = FeatureCache(Path(data), RegionFeatureExtractor(backbone=backbone), levels=tuple(models[0].config.levels))
        for model in models:
            if model.config.backbone and model.config.backbone != backbone.version:
                raise InvalidInputError(f"model {model.name} was trained on backbone {model.config.backbone}, this engine runs {backbone.version}; retrain it")
            pred, gt, kinds = ground_split(model, part.images, cache.get, progress=progress)
            per_method.append((model.name, pred, gt, kinds))
    rows = [localization_row(name, pred, gt) for name, pred, gt, _ in per_method]
    for kind in ("region", "ref"):
        for name, pred, gt, kinds in per_method:
            keep = [i for i, k in enumerate(kinds) if k == kind]
            if keep:
                rows.append(localization_row(name, [pred[i] for i in keep], [gt[i] for i in keep], kind))
    return rows


def rows_to_markdown(rows: Sequence[AttentionRow]) -> str:
    """The rows as a markdown table (percent)."""
    lines = ["| method | phrases | n | acc@0.3 | acc@0.4 | acc@0.5 | mean IoU |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.method} | {r.phrases} | {r.n} | " + " | ".join(f"{r.acc[t]:.2f}" for t in THRESHOLDS) + f" | {r.mean_iou:.2f} |")
    return "\n".join(lines) + "\n"
