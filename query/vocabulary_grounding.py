"""Grounding any English phrase in a photograph through the open vocabulary (``engine ground --method
vocabulary``; ``--explain`` of texts the first-wave models do not know).

The image's RPN proposals (as indexing makes them, one backbone pass) are scored for the phrase exactly
as a text-only search scores indexed regions (``query.concept_search.text_candidates``)::

    score = concept + w · projection

``concept`` the box's ConSE score from its class evidence, ``projection`` the cosine of its visual key
with the phrase mapped into the key space (``engine/models/text_projection.py``), ``w`` the engine's
``projection_weight``. The best box is the grounding; the picture's map is, at each pixel, the best
score of a proposal covering it (scaled from the image's lowest to its highest proposal score).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from engine.models.concepts import conse_scores
from query.concept_search import relative_log_scores
from query.explain import Grounding

if TYPE_CHECKING:
    from engine.models.concepts import ConceptVocabulary
    from engine.models.text_projection import TextProjection
    from indexer.concept_evidence import ConceptEvidence
    from indexer.proposal_sources import RpnProposals
    from indexer.region_features import RegionFeatureExtractor

__all__ = ["VocabularyGrounder", "ScoredProposals", "proposal_heat"]


@dataclass(frozen=True)
class ScoredProposals:
    """One image's proposals ``[n, 4]`` (with the RPN's objectness) and their scores for one phrase, with the two parts."""

    boxes: np.ndarray
    objectness: np.ndarray
    scores: np.ndarray
    concept: np.ndarray
    projection: np.ndarray | None


class VocabularyGrounder:
    """Grounds phrases among an image's RPN proposals by the open vocabulary (module docstring).

    Args:
        extractor: the region feature extractor (its backbone runs the image once; its key scores the projection).
        proposals: the RPN proposals provider on the same backbone.
        evidence: the class evidence of boxes (the index's ``concepts`` array, computed here).
        vocabulary: MiniLM and the concept table.
        projection: the text projection (``None``: ConSE alone).
        projection_weight: ``w``; the engine's default is fitted on val (``engine.config.PROJECTION_WEIGHT``).
        proposal_weight: weight of each proposal's log score relative to the image's best (as text-only search
            adds it, :func:`~query.concept_search.proposal_prior`; ``engine.config.PROPOSAL_WEIGHT``).
    """

    method = "vocabulary"

    def __init__(self, *, extractor: RegionFeatureExtractor, proposals: RpnProposals, evidence: ConceptEvidence, vocabulary: ConceptVocabulary, projection: TextProjection | None, projection_weight: float, proposal_weight: float = 0.0) -> None:
        self.extractor = extractor
        self.proposals = proposals
        self.evidence = evidence
        self.vocabulary = vocabulary
        self.projection = projection
        self.projection_weight = float(projection_weight)
        self.proposal_weight = float(proposal_weight)

    def check_text(self, text: str | None) -> str:
        """``text`` when it holds a word, else a one-line :class:`~engine.errors.InvalidInputError`."""
        self.vocabulary.text_vector(str(text or ""))
        return str(text)

    @torch.no_grad()
    def score(self, image: Image.Image, texts: Sequence[str]) -> list[ScoredProposals]:
        """Every proposal of ``image`` scored for each text (one backbone pass for all; a wordless text is a
        one-line error before it)."""
        sentences = [self.vocabulary.text_vector(str(text)) for text in texts]
        maps, [(boxes, objectness)] = self.proposals.propose_batch([image])
        boxes = np.asarray(boxes, np.float64)
        key_maps = {lvl: maps[lvl] for lvl in self.extractor.config.key_levels}
        keys = self.extractor.key(key_maps, [image.size], [boxes])
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        evidence = self.evidence.evidence(maps, [image.size], [boxes])[0]
        prior = relative_log_scores(np.asarray(objectness), np.zeros(len(objectness), np.int64))  # one image: relative to its best
        out = []
        for sentence in sentences:
            concept = conse_scores(evidence, self.vocabulary.table.relevance(sentence))
            projection = None if self.projection is None or self.projection_weight == 0 else (keys @ self.projection.apply(sentence)).astype(np.float32)
            scores = concept if projection is None else (concept + np.float32(self.projection_weight) * projection).astype(np.float32)
            if self.proposal_weight > 0:
                scores = (scores + np.float32(self.proposal_weight) * prior).astype(np.float32)
            out.append(ScoredProposals(boxes=boxes, objectness=np.asarray(objectness, np.float32), scores=scores, concept=concept, projection=projection))
        return out

    def ground(self, image: Image.Image, texts: Sequence[str]) -> list[Grounding]:
        """Each text's best proposal in ``image``, with the map of proposal scores."""
        result = []
        for text, scored in zip(texts, self.score(image, texts)):
            best = int(np.argmax(scored.scores))
            box = tuple(float(v) for v in scored.boxes[best])
            result.append(Grounding(text, box, proposal_heat(scored.boxes, scored.scores, image.size), float(scored.scores[best]), method=self.method))
        return result


def proposal_heat(boxes: np.ndarray, scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[h, w]`` in [0, 1]: at each pixel the best score of a box covering it, scaled from the lowest
    to the highest score (0 where no box lies)."""
    w, h = size
    heat = np.zeros((h, w), np.float32)
    if not len(scores):
        return heat
    low, high = float(np.min(scores)), float(np.max(scores))
    scaled = (np.asarray(scores, np.float32) - low) / max(high - low, 1e-6)
    for i in np.argsort(scaled):  # best last: a pixel keeps the best box covering it
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        region = heat[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)]
        np.maximum(region, scaled[i], out=region)
    return heat
