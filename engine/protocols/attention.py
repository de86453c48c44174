"""Weakly supervised phrase localization (MCB attention paper, Tables 1–2): the phrases of an image,
their predicted boxes and the localization accuracy at IoU 0.3 / 0.4 / 0.5 with the mean IoU
(:func:`engine.metrics.localization_accuracy`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.datasets.types import ImageAnn
from engine.metrics import localization_accuracy

__all__ = ["THRESHOLDS", "AttentionRow", "Phrase", "ground_split", "image_phrases", "localization_row"]


THRESHOLDS = (0.3, 0.4, 0.5)


@dataclass(frozen=True)
class Phrase:
    """A phrase of an image with its ground-truth box; ``kind`` is ``"region"`` or ``"ref"``."""

    text: str
    box: tuple[float, float, float, float]
    kind: str


def image_phrases(image: ImageAnn) -> list[Phrase]:
    """The image's region descriptions and referring expressions with their boxes (wordless texts left out)."""
    from engine.models.vocab import tokenize

    objects = {o.id: o.box for o in image.objects}
    out = [Phrase(r.description, tuple(map(float, r.box)), "region") for r in image.regions]
    out += [Phrase(r.expression, tuple(map(float, objects[r.object])), "ref") for r in image.refs if r.object in objects]
    return [p for p in out if tokenize(p.text)]


@dataclass(frozen=True)
class AttentionRow:
    """One method's localization figures (accuracies and mean IoU in percent) over ``n`` phrases."""

    method: str
    acc: dict[float, float]
    mean_iou: float
    n: int
    phrases: str = "all"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        out.update({f"acc@{t}": round(v, 3) for t, v in self.acc.items()})
        out["mean_iou"] = round(self.mean_iou, 3)
        out["phrases"] = self.phrases
        out["n"] = self.n
        return out


def localization_row(method: str, pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]], phrases: str = "all") -> AttentionRow:
    """The row of ``method`` from predicted and ground-truth boxes paired by position (percent)."""
    res = localization_accuracy(np.asarray(pred, np.float64), np.asarray(gt, np.float64), thresholds=THRESHOLDS)
    return AttentionRow(method, {t: 100.0 * a for t, a in res.accuracy_at.items()}, 100.0 * res.mean_iou, res.n, phrases)


def ground_split(model: Any, images: Sequence[ImageAnn], get_levels: Any, *, progress: bool = False, threshold: float | None = None) -> tuple[list[tuple[float, ...]], list[tuple[float, ...]], list[str]]:
    """``(predicted boxes, ground-truth boxes, kinds)`` of every phrase of ``images``; ``model`` is a
    :class:`~engine.models.mcb.GroundingModel`, ``get_levels(image)`` returns the image's cached maps
    (a :class:`~indexer.feature_cache.CachedImage`)."""
    pred, gt, kinds = [], [], []
    for im in tqdm(images, desc=f"ground {getattr(model, 'name', '')}", unit="img", disable=not progress, dynamic_ncols=True):
        phrases = image_phrases(im)
        if not phrases:
            continue
        cached = get_levels(im.image)
        pred += model.boxes(cached.maps, cached.size, [p.text for p in phrases], threshold=threshold)
        gt += [p.box for p in phrases]
        kinds += [p.kind for p in phrases]
    return pred, gt, kinds
