"""The FAISS indexes of an opened index, kept in step with the database.

Each searched array (``visual``, and ``san`` when the index has it; :func:`indexer.arrays.vector_arrays`)
has a FAISS file (:mod:`indexer.faiss_store`) that is derived data: it records the highest region id
and tombstone seq it includes, and is loaded on first use, then caught up from the database (regions
added since, tombstones applied) and the feature store before each search. A missing, damaged or
ahead-of-the-database file is rebuilt in memory from the feature store; only the writer saves files.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from engine.errors import EngineError
from indexer.catalog import Catalog, regions_since, tombstones_since
from indexer.db_state import Database, DbState, snapshot_state
from indexer.faiss_store import VectorFileError, VectorIndex
from indexer.feature_sync import FeatureSync
from indexer.index_dir import IndexLayout
from indexer.checksums import SavedFile

__all__ = ["VectorSync"]

logger = logging.getLogger(__name__)

_CATCH_UP_CHUNK = 65_536  # vectors read per step when catching up


class VectorSync:
    """The in-memory FAISS index of each vector array of an index (``dims``: array name -> dimension)."""

    def __init__(
        self,
        *,
        db: Database,
        catalog: Catalog,
        layout: IndexLayout,
        features: FeatureSync,
        dims: dict[str, int],
        flat_threshold: int,
        device: str,
    ) -> None:
        self._db = db
        self._catalog = catalog
        self._layout = layout
        self._features = features
        self._dims = dims
        self._flat_threshold = flat_threshold
        self._device = device
        self._vectors: dict[str, VectorIndex] = {}

    def synced(self, array: str, *, allow_rebuild: bool) -> VectorIndex:
        """The FAISS index of ``array``, loaded on first use and caught up with the database.

        Only the writer changes the index type (on first use and on save): a reader keeps the
        type of the saved file, so readers never train an index in memory that the next save
        replaces anyway.
        """
        state = self._db.state()
        self._features.follow(state)  # a compaction committed since the last search
        if array not in self._vectors:
            self._vectors[array] = self._load(array)
            self._catch_up(array)
            allow_rebuild = allow_rebuild or self._db.writable
        elif state.region_seq > self._vectors[array].max_region_id or state.tomb_seq > self._vectors[array].max_tombstone_seq:
            self._catch_up(array)
        vectors = self._vectors[array]
        if allow_rebuild:
            factory = vectors.wanted_factory()
            if factory is not None:
                logger.info("rebuilding the %s vector index of %s as %s", array, self._layout.root, factory)
                self._vectors[array] = self._rebuild(factory, array)
            elif vectors.needs_calibration():  # a file from before the per-k nprobe calibration
                logger.info("calibrating nprobe per result count for the %s vectors of %s", array, self._layout.root)
                _, ids, feature_rows = self._catalog.live_rows()
                vectors.calibrate(ids, feature_rows, self._reader(array))
        return self._vectors[array]

    def save(self, arrays: tuple[str, ...], *, release: bool = False) -> tuple[int, list[SavedFile]]:
        """Bring every FAISS index of ``arrays`` up to date and save it atomically; return the smallest
        tombstone seq they all hold (the tombstones up to it may be pruned) and the files written.
        ``release``: forget each index once written (loaded again from its file on next use)."""
        self._db.require_writable()
        held = []
        files = []
        for name in arrays:
            vectors = self.synced(name, allow_rebuild=True)
            path = self._layout.vector_file(name)
            digest = vectors.save(path)
            files.append(SavedFile(path.name, digest, (vectors.max_region_id, vectors.max_tombstone_seq)))
            held.append(vectors.max_tombstone_seq)
            if release:  # drop both references now: the next array's index is built before `vectors` is rebound
                del vectors
                self._vectors.pop(name)
        return min(held), files

    def clear(self) -> None:
        self._vectors = {}

    def _reader(self, array: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda rows: self._features.read(array, rows)

    def _new(self, array: str) -> VectorIndex:
        return VectorIndex(self._dims[array], flat_threshold=self._flat_threshold, device=self._device)

    def _load(self, array: str) -> VectorIndex:
        path = self._layout.vector_file(array)
        if path.is_file():
            try:
                vectors = VectorIndex.load(path, self._dims[array], flat_threshold=self._flat_threshold, device=self._device)
            except VectorFileError as exc:
                logger.warning("%s; rebuilding the vector index from the feature store", exc)
            else:
                state = self._db.state()
                if vectors.max_region_id <= state.region_seq and vectors.max_tombstone_seq <= state.tomb_seq:
                    return vectors
                logger.warning(
                    "%s is ahead of the database (region %d > %d or tombstone %d > %d); rebuilding "
                    "it from the feature store",
                    path, vectors.max_region_id, state.region_seq, vectors.max_tombstone_seq, state.tomb_seq,
                )
        return self._rebuild(None, array)

    def _rebuild(self, factory: str | None, array: str) -> VectorIndex:
        state, ids, feature_rows = self._catalog.live_rows()
        self._features.follow(state)
        vectors = self._new(array)
        vectors.rebuild(ids, feature_rows, self._reader(array), factory=factory)
        vectors.max_region_id = state.region_seq
        vectors.max_tombstone_seq = state.tomb_seq
        return vectors

    def _catch_up(self, array: str) -> None:
        """Add regions newer than the index, apply tombstones newer than it (one DB snapshot)."""
        for _ in range(3):
            vectors = self._vectors[array]
            with self._db.read() as s:
                state: DbState = snapshot_state(s)
                new = regions_since(s, vectors.max_region_id)
                tombs = tombstones_since(s, vectors.max_tombstone_seq, state.tomb_seq)
            if tombs is None:
                # Tombstones we never applied were pruned: a newer saved file holds them.
                logger.info("vector index of %s is behind pruned tombstones; reloading", self._layout.root)
                self._vectors[array] = self._load(array)
                continue
            self._features.follow(state)
            for start in range(0, len(new), _CATCH_UP_CHUNK):
                chunk = new[start : start + _CATCH_UP_CHUNK]
                ids = np.asarray([r.id for r in chunk], dtype=np.int64)
                rows = np.asarray([r.row for r in chunk], dtype=np.int64)
                vectors.add(ids, self._features.read(array, rows))
            if tombs:
                vectors.remove(np.asarray([t.region_id for t in tombs], dtype=np.int64))
            vectors.max_region_id = max(vectors.max_region_id, state.region_seq)
            vectors.max_tombstone_seq = max(vectors.max_tombstone_seq, state.tomb_seq)
            if new or tombs:
                logger.debug("caught up %s: +%d regions, -%d tombstones", self._layout.root, len(new), len(tombs))
            return
        raise EngineError(
            f"could not bring the vector index of {self._layout.root} up to date (the writer kept pruning); "
            "retry the search"
        )
