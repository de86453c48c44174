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
import torch
from tqdm import tqdm

from engine.boxes import box_iou
from engine.datasets.types import ImageAnn
from engine.errors import InvalidInputError
from engine.models.cm_att import Candidates, CMAttConfig, GroundingScorer, build_candidates

__all__ = ["GROUNDING_TARGETS", "GroundingData", "GroundingRow", "build_grounding_data", "grounding_accuracy", "evaluate_grounding", "rows_to_markdown"]


GROUNDING_TARGETS = ("refs", "regions")


@dataclass
class GroundingData:
    """The expressions of some images and every object of those images as candidates (flattened).

    Image ``g``'s objects are candidate rows ``offsets[g] : offsets[g] + counts[g]``; expression
    ``r`` belongs to image ``ref_image[r]`` and refers to candidate row ``ref_row[r]``.
    """

    config: CMAttConfig
    images: list[ImageAnn]
    texts: list[str]
    ref_image: np.ndarray
    ref_row: np.ndarray
    counts: np.ndarray
    offsets: np.ndarray
    candidates: Candidates
    image_vectors: torch.Tensor


def _image_vector(cache: Any, image: str) -> np.ndarray:
    level = cache.extractor.config.level
    return cache.get(image).maps[level].astype(np.float32).mean(axis=(1, 2))


def _targets(im: ImageAnn, targets: str) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Candidate boxes of an image and its ``(expression, candidate index)`` pairs.

    ``refs``: the objects are the candidates, each referring expression points at its object.
    ``regions``: the objects *and* the described regions are the candidates, each region description
    points at its region's box (so a box covering only one of the objects it mentions is a negative).
    """
    boxes = [o.box for o in im.objects]
    if targets == "refs":
        index = {o.id: k for k, o in enumerate(im.objects)}
        return np.asarray(boxes, np.float64).reshape(-1, 4), [(r.expression, index[r.object]) for r in im.refs if r.object in index]
    pairs = [(r.description, len(boxes) + k) for k, r in enumerate(im.regions)]
    return np.asarray(boxes + [r.box for r in im.regions], np.float64).reshape(-1, 4), pairs


def build_grounding_data(images: Sequence[ImageAnn], cache: Any, config: CMAttConfig, *, targets: str = "refs") -> GroundingData:
    """RoI maps of every candidate and context features, from the dataset's backbone cache
    (``targets``: ``refs`` — referring expressions over objects — or ``regions`` — region
    descriptions over objects and regions, see :func:`_targets`)."""
    if targets not in GROUNDING_TARGETS:
        raise InvalidInputError(f"grounding targets must be one of {', '.join(GROUNDING_TARGETS)}, got {targets!r}")
    texts, ref_image, ref_row, counts, offsets, parts, vectors = [], [], [], [], [], [], []
    kept: list[ImageAnn] = []
    row = 0
    for im in images:
        boxes, pairs = _targets(im, targets)
        if not pairs:
            continue
        g = len(kept)
        kept.append(im)
        parts.append(build_candidates(cache.region_maps(im.image, boxes), boxes, (im.width, im.height), k=config.contexts))
        vectors.append(_image_vector(cache, im.image))
        for text, k in pairs:
            texts.append(text)
            ref_image.append(g)
            ref_row.append(row + k)
        counts.append(len(boxes))
        offsets.append(row)
        row += len(boxes)
    cat = (lambda name: torch.cat([getattr(p, name) for p in parts])) if parts else None
    empty = Candidates(torch.zeros(0, config.visual_dim, 7, 7), torch.zeros(0, config.contexts + 1, 6), torch.zeros(0, config.contexts, config.visual_dim + 5), torch.zeros(0, config.contexts + 1, dtype=torch.bool), torch.zeros(0, config.contexts, dtype=torch.bool))
    candidates = Candidates(cat("maps"), cat("loc_ctx"), cat("rel_ctx"), cat("loc_mask"), cat("rel_mask")) if cat else empty
    return GroundingData(
        config=config,
        images=kept,
        texts=texts,
        ref_image=np.asarray(ref_image, np.int64),
        ref_row=np.asarray(ref_row, np.int64),
        counts=np.asarray(counts, np.int64),
        offsets=np.asarray(offsets, np.int64),
        candidates=candidates,
        image_vectors=torch.as_tensor(np.asarray(vectors, np.float32).reshape(len(vectors), -1)),
    )


@torch.no_grad()
def grounding_accuracy(scorer: GroundingScorer, data: GroundingData) -> float:
    """Top-1 accuracy (percent) with ground-truth boxes: the best-scored object is the referent."""
    if not len(data.texts):
        raise InvalidInputError("no referring expressions to ground; check that the split holds refs")
    net = scorer.net
    was = net.training
    net.eval()
    correct = 0
    for r, text in enumerate(data.texts):
        g = data.ref_image[r]
        rows = torch.arange(data.offsets[g], data.offsets[g] + data.counts[g])
        ids, lengths = scorer.vocab.encode_batch([text])
        s, _ = net(data.candidates.select(rows), torch.zeros(len(rows), dtype=torch.long), ids, lengths, data.image_vectors[g : g + 1])
        correct += int(rows[int(s.argmax())]) == int(data.ref_row[r])
    net.train(was)
    return 100.0 * correct / len(data.texts)


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
    from engine.evaluation.ref_nms import REAL_THRESHOLD
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
        vector = _image_vector(cache, im.image)
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
