"""Attention pictures of the MCB grounding model: where a phrase is in an image, with no proposals.

Used by ``engine ground IMAGE --text ... --method attention`` (one picture) and by
``engine query ... --explain DIR`` (one picture per hit: the hit's box beside the query text's
attention map over the hit image). A text in words the MCB model does not know is explained by the
open vocabulary instead (:class:`query.vocabulary_grounding.VocabularyGrounder`, the same pictures
with its map of proposal scores): any :class:`Grounder` draws them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from engine.boxes import Box
from engine.errors import InvalidInputError
from engine.models.mcb import map_to_box
from engine.models.vocab import tokenize
from engine.results import Hit
from indexer.images import load_image
from query.output import writing
from query.render import HIT_COLOUR, draw_box

__all__ = ["Grounding", "Grounder", "AttentionGrounder", "attention_picture", "explain_hits", "heat_colours"]

ATTENTION_COLOUR = (40, 160, 255)


@dataclass(frozen=True)
class Grounding:
    """A phrase's box (xyxy original pixels), its map over the image ``[h, w]`` in [0, 1] and its peak;
    ``method``: what made the map (``attention``: MCB; ``vocabulary``: proposal scores of the open vocabulary)."""

    text: str
    box: Box
    heat: np.ndarray
    peak: float
    method: str = "attention"


class Grounder(Protocol):
    """Anything that grounds phrases in an image as :class:`Grounding` (MCB attention, the open vocabulary)."""

    def check_text(self, text: str | None) -> str: ...

    def ground(self, image: Image.Image, texts: Sequence[str]) -> list[Grounding]: ...


class AttentionGrounder:
    """The shipped (or a given) MCB grounding model with the frozen backbone that feeds it."""

    def __init__(self, checkpoint: Path | str | None = None, *, device: str = "cpu") -> None:
        from engine.device import resolve_device
        from engine.models.registry import load_model

        target = resolve_device(device)
        self.model = load_model(checkpoint, device=target, family="mcb-attention")
        self.device = target
        self._backbone = None  # built on the first grounding: routing a text by the model's words needs none

    @property
    def backbone(self):  # -> indexer.backbone.Backbone
        """The frozen backbone the model was trained on, built once (a clear error for another one)."""
        if self._backbone is None:
            from indexer.backbone import BackboneConfig, create_backbone

            backbone = create_backbone(BackboneConfig(max_size=self.model.config.max_size), device=self.device)
            if self.model.config.backbone and self.model.config.backbone != backbone.version:
                raise InvalidInputError(f"the grounding model was trained on backbone {self.model.config.backbone}, this engine runs {backbone.version}; retrain it with `engine train mcb`")
            self._backbone = backbone
        return self._backbone

    def knows(self, text: str) -> bool:
        """Whether the model was trained on every content word of ``text`` (else the open vocabulary reads it)."""
        from query.concept_search import text_models_cover

        return text_models_cover(text, self.model.vocab)

    def check_text(self, text: str | None) -> str:
        """``text`` if it holds a word, else :class:`InvalidInputError`."""
        if text is None or not tokenize(text):
            raise InvalidInputError(f"--text {text!r} holds no words; describe the region in words, e.g. 'the red circle'")
        return text

    @torch.no_grad()
    def ground(self, image: Image.Image, texts: Sequence[str]) -> list[Grounding]:
        """Ground every text in ``image`` (attention map → box by :func:`~engine.models.mcb.map_to_box`)."""
        from indexer.backbone import preprocess

        texts = [self.check_text(t) for t in texts]
        batch, _ = preprocess([image], max_size=self.backbone.max_size)
        out = self.backbone(batch.to(self.device), levels=list(self.model.config.levels))
        levels = {k: v[0].float().cpu() for k, v in out.items()}
        grids = self.model.attention(levels, image.size, list(texts))
        result = []
        for text, grid in zip(texts, grids):
            heat = self.model.heat(grid, image.size)
            box = map_to_box(heat, threshold=self.model.config.threshold)
            result.append(Grounding(text, box, np.clip(heat, 0, 1), float(grid.max())))
        return result


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """A "hot" colour map of a map scaled to its maximum: black → red → yellow → white, uint8 ``[h, w, 3]``."""
    p = np.asarray(heat, np.float32)
    p = p / max(float(p.max()), 1e-6)
    rgb = np.stack([np.clip(3 * p, 0, 1), np.clip(3 * p - 1, 0, 1), np.clip(3 * p - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def attention_picture(image: Image.Image, grounding: Grounding, *, box: Box | None = None, box_label: str | None = None, alpha: float = 0.6) -> Image.Image:
    """Two panels: ``image`` with ``box`` (default: the attention box) drawn, and the attention map
    (relative to its maximum) blended over the image with the attention box; the phrase as a caption."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    left = draw_box(rgb, box if box is not None else grounding.box, colour=HIT_COLOUR if box is not None else ATTENTION_COLOUR, label=box_label)
    p = grounding.heat / max(float(grounding.heat.max()), 1e-6)
    blend = np.asarray(rgb, np.float32) * (1 - alpha * p[..., None]) + heat_colours(grounding.heat).astype(np.float32) * alpha * p[..., None]
    right = draw_box(Image.fromarray(blend.clip(0, 255).astype(np.uint8)), grounding.box, colour=ATTENTION_COLOUR, label=grounding.method)
    caption = 16
    sheet = Image.new("RGB", (2 * w + 8, h + caption), (255, 255, 255))
    sheet.paste(left, (0, caption))
    sheet.paste(right, (w + 8, caption))
    ImageDraw.Draw(sheet).text((4, 2), f'"{grounding.text}"'[:120], fill=(0, 0, 0), font=ImageFont.load_default())
    return sheet


def explain_hits(grounder: Grounder, hits: Sequence[Hit], text: str, out_dir: Path) -> list[Path]:
    """Write ``explain_NN.png`` per hit into ``out_dir``: the hit box beside the map of ``text`` over the hit image."""
    text = grounder.check_text(text)
    out_dir = Path(out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, hit in enumerate(hits, start=1):
        image = load_image(Path(hit.image))
        grounding = grounder.ground(image, [text])[0]
        pic = attention_picture(image, grounding, box=hit.box, box_label=f"#{rank} {hit.score:.3f}")
        path = out_dir / f"explain_{rank:02d}.png"
        with writing(path, partial=path):  # a full disk is one line naming the file, no partial file left
            pic.save(path, format="PNG")
        written.append(path)
    return written

