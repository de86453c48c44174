"""The SQL catalog of an index: images, regions, index runs, error records and tombstones.

Every statement on those tables lives here, each write in one transaction of :class:`Database`. The
feature rows the regions point at are the store's business (:mod:`indexer.store` appends and fsyncs
them before :meth:`Catalog.commit_images` commits the rows that refer to them).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from sqlalchemy import bindparam, delete, func, insert, literal_column, select, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.orm import Session

from engine.errors import EngineError, InvalidBoxError, InvalidInputError
from indexer.db.models import REGION_SOURCES, RUN_STATUSES, Image, IndexRun, Region, Tombstone
from indexer.db_state import Database, DbState, dbapi, set_meta, snapshot_state, utc_now
from indexer.feature_store import ArraySpec
from indexer.checksums import SavedFile, Segment, record_file, record_segments, replace_segments
from indexer.scan import is_utf8

__all__ = [
    "ImageRecord",
    "RegionBatch",
    "RegionRow",
    "ImageEntry",
    "DeletedImages",
    "RunCounts",
    "CatalogCounts",
    "Catalog",
    "regions_since",
    "tombstones_since",
    "check_items",
]

_CHUNK = 500  # ids per SQL ``IN (...)``


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
class ImageEntry:
    """An indexed image as a listing shows it: its id, absolute path and pixel size."""

    id: int
    path: str
    width: int | None
    height: int | None

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "path": self.path, "width": self.width, "height": self.height}


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
class DeletedImages:
    """What :meth:`IndexStore.delete_images` deleted: indexed images, error records, regions."""

    indexed: int
    errors: int
    regions: int

    @property
    def images(self) -> int:
        return self.indexed + self.errors


@dataclass(frozen=True)
class RunCounts:
    """What an index run did: images processed, unchanged and removed, regions added, errors, seconds."""

    processed: int
    unchanged: int
    removed: int
    regions_added: int
    errors: int
    seconds: float


@dataclass(frozen=True)
class CatalogCounts:
    """Row counts for ``engine info`` (one snapshot): indexed and error images, regions, runs, and the
    latest run's models and the committed feature rows at that snapshot."""

    images: int
    errors: int
    regions: int
    runs: int
    models: dict[str, str]
    next_row: int


