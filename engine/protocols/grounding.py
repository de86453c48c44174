"""Referring-expression grounding with ground-truth boxes (CM-Att-Erase, Ref-NMS Table 2's ``gt`` setting):
every object of an image is a candidate; an expression is grounded correctly when its best-scored
candidate is its referent. ``engine eval grounding`` adds the detected-proposal setting on top.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.datasets.types import ImageAnn
from engine.errors import InvalidInputError
from engine.models.cm_att import Candidates, CMAttConfig, GroundingScorer, build_candidates
from indexer.region_features import image_vectors

__all__ = ["GROUNDING_TARGETS", "GroundingData", "build_grounding_data", "grounding_accuracy", "image_vector"]


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


def image_vector(cache: Any, image: str) -> np.ndarray:
    """The image's context feature: the mean over positions of its map at the extractor's level (float32 ``[C]``)."""
    level = cache.extractor.config.level
    return image_vectors(cache.get(image).maps[level][None])[0]


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
        vectors.append(image_vector(cache, im.image))
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
    device = net.input_scale.device
    was = net.training
    net.eval()
    correct = 0
    for r, text in enumerate(data.texts):
        g = data.ref_image[r]
        rows = torch.arange(data.offsets[g], data.offsets[g] + data.counts[g])
        ids, lengths = scorer.vocab.encode_batch([text])
        candidates = data.candidates.select(rows).to(device)
        s, _ = net(candidates, torch.zeros(len(rows), dtype=torch.long, device=device), ids.to(device), lengths.to(device), data.image_vectors[g : g + 1].to(device))
        correct += int(rows[int(s.argmax())]) == int(data.ref_row[r])
    net.train(was)
    return 100.0 * correct / len(data.texts)
