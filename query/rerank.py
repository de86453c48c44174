"""Stage 2: the query text gates the query region and every shortlisted candidate (GRN, paper Eq. 1–5),
and candidates are ranked by the cosine similarity of the gated representations."""
from __future__ import annotations

import numpy as np

from indexer.store import IndexStore, RegionRow

__all__ = ["GrnRescorer"]


class GrnRescorer:
    """Scores shortlisted regions with a text-gated retrieval model, reading their 7×7 maps from the feature store.

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

    def __call__(self, rows: list[RegionRow]) -> dict[str, np.ndarray]:
        maps = self.store.read_arrays("maps", np.asarray([r.row for r in rows], np.int64))
        scores = np.asarray(self.model.score(self.query_map, self.text, maps), np.float32)
        return {"grn": scores, "final": scores}
