"""Referring-expression grounding top-1 accuracy (Ref-NMS Table 2 layout): CM-Att and CM-Att-Erase,
each alone and with Ref-NMS, with ground-truth boxes and with detected proposals.

* ``gt``: the candidates are the image's ground-truth object boxes; correct when the best-scored
  box is the referent.
* ``det``: the candidates are the RPN's boxes after NMS (IoU 0.5 over objectness, boxes with
  objectness ``< δ`` dropped), as many as plain NMS keeps with objectness ``≥ 0.5`` on that image
  (the ``real`` setting of ``engine eval proposals``); ``+ref-nms``: the same number of boxes after
  Ref-NMS with the expression. Correct when the best-scored box has IoU > 0.5 with the referent.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.boxes import box_iou
from engine.datasets.types import ImageAnn
from engine.models.cm_att import CMAttConfig, GroundingScorer
from engine.protocols.grounding import build_grounding_data, grounding_accuracy, image_vector
from engine.protocols.proposals import REAL_THRESHOLD

__all__ = ["GroundingRow", "evaluate_grounding", "rows_to_markdown"]


@dataclass(frozen=True)
class GroundingRow:
    method: str
    proposals: str
    acc: float
    expressions: int

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "proposals": self.proposals, "acc": self.acc, "expressions": self.expressions}


def evaluate_grounding(
    images: Sequence[ImageAnn],
    cache: Any,
    scorers: Sequence[GroundingScorer],
    proposals: dict[str, tuple[np.ndarray, np.ndarray]],
    ref_nms: Any | None,
    *,
    progress: bool = False,
) -> list[GroundingRow]:
    """Rows ``(method, gt|det, acc)`` for every scorer, and ``method+ref-nms`` on ``det`` when ``ref_nms`` is given."""
    from engine.models.ref_nms import fused_nms

    rows = []
    config = scorers[0].net.config if scorers else CMAttConfig()
    data = build_grounding_data(images, cache, config)
    for scorer in scorers:
        rows.append(GroundingRow(scorer.name, "gt", grounding_accuracy(scorer, data), len(data.texts)))
    delta = ref_nms.config.delta if ref_nms is not None else 0.05
    iou = ref_nms.config.nms_iou if ref_nms is not None else 0.5
    hits = {(s.name, suffix): 0 for s in scorers for suffix in ("", "+ref-nms")}
    total = 0
    for im in tqdm(data.images, desc="grounding (det)", unit="img", disable=not progress, dynamic_ncols=True):
        boxes, objectness = proposals[im.image]
        keep = objectness >= delta
        boxes, objectness = boxes[keep], objectness[keep]
        objects = {o.id: np.asarray(o.box, np.float64) for o in im.objects}
        if len(boxes) == 0:  # nothing detected: every expression of the image is a miss
            total += sum(1 for r in im.refs if r.object in objects)
            continue
        maps = cache.region_maps(im.image, boxes)
        plain = fused_nms(boxes, objectness, None, iou=iou)
        n = max(1, int((objectness[plain] >= REAL_THRESHOLD).sum()))
        vector = image_vector(cache, im.image)
        for ref in im.refs:
            if ref.object not in objects:
                continue
            total += 1
            sets = {"": plain[:n]}
            if ref_nms is not None:
                sets["+ref-nms"] = fused_nms(boxes, objectness, ref_nms.relatedness(maps, ref.expression), iou=iou)[:n]
            for suffix, chosen in sets.items():
                for scorer in scorers:
                    s = scorer.score(maps[chosen], boxes[chosen], (im.width, im.height), vector, ref.expression)
                    best = boxes[chosen[int(np.argmax(s))]]
                    hits[(scorer.name, suffix)] += bool(box_iou(best[None], objects[ref.object][None])[0, 0] > 0.5)
    for (name, suffix), h in hits.items():
        if suffix and ref_nms is None:
            continue
        rows.append(GroundingRow(name + suffix, "det", 100.0 * h / max(total, 1), total))
    return rows


def rows_to_markdown(rows: Sequence[GroundingRow]) -> str:
    methods = list(dict.fromkeys(r.method for r in rows))
    table = {(r.method, r.proposals): r.acc for r in rows}
    lines = ["| method | gt boxes | detected proposals |", "| --- | ---: | ---: |"]
    for m in methods:
        gt = table.get((m, "gt"))
        det = table.get((m, "det"))
        lines.append(f"| {m} | {'—' if gt is None else f'{gt:.2f}'} | {'—' if det is None else f'{det:.2f}'} |")
    return "\n".join(lines) + "\n"
