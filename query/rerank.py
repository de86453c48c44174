"""Stage 2: the query text gates the query region and every shortlisted candidate (GRN, paper Eq. 1–5),
and candidates are ranked by the cosine similarity of the gated representations, plus, when the
index holds SAN embeddings, a weighted text–region match score (SAN, Eq. 8–9). A region-only query
(no text) reranks its shortlist by the visual key's cosine plus the spatially aligned similarity of
the 7×7 maps (:class:`LayoutRescorer`), which tells the whole object from a part of it or from a
box with much background around it."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from engine.errors import IndexVersionError, InvalidInputError
from indexer.store import INSTANCE_ARRAY, MAPS_ARRAY, POOLED_ARRAY, VECTOR_ARRAY, IndexStore

__all__ = [
    "StageScores",
    "Rescorer",
    "fuse_scores",
    "GrnRescorer",
    "SanRescorer",
    "FusedRescorer",
    "LayoutRescorer",
    "row_dot",
    "layout_similarity",
    "visual_cosine",
    "read_grn_inputs",
    "read_region_maps",
    "default_grn_name",
    "default_grn_checkpoint",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageScores:
    """Stage 2's scores of some candidates, aligned with them: ``final`` ranks them; ``grn`` (the
    text-gated similarity) and ``san`` (SAN's text–region score) are its parts where they were computed."""

    final: np.ndarray
    grn: np.ndarray | None = None
    san: np.ndarray | None = None
    layout: np.ndarray | None = None
    visual: np.ndarray | None = None
    concept: np.ndarray | None = None
    projection: np.ndarray | None = None
    instance: np.ndarray | None = None
    proposal: np.ndarray | None = None

    def parts(self) -> dict[str, np.ndarray]:
        """The computed parts by name (``visual`` when stage 2 recomputed it exactly, ``grn``, ``san``,
        ``layout``, ``concept``, ``projection``, ``instance``, ``proposal``; ``final`` left out): what a hit's ``scores`` show, over stage 1's own score."""
        named = (("visual", self.visual), ("grn", self.grn), ("san", self.san), ("layout", self.layout), ("concept", self.concept), ("projection", self.projection), ("instance", self.instance), ("proposal", self.proposal))
        return {name: value for name, value in named if value is not None}

    def take(self, part: slice) -> "StageScores":
        """The scores of the candidates at ``part``."""
        return StageScores(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[part] for f in fields(self)})


Rescorer = Callable[[np.ndarray], StageScores]
"""Stage 2: scores the shortlisted regions, given by their feature rows (int64 ``[n]``)."""


def fuse_scores(grn: np.ndarray, san: np.ndarray, *, image_weight: float, text_weight: float) -> np.ndarray:
    """The fused stage-2 score of a combined query: ``image_weight · grn + text_weight · san`` (float32).
    The one place the formula lives: the engine's search, ``engine bench`` and the exhaustive benchmark use it."""
    return (np.float32(image_weight) * np.asarray(grn, np.float32) + np.float32(text_weight) * np.asarray(san, np.float32)).astype(np.float32)


