"""Stage 2: the query text gates the query region and every shortlisted candidate (GRN, paper Eq. 1–5),
and candidates are ranked by the cosine similarity of the gated representations, plus, when the
index holds SAN embeddings, a weighted text–region match score (SAN, Eq. 8–9)."""
from __future__ import annotations

import numpy as np

from engine.errors import IndexVersionError
from indexer.store import MAPS_ARRAY, POOLED_ARRAY, IndexStore

__all__ = ["GrnRescorer", "SanRescorer", "FusedRescorer", "read_grn_inputs", "read_region_maps"]


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

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of the regions at feature rows ``rows``."""
        maps = read_grn_inputs(self.store, self.model, rows)
        scores = np.asarray(self.model.score(self.query_map, self.text, maps), np.float32)
        return {"grn": scores, "final": scores}


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

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of the regions at feature rows ``rows``."""
        vectors = self.store.read_arrays("san", rows).astype(np.float32)
        scores = np.asarray(self.model.score(self.text, vectors), np.float32)
        return {"san": scores, "final": scores}


class FusedRescorer:
    """Stage 2 of a combined query: ``final = image_weight · grn + text_weight · san``.

    The GRN compares the query region with each candidate through the text's gates; a candidate that
    looks like the query region keeps most of its similarity under any text, because the same gates
    act on both sides. SAN's score says how well the candidate itself fits the words, so a
    description changes which look-alikes come first. ``text_weight`` is fitted on the validation
    split (``engine eval fusion``).
    """

    def __init__(self, grn: GrnRescorer, san: SanRescorer, *, text_weight: float, image_weight: float = 1.0) -> None:
        self.grn = grn
        self.san = san
        self.text_weight = text_weight
        self.image_weight = image_weight

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of the regions at feature rows ``rows``."""
        grn = self.grn(rows)["grn"]
        san = self.san(rows)["san"]
        return {"grn": grn, "san": san, "final": (self.image_weight * grn + self.text_weight * san).astype(np.float32)}
