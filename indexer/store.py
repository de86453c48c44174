"""``IndexStore``: the one door to an index directory (SQLite + FAISS + feature store).

The indexing pipeline writes through it (``begin_run`` / ``commit_images`` / ``record_error`` /
``delete_images`` / ``save_vectors`` / ``finish_run``) and the query side reads through it
(``search`` / ``lookup_regions`` (the in-memory region table) / ``regions`` / ``read_arrays``). Layout,
tables and the crash-safety argument are in ``docs/index-layout.md``; in short:

* ``commit_images`` appends the feature rows first and fsyncs them, then inserts the image and
  region rows and advances ``meta.next_row`` in ONE SQLite transaction. Rows past ``next_row``
  are garbage from an interrupted write and are overwritten by the next append.
* ``vectors.faiss`` is derived data: saved atomically with the highest region id and tombstone
  ``seq`` it includes, and brought up to date on open (and before each search) from the database
  and the feature store.
* one writer at a time (``flock`` on ``DIR/.lock``); any number of readers, in any process, with
  no lock (SQLite WAL). Readers of a folder they cannot write open it immutable and write nothing.
* ``compact`` rewrites the feature arrays without dead rows as a new *generation* of files and
  switches to it in one transaction (``meta.feature_generation``; :mod:`indexer.compaction`).
  Readers follow the switch at the start of their next search; rows they looked up just before
  it are translated through the generation's row map.

The store is a facade; each concern is a module of its own:

* :mod:`indexer.db_state` — creating and opening ``engine.db``, transactions, the database state;
* :mod:`indexer.catalog` — the SQL of images, regions, runs, errors and tombstones;
* :mod:`indexer.feature_sync` — the feature files of the generation the database names;
* :mod:`indexer.vector_sync` — loading, catching up, rebuilding and saving the FAISS files;
* :mod:`indexer.table_sync` — the in-memory region table and ``regions.npz``.

An ``IndexStore`` object is not thread-safe; give each thread its own.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from engine.errors import EngineError, IndexVersionError, InvalidInputError
from indexer.arrays import (
    CONCEPT_ARRAY,
    INSTANCE_ARRAY,
    MAPS_ARRAY,
    POOLED_ARRAY,
    REFNMS_ARRAY,
    SAN_ARRAY,
    VECTOR_ARRAY,
    specs_from_shapes,
    vector_arrays,
)
from indexer.catalog import (
    Catalog,
    DeletedImages,
    ImageEntry,
    ImageRecord,
    RegionBatch,
    RegionRow,
    RunCounts,
    check_items,
)
from indexer.compaction import (
    CompactSummary,
    feature_files,
    files_bytes,
    remove_generation,
    remove_stale_generations,
    write_generation,
)
from indexer.db_state import Database, open_database, stored_visual_key
from indexer.faiss_store import DEFAULT_FLAT_THRESHOLD, num_faiss_gpus
from indexer.feature_store import ArraySpec, FeatureStore
from indexer.feature_sync import FeatureSync
from indexer.index_dir import IndexLayout, WriterLock, remove_stale_temps
from indexer.checksums import check_scores, commit_segments
from indexer.integrity import ensure_features_intact
from indexer.region_table import Regions
from indexer.table_sync import TableSync
from indexer.vector_sync import VectorSync

__all__ = [
    "VECTOR_ARRAY",
    "SAN_ARRAY",
    "MAPS_ARRAY",
    "REFNMS_ARRAY",
    "POOLED_ARRAY",
    "CONCEPT_ARRAY",
    "INSTANCE_ARRAY",
    "StoreConfig",
    "ImageRecord",
    "ImageEntry",
    "RegionBatch",
    "RegionRow",
    "IndexInfo",
    "DeletedImages",
    "IndexStore",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreConfig:
    """Tunables of an opened index. ``faiss_device``: ``auto`` | ``cpu`` | ``cuda``."""

    flat_threshold: int = DEFAULT_FLAT_THRESHOLD
    faiss_device: str = "auto"

    def __post_init__(self) -> None:
        threshold = self.flat_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise InvalidInputError(
                f"flat_threshold={self.flat_threshold!r} is not allowed; use a positive number of "
                f"vectors (default {DEFAULT_FLAT_THRESHOLD})"
            )
        if self.faiss_device not in ("auto", "cpu", "cuda"):
            raise InvalidInputError(
                f"faiss_device={self.faiss_device!r} is not allowed; use 'auto', 'cpu' or 'cuda'"
            )


@dataclass(frozen=True)
class IndexInfo:
    """What ``engine info`` shows. ``images`` counts indexed images, ``errors`` failed ones.

    ``dead_rows`` / ``dead_bytes``: feature rows no region refers to any more (removed or replaced
    images) and their size in all arrays; :meth:`IndexStore.compact` reclaims them.
    """

    path: Path
    images: int
    regions: int
    errors: int
    vectors: int
    index_type: str
    device: str
    dims: dict[str, tuple[int, ...]]
    models: dict[str, str]
    runs: int
    next_row: int = 0
    nprobe: int | None = None
    nprobe_at: dict[int, int] = field(default_factory=dict)
    refine_at: dict[int, int] = field(default_factory=dict)
    dead_rows: int = 0
    dead_bytes: int = 0
    shards: list[str] = field(default_factory=list)  # a sharded index: its shards' directories (counts summed over them)

    def to_dict(self) -> dict[str, Any]:
        """The stable ``engine info --json`` form (keys are only ever added)."""
        return {
            "images": self.images,
            "regions": self.regions,
            "errors": self.errors,
            "index_type": self.index_type,
            "device": self.device,
            "vectors": self.vectors,
            "nprobe": self.nprobe,
            "nprobe_at": {str(k): v for k, v in sorted(self.nprobe_at.items())},
            "refine_at": {str(k): v for k, v in sorted(self.refine_at.items())},
            "dims": {k: list(v) for k, v in self.dims.items()},
            "models": dict(self.models),
            "runs": self.runs,
            "path": str(self.path),
            "dead_rows": self.dead_rows,
            "dead_bytes": self.dead_bytes,
            **({"shards": list(self.shards)} if self.shards else {}),
        }


class IndexStore:
    """An opened index directory. Use :meth:`open`; close with :meth:`close` or ``with``."""

    def __init__(
        self,
        *,
        layout: IndexLayout,
        database: Database,
        specs: dict[str, ArraySpec],
        config: StoreConfig,
        lock: WriterLock | None,
    ) -> None:
        self.layout = layout
        self.path = layout.root
        self.config = config
        self.writable = database.writable
        self._specs = specs
        self._lock = lock
        self._db = database
        self._catalog = Catalog(database)
        self._features = FeatureSync(layout, specs, writable=database.writable, state=database.state())
        self._vectors = VectorSync(
            db=database,
            catalog=self._catalog,
            layout=layout,
            features=self._features,
            dims={name: specs[name].shape[0] for name in vector_arrays(specs)},
            flat_threshold=config.flat_threshold,
            device=config.faiss_device,
        )
        self._table = TableSync(db=database, layout=layout, features=self._features)

    # ------------------------------------------------------------------------------------------
    # opening and closing
    # ------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        index_dir: Path,
        *,
        create: bool = False,
        writable: bool = False,
        config: StoreConfig = StoreConfig(),
        array_shapes: Mapping[str, tuple[int, ...]] | None = None,
        visual_key: str | None = None,
    ) -> IndexStore:
        """Open (and with ``create=True`` create) the index at ``index_dir``; migrate it to head.

        ``array_shapes`` (row shape per feature array, must include ``"visual"``, 1-d) is needed
        to create an index; for an existing one it is checked against the stored shapes.
        ``visual_key`` (:func:`~indexer.component_configs.visual_key_version`) is recorded by a creation
        and, for an existing index, must equal the recorded one (else one :class:`IndexVersionError`
        line: re-index into a new directory); ``None`` checks nothing.
        ``writable=True`` takes the writer lock (:class:`IndexLockedError` if held elsewhere;
        :class:`IndexReadOnlyError` when the folder cannot be written). Creation is atomic, and
        ``create=True`` finishes a creation that a killed process left unfinished
        (:mod:`indexer.db_state`). A reader of a folder it cannot write writes nothing.
        """
        layout = IndexLayout(Path(index_dir).expanduser().resolve())
        if config.faiss_device == "cuda" and num_faiss_gpus() == 0:
            raise EngineError(
                "faiss_device='cuda' but faiss sees no GPU (faiss.get_num_gpus() == 0); use "
                "'auto' or 'cpu', or run on a machine with a CUDA device and faiss-gpu"
            )
        wanted = specs_from_shapes(array_shapes) if array_shapes is not None else None
        opened = open_database(layout, create=create, writable=writable, wanted=wanted, visual_key=visual_key)
        store: IndexStore | None = None
        try:
            store = cls(layout=layout, database=opened.database, specs=opened.specs, config=config, lock=opened.lock)
            if writable:
                store._clean_up_after_crash()
            return store
        except BaseException:
            if store is not None:
                store.close()
            else:
                opened.database.close()
                if opened.lock is not None:
                    opened.lock.release()
            raise

    def _clean_up_after_crash(self) -> None:
        """What the writer tidies on open: temp files of interrupted saves, files of other feature
        generations, and runs a crash left 'running' (they are failed)."""
        for name in self.vector_arrays:
            remove_stale_temps(self.layout.vector_file(name))
        remove_stale_temps(self.layout.region_table_path)
        remove_stale_generations(self.layout, self._specs, self.features.generation)
        dead = self._catalog.fail_dead_runs()
        if dead:
            logger.warning("marked %d interrupted index run(s) as failed", dead)

    def close(self) -> None:
        """Release files, database connections and the writer lock. Safe to call twice."""
        self._features.close()
        self._vectors.clear()
        self._table.clear()
        self._db.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # what the index holds
    # ------------------------------------------------------------------------------------------
    @property
    def features(self) -> FeatureStore:
        return self._features.store

    @property
    def database(self) -> Database:
        """The opened ``engine.db`` (transactions and state), for :mod:`indexer.integrity`."""
        return self._db

    @property
    def array_specs(self) -> dict[str, ArraySpec]:
        return dict(self._specs)

    @property
    def vector_arrays(self) -> tuple[str, ...]:
        """The feature arrays with a FAISS file: ``visual``, and ``san`` when the index stores it."""
        return vector_arrays(self._specs)

    def has_array(self, name: str) -> bool:
        return name in self._specs

    # ------------------------------------------------------------------------------------------
    # writer side
    # ------------------------------------------------------------------------------------------
    def begin_run(self, corpus: str, models: dict[str, str]) -> int:
        """Record the start of an index run over ``corpus`` with model versions ``models``."""
        return self._catalog.begin_run(corpus, models)

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        processed: int,
        unchanged: int,
        removed: int,
        regions_added: int,
        errors: int,
        seconds: float,
    ) -> None:
        """Record the end of run ``run_id`` (``status`` 'completed' or 'failed') and its counts."""
        counts = RunCounts(int(processed), int(unchanged), int(removed), int(regions_added), int(errors), float(seconds))
        self._catalog.finish_run(run_id, status=status, counts=counts)

    def commit_images(self, run_id: int, items: list[tuple[ImageRecord, RegionBatch]]) -> list[int]:
        """Add images with their regions atomically; return the new image ids (in order).

        Feature rows are appended and fsynced first; then one transaction replaces any earlier
        row of each path (tombstoning its regions), inserts images and regions (``row`` = feature
        row) and advances ``next_row``. Nothing is visible before that commit.
        """
        self._db.require_writable()
        if not items:
            return []
        check_items(items, self._specs)
        arrays = self._feature_rows(items)
        features = self.features
        first = features.append(arrays)
        try:
            features.flush()
            segments = commit_segments(arrays, first, features.generation)  # crc32 of the bytes appended
            image_ids = self._catalog.commit_images(run_id, items, first, segments)
        except BaseException:
            # The database decides what is committed; anything past it gets overwritten.
            features.rollback(self._committed_rows_or(features.committed_rows))
            raise
        features.mark_committed()
        return image_ids

    def _feature_rows(self, items: list[tuple[ImageRecord, RegionBatch]]) -> dict[str, np.ndarray]:
        """The rows of every array of ``items``, concatenated and cast; NaN/inf after the cast refused."""
        with np.errstate(over="ignore"):  # overflow shows up as inf, refused just below
            arrays = {
                name: np.concatenate(
                    [np.asarray(batch.arrays[name], dtype=spec.np_dtype) for _, batch in items]
                )
                for name, spec in self._specs.items()
            }
        for name, array in arrays.items():
            if not np.isfinite(array).all():
                with np.errstate(over="ignore"):
                    bad = next(
                        r.path for r, b in items
                        if not np.isfinite(np.asarray(b.arrays[name], dtype=np.float16)).all()
                    )
                raise InvalidInputError(
                    f"feature array {name!r} of {bad} has NaN/inf values after conversion to "
                    "float16 (|x| > 65504 overflows); pass finite, float16-range features"
                )
        return arrays

    def _committed_rows_or(self, fallback: int) -> int:
        try:
            return self._db.state().next_row
        except Exception:  # the database is unusable right now; the next open re-reads it
            return fallback

    def record_error(self, run_id: int, record: ImageRecord | None, path: str, reason: str) -> None:
        """Record that ``path`` could not be indexed and why; replaces any earlier row of it."""
        self._db.require_writable()
        self._catalog.record_error(run_id, record, path, reason)

    def delete_images(self, paths: Sequence[str]) -> DeletedImages:
        """Delete the image rows at ``paths`` (indexed or error) and their regions, in one transaction.

        The region ids go to ``tombstones`` so that every FAISS file drops them on catch-up; their
        feature rows stay dead until :meth:`compact`. Unknown paths are ignored.
        """
        self._db.require_writable()
        return self._catalog.delete_images(paths)

    def images_under(self, path: str) -> list[str]:
        """Recorded image paths (indexed or error) equal to ``path`` or inside folder ``path``, sorted."""
        return self._catalog.images_under(path)

    def save_vectors(self, *, release: bool = False) -> None:
        """Bring the FAISS files and the region table up to date, save them atomically, prune the
        tombstones every file holds. ``release``: drop each FAISS index from memory once written (a
        builder of a large index: the next search loads the file again), so that only one is held."""
        self._db.require_writable()
        held, files = self._vectors.save(self.vector_arrays, release=release)
        files.append(self._table.save())
        self._catalog.prune_tombstones(held, files)

    # ------------------------------------------------------------------------------------------
    # compaction
    # ------------------------------------------------------------------------------------------
    def compact(self) -> CompactSummary:
        """Rewrite the feature arrays with only the rows of live regions; save the FAISS files.

        Crash-safe (:mod:`indexer.compaction`): the new generation of files is written and
        fsynced first, then one transaction renumbers ``regions.row`` and names the generation,
        then the old files go. Region ids, and so the FAISS ids, stay the same.
        """
        self._db.require_writable()
        feature_before = self._feature_file_bytes()
        vector_before = self._vector_file_bytes()
        self.save_vectors()  # pending tombstones applied, saved and pruned
        state, ids, rows = self._catalog.live_rows(by="row")
        generation = state.generation
        compacted = not np.array_equal(rows, np.arange(state.next_row))
        if compacted:
            ensure_features_intact(self.layout, self._db)  # never copy damaged rows under fresh checksums
            generation = self._compact_into(generation + 1, state.generation, state.next_row, ids, rows)
            # the saved table numbers the rows of the old generation
            self._catalog.record_files([self._table.save()])
        remove_stale_generations(self.layout, self._specs, generation)
        return CompactSummary(
            rows_before=int(state.next_row),
            rows_after=int(rows.size),
            feature_bytes_before=feature_before,
            feature_bytes_after=self._feature_file_bytes(),
            vector_bytes_before=vector_before,
            vector_bytes_after=self._vector_file_bytes(),
            generation=generation,
            compacted=compacted,
        )

    def _compact_into(self, new: int, old: int, next_row: int, ids: np.ndarray, rows: np.ndarray) -> int:
        """Write generation ``new`` from ``old``, commit it, switch to it; return ``new``."""
        try:
            segments = write_generation(self.features, self.layout, self._specs, rows, new)
            self._catalog.commit_generation(new, old, next_row, ids, rows, segments)
        except BaseException:
            committed = self._committed_generation()
            if committed is not None and committed != new:  # never committed: garbage
                try:
                    remove_generation(self.layout, self._specs, new)
                except OSError as exc:
                    logger.warning("could not remove generation %d of %s: %s", new, self.path, exc)
            raise
        self._features.follow(self._db.state())
        logger.info(
            "compacted the feature store of %s: %d -> %d rows (generation %d)",
            self.path, next_row, rows.size, new,
        )
        return new

    def _committed_generation(self) -> int | None:
        """The generation the database names, or ``None`` if it cannot be read right now."""
        try:
            return self._db.state().generation
        except Exception:  # unusable right now: keep every file, the next writer sorts them out
            return None

    def _feature_file_bytes(self) -> int:
        return files_bytes(p for p, _, _ in feature_files(self.layout, self._specs))

    def _vector_file_bytes(self) -> int:
        return files_bytes(self.layout.vector_file(name) for name in self.vector_arrays)

    # ------------------------------------------------------------------------------------------
    # scanning support
    # ------------------------------------------------------------------------------------------
    def known_images(self, under: str) -> dict[str, tuple[int, int, str, str]]:
        """``path -> (size_bytes, mtime_ns, content_hash, status)`` for paths under ``under``.

        ``under`` is an absolute directory path; error rows may hold ``None`` for the first three.
        """
        return self._catalog.known_images(under)

    # ------------------------------------------------------------------------------------------
    # reader side
    # ------------------------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int, *, array: str = VECTOR_ARRAY) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` regions by cosine similarity: scores ``[q, k]``, region ids ``[q, k]``.

        ``array`` picks the FAISS file (``visual``, or ``san`` for text-only queries). Ids are -1
        (score ``-inf``) where fewer than ``k`` results exist. Catches up with the database first
        when it has moved on (one cheap query).
        """
        if array not in self.vector_arrays:
            raise IndexVersionError(
                f"index at {self.path} has no {array!r} vectors; re-index into a new directory with "
                "`engine index CORPUS --index NEWDIR`"
            )
        scores, ids = self._vectors.synced(array, allow_rebuild=False).search(vectors, k, exact=lambda wanted: self._stored_vectors(array, wanted))
        check_scores(scores, ids, self.path)  # NaN scores come from damaged files: never rank with them
        return scores, ids

    def _stored_vectors(self, array: str, ids: np.ndarray) -> np.ndarray:
        """The feature store's vectors ``array`` of the regions ``ids`` (sorted, unique), zeros for a region
        deleted since the FAISS index was caught up: what exact re-scoring ranks by (:mod:`indexer.faiss_store`)."""
        found = self._table.synced().lookup(ids)
        out = np.zeros((len(ids), self._specs[array].shape[0]), np.float32)
        if len(found):
            out[np.searchsorted(ids, found.ids)] = self._features.read(array, found.rows)
        return out

    def vector_count(self, array: str = VECTOR_ARRAY) -> int:
        """How many regions the FAISS file ``array`` holds once caught up with the database: the live
        regions, without counting the ``regions`` table (a scan of ~20 ms at a million rows)."""
        return self._vectors.synced(array, allow_rebuild=False).ntotal

    def regions(self, ids: Sequence[int]) -> list[RegionRow]:
        """The regions with these ids, in the given order; unknown (deleted) ids and -1 are skipped."""
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1) if i >= 0]
        state, found = self._catalog.regions(wanted)
        found = {r.id: r for r in self._features.numbered(state, list(found.values()))}
        return [found[i] for i in wanted if i in found]

    def lookup_regions(self, ids: Sequence[int] | np.ndarray) -> Regions:
        """The live regions among ``ids`` (in their order; deleted ids and -1 dropped) as columns (feature
        row, image id, box) from the in-memory region table (:mod:`indexer.region_table`), brought up to
        date with the database first. Its rows index the feature store as it is open after this call."""
        return self._table.synced().lookup(ids)

    def all_regions(self) -> Regions:
        """Every live region (id, feature row, image id, box), by id, from the in-memory region table."""
        return self._table.synced().regions

    def image_ids_with_hash(self, content_hash: str) -> np.ndarray:
        """Ids of the indexed images whose file content has this sha256 (copies of one picture)."""
        return self._catalog.image_ids_with_hash(content_hash)

    def regions_of_image(self, path: str) -> list[RegionRow]:
        """All regions of the image at ``path`` (by region id); empty if it has none or is unknown."""
        state, found = self._catalog.regions_of_image(path)
        return self._features.numbered(state, found)

    def regions_of_images(self, paths: Sequence[str]) -> dict[str, list[RegionRow]]:
        """:meth:`regions_of_image` of several images in one database read (paths with no region are absent)."""
        state, found = self._catalog.regions_of_images(paths)
        numbered = {r.id: r for r in self._features.numbered(state, [r for rows in found.values() for r in rows])}
        return {path: [numbered[r.id] for r in rows if r.id in numbered] for path, rows in found.items()}

    def image_vectors(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored mean backbone feature (float32 ``[C]``) of each indexed image in ``paths`` that has
        one (images indexed before schema revision 0003 have none)."""
        return self._catalog.image_vectors(paths)

    def read_arrays(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Feature-store rows ``rows`` of array ``name`` as float16 ``[*rows.shape, *shape]``."""
        return self.features.read(name, rows)

    def all_region_ids(self) -> np.ndarray:
        """Every committed region id, ascending, int64."""
        return self._catalog.region_ids()

    @property
    def visual_key(self) -> str | None:
        """The visual key version the index records (``meta.visual_key``; ``None``: none recorded)."""
        return stored_visual_key(self._db)

    def models(self) -> dict[str, str]:
        """The model versions of the latest indexing run (``IndexInfo.models`` without the counts)."""
        return self._catalog.models()

    def info(self) -> IndexInfo:
        vectors = self._vectors.synced(VECTOR_ARRAY, allow_rebuild=False)
        counts = self._catalog.counts()
        dead_rows = max(0, counts.next_row - counts.regions)
        return IndexInfo(
            path=self.path,
            images=counts.images,
            regions=counts.regions,
            errors=counts.errors,
            vectors=vectors.ntotal,
            index_type=vectors.index_type,
            device=vectors.device,
            dims={name: spec.shape for name, spec in self._specs.items()},
            models=counts.models,
            runs=counts.runs,
            next_row=counts.next_row,
            nprobe=vectors.nprobe,
            nprobe_at=dict(vectors.nprobe_at),
            refine_at=dict(vectors.refine_at),
            dead_rows=dead_rows,
            dead_bytes=dead_rows * sum(spec.row_bytes for spec in self._specs.values()),
        )

    def image(self, image_id: int) -> ImageEntry | None:
        """The indexed image ``image_id``; ``None`` when the index holds no indexed image with that id."""
        return self._catalog.indexed_image(image_id)

    def images(self, *, offset: int = 0, limit: int = 100) -> list[ImageEntry]:
        """Indexed images by id, ``limit`` of them from the ``offset``-th."""
        return self._catalog.indexed_images(offset=offset, limit=limit)

    def errors(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every image recorded with status 'error', by path."""
        return self._catalog.errors()
