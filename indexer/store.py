"""``IndexStore``: the one door to an index directory (SQLite + FAISS + feature store).

The indexing pipeline writes through it (``begin_run`` / ``commit_images`` / ``record_error`` /
``remove_images`` / ``save_vectors`` / ``finish_run``) and the query side reads through it
(``search`` / ``lookup_regions`` (the in-memory region table) / ``regions`` / ``read_arrays``). Layout, tables and the crash-safety argument are in
``docs/index-layout.md``; in short:

* ``commit_images`` appends the feature rows first and fsyncs them, then inserts the image and
  region rows and advances ``meta.next_row`` in ONE SQLite transaction. Rows past ``next_row``
  are garbage from an interrupted write and are overwritten by the next append.
* ``vectors.faiss`` is derived data: saved atomically with the highest region id and tombstone
  ``seq`` it includes, and brought up to date on open (and before each search) from the database
  and the feature store.
* one writer at a time (``flock`` on ``DIR/.lock``); any number of readers, in any process, with
  no lock (SQLite WAL).
* ``compact`` rewrites the feature arrays without dead rows as a new *generation* of files and
  switches to it in one transaction (``meta.feature_generation``; :mod:`indexer.compaction`).
  Readers follow the switch at the start of their next search; rows they looked up just before
  it are translated through the generation's row map.

An ``IndexStore`` object is not thread-safe; give each thread its own.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from sqlalchemy import bindparam, delete, func, insert, literal_column, select, text, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from engine.errors import (
    EngineError,
    IndexNotFoundError,
    IndexVersionError,
    InvalidBoxError,
    InvalidInputError,
)
from indexer.db.models import (
    REGION_SOURCES,
    RUN_STATUSES,
    Image,
    IndexRun,
    Meta,
    Region,
    Tombstone,
)
from indexer.db.session import create_db_engine, upgrade_database
from indexer.compaction import (
    CompactSummary,
    feature_files,
    files_bytes,
    read_row_map,
    remove_generation,
    remove_stale_generations,
    write_generation,
)
from indexer.faiss_store import (
    DEFAULT_FLAT_THRESHOLD,
    VectorFileError,
    VectorIndex,
    num_faiss_gpus,
)
from indexer.feature_store import ArraySpec, FeatureStore
from indexer.index_dir import IndexLayout, WriterLock, check_array_name, remove_stale_temps
from indexer.region_table import Regions, RegionTable, load_table, read_regions, save_table

__all__ = [
    "VECTOR_ARRAY",
    "SAN_ARRAY",
    "POOLED_ARRAY",
    "StoreConfig",
    "ImageRecord",
    "RegionBatch",
    "RegionRow",
    "IndexInfo",
    "DeletedImages",
    "IndexStore",
]

logger = logging.getLogger(__name__)

#: The feature-store array whose rows are the FAISS vectors.
VECTOR_ARRAY = "visual"
#: The feature-store array of SAN region embeddings; when an index has it, it gets its own FAISS file.
SAN_ARRAY = "san"
MAPS_ARRAY = "maps"  # the 7×7 RoI maps; absent from an index built with ``engine index --no-maps``
REFNMS_ARRAY = "refnms"  # Ref-NMS's text-independent visual feature v_i of each region (query stage 3)
POOLED_ARRAY = "pooled"  # the un-normalised spatial mean of each 7×7 map: all a non-spatial stage 2 (grn-fc) reads
_CHUNK = 500  # ids per SQL ``IN (...)``
_CATCH_UP_CHUNK = 65_536  # vectors read per step when catching up


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
class ImageRecord:
    """An image file as scanned: absolute resolved ``path``, sha256 hex ``content_hash``, stat, size,
    and (once the backbone has seen it) ``vector``, the image's mean backbone feature ``[C]``."""

    path: str
    content_hash: str
    size_bytes: int
    mtime_ns: int
    width: int
    height: int
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class RegionBatch:
    """The regions of ONE image.

    ``boxes`` ``[n, 4]`` float xyxy pixels of the original image; ``objectness`` ``[n]``;
    ``source`` one of ``'gt' | 'selective-search' | 'rpn'``; ``arrays`` one ``[n, *shape]`` array
    per feature-store array of the index (e.g. ``{"maps": [n,112,7,7], "visual": [n,112]}``;
    ``"visual"`` is the FAISS vector).
    """

    boxes: np.ndarray
    objectness: np.ndarray
    source: str
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class RegionRow:
    """A committed region with what the query side needs of its image. ``box`` is xyxy pixels."""

    id: int
    image_id: int
    image_path: str
    content_hash: str | None
    box: tuple[float, float, float, float]
    objectness: float
    source: str
    row: int
    width: int | None
    height: int | None


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
    dead_rows: int = 0
    dead_bytes: int = 0

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
            "dims": {k: list(v) for k, v in self.dims.items()},
            "models": dict(self.models),
            "runs": self.runs,
            "path": str(self.path),
            "dead_rows": self.dead_rows,
            "dead_bytes": self.dead_bytes,
        }


