"""Text through the open visual vocabulary (ConSE over the stored class evidence, ``engine/models/concepts.py``).

Two uses, both over the ``concepts`` array of an index:

* a text-only query whose words the first-wave text models (SAN, the GRN) do not all know scores every
  indexed region exhaustively (:func:`concept_scores`: 40 bytes read and ten multiply-adds a
  region); with the text projection (``engine/models/text_projection.py``) the text's image in the
  visual key space also searches the visual FAISS file, and the best of both are ranked by
  ``concept + projection_weight · projection`` (:func:`text_candidates`);
* a combined query of such a text keeps its region-only ranking (visual key + layout) and adds the
  candidates' ConSE score, weighted by how well the text fits the QUERY region itself
  (:class:`ConceptRescorer`): a text that the vocabulary cannot relate to the query region leaves
  the visual ranking as it was, so a description never sinks a good visual match.

:func:`text_models_cover` is the routing rule: texts whose content words the first-wave models all
know (the shapes world's vocabulary) keep the GRN / SAN / stage-3 path they were fitted for.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from engine.models.concepts import conse_scores
from engine.models.vocab import tokenize
from indexer.arrays import CONCEPT_ARRAY, SAN_ARRAY, VECTOR_ARRAY
from indexer.region_table import Regions
from indexer.store import IndexStore
from query.rerank import Rescorer, StageScores, visual_cosine

__all__ = ["ConceptRescorer", "SanPart", "concept_scores", "best_first", "proposal_prior", "relative_log_scores", "text_candidates", "text_models_cover", "content_words", "concept_gate"]


def content_words(text: str) -> list[str]:
    """The words of ``text`` that carry meaning: scikit-learn's English stop words left out."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [w for w in tokenize(text) if w not in ENGLISH_STOP_WORDS]


def text_models_cover(text: str, vocabulary: Collection[str]) -> bool:
    """Whether the first-wave text models know every content word of ``text`` (and it has one)."""
    words = content_words(text)
    return bool(words) and all(w in vocabulary for w in words)


def concept_gate(query_score: float, *, floor: float, ceiling: float) -> float:
    """How far the text fits the query region, in ``[0, 1]``: the query region's own ConSE score mapped
    linearly from ``floor`` (0: the text is unrelated to what the region shows) to ``ceiling`` (1)."""
    if ceiling <= floor:
        return 1.0 if query_score >= floor else 0.0
    return float(np.clip((query_score - floor) / (ceiling - floor), 0.0, 1.0))


def concept_scores(store: IndexStore, relevance: np.ndarray) -> tuple[Regions, np.ndarray]:
    """Every live region and its ConSE score for class ``relevance`` ``[C]`` (exhaustive over the index's
    ``concepts`` array: 40 bytes a region)."""
    regions = store.all_regions()
    if not len(regions):
        return regions, np.zeros(0, np.float32)
    return regions, conse_scores(store.read_arrays(CONCEPT_ARRAY, regions.rows), relevance)


def best_first(regions: Regions, scores: np.ndarray, count: int) -> tuple[Regions, np.ndarray]:
    """The ``count`` best-scored of ``regions``, best first, with their scores."""
    count = min(count, len(regions))
    if count == 0:
        return regions.take(np.zeros(0, np.int64)), scores[:0]
    head = np.argpartition(-scores, count - 1)[:count]
    head = head[np.argsort(-scores[head], kind="stable")]
    return regions.take(head), scores[head]


@dataclass(frozen=True)
class SanPart:
    """SAN's part in a text-only query through the vocabulary: its text vector ``t_g`` (searched in the
    ``san`` FAISS file for candidates), the full model's ``score`` of candidates (feature rows → cosines,
    :class:`~query.rerank.SanRescorer`), its ``weight`` in the sum, and the ``gate`` range (floor,
    ceiling) over which SAN's confidence — the cosine of its best FAISS match — takes the weight from
    0 to full (:func:`concept_gate`): SAN reads the shapes world's texts with confidence, real
    photographs' objects it never saw much less."""

    vector: np.ndarray
    score: Callable[[np.ndarray], StageScores]
    weight: float
    gate: tuple[float, float] = (-1.0, -1.0)
    confidence: float | None = None  # SAN's best cosine over a whole sharded index (None: this index's own best match)


