"""Referring-expression grounding in one image with proposals: RPN → Ref-NMS → CM-Att(-Erase).

``engine ground IMAGE --text "..." --method cm-att``: the RPN proposes boxes, Ref-NMS suppresses by
relatedness × objectness and keeps as many boxes as a detector would output (plain NMS's boxes with
objectness ≥ 0.5, at least one; the ``real`` setting of ``docs/ref-nms.md``), and CM-Att-Erase picks
the box that the expression refers to.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import InvalidInputError
from engine.models.vocab import tokenize

__all__ = ["ReferringGrounding", "ReferringGrounder", "referring_picture"]


@dataclass(frozen=True)
class ReferringGrounding:
    """The grounded box with its CM-Att score, and the candidate boxes it was chosen from."""

    box: tuple[float, float, float, float]
    score: float
    candidates: np.ndarray  # [M, 4]
    relatedness: np.ndarray  # [M] Ref-NMS r_i × c_i of the candidates


class ReferringGrounder:
    """The shipped (or given) RPN, Ref-NMS and CM-Att checkpoints with the frozen backbone."""

    def __init__(self, model: Path | str | None = None, *, ref_nms: Path | str | None = None, device: str = "cpu") -> None:
        """``model`` / ``ref_nms``: checkpoint files or installed names (``None``: the shipped defaults);
        every network and the backbone run on ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``)."""
        from engine.device import resolve_device
        from engine.models.registry import load_model
        from indexer.backbone import BackboneConfig, create_backbone

        target = resolve_device(device)
        self.backbone = create_backbone(BackboneConfig(), device=target)
        self.rpn = load_model(None, device=target, family="rpn")
        self.rpn.check_backbone(self.backbone.version, self.backbone.max_size)
        self.ref_nms = load_model(ref_nms, device=target, family="ref-nms")
        self.scorer = load_model(model, device=target, family="cm-att")

    def ground(self, image: Path, text: str) -> ReferringGrounding:
        """Ground ``text`` in the image file ``image``."""
        from engine.datasets.types import ImageAnn
        from engine.models.ref_nms import fused_nms
        from engine.protocols.grounding import image_vector
        from engine.protocols.proposals import REAL_THRESHOLD, image_proposals
        from indexer.feature_cache import ImageMaps
        from indexer.images import load_image
        from indexer.region_features import RegionFeatureExtractor

        if not tokenize(text or ""):
            raise InvalidInputError(f"--text {text!r} holds no words; describe the object, e.g. 'the red circle left of the blue square'")
        image = Path(image)
        pil = load_image(image)
        maps_of = ImageMaps(pil, image.name, RegionFeatureExtractor(backbone=self.backbone))
        ann = ImageAnn(image=image.name, width=pil.width, height=pil.height)
        boxes, objectness = image_proposals(self.rpn, maps_of, [ann])[image.name]
        keep = objectness >= self.ref_nms.config.delta
        boxes, objectness = boxes[keep], objectness[keep]
        if len(boxes) == 0:
            raise InvalidInputError(f"{image}: the region proposal network found no object to ground the text in")
        maps = maps_of.region_maps(image.name, boxes)
        vector = image_vector(maps_of, image.name)
        iou = self.ref_nms.config.nms_iou
        n = max(1, int((objectness[fused_nms(boxes, objectness, None, iou=iou)] >= REAL_THRESHOLD).sum()))
        r = self.ref_nms.relatedness(maps, text)
        chosen = fused_nms(boxes, objectness, r, iou=iou)[:n]
        scores = self.scorer.score(maps[chosen], boxes[chosen], pil.size, vector, text)
        best = int(np.argmax(scores))
        box = tuple(float(v) for v in boxes[chosen[best]])
        return ReferringGrounding(box=box, score=float(scores[best]), candidates=boxes[chosen], relatedness=(r * objectness)[chosen])


def referring_picture(image: Image.Image, grounding: ReferringGrounding) -> Image.Image:
    """The image with the Ref-NMS candidates (grey, thin) and the grounded box (red, with its score)."""
    from PIL import ImageDraw

    from query.render import HIT_COLOUR, draw_box

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for b in grounding.candidates:
        draw.rectangle([float(v) for v in b], outline=(160, 160, 160), width=1)
    return draw_box(out, grounding.box, colour=HIT_COLOUR, label=f"{grounding.score:.2f}")
