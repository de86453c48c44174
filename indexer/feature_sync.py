"""Which generation of the feature files an opened index reads, kept in step with the database.

A compaction (:mod:`indexer.compaction`) writes a new generation of the feature arrays and names it in
``meta.feature_generation``; a store opened before follows the switch the next time it reads the
database state (:meth:`FeatureSync.follow`). Rows looked up in the snapshot just before a switch are
translated through the generation's row map (:meth:`FeatureSync.numbered`).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from engine.errors import EngineError
from indexer.catalog import RegionRow
from indexer.compaction import read_row_map
from indexer.db_state import DbState
from indexer.feature_store import ArraySpec, FeatureStore
from indexer.index_dir import IndexLayout

__all__ = ["FeatureSync"]

logger = logging.getLogger(__name__)


class FeatureSync:
    """The open :class:`FeatureStore` of an index, at the generation the database last named."""

    def __init__(self, layout: IndexLayout, specs: dict[str, ArraySpec], *, writable: bool, state: DbState) -> None:
        self.layout = layout
        self._specs = specs
        self._writable = writable
        self._row_maps: dict[int, np.ndarray | None] = {}
        self._store: FeatureStore | None = self._open(state.generation, state.next_row)

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            raise EngineError(f"index at {self.layout.root} is closed; open it again")
        return self._store

    def read(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self.store.read(name, rows)

    def follow(self, state: DbState) -> None:
        """Switch to the generation ``state`` names (a compaction committed since it was opened)."""
        if self._store is not None and self._store.generation == state.generation:
            return
        logger.info("feature store of %s moved to generation %d", self.layout.root, state.generation)
        old, self._store = self._store, None
        self._row_maps = {}
        if old is not None:
            old.close()
        self._store = self._open(state.generation, state.next_row)

    def numbered(self, state: DbState, rows: list[RegionRow]) -> list[RegionRow]:
        """``rows`` (read in a snapshot at ``state``) numbered as the open feature store is.

        A compaction that committed after this store's last search leaves it one generation
        behind: the rows are translated back through that generation's row map, so that rows
        looked up during one query all index the same files. Anything else (several generations
        behind, rows added since the compaction) switches the store to the snapshot's generation.
        """
        current = self.store.generation
        if state.generation == current or not rows:
            return rows
        if state.generation == current + 1:
            if state.generation not in self._row_maps:
                self._row_maps[state.generation] = read_row_map(self.layout, state.generation)
            old_rows = self._row_maps[state.generation]
            if old_rows is not None and all(r.row < old_rows.shape[0] for r in rows):
                return [replace(r, row=int(old_rows[r.row])) for r in rows]
        self.follow(state)
        return rows

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self._row_maps = {}

    def _open(self, generation: int, next_row: int) -> FeatureStore:
        return FeatureStore(
            self.layout.features_dir,
            self._specs,
            committed_rows=next_row,
            writable=self._writable,
            generation=generation,
        )