def text_candidates(store: IndexStore, regions: Regions, concept: np.ndarray, projected: np.ndarray | None, weight: float, count: int, san: SanPart | None = None, *, proposal_weight: float = 0.0) -> tuple[Regions, StageScores]:
    """A text-only query's candidates and their scores: the ``count`` best of ``regions`` by their ConSE
    score ``concept`` and, with a ``projected`` text (a unit vector in the visual key space), its ``count``
    best matches in the visual FAISS file, and with ``san`` SAN's ``count`` best matches in its FAISS file;
    each scored ``concept + weight · projection + san.weight · gate · san + proposal_weight · log(proposal score)``
    (``gate``: see :class:`SanPart`), the projection part being the exact cosine with the stored key, SAN's the
    full model's score, the proposal score the one stored with each region (:func:`proposal_prior`). Without
    projection and SAN: the ConSE ranking alone."""
    head, head_scores = best_first(regions, concept, count)
    if projected is None and san is None:
        return head, StageScores(final=head_scores, concept=head_scores)
    chosen = np.isin(regions.ids, head.ids)
    san_weight = 0.0
    for vector, array in ((projected, VECTOR_ARRAY), (None if san is None else san.vector, SAN_ARRAY)):
        if vector is not None:
            found, ids = store.search(np.asarray(vector, np.float32)[None], min(count, len(regions)) or 1, array=array)
            chosen |= np.isin(regions.ids, ids[0][ids[0] >= 0])
            if san is not None and array == SAN_ARRAY:
                confidence = san.confidence if san.confidence is not None else float(found[0][0]) if ids[0][0] >= 0 else -1.0
                san_weight = san.weight * concept_gate(confidence, floor=san.gate[0], ceiling=san.gate[1])
    pool = regions.take(np.nonzero(chosen)[0])
    pool_concept = concept[chosen]
    final = pool_concept.astype(np.float32)
    projection = san_scores = None
    if projected is not None:
        projection = visual_cosine(store, projected, pool.rows)
        final = final + np.float32(weight) * projection
    if san is not None:
        san_scores = san.score(pool.rows).final
        final = final + np.float32(san_weight) * san_scores
    prior = None
    if proposal_weight > 0:
        prior = proposal_prior(pool)
        final = final + np.float32(proposal_weight) * prior
    return pool, StageScores(final=final.astype(np.float32), concept=pool_concept, projection=projection, san=san_scores, proposal=prior)


def proposal_prior(regions: Regions) -> np.ndarray:
    """Float32 ``[n]``: the ``log`` of each region's stored proposal score (the RPN's predicted IoU and
    objectness, :class:`~engine.models.rpn.RpnConfig`; 1 for annotated boxes; floored at 1e-4) minus the best
    such log among the same image's ``regions``. Relative within an image, it picks among a photograph's boxes
    the one that fits an object best (not a part of it) without ranking whole photographs by how familiar
    they look to the RPN (absolute scores sank a real rocket's photograph under "a rocket"). The scores come
    from the in-memory region table (no database read)."""
    return relative_log_scores(regions.scores, regions.image_ids)


def relative_log_scores(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Float32 ``log(max(score, 1e-4))`` minus the largest such value among the entries of the same group."""
    logs = np.log(np.maximum(np.asarray(scores, np.float64), 1e-4))
    if not len(logs):
        return logs.astype(np.float32)
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    best = np.full(int(group.max()) + 1, -np.inf)
    np.maximum.at(best, group, logs)
    return (logs - best[group]).astype(np.float32)


@dataclass(frozen=True)
class ConceptRescorer:
    """Stage 2 of a combined query through the vocabulary: ``final = base + gate · (weight · concept + san_weight · san)``.

    ``base`` is the region-only stage 2 (``None``: the visual key's exact cosine alone), ``concept`` each
    candidate's ConSE score for the text, ``gate`` :func:`concept_gate` of the query region's own score;
    ``san`` (optional) SAN's score of each candidate for the text, when SAN reads every word (MiniLM).
    ``weight``, ``san_weight`` and the gate's range are fitted on the val splits (``benchmarks/text_fit.py``).
    """

    store: IndexStore
    base: Rescorer | None
    vector: np.ndarray
    relevance: np.ndarray
    weight: float
    gate: float
    san: Rescorer | None = None
    san_weight: float = 0.0

    def __call__(self, rows: np.ndarray) -> StageScores:
        """Scores of the regions at feature rows ``rows``."""
        if self.base is not None:
            base = self.base(rows)
        else:
            visual = visual_cosine(self.store, self.vector, rows)
            base = StageScores(final=visual, visual=visual)
        concept = conse_scores(self.store.read_arrays(CONCEPT_ARRAY, rows), self.relevance)
        text = np.float32(self.weight) * concept
        san = None
        if self.san is not None and self.san_weight > 0:
            san = self.san(rows).final
            text = text + np.float32(self.san_weight) * san
        final = (base.final + np.float32(self.gate) * text).astype(np.float32)
        return StageScores(final=final, grn=base.grn, san=san if san is not None else base.san, layout=base.layout, visual=base.visual, concept=concept)