def read_grn_inputs(store: IndexStore, model, rows: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """What the retrieval ``model`` reads of feature rows ``rows``: the 7×7 maps ``[n, C, 7, 7]``, or, for a
    model that only reads their spatial mean (``grn-fc``; ``model.spatial`` is False) on an index with the
    ``pooled`` array, those means as ``[n, C, 1, 1]`` — 224 bytes a region instead of 10,976. A clear
    error for a spatial model on an index built without maps."""
    if not model.spatial and store.has_array(POOLED_ARRAY):
        return store.read_arrays(POOLED_ARRAY, rows)[:, :, None, None]
    if not store.has_array(MAPS_ARRAY):
        raise IndexVersionError(
            f"index {store.path} was built without the 7x7 region maps (engine index --no-maps), which {model.method} reads in stage 2; "
            "use grn-fc (the default for such an index) or re-index into a new directory with maps"
        )
    return store.read_arrays(MAPS_ARRAY, rows)


def read_region_maps(store: IndexStore, rows: np.ndarray) -> np.ndarray:
    """Indexed regions as query maps: their 7×7 maps, or on an index built without them their pooled means
    ``[n, C, 1, 1]`` (all that ``grn-fc`` reads of a map)."""
    if store.has_array(MAPS_ARRAY):
        return store.read_arrays(MAPS_ARRAY, rows)
    return store.read_arrays(POOLED_ARRAY, rows)[:, :, None, None]


def layout_similarity(query_map: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Spatially aligned similarity float32 ``[n]`` of a query map ``[C, S, S]`` and region maps ``[n, C, S, S]``:
    the mean over the ``S × S`` cells of the cosine of the query's and the region's ``C``-d cell vectors,
    ``(1 / S²) Σ_ij ⟨q_ij / ‖q_ij‖, m_ij / ‖m_ij‖⟩``. RoIAlign bins cover each box in the same relative
    grid, so a box on the same object with the same extent matches cell for cell, while a part of the
    object or a box with much background puts other content in the cells."""
    q = np.asarray(query_map, np.float32)
    m = np.asarray(maps, np.float32)
    if q.ndim != 3 or m.ndim != 4 or m.shape[1:] != q.shape:
        raise InvalidInputError(f"layout similarity needs a query map [C, S, S] and maps [n, C, S, S] of the same C, S; got {q.shape} and {m.shape}")
    c = q.shape[0]
    qc = q.reshape(c, -1)
    qc = qc / np.maximum(np.linalg.norm(qc, axis=0, keepdims=True), 1e-6)
    mc = m.reshape(m.shape[0], c, -1)
    # each cell's dot product over its norm: no normalised copy of the maps (half the time of normalising first)
    dots = np.einsum("ncs,cs->ns", mc, qc)
    norms = np.sqrt(np.einsum("ncs,ncs->ns", mc, mc))
    return (dots / np.maximum(norms, 1e-6)).mean(axis=1).astype(np.float32)


def visual_cosine(store: IndexStore, vector: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The exact cosine float32 ``[n]`` of the query's visual key ``vector`` and the stored keys of feature rows
    ``rows`` (stage 1's FAISS score is approximate on a compressed index)."""
    return key_cosine(vector, store.read_arrays(VECTOR_ARRAY, rows).astype(np.float32))


def key_cosine(vector: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The cosine float32 ``[n]`` of ``vector`` with each row of ``vectors`` ``[n, D]``."""
    q = np.asarray(vector, np.float32) / max(float(np.linalg.norm(vector)), 1e-12)
    return (row_dot(vectors, q) / np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)).astype(np.float32)


def row_dot(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``rows @ vector`` for a few thousand rows, in numpy's own loop: BLAS would run a product this size on
    its thread pool, whose threads then spin against the backbone's on the next query (measured: the next
    query image's backbone pass 40 → 115 ms after a 2,000-row product)."""
    return np.einsum("nd,d->n", rows, vector)


class LayoutRescorer:
    """Stage 2 of a region-only query: ``final = (visual + weight · layout) / (1 + weight)``, the visual key's
    exact cosine plus :func:`layout_similarity` of the stored 7×7 maps, scaled so that a region matched
    with itself scores 1 as with the key alone. ``visual`` is recomputed from the stored vectors (a row
    of 864 bytes per candidate) because stage 1's FAISS score is approximate on a compressed (IVF-PQ) index; the
    hits show this exact value as their ``visual`` part, so that the parts add up to the score.
    On the stamps world's val split (368 queries, 300 candidates, weight 5) it moved box@1 from 0.63 to 0.89;
    the weights and shortlist are fitted on both val splits by ``benchmarks/layout_fit.py``
    (``engine.config.LAYOUT_SHORTLIST`` / ``LAYOUT_WEIGHT`` / ``INSTANCE_WEIGHT``, docs/query-pipeline.md).

    Args:
        store: the open index (feature arrays ``visual`` and ``maps``).
        vector: the query's visual key ``[D]``.
        query_map: the query region's map ``[C, 7, 7]``.
        weight: the layout's weight.
        head: the instance head (:class:`engine.models.instance_head.InstanceHead`) or ``None``.
        head_weight: its cosine's weight (0: left out).
        stored: read each candidate's embedding from the index's ``instance`` array (it holds this head's)
            instead of running the head on its map.
        keep: with ``stored``, compute the layout for the best ``keep`` candidates by ``visual +
            head_weight · instance`` only (the cascade of :meth:`__call__`).
    """

    def __init__(self, *, store: IndexStore, vector: np.ndarray, query_map: np.ndarray, weight: float, head=None, head_weight: float = 0.0, stored: bool = False, keep: int | None = None) -> None:  # noqa: ANN001
        self.store = store
        self.vector = np.asarray(vector, np.float32)
        self.query_map = np.asarray(query_map, np.float32)
        self.weight = np.float32(weight)
        self.head = head if head_weight > 0 else None
        self.head_weight = np.float32(head_weight if self.head is not None else 0.0)
        self.stored = stored and self.head is not None
        self.keep = keep if self.stored else None
        self._query_embedding = None if self.head is None else self.head.embed(self.query_map[None], self.vector[None])[0]

    def __call__(self, rows: np.ndarray) -> StageScores:
        """Scores of the regions at feature rows ``rows``: with an instance head (``head``, weight ``head_weight``),
        ``(visual + weight · layout + head_weight · instance) / (1 + weight + head_weight)``, ``instance`` the
        cosine of the head's embeddings (:class:`engine.models.instance_head.InstanceHead`) of the query and
        of each candidate — read from the index's ``instance`` array when ``stored`` (the index holds this
        head's embeddings), else computed from each candidate's stored map and key.

        With ``stored`` and ``keep``, a cascade: every row is first ranked by ``visual + head_weight ·
        instance`` (a few bytes a row), and the layout (the 7×7 maps, the costly part) is computed for the
        best ``keep`` only; the other rows get ``final = -inf`` (left out of the hits)."""
        keys = self.store.read_arrays(VECTOR_ARRAY, rows).astype(np.float32)  # read once: the cosine and the head
        visual = key_cosine(self.vector, keys)
        instance = None
        if self.stored:
            instance = row_dot(self.store.read_arrays(INSTANCE_ARRAY, rows).astype(np.float32), self._query_embedding).astype(np.float32)
        chosen = np.arange(len(rows))
        if instance is not None and self.keep is not None and self.keep < len(rows):
            chosen = np.sort(np.argsort(-(visual + self.head_weight * instance), kind="stable")[: self.keep])
        maps = self.store.read_arrays(MAPS_ARRAY, rows[chosen])
        layout = np.zeros(len(rows), np.float32)
        layout[chosen] = layout_similarity(self.query_map, maps)
        if self.head is not None and instance is None:
            instance = row_dot(self.head.embed(maps, keys), self._query_embedding).astype(np.float32)
        total = visual + self.weight * layout
        if instance is not None:
            total = total + self.head_weight * instance
        final = np.full(len(rows), -np.inf, np.float32)
        final[chosen] = total[chosen] / (1 + self.weight + self.head_weight)
        return StageScores(final=final, layout=layout, visual=visual, instance=instance)


class GrnRescorer:
    """Scores shortlisted regions with a text-gated retrieval model, reading what it needs of them from the
    feature store (:func:`read_grn_inputs`: the 7×7 maps, or the ``pooled`` means for ``grn-fc``).

    Args:
        store: the open index (feature array ``maps``).
        model: a :class:`engine.models.retrieval.RegionRetrievalModel`.
        query_map: the query region's map ``[C, 7, 7]``.
        text: the query description.
    """

    def __init__(self, *, store: IndexStore, model, query_map: np.ndarray, text: str) -> None:
        self.store = store
        self.model = model
        self.query_map = query_map
        self.text = text

    def __call__(self, rows: np.ndarray) -> StageScores:
        """Scores of the regions at feature rows ``rows``."""
        maps = read_grn_inputs(self.store, self.model, rows)
        scores = np.asarray(self.model.score(self.query_map, self.text, maps), np.float32)
        return StageScores(final=scores, grn=scores)


class SanRescorer:
    """Stage 2 of a text-only query: the full SAN scores each shortlisted region against the text.

    With FT(G-S) the text's representation depends on each candidate (STA's gated fusion of the
    candidate's visual vector and the sentence, SAN Eq. 8–9), so it is computed per candidate from the
    SAN vectors read from the feature store (array ``san``).

    Args:
        store: the open index (feature array ``san``).
        model: a :class:`engine.models.san.SANModel`.
        text: the query sentence.
    """

    def __init__(self, *, store: IndexStore, model, text: str) -> None:
        self.store = store
        self.model = model
        self.text = text

    def __call__(self, rows: np.ndarray) -> StageScores:
        """Scores of the regions at feature rows ``rows``."""
        vectors = self.store.read_arrays("san", rows).astype(np.float32)
        scores = np.asarray(self.model.score(self.text, vectors), np.float32)
        return StageScores(final=scores, san=scores)


class FusedRescorer:
    """Stage 2 of a combined query: ``final = image_weight · grn + text_weight · san``.

    The GRN compares the query region with each candidate through the text's gates; a candidate that
    looks like the query region keeps most of its similarity under any text, because the same gates
    act on both sides. SAN's score says how well the candidate itself fits the words, so a
    description changes which look-alikes come first. ``text_weight`` is fitted on the validation
    split (``engine eval fusion``).
    """

    def __init__(self, grn: Rescorer, san: Rescorer, *, text_weight: float, image_weight: float = 1.0) -> None:
        self.grn = grn
        self.san = san
        self.text_weight = text_weight
        self.image_weight = image_weight

    def __call__(self, rows: np.ndarray) -> StageScores:
        """Scores of the regions at feature rows ``rows``."""
        grn = self.grn(rows).final
        san = self.san(rows).final
        return StageScores(final=fuse_scores(grn, san, image_weight=self.image_weight, text_weight=self.text_weight), grn=grn, san=san)


def default_grn_name(regions: int, *, has_maps: bool, on_gpu: bool, fc_from_regions: int) -> str:
    """The policy of :func:`default_grn_checkpoint` for an index of ``regions`` regions: ``"grn"`` or
    ``"grn-fc"`` (the benchmarks name their default variant by it too)."""
    if not has_maps:
        return "grn-fc"
    return "grn" if on_gpu or regions < fc_from_regions else "grn-fc"


def default_grn_checkpoint(store: IndexStore | None, *, on_gpu: bool, fc_from_regions: int, regions: int | None = None) -> Path | None:
    """The stage-2 GRN for an index when none is configured (``None``: the shipped conv ``grn``).

    The conv ``grn`` (the paper's model; best R@10/R@100) on a GPU and for indexes under
    ``fc_from_regions`` regions; ``grn-fc`` on the CPU from there on, where the conv GRN's ~0.25 s per
    1,000 candidates cannot meet a 100 ms query (docs/benchmarks.md); ``grn-fc`` always on an index
    built without the 7×7 maps (``engine index --no-maps``). ``store``: the open index, ``None`` when
    there is none yet; ``regions``: the regions searched when not ``store``'s (a sharded index: all shards').
    """
    from engine.models.checkpoint import default_checkpoint

    if store is None:
        return None
    has_maps = store.has_array(MAPS_ARRAY)
    regions = (store.vector_count() if regions is None else regions) if has_maps and not on_gpu else 0
    if default_grn_name(regions, has_maps=has_maps, on_gpu=on_gpu, fc_from_regions=fc_from_regions) == "grn":
        return None
    if not has_maps:
        log.info("index built without 7x7 maps: stage 2 uses grn-fc")
    else:
        log.info("index of %d regions on the CPU: stage 2 uses grn-fc (EngineConfig.fc_from_regions=%d)", regions, fc_from_regions)
    return default_checkpoint("grn-fc")