@dataclass(frozen=True)
class DeletedImages:
    """What :meth:`IndexStore.delete_images` deleted: indexed images, error records, regions."""

    indexed: int
    errors: int
    regions: int

    @property
    def images(self) -> int:
        return self.indexed + self.errors


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _chunks(values: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class IndexStore:
    """An opened index directory. Use :meth:`open`; close with :meth:`close` or ``with``."""

    def __init__(
        self,
        *,
        layout: IndexLayout,
        specs: dict[str, ArraySpec],
        config: StoreConfig,
        writable: bool,
        lock: WriterLock | None,
    ) -> None:
        self.layout = layout
        self.path = layout.root
        self.config = config
        self.writable = writable
        self._specs = specs
        self._lock = lock
        self._engine = create_db_engine(layout.db_path, immediate=writable)
        self._features: FeatureStore | None = None
        self._vector_sets: dict[str, VectorIndex] = {}
        self._row_maps: dict[int, np.ndarray | None] = {}
        self._table: RegionTable | None = None
        self._state_connection: Any = None  # see _state

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
    ) -> IndexStore:
        """Open (and with ``create=True`` create) the index at ``index_dir``; migrate it to head.

        ``array_shapes`` (row shape per feature array, must include ``"visual"``, 1-d) is needed
        to create an index; for an existing one it is checked against the stored shapes.
        ``writable=True`` takes the writer lock (:class:`IndexLockedError` if held elsewhere).
        """
        layout = IndexLayout(Path(index_dir).expanduser().resolve())
        if config.faiss_device == "cuda" and num_faiss_gpus() == 0:
            raise EngineError(
                "faiss_device='cuda' but faiss sees no GPU (faiss.get_num_gpus() == 0); use "
                "'auto' or 'cpu', or run on a machine with a CUDA device and faiss-gpu"
            )
        wanted = _specs_from_shapes(array_shapes) if array_shapes is not None else None
        if not layout.exists() and not create:
            raise IndexNotFoundError(
                f"no index at {layout.root}; create one with `engine index CORPUS --index {layout.root}`"
            )
        lock: WriterLock | None = None
        store: IndexStore | None = None
        try:
            if create or writable:
                layout.root.mkdir(parents=True, exist_ok=True)
            if writable or (create and not layout.exists()):
                lock = WriterLock(layout.lock_path)
                lock.acquire()
            creating = not layout.exists()
            if creating and wanted is None:
                raise InvalidInputError(
                    f"array_shapes is required to create the index at {layout.root}; pass the row "
                    "shape of every feature array, e.g. {'visual': (112,), 'maps': (112, 7, 7)}"
                )
            upgrade_database(layout.db_path)
            specs = _read_or_init_specs(layout, wanted, can_write=lock is not None)
            if lock is not None and not writable:
                lock.release()
                lock = None
            store = cls(layout=layout, specs=specs, config=config, writable=writable, lock=lock)
            store._open_features()
            if writable:
                for name in store.vector_arrays:
                    remove_stale_temps(layout.vector_file(name))
                remove_stale_temps(layout.region_table_path)
                remove_stale_generations(layout, specs, store.features.generation)
                store._fail_dead_runs()
            return store
        except BaseException:
            if store is not None:
                store.close()
            elif lock is not None:
                lock.release()
            raise

    def _open_features(self) -> None:
        with self._read() as s:
            generation, next_row = _feature_state(s)
        self._features = FeatureStore(
            self.layout.features_dir,
            self._specs,
            committed_rows=next_row,
            writable=self.writable,
            generation=generation,
        )

    def _use_generation(self, generation: int, next_row: int) -> None:
        """Switch the feature store to ``generation`` (a compaction committed since it was opened)."""
        if self._features is not None and self._features.generation == generation:
            return
        logger.info("feature store of %s moved to generation %d", self.path, generation)
        old, self._features = self._features, None
        self._row_maps = {}
        if old is not None:
            old.close()
        self._features = FeatureStore(
            self.layout.features_dir,
            self._specs,
            committed_rows=next_row,
            writable=self.writable,
            generation=generation,
        )

    def _fail_dead_runs(self) -> None:
        """We hold the writer lock, so a run still marked 'running' died (crash, kill -9)."""
        with self._write() as s:
            dead = s.execute(
                update(IndexRun).where(IndexRun.status == "running").values(status="failed")
            ).rowcount
        if dead:
            logger.warning("marked %d interrupted index run(s) as failed", dead)

    def close(self) -> None:
        """Release files, database connections and the writer lock. Safe to call twice."""
        if self._features is not None:
            self._features.close()
            self._features = None
        self._vector_sets = {}
        self._row_maps = {}
        self._table = None
        if self._state_connection is not None:
            self._state_connection.close()
            self._state_connection = None
        self._engine.dispose()
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
    # sessions
    # ------------------------------------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[Session]:
        """One read transaction: every query inside sees the same snapshot (WAL)."""
        with Session(self._engine) as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction (``BEGIN IMMEDIATE``), committed on leaving the block."""
        self._require_writable()
        with Session(self._engine) as session, session.begin():
            yield session

    def _require_writable(self) -> None:
        if not self.writable:
            raise EngineError(
                f"index at {self.path} is open read-only; open it with writable=True to change it"
            )

    @property
    def features(self) -> FeatureStore:
        if self._features is None:
            raise EngineError(f"index at {self.path} is closed; open it again")
        return self._features

    @property
    def array_specs(self) -> dict[str, ArraySpec]:
        return dict(self._specs)

    @property
    def vector_arrays(self) -> tuple[str, ...]:
        """The feature arrays with a FAISS file: ``visual``, and ``san`` when the index stores it."""
        return tuple(n for n in (VECTOR_ARRAY, SAN_ARRAY) if n in self._specs)

    def has_array(self, name: str) -> bool:
        return name in self._specs

    # ------------------------------------------------------------------------------------------
    # writer side
    # ------------------------------------------------------------------------------------------
    def begin_run(self, corpus: str, models: dict[str, str]) -> int:
        """Record the start of an index run over ``corpus`` with model versions ``models``."""
        with self._write() as s:
            run_id = s.execute(
                insert(IndexRun)
                .values(
                    started_at=_now(),
                    corpus=str(corpus),
                    status="running",
                    processed=0,
                    unchanged=0,
                    removed=0,
                    regions_added=0,
                    errors=0,
                    seconds=0.0,
                    models=json.dumps(dict(models), sort_keys=True),
                )
                .returning(IndexRun.id)
            ).scalar_one()
            _set_meta(s, "models", dict(models))
        return int(run_id)

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
        if status not in RUN_STATUSES:
            raise InvalidInputError(
                f"run status {status!r} is not allowed; use one of {list(RUN_STATUSES)}"
            )
        with self._write() as s:
            changed = s.execute(
                update(IndexRun)
                .where(IndexRun.id == run_id)
                .values(
                    status=status,
                    finished_at=_now(),
                    processed=int(processed),
                    unchanged=int(unchanged),
                    removed=int(removed),
                    regions_added=int(regions_added),
                    errors=int(errors),
                    seconds=float(seconds),
                )
            ).rowcount
            if not changed:
                raise InvalidInputError(
                    f"index run {run_id} does not exist in {self.path}; pass the id begin_run returned"
                )

    def commit_images(self, run_id: int, items: list[tuple[ImageRecord, RegionBatch]]) -> list[int]:
        """Add images with their regions atomically; return the new image ids (in order).

        Feature rows are appended and fsynced first; then one transaction replaces any earlier
        row of each path (tombstoning its regions), inserts images and regions (``row`` = feature
        row) and advances ``next_row``. Nothing is visible before that commit.
        """
        self._require_writable()
        if not items:
            return []
        paths = [record.path for record, _ in items]
        if len(set(paths)) != len(paths):
            dupes = sorted({p for p in paths if paths.count(p) > 1})
            raise InvalidInputError(
                f"commit_images got the same path more than once ({dupes[0]!r}); commit each image once"
            )
        for record, batch in items:
            _check_record(record)
            _check_batch(record.path, batch, self._specs)
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
        features = self.features
        first = features.append(arrays)
        try:
            features.flush()
            with self._write() as s:
                committed = _get_meta(s, "next_row", 0)
                if committed != first:
                    raise EngineError(
                        f"feature store of {self.path} is at row {first} but the database says "
                        f"{committed}; another writer changed the index; re-open it and re-run"
                    )
                now = _now()
                row = first
                image_ids: list[int] = []
                for record, batch in items:
                    _drop_path(s, record.path)
                    image_id = s.execute(
                        insert(Image)
                        .values(
                            path=record.path,
                            content_hash=record.content_hash,
                            size_bytes=int(record.size_bytes),
                            mtime_ns=int(record.mtime_ns),
                            width=int(record.width),
                            height=int(record.height),
                            status="indexed",
                            error=None,
                            run_id=run_id,
                            indexed_at=now,
                            vector=_vector_bytes(record.vector),
                        )
                        .returning(Image.id)
                    ).scalar_one()
                    boxes = np.asarray(batch.boxes, dtype=np.float64).reshape(-1, 4)
                    scores = np.asarray(batch.objectness, dtype=np.float64).reshape(-1)
                    if len(boxes):
                        s.execute(
                            insert(Region),
                            [
                                {
                                    "image_id": image_id,
                                    "x1": float(b[0]),
                                    "y1": float(b[1]),
                                    "x2": float(b[2]),
                                    "y2": float(b[3]),
                                    "objectness": float(o),
                                    "source": batch.source,
                                    "row": row + i,
                                }
                                for i, (b, o) in enumerate(zip(boxes, scores))
                            ],
                        )
                    row += len(boxes)
                    image_ids.append(int(image_id))
                _set_meta(s, "next_row", row)
        except BaseException:
            # The database decides what is committed; anything past it gets overwritten.
            features.rollback(self._committed_rows_or(features.committed_rows))
            raise
        features.mark_committed()
        return image_ids

    def _committed_rows_or(self, fallback: int) -> int:
        try:
            with self._read() as s:
                return int(_get_meta(s, "next_row", 0))
        except Exception:  # the database is unusable right now; the next open re-reads it
            return fallback

    def record_error(self, run_id: int, record: ImageRecord | None, path: str, reason: str) -> None:
        """Record that ``path`` could not be indexed and why; replaces any earlier row of it."""
        self._require_writable()
        if record is not None and record.path != path:
            raise InvalidInputError(
                f"record_error got record.path={record.path!r} but path={path!r}; pass the same path"
            )
        _check_path(path)
        with self._write() as s:
            _drop_path(s, path)
            s.execute(
                insert(Image).values(
                    path=path,
                    content_hash=record.content_hash if record else None,
                    size_bytes=int(record.size_bytes) if record else None,
                    mtime_ns=int(record.mtime_ns) if record else None,
                    width=int(record.width) if record else None,
                    height=int(record.height) if record else None,
                    status="error",
                    error=str(reason),
                    run_id=run_id,
                    indexed_at=_now(),
                )
            )

    def remove_images(self, paths: list[str]) -> int:
        """Delete the images at ``paths`` (and their regions) in one transaction; return how many."""
        return self.delete_images(paths).images

    def delete_images(self, paths: Sequence[str]) -> DeletedImages:
        """Delete the image rows at ``paths`` (indexed or error) and their regions, in one transaction.

        The region ids go to ``tombstones`` so that every FAISS file drops them on catch-up; their
        feature rows stay dead until :meth:`compact`. Unknown paths are ignored.
        """
        self._require_writable()
        indexed = errors = regions = 0
        with self._write() as s:
            for chunk in _chunks(list(dict.fromkeys(paths))):
                rows = s.execute(select(Image.id, Image.status).where(Image.path.in_(chunk))).all()
                if not rows:
                    continue
                ids = [r.id for r in rows]
                regions += s.execute(
                    insert(Tombstone).from_select(
                        ["region_id"],
                        select(Region.id).where(Region.image_id.in_(ids)).order_by(Region.id),
                    )
                ).rowcount
                s.execute(delete(Image).where(Image.id.in_(ids)))  # regions cascade
                errors += sum(r.status == "error" for r in rows)
                indexed += sum(r.status != "error" for r in rows)
        return DeletedImages(indexed=indexed, errors=errors, regions=regions)

    def images_under(self, path: str) -> list[str]:
        """Recorded image paths (indexed or error) equal to ``path`` or inside folder ``path``, sorted."""
        _check_path(path)
        base = path.rstrip(os.sep) or os.sep
        prefix = base if base.endswith(os.sep) else base + os.sep
        upper = prefix[:-1] + chr(ord(os.sep) + 1)  # every string starting with prefix is < upper
        with self._read() as s:
            return list(
                s.scalars(
                    select(Image.path)
                    .where((Image.path == base) | ((Image.path >= prefix) & (Image.path < upper)))
                    .order_by(Image.path)
                )
            )

    def save_vectors(self) -> None:
        """Bring the FAISS index up to date, save it atomically, prune the tombstones it holds."""
        self._require_writable()
        saved = []
        for name in self.vector_arrays:
            vectors = self._synced_vectors(allow_rebuild=True, array=name)
            vectors.save(self.layout.vector_file(name))
            saved.append(vectors.max_tombstone_seq)
        self._save_table()
        with self._write() as s:  # every file holds the tombstones up to the smallest of theirs
            s.execute(delete(Tombstone).where(Tombstone.seq <= min(saved)))

    # ------------------------------------------------------------------------------------------
    # compaction
    # ------------------------------------------------------------------------------------------
    def compact(self) -> CompactSummary:
        """Rewrite the feature arrays with only the rows of live regions; save the FAISS files.

        Crash-safe (:mod:`indexer.compaction`): the new generation of files is written and
        fsynced first, then one transaction renumbers ``regions.row`` and names the generation,
        then the old files go. Region ids, and so the FAISS ids, stay the same.
        """
        self._require_writable()
        feature_before = self._feature_file_bytes()
        vector_before = self._vector_file_bytes()
        self.save_vectors()  # pending tombstones applied, saved and pruned
        with self._read() as s:
            generation, next_row = _feature_state(s)
            live = s.execute(select(Region.id, Region.row).order_by(Region.row)).all()
        rows = np.asarray([r.row for r in live], dtype=np.int64)
        compacted = not np.array_equal(rows, np.arange(next_row))
        if compacted:
            generation = self._compact_into(generation + 1, generation, next_row, live, rows)
            self._save_table()  # the saved one numbers the rows of the old generation
        remove_stale_generations(self.layout, self._specs, generation)
        return CompactSummary(
            rows_before=int(next_row),
            rows_after=int(rows.size),
            feature_bytes_before=feature_before,
            feature_bytes_after=self._feature_file_bytes(),
            vector_bytes_before=vector_before,
            vector_bytes_after=self._vector_file_bytes(),
            generation=generation,
            compacted=compacted,
        )

    def _compact_into(
        self, new: int, old: int, next_row: int, live: Sequence[Any], rows: np.ndarray
    ) -> int:
        """Write generation ``new`` from ``old``, commit it, switch to it; return ``new``."""
        try:
            write_generation(self.features, self.layout, self._specs, rows, new)
            self._commit_generation(new, old, next_row, [r.id for r in live], rows)
        except BaseException:
            committed = self._committed_generation()
            if committed is not None and committed != new:  # never committed: garbage
                try:
                    remove_generation(self.layout, self._specs, new)
                except OSError as exc:
                    logger.warning("could not remove generation %d of %s: %s", new, self.path, exc)
            raise
        self._use_generation(new, int(rows.size))
        logger.info(
            "compacted the feature store of %s: %d -> %d rows (generation %d)",
            self.path, next_row, rows.size, new,
        )
        return new

    def _commit_generation(
        self, new: int, old: int, next_row: int, region_ids: list[int], old_rows: np.ndarray
    ) -> None:
        """One transaction: ``regions.row`` -> ``0..n-1`` in old-row order, ``next_row``, generation.

        Updating in ascending old-row order never breaks ``UNIQUE(row)``: the new row ``i`` of a
        region is at most its old row, every region updated before it now holds a row below
        ``i``, and every region not yet updated still holds an old row above its own.
        """
        with self._write() as s:
            if _feature_state(s) != (old, next_row):
                raise EngineError(
                    f"the feature store of {self.path} changed during compaction (another writer?); "
                    "run `engine compact` again"
                )
            moves = [
                {"region_id": rid, "new_row": i}
                for i, (rid, row) in enumerate(zip(region_ids, old_rows.tolist()))
                if row != i
            ]
            table = Region.__table__
            if moves:
                s.execute(
                    update(table)
                    .where(table.c.id == bindparam("region_id"))
                    .values(row=bindparam("new_row")),
                    moves,
                )
            _set_meta(s, "next_row", len(region_ids))
            _set_meta(s, "feature_generation", new)

    def _committed_generation(self) -> int | None:
        """The generation the database names, or ``None`` if it cannot be read right now."""
        try:
            with self._read() as s:
                return _feature_state(s)[0]
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
        base = str(under)
        _check_path(base)
        prefix = base if base.endswith(os.sep) else base + os.sep
        upper = prefix[:-1] + chr(ord(os.sep) + 1)  # every string starting with prefix is < upper
        with self._read() as s:
            rows = s.execute(
                select(Image.path, Image.size_bytes, Image.mtime_ns, Image.content_hash, Image.status)
                .where((Image.path >= prefix) & (Image.path < upper))
            ).all()
        return {r.path: (r.size_bytes, r.mtime_ns, r.content_hash, r.status) for r in rows}

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
        return self._synced_vectors(allow_rebuild=False, array=array).search(vectors, k)

    def vector_count(self, array: str = VECTOR_ARRAY) -> int:
        """How many regions the FAISS file ``array`` holds once caught up with the database: the live
        regions, without counting the ``regions`` table (a scan of ~20 ms at a million rows)."""
        return self._synced_vectors(allow_rebuild=False, array=array).ntotal

    def regions(self, ids: Sequence[int]) -> list[RegionRow]:
        """The regions with these ids, in the given order; unknown (deleted) ids and -1 are skipped."""
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1) if i >= 0]
        found: dict[int, RegionRow] = {}
        with self._read() as s:
            state = _feature_state(s)
            # one statement for any number of ids (SQLite's json_each), on the DB-API cursor: a
            # 2000-candidate shortlist costs ~15 ms instead of ~75 through ORM rows
            cursor = _dbapi(s).execute(_REGIONS_BY_ID, (json.dumps(sorted(set(wanted))),))
            for row in cursor.fetchall():
                found[row[0]] = _region_row(row)
        rows = self._in_open_generation(state, list(found.values()))
        found = {r.id: r for r in rows}
        return [found[i] for i in wanted if i in found]

    def lookup_regions(self, ids: Sequence[int] | np.ndarray) -> Regions:
        """The live regions among ``ids`` (in their order; deleted ids and -1 dropped) as columns (feature
        row, image id, box) from the in-memory region table (:mod:`indexer.region_table`), brought up to
        date with the database first. Its rows index the feature store as it is open after this call."""
        return self._synced_table().lookup(ids)

    def all_regions(self) -> Regions:
        """Every live region (id, feature row, image id, box), by id, from the in-memory region table."""
        return self._synced_table().regions

    def image_ids_with_hash(self, content_hash: str) -> np.ndarray:
        """Ids of the indexed images whose file content has this sha256 (copies of one picture)."""
        with self._read() as s:
            found = s.scalars(select(Image.id).where(Image.content_hash == content_hash, Image.status == "indexed"))
            return np.asarray(list(found), np.int64)

    def _state(self) -> tuple[int, int, int, int]:
        """``(feature_generation, next_row, region_seq, tomb_seq)`` now, by one statement on a connection
        held for it (a lone SELECT reads one snapshot): ~0.05 ms instead of ~0.6 ms through a session."""
        if self._state_connection is None:
            self._state_connection = self._engine.raw_connection()
        return _db_state(self._state_connection.driver_connection)

    def _save_table(self) -> None:
        """Save the region table (caught up) for readers to load instead of reading SQLite (``regions.npz``)."""
        save_table(self._synced_table(), self.layout.region_table_path)

    def _synced_table(self) -> RegionTable:
        """The region table, brought to one database snapshot: regions added and removed since applied,
        or read whole (first use, a compaction's new generation, tombstones pruned before it saw them)."""
        generation, next_row, region_seq, tomb_seq = self._state()
        table = self._table
        if table is not None and (table.generation, table.region_seq, table.tomb_seq) == (generation, region_seq, tomb_seq):
            self._use_generation(generation, next_row)
            return table
        with self._read() as s:  # one snapshot for the state and the catch-up
            generation, next_row, region_seq, tomb_seq = _db_state(_dbapi(s))
            table = self._table if self._table is not None else self._saved_table(generation, region_seq, tomb_seq)
            if table is not None and table.generation != generation:  # a compaction renumbered the rows
                table = None
            if table is not None and (table.region_seq, table.tomb_seq) != (region_seq, tomb_seq):
                table = _caught_up_table(s, table, region_seq, tomb_seq)
            if table is None:
                table = RegionTable(read_regions(_dbapi(s)), generation, region_seq, tomb_seq)
        self._use_generation(generation, next_row)
        self._table = table
        return table

    def _saved_table(self, generation: int, region_seq: int, tomb_seq: int) -> RegionTable | None:
        """The table the writer saved, when it belongs to this feature ``generation`` and is not ahead of
        the database (``region_seq`` / ``tomb_seq``: e.g. a database restored from an older copy)."""
        table = load_table(self.layout.region_table_path)
        if table is None or table.generation != generation:
            return None
        if table.region_seq > region_seq or table.tomb_seq > tomb_seq:
            logger.warning("%s is ahead of the database; reading the regions from the database", self.layout.region_table_path)
            return None
        return table

    def regions_of_image(self, path: str) -> list[RegionRow]:
        """All regions of the image at ``path`` (by region id); empty if it has none or is unknown."""
        with self._read() as s:
            state = _feature_state(s)
            rows = s.execute(_region_select().where(Image.path == str(path)).order_by(Region.id))
            found = [_region_row(row) for row in rows]
        return self._in_open_generation(state, found)

    def _in_open_generation(self, state: tuple[int, int], rows: list[RegionRow]) -> list[RegionRow]:
        """``rows`` (read in a snapshot at feature ``state``) numbered as the open feature store is.

        A compaction that committed after this store's last search leaves it one generation
        behind: the rows are translated back through that generation's row map, so that rows
        looked up during one query all index the same files. Anything else (several generations
        behind, rows added since the compaction) switches the store to the snapshot's generation.
        """
        generation, next_row = state
        current = self.features.generation
        if generation == current or not rows:
            return rows
        if generation == current + 1:
            if generation not in self._row_maps:
                self._row_maps[generation] = read_row_map(self.layout, generation)
            old_rows = self._row_maps[generation]
            if old_rows is not None and all(r.row < old_rows.shape[0] for r in rows):
                return [replace(r, row=int(old_rows[r.row])) for r in rows]
        self._use_generation(generation, next_row)
        return rows

    def image_vectors(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored mean backbone feature (float32 ``[C]``) of each indexed image in ``paths`` that has
        one (images indexed before schema revision 0003 have none)."""
        out: dict[str, np.ndarray] = {}
        with self._read() as s:
            for chunk in _chunks(sorted(set(map(str, paths)))):
                for path, blob in s.execute(select(Image.path, Image.vector).where(Image.path.in_(chunk), Image.vector.is_not(None))):
                    out[path] = np.frombuffer(blob, dtype=np.float16).astype(np.float32)
        return out

    def read_arrays(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Feature-store rows ``rows`` of array ``name`` as float16 ``[*rows.shape, *shape]``."""
        return self.features.read(name, rows)

    def all_region_ids(self) -> np.ndarray:
        """Every committed region id, ascending, int64."""
        with self._read() as s:
            ids = list(s.scalars(select(Region.id).order_by(Region.id)))
        return np.asarray(ids, dtype=np.int64)

    def models(self) -> dict[str, str]:
        """The model versions of the latest indexing run (``IndexInfo.models`` without the counts)."""
        with self._read() as s:
            latest = s.scalar(select(IndexRun.models).order_by(IndexRun.id.desc()).limit(1))
        return json.loads(latest) if latest else {}

    def info(self) -> IndexInfo:
        vectors = self._synced_vectors(allow_rebuild=False)
        with self._read() as s:
            images = s.scalar(select(func.count()).select_from(Image).where(Image.status == "indexed"))
            errors = s.scalar(select(func.count()).select_from(Image).where(Image.status == "error"))
            regions = s.scalar(select(func.count()).select_from(Region))
            runs = s.scalar(select(func.count()).select_from(IndexRun))
            latest = s.scalar(select(IndexRun.models).order_by(IndexRun.id.desc()).limit(1))
            next_row = _get_meta(s, "next_row", 0)
        dead_rows = max(0, int(next_row) - int(regions or 0))
        return IndexInfo(
            path=self.path,
            images=int(images or 0),
            regions=int(regions or 0),
            errors=int(errors or 0),
            vectors=vectors.ntotal,
            index_type=vectors.index_type,
            device=vectors.device,
            dims={name: spec.shape for name, spec in self._specs.items()},
            models=json.loads(latest) if latest else {},
            runs=int(runs or 0),
            next_row=int(next_row),
            nprobe=vectors.nprobe,
            nprobe_at=dict(vectors.nprobe_at),
            dead_rows=dead_rows,
            dead_bytes=dead_rows * sum(spec.row_bytes for spec in self._specs.values()),
        )

    def errors(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every image recorded with status 'error', by path."""
        with self._read() as s:
            rows = s.execute(
                select(Image.path, Image.error).where(Image.status == "error").order_by(Image.path)
            ).all()
        return [(r.path, r.error or "") for r in rows]

    # ------------------------------------------------------------------------------------------
    # FAISS catch-up
    # ------------------------------------------------------------------------------------------
    def _synced_vectors(self, *, allow_rebuild: bool, array: str = VECTOR_ARRAY) -> VectorIndex:
        """The in-memory FAISS index, loaded on first use and caught up with the database.

        Only the writer changes the index type (on first use and on save): a reader keeps the
        type of the saved file, so readers never train an index in memory that the next save
        replaces anyway.
        """
        generation, next_row, region_seq, tomb_seq = self._state()
        self._use_generation(generation, next_row)  # a compaction committed since the last search
        if array not in self._vector_sets:
            self._vector_sets[array] = self._load_vectors(array)
            self._catch_up(array)
            allow_rebuild = allow_rebuild or self.writable
        elif region_seq > self._vector_sets[array].max_region_id or tomb_seq > self._vector_sets[array].max_tombstone_seq:
            self._catch_up(array)
        vectors = self._vector_sets[array]
        if allow_rebuild:
            factory = vectors.wanted_factory()
            if factory is not None:
                logger.info("rebuilding the %s vector index of %s as %s", array, self.path, factory)
                self._vector_sets[array] = self._rebuild_vectors(factory, array)
            elif vectors.needs_calibration():  # a file from before the per-k nprobe calibration
                logger.info("calibrating nprobe per result count for the %s vectors of %s", array, self.path)
                ids, feature_rows = self._live_rows()
                vectors.calibrate(ids, feature_rows, lambda r: self.features.read(array, r))
        return self._vector_sets[array]

    def _new_vector_index(self, array: str = VECTOR_ARRAY) -> VectorIndex:
        return VectorIndex(
            self._specs[array].shape[0],
            flat_threshold=self.config.flat_threshold,
            device=self.config.faiss_device,
        )

    def _load_vectors(self, array: str = VECTOR_ARRAY) -> VectorIndex:
        path = self.layout.vector_file(array)
        if path.is_file():
            try:
                vectors = VectorIndex.load(
                    path,
                    self._specs[array].shape[0],
                    flat_threshold=self.config.flat_threshold,
                    device=self.config.faiss_device,
                )
            except VectorFileError as exc:
                logger.warning("%s; rebuilding the vector index from the feature store", exc)
            else:
                _, _, region_seq, tomb_seq = self._state()
                if vectors.max_region_id <= region_seq and vectors.max_tombstone_seq <= tomb_seq:
                    return vectors
                logger.warning(
                    "%s is ahead of the database (region %d > %d or tombstone %d > %d); rebuilding "
                    "it from the feature store",
                    path, vectors.max_region_id, region_seq, vectors.max_tombstone_seq, tomb_seq,
                )
        return self._rebuild_vectors(None, array)

    def _live_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every region id and its feature row, by id."""
        with self._read() as s:
            rows = s.execute(select(Region.id, Region.row).order_by(Region.id)).all()
        return np.asarray([r.id for r in rows], dtype=np.int64), np.asarray([r.row for r in rows], dtype=np.int64)

    def _rebuild_vectors(self, factory: str | None, array: str = VECTOR_ARRAY) -> VectorIndex:
        with self._read() as s:
            generation, next_row, region_seq, tomb_seq = _db_state(_dbapi(s))
            rows = s.execute(select(Region.id, Region.row).order_by(Region.id)).all()
        self._use_generation(generation, next_row)
        ids = np.asarray([r.id for r in rows], dtype=np.int64)
        feature_rows = np.asarray([r.row for r in rows], dtype=np.int64)
        vectors = self._new_vector_index(array)
        vectors.rebuild(ids, feature_rows, lambda r: self.features.read(array, r), factory=factory)
        vectors.max_region_id = region_seq
        vectors.max_tombstone_seq = tomb_seq
        return vectors

    def _read_vectors(self, rows: np.ndarray) -> np.ndarray:
        return self.features.read(VECTOR_ARRAY, rows)

    def _catch_up(self, array: str = VECTOR_ARRAY) -> None:
        """Add regions newer than the index, apply tombstones newer than it (one DB snapshot)."""
        for _ in range(3):
            vectors = self._vector_sets[array]
            with self._read() as s:
                generation, next_row, region_seq, tomb_seq = _db_state(_dbapi(s))
                new = s.execute(
                    select(Region.id, Region.row)
                    .where(Region.id > vectors.max_region_id)
                    .order_by(Region.id)
                ).all()
                tombs = _tombstones_since(s, vectors.max_tombstone_seq, tomb_seq)
            if tombs is None:
                # Tombstones we never applied were pruned: a newer saved file holds them.
                logger.info("vector index of %s is behind pruned tombstones; reloading", self.path)
                self._vector_sets[array] = self._load_vectors(array)
                continue
            self._use_generation(generation, next_row)
            for chunk in _chunks(new, _CATCH_UP_CHUNK):
                ids = np.asarray([r.id for r in chunk], dtype=np.int64)
                rows = np.asarray([r.row for r in chunk], dtype=np.int64)
                vectors.add(ids, self.features.read(array, rows))
            if tombs:
                vectors.remove(np.asarray([t.region_id for t in tombs], dtype=np.int64))
            vectors.max_region_id = max(vectors.max_region_id, region_seq)
            vectors.max_tombstone_seq = max(vectors.max_tombstone_seq, tomb_seq)
            if new or tombs:
                logger.debug(
                    "caught up %s: +%d regions, -%d tombstones", self.path, len(new), len(tombs)
                )
            return
        raise EngineError(
            f"could not bring the vector index of {self.path} up to date (the writer kept pruning); "
            "retry the search"
        )


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _specs_from_shapes(array_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, ArraySpec]:
    specs = {check_array_name(name): ArraySpec(tuple(shape)) for name, shape in array_shapes.items()}
    if VECTOR_ARRAY not in specs or len(specs[VECTOR_ARRAY].shape) != 1:
        raise InvalidInputError(
            f"array_shapes {dict(array_shapes)} lack a 1-d {VECTOR_ARRAY!r} array (the FAISS "
            f"vector); add e.g. {VECTOR_ARRAY!r}: (112,)"
        )
    return specs


def _describe(specs: Mapping[str, ArraySpec]) -> str:
    return ", ".join(f"{n}{spec.shape}" for n, spec in sorted(specs.items()))


def _read_or_init_specs(
    layout: IndexLayout, wanted: dict[str, ArraySpec] | None, *, can_write: bool
) -> dict[str, ArraySpec]:
    engine = create_db_engine(layout.db_path, immediate=can_write)
    try:
        with Session(engine) as s, s.begin():
            stored = _get_meta(s, "arrays", None)
            if stored is None:
                if wanted is None or not can_write:
                    raise IndexNotFoundError(
                        f"index at {layout.root} was never completely created (no feature arrays "
                        f"recorded); create it with `engine index CORPUS --index {layout.root}`"
                    )
                _set_meta(s, "arrays", {n: spec.to_json() for n, spec in wanted.items()})
                _set_meta(s, "vector_array", VECTOR_ARRAY)
                _set_meta(s, "next_row", 0)
                _set_meta(s, "created_at", _now().isoformat())
                return dict(wanted)
            specs = {name: ArraySpec.from_json(value) for name, value in stored.items()}
    finally:
        engine.dispose()
    if wanted is not None and wanted != specs:
        raise IndexVersionError(
            f"index at {layout.root} stores feature arrays [{_describe(specs)}] but this engine "
            f"writes [{_describe(wanted)}]; re-index into a new directory with "
            "`engine index CORPUS --index NEWDIR` (or use the models the index was built with)"
        )
    if VECTOR_ARRAY not in specs:
        raise IndexVersionError(
            f"index at {layout.root} has no {VECTOR_ARRAY!r} feature array; re-index it with "
            "`engine index CORPUS --index NEWDIR`"
        )
    return specs


def _get_meta(session: Session, key: str, default: Any) -> Any:
    value = session.scalar(select(Meta.value).where(Meta.key == key))
    return default if value is None else json.loads(value)


def _set_meta(session: Session, key: str, value: Any) -> None:
    encoded = json.dumps(value, sort_keys=True)
    session.execute(
        sqlite_insert(Meta)
        .values(key=key, value=encoded)
        .on_conflict_do_update(index_elements=[Meta.key], set_={"value": encoded})
    )


def _feature_state(session: Session) -> tuple[int, int]:
    """``(feature_generation, next_row)``: which feature files are current and how many rows count.

    One plain statement: it runs several times per query (each region lookup checks it)."""
    values = dict(session.execute(text("SELECT key, value FROM meta WHERE key IN ('feature_generation', 'next_row')")).all())
    return int(json.loads(values.get("feature_generation", "0"))), int(json.loads(values.get("next_row", "0")))


def _tombstones_since(session: Session, seen: int, tomb_seq: int) -> list[Any] | None:
    """The tombstones ``(seq, region_id)`` after seq ``seen``, up to the snapshot's ``tomb_seq``; ``None``
    when some of them were already pruned (seqs have no gaps, so a missing first one shows it)."""
    tombs = session.execute(
        select(Tombstone.seq, Tombstone.region_id).where(Tombstone.seq > seen).order_by(Tombstone.seq)
    ).all()
    if tomb_seq > seen and (not tombs or tombs[0].seq != seen + 1):
        return None
    return list(tombs)


def _caught_up_table(session: Session, table: RegionTable, region_seq: int, tomb_seq: int) -> RegionTable | None:
    """``table`` brought to the session's snapshot (sequences ``region_seq`` / ``tomb_seq``): newer regions
    added, newer tombstones applied; ``None`` when tombstones it never saw were pruned."""
    tombs = _tombstones_since(session, table.tomb_seq, tomb_seq)
    if tombs is None:
        return None
    added = read_regions(_dbapi(session), table.region_seq)
    return table.updated(added, [t.region_id for t in tombs], region_seq=region_seq, tomb_seq=tomb_seq)


def _dbapi(session: Session) -> Any:  # noqa: ANN401
    """The session's DB-API (sqlite3) connection, for statements that run per query or per region."""
    return session.connection().connection.driver_connection


_DB_STATE = (
    "SELECT key, value FROM meta WHERE key IN ('feature_generation', 'next_row') "
    "UNION ALL SELECT name, seq FROM sqlite_sequence WHERE name IN ('regions', 'tombstones')"
)


def _db_state(connection: Any) -> tuple[int, int, int, int]:  # noqa: ANN401
    """The feature store's state and the highest region id and tombstone seq ever handed out
    (``sqlite_sequence``; 0 if none), in one statement on a DB-API ``connection`` (each search checks
    them): ``(feature_generation, next_row, region_seq, tomb_seq)``."""
    values = dict(connection.execute(_DB_STATE).fetchall())
    meta = [int(json.loads(values.get(key, "0"))) for key in ("feature_generation", "next_row")]
    return meta[0], meta[1], int(values.get("regions") or 0), int(values.get("tombstones") or 0)


def _drop_path(session: Session, path: str) -> None:
    """Delete the image row of ``path`` (if any) and tombstone its regions."""
    old = session.scalar(select(Image.id).where(Image.path == path))
    if old is None:
        return
    session.execute(
        insert(Tombstone).from_select(
            ["region_id"], select(Region.id).where(Region.image_id == old).order_by(Region.id)
        )
    )
    session.execute(delete(Image).where(Image.id == old))  # regions go by ON DELETE CASCADE


def _vector_bytes(vector: np.ndarray | None) -> bytes | None:
    if vector is None:
        return None
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if not np.isfinite(v).all():
        raise InvalidInputError("an image vector has NaN/inf values; pass finite features")
    return v.astype(np.float16).tobytes()


def _region_select():  # type: ignore[no-untyped-def]
    return select(
        Region.id,
        Region.image_id,
        Image.path,
        Image.content_hash,
        Region.x1,
        Region.y1,
        Region.x2,
        Region.y2,
        Region.objectness,
        Region.source,
        Region.row,
        Image.width,
        Image.height,
    ).join(Image, Region.image_id == Image.id)


_REGIONS_BY_ID = str(
    _region_select()
    .where(Region.id.in_(select(literal_column("value")).select_from(func.json_each(bindparam("ids")))))
    .compile(dialect=sqlite_dialect())
)
""":func:`_region_select` for the regions whose ids are listed in one JSON array (one ``?`` parameter)."""


def _region_row(row: Sequence[Any]) -> RegionRow:
    """A :class:`RegionRow` from a row in :func:`_region_select`'s column order (read by position: this
    runs for every candidate of every query)."""
    rid, image_id, path, content_hash, x1, y1, x2, y2, objectness, source, feature_row, width, height = row
    return RegionRow(rid, image_id, path, content_hash, (x1, y1, x2, y2), objectness, source, feature_row, width, height)


def _check_path(path: str) -> None:
    if not isinstance(path, str) or not os.path.isabs(path):
        raise InvalidInputError(
            f"image path {path!r} is not absolute; pass str(Path(p).resolve())"
        )
    if not path.isascii() and not _is_utf8(path):
        raise InvalidInputError(
            f"image path {path!r} is not UTF-8 (a file name with undecodable bytes); the index stores UTF-8 paths: rename the file"
        )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_record(record: ImageRecord) -> None:
    _check_path(record.path)
    if not record.content_hash or not isinstance(record.content_hash, str):
        raise InvalidInputError(
            f"image {record.path} has content_hash {record.content_hash!r}; pass its sha256 hex digest"
        )


def _check_batch(path: str, batch: RegionBatch, specs: Mapping[str, ArraySpec]) -> None:
    boxes = np.asarray(batch.boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidBoxError(
            f"boxes of {path} have shape {tuple(boxes.shape)}; pass [n, 4] xyxy pixel boxes"
        )
    n = boxes.shape[0]
    if not np.isfinite(boxes).all() or (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise InvalidBoxError(
            f"boxes of {path} include a non-finite or inverted box; pass xyxy boxes with x2 >= x1, y2 >= y1"
        )
    objectness = np.asarray(batch.objectness, dtype=np.float64).reshape(-1)
    if objectness.shape[0] != n or not np.isfinite(objectness).all():
        raise InvalidInputError(
            f"objectness of {path} has {objectness.shape[0]} finite-or-not values for {n} boxes; "
            "pass one finite score per box"
        )
    if batch.source not in REGION_SOURCES:
        raise InvalidInputError(
            f"region source {batch.source!r} of {path} is not allowed; use one of {list(REGION_SOURCES)}"
        )
    if set(batch.arrays) != set(specs):
        raise InvalidInputError(
            f"regions of {path} carry feature arrays {sorted(batch.arrays)} but the index stores "
            f"{sorted(specs)}; pass exactly those"
        )
    for name, spec in specs.items():
        shape = tuple(np.shape(batch.arrays[name]))
        if shape != (n, *spec.shape):
            raise InvalidInputError(
                f"feature array {name!r} of {path} has shape {shape}; expected {(n, *spec.shape)} "
                f"(one {spec.shape} row per box)"
            )

