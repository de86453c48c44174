"""Ref-NMS Table 1 protocol: recall of the referent and of the contextual objects with few proposals.

Protocol (documented in ``docs/ref-nms.md``):

* For every image of the split, the shipped RPN proposes its top :data:`~engine.protocols.proposals.POOL`
  boxes with their objectness ``c_i`` (the "initial bboxes" of the detector); boxes with ``c_i < δ`` are dropped.
* ``nms``: greedy NMS (IoU ``nms_iou``) over ``c_i``; ``ref-nms-b`` / ``ref-nms-r``: the same NMS over
  ``s_i = r_i × c_i`` with each referring expression's relatedness ``r_i``.
* ``n = N``: the top N kept boxes. ``n = "real"``: as many boxes as plain NMS keeps with
  ``c_i ≥`` :data:`~engine.protocols.proposals.REAL_THRESHOLD` on that image (a detector's usual
  output, a handful), the same number for every method, so only the ranking differs.
* Referent recall: the fraction of expressions whose referent box has IoU > 0.5 with a kept box.
  Context recall: the fraction of the mentioned context objects (all expressions pooled) covered so.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.boxes import box_iou
from engine.datasets.types import ImageAnn
from engine.errors import InvalidInputError
from engine.models.ref_nms import RefNMSModel, fused_nms
from engine.protocols.proposals import REAL_THRESHOLD

__all__ = ["DEFAULT_NS", "ProposalRow", "RefTarget", "evaluate_ref_proposals", "ref_targets"]


DEFAULT_NS = (1, 3, 5, 10, 100)


@dataclass(frozen=True)
class RefTarget:
    """One referring expression with its referent box and the boxes of the context objects it mentions."""

    image: str
    expression: str
    referent: np.ndarray  # [4]
    context: np.ndarray  # [K, 4]


@dataclass(frozen=True)
class ProposalRow:
    method: str
    n: int | str
    referent_recall: float
    context_recall: float
    expressions: int
    boxes: float  # mean boxes kept per expression

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "n": self.n, "referent_recall": self.referent_recall, "context_recall": self.context_recall, "expressions": self.expressions, "boxes": self.boxes}


def ref_targets(images: Sequence[ImageAnn]) -> list[RefTarget]:
    """The referring expressions of ``images`` with their referent and context boxes (context objects
    are known on synthetic data: the ``context_objects`` of each ``ref``)."""
    out = []
    for im in images:
        boxes = {o.id: np.asarray(o.box, np.float64) for o in im.objects}
        for ref in im.refs:
            if ref.object not in boxes:
                continue
            context = np.asarray([boxes[c] for c in ref.context_objects if c in boxes], np.float64).reshape(-1, 4)
            out.append(RefTarget(image=im.image, expression=ref.expression, referent=boxes[ref.object], context=context))
    return out


def _covered(kept: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Which target boxes have IoU > 0.5 with one of the kept boxes."""
    if len(targets) == 0:
        return np.zeros(0, bool)
    if len(kept) == 0:
        return np.zeros(len(targets), bool)
    return (box_iou(targets, kept) > 0.5).any(axis=1)


def evaluate_ref_proposals(
    images: Sequence[ImageAnn],
    proposals: dict[str, tuple[np.ndarray, np.ndarray]],
    region_maps: Any,
    models: Sequence[RefNMSModel],
    *,
    ns: Sequence[int] = DEFAULT_NS,
    delta: float = 0.05,
    nms_iou: float = 0.5,
    progress: bool = False,
) -> list[ProposalRow]:
    """Table 1 rows for plain NMS and each model, for every N in ``ns`` and the ``real`` setting.

    ``region_maps(image, boxes) -> [N, C, 7, 7]`` gives the RoI maps (e.g. ``FeatureCache.region_maps``).
    """
    targets = ref_targets(images)
    if not targets:
        raise InvalidInputError("the split holds no referring expressions with known referents")
    methods = ["nms", *(m.name for m in models)]
    settings: list[int | str] = [*ns, "real"]
    hits = {(m, n): [0, 0, 0, 0.0] for m in methods for n in settings}  # referent hits, context hits, context total, boxes
    by_image: dict[str, list[RefTarget]] = {}
    for t in targets:
        by_image.setdefault(t.image, []).append(t)
    for image, refs in tqdm(by_image.items(), desc="ref-nms recall", unit="img", disable=not progress, dynamic_ncols=True):
        boxes, objectness = proposals[image]
        keep_mask = objectness >= delta
        boxes, objectness = boxes[keep_mask], objectness[keep_mask]
        plain = fused_nms(boxes, objectness, None, iou=nms_iou)
        n_real = max(1, int((objectness[plain] >= REAL_THRESHOLD).sum()))
        maps = region_maps(image, boxes) if models else None
        for t in refs:
            orders = {"nms": plain}
            for m in models:
                orders[m.name] = fused_nms(boxes, objectness, m.relatedness(maps, t.expression), iou=nms_iou)
            for method, order in orders.items():
                for n in settings:
                    top = boxes[order[: (n_real if n == "real" else int(n))]]
                    h = hits[(method, n)]
                    h[0] += bool(_covered(top, t.referent[None])[0])
                    h[1] += int(_covered(top, t.context).sum())
                    h[2] += len(t.context)
                    h[3] += len(top)
    total = len(targets)
    return [
        ProposalRow(method=m, n=n, referent_recall=100.0 * h[0] / total, context_recall=100.0 * h[1] / max(h[2], 1), expressions=total, boxes=h[3] / total)
        for (m, n), h in hits.items()
    ]