def _chunks(values: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class Catalog:
    """The catalog tables of the database ``db`` (reads in one snapshot each; writes need the writer)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.root = db.layout.root

    # -- index runs -----------------------------------------------------------------------------
    def begin_run(self, corpus: str, models: dict[str, str]) -> int:
        with self.db.write() as s:
            run_id = s.execute(
                insert(IndexRun)
                .values(
                    started_at=utc_now(),
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
            set_meta(s, "models", dict(models))
        return int(run_id)

    def finish_run(self, run_id: int, *, status: str, counts: RunCounts) -> None:
        if status not in RUN_STATUSES:
            raise InvalidInputError(
                f"run status {status!r} is not allowed; use one of {list(RUN_STATUSES)}"
            )
        with self.db.write() as s:
            changed = s.execute(
                update(IndexRun).where(IndexRun.id == run_id).values(status=status, finished_at=utc_now(), **asdict(counts))
            ).rowcount
            if not changed:
                raise InvalidInputError(
                    f"index run {run_id} does not exist in {self.root}; pass the id begin_run returned"
                )

    def fail_dead_runs(self) -> int:
        """Mark runs still 'running' as failed (the caller holds the writer lock, so they died)."""
        with self.db.write() as s:
            return int(
                s.execute(update(IndexRun).where(IndexRun.status == "running").values(status="failed")).rowcount
            )

    def models(self) -> dict[str, str]:
        with self.db.read() as s:
            latest = s.scalar(select(IndexRun.models).order_by(IndexRun.id.desc()).limit(1))
        return json.loads(latest) if latest else {}

    # -- images ---------------------------------------------------------------------------------
    def commit_images(
        self,
        run_id: int,
        items: Sequence[tuple[ImageRecord, RegionBatch]],
        first_row: int,
        segments: Sequence[Segment] = (),
    ) -> list[int]:
        """One transaction: replace each path's earlier row (tombstoning its regions), insert the images and
        their regions at feature rows ``first_row...``, record the checksums of their feature ``segments``
        and advance ``next_row``; return the image ids."""
        with self.db.write() as s:
            committed = snapshot_state(s).next_row
            if committed != first_row:
                raise EngineError(
                    f"feature store of {self.root} is at row {first_row} but the database says "
                    f"{committed}; another writer changed the index; re-open it and re-run"
                )
            now = utc_now()
            row = first_row
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
            set_meta(s, "next_row", row)
            record_segments(s, segments)
        return image_ids

    def record_error(self, run_id: int, record: ImageRecord | None, path: str, reason: str) -> None:
        if record is not None and record.path != path:
            raise InvalidInputError(
                f"record_error got record.path={record.path!r} but path={path!r}; pass the same path"
            )
        check_path(path)
        with self.db.write() as s:
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
                    indexed_at=utc_now(),
                )
            )

    def delete_images(self, paths: Sequence[str]) -> DeletedImages:
        indexed = errors = regions = 0
        with self.db.write() as s:
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
        check_path(path)
        base = path.rstrip(os.sep) or os.sep
        prefix = base if base.endswith(os.sep) else base + os.sep
        upper = prefix[:-1] + chr(ord(os.sep) + 1)  # every string starting with prefix is < upper
        with self.db.read() as s:
            return list(
                s.scalars(
                    select(Image.path)
                    .where((Image.path == base) | ((Image.path >= prefix) & (Image.path < upper)))
                    .order_by(Image.path)
                )
            )

    def known_images(self, under: str) -> dict[str, tuple[int, int, str, str]]:
        base = str(under)
        check_path(base)
        prefix = base if base.endswith(os.sep) else base + os.sep
        upper = prefix[:-1] + chr(ord(os.sep) + 1)  # every string starting with prefix is < upper
        with self.db.read() as s:
            rows = s.execute(
                select(Image.path, Image.size_bytes, Image.mtime_ns, Image.content_hash, Image.status)
                .where((Image.path >= prefix) & (Image.path < upper))
            ).all()
        return {r.path: (r.size_bytes, r.mtime_ns, r.content_hash, r.status) for r in rows}

    def image_ids_with_hash(self, content_hash: str) -> np.ndarray:
        with self.db.read() as s:
            found = s.scalars(select(Image.id).where(Image.content_hash == content_hash, Image.status == "indexed"))
            return np.asarray(list(found), np.int64)

    def image_vectors(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self.db.read() as s:
            for chunk in _chunks(sorted(set(map(str, paths)))):
                for path, blob in s.execute(select(Image.path, Image.vector).where(Image.path.in_(chunk), Image.vector.is_not(None))):
                    out[path] = np.frombuffer(blob, dtype=np.float16).astype(np.float32)
        return out

    def indexed_image(self, image_id: int) -> ImageEntry | None:
        """The indexed image ``image_id`` (``None`` when no indexed image has that id; error rows do not count)."""
        with self.db.read() as s:
            row = s.execute(select(Image.id, Image.path, Image.width, Image.height).where(Image.id == int(image_id), Image.status == "indexed")).first()
        return None if row is None else ImageEntry(id=row.id, path=row.path, width=row.width, height=row.height)

    def indexed_images(self, *, offset: int = 0, limit: int = 100) -> list[ImageEntry]:
        """Indexed images by id, ``limit`` of them from the ``offset``-th."""
        with self.db.read() as s:
            rows = s.execute(
                select(Image.id, Image.path, Image.width, Image.height).where(Image.status == "indexed").order_by(Image.id).offset(int(offset)).limit(int(limit))
            ).all()
        return [ImageEntry(id=r.id, path=r.path, width=r.width, height=r.height) for r in rows]

    def errors(self) -> list[tuple[str, str]]:
        with self.db.read() as s:
            rows = s.execute(
                select(Image.path, Image.error).where(Image.status == "error").order_by(Image.path)
            ).all()
        return [(r.path, r.error or "") for r in rows]

    def counts(self) -> CatalogCounts:
        with self.db.read() as s:
            images = s.scalar(select(func.count()).select_from(Image).where(Image.status == "indexed"))
            errors = s.scalar(select(func.count()).select_from(Image).where(Image.status == "error"))
            regions = s.scalar(select(func.count()).select_from(Region))
            runs = s.scalar(select(func.count()).select_from(IndexRun))
            latest = s.scalar(select(IndexRun.models).order_by(IndexRun.id.desc()).limit(1))
            next_row = snapshot_state(s).next_row
        return CatalogCounts(
            images=int(images or 0),
            errors=int(errors or 0),
            regions=int(regions or 0),
            runs=int(runs or 0),
            models=json.loads(latest) if latest else {},
            next_row=next_row,
        )

    # -- regions --------------------------------------------------------------------------------
    def regions(self, ids: Sequence[int]) -> tuple[DbState, dict[int, RegionRow]]:
        """The regions among ``ids`` by id, with the state of the snapshot they were read in."""
        found: dict[int, RegionRow] = {}
        with self.db.read() as s:
            state = snapshot_state(s)
            # one statement for any number of ids (SQLite's json_each), on the DB-API cursor: a
            # 2000-candidate shortlist costs ~15 ms instead of ~75 through ORM rows
            cursor = dbapi(s).execute(_REGIONS_BY_ID, (json.dumps(sorted(set(ids))),))
            for row in cursor.fetchall():
                found[row[0]] = _region_row(row)
        return state, found

    def regions_of_image(self, path: str) -> tuple[DbState, list[RegionRow]]:
        """The regions of the image at ``path`` by id, with the state of the snapshot they were read in."""
        with self.db.read() as s:
            state = snapshot_state(s)
            rows = s.execute(_region_select().where(Image.path == str(path)).order_by(Region.id))
            return state, [_region_row(row) for row in rows]

    def regions_of_images(self, paths: Sequence[str]) -> tuple[DbState, dict[str, list[RegionRow]]]:
        """The regions of each image at ``paths`` (by region id; an unknown path is absent), read in one snapshot."""
        wanted = [str(p) for p in paths]
        out: dict[str, list[RegionRow]] = {}
        with self.db.read() as s:
            state = snapshot_state(s)
            for row in s.execute(_region_select().where(Image.path.in_(wanted)).order_by(Region.id)):
                region = _region_row(row)
                out.setdefault(region.image_path, []).append(region)
        return state, out

    def region_ids(self) -> np.ndarray:
        """Every committed region id, ascending, int64."""
        with self.db.read() as s:
            return np.asarray(list(s.scalars(select(Region.id).order_by(Region.id))), dtype=np.int64)

    def live_rows(self, *, by: Literal["id", "row"] = "id") -> tuple[DbState, np.ndarray, np.ndarray]:
        """Every region id and its feature row (sorted ``by`` ``"id"`` or ``"row"``), in one snapshot."""
        order = Region.id if by == "id" else Region.row
        with self.db.read() as s:
            state = snapshot_state(s)
            rows = s.execute(select(Region.id, Region.row).order_by(order)).all()
        return state, np.asarray([r.id for r in rows], dtype=np.int64), np.asarray([r.row for r in rows], dtype=np.int64)

    def commit_generation(
        self,
        new: int,
        old: int,
        next_row: int,
        region_ids: np.ndarray,
        old_rows: np.ndarray,
        segments: Sequence[Segment] = (),
    ) -> None:
        """One transaction: ``regions.row`` -> ``0..n-1`` in old-row order, ``next_row``, generation.

        Updating in ascending old-row order never breaks ``UNIQUE(row)``: the new row ``i`` of a
        region is at most its old row, every region updated before it now holds a row below
        ``i``, and every region not yet updated still holds an old row above its own.
        """
        with self.db.write() as s:
            state = snapshot_state(s)
            if (state.generation, state.next_row) != (old, next_row):
                raise EngineError(
                    f"the feature store of {self.root} changed during compaction (another writer?); "
                    "run `engine compact` again"
                )
            moves = [
                {"region_id": rid, "new_row": i}
                for i, (rid, row) in enumerate(zip(region_ids.tolist(), old_rows.tolist()))
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
            set_meta(s, "next_row", len(region_ids))
            set_meta(s, "feature_generation", new)
            replace_segments(s, new, segments)  # the checksums of the new files replace the old ones

    def prune_tombstones(self, up_to: int, saved: Sequence[SavedFile] = ()) -> None:
        """Delete the tombstones up to seq ``up_to`` (every saved FAISS file holds them) and record the
        ``saved`` files' sizes and checksums, in one transaction."""
        with self.db.write() as s:
            s.execute(delete(Tombstone).where(Tombstone.seq <= up_to))
            for file in saved:
                record_file(s, file)

    def record_files(self, saved: Sequence[SavedFile]) -> None:
        """Record the sizes and checksums of the ``saved`` files (for ``engine check``)."""
        with self.db.write() as s:
            for file in saved:
                record_file(s, file)


def regions_since(session: Session, after_id: int) -> list[Any]:
    """The regions ``(id, row)`` with ids above ``after_id``, by id."""
    return list(session.execute(select(Region.id, Region.row).where(Region.id > after_id).order_by(Region.id)).all())


def tombstones_since(session: Session, seen: int, tomb_seq: int) -> list[Any] | None:
    """The tombstones ``(seq, region_id)`` after seq ``seen``, up to the snapshot's ``tomb_seq``; ``None``
    when some of them were already pruned (seqs have no gaps, so a missing first one shows it)."""
    tombs = session.execute(
        select(Tombstone.seq, Tombstone.region_id).where(Tombstone.seq > seen).order_by(Tombstone.seq)
    ).all()
    if tomb_seq > seen and (not tombs or tombs[0].seq != seen + 1):
        return None
    return list(tombs)


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


# ----------------------------------------------------------------------------------------------
# validation of what the writer commits (nothing is written for a bad item)
# ----------------------------------------------------------------------------------------------
def check_path(path: str) -> None:
    if not isinstance(path, str) or not os.path.isabs(path):
        raise InvalidInputError(
            f"image path {path!r} is not absolute; pass str(Path(p).resolve())"
        )
    if not path.isascii() and not is_utf8(path):
        raise InvalidInputError(
            f"image path {path!r} is not UTF-8 (a file name with undecodable bytes); the index stores UTF-8 "
            "paths: rename the file"
        )


def check_items(items: Sequence[tuple[ImageRecord, RegionBatch]], specs: Mapping[str, ArraySpec]) -> None:
    """Refuse a commit that names a path twice, a bad record or a batch that does not fit ``specs``."""
    paths = [record.path for record, _ in items]
    if len(set(paths)) != len(paths):
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        raise InvalidInputError(
            f"commit_images got the same path more than once ({dupes[0]!r}); commit each image once"
        )
    for record, batch in items:
        _check_record(record)
        _check_batch(record.path, batch, specs)


def _check_record(record: ImageRecord) -> None:
    check_path(record.path)
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
