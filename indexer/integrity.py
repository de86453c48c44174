"""``engine check``: every file of an index verified against its database, and ``--repair``.

:func:`check_index` compares every file with the database: feature-file sizes with ``next_row``, each
segment's crc32 (:mod:`indexer.checksums`; NaN/inf in live rows without a segment), the FAISS files and
the region table with their records (and their own internal checksums). Damage that touches only dead
rows (no live region refers to them) is harmless and reported as a note. :func:`repair_index`
(``--repair``) extends truncated feature files (with NaN, so nothing reads them as data), re-extracts the
features of the images whose live rows are damaged from their files (the same pipeline as ``engine
index``; their old rows become dead), and rebuilds damaged FAISS files and the region table from the
feature store. docs/index-layout.md, "Checksums and `engine check`".
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.errors import EngineError, IndexCorruptError
from indexer.arrays import SAN_ARRAY, VECTOR_ARRAY
from indexer.checksums import FILE_KEY, Segment
from indexer.db.models import FeatureSegment, Image, IndexRun, Meta, Region
from indexer.db_state import Database, snapshot_state
from indexer.faiss_store import VectorFileError, read_header
from indexer.feature_store import ArraySpec, nonfinite_rows
from indexer.index_dir import FileDigest, IndexLayout, WriterLock, fsync_dir
from indexer.region_table import load_table

if TYPE_CHECKING:
    from indexer.store import IndexStore, StoreConfig

__all__ = [
    "DamagedPart",
    "RepairReport",
    "CheckReport",
    "ReindexJob",
    "Reindexer",
    "check_index",
    "check_layout",
    "ensure_features_intact",
    "repair_index",
]

logger = logging.getLogger(__name__)

_READ_BYTES = 16 << 20  # feature bytes read per step when verifying
_VECTOR_ARRAYS = (VECTOR_ARRAY, SAN_ARRAY)  # the arrays with a FAISS file (indexer.store.IndexStore.vector_arrays)
_NAN_BYTE = b"\xff"  # 0xFFFF is a float16 NaN: padding that no reader takes for data
_PROPOSAL_SOURCES = ("gt", "selective-search")  # runs record these by name, the RPN by its version


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DamagedPart:
    """One damaged part of an index: a file (``file``, relative to the index directory), the feature rows
    ``rows`` (``[first, end)``; ``None`` for a whole derived file), what is wrong, and the images whose
    live regions use those rows (re-extracted by a repair). ``kind``: ``features``, ``vectors`` or
    ``region-table``."""

    kind: str
    file: str
    problem: str
    rows: tuple[int, int] | None = None
    image_ids: tuple[int, ...] = ()

    def line(self) -> str:
        where = f" rows {self.rows[0]}-{self.rows[1] - 1}" if self.rows is not None else ""
        images = f"; live regions of {len(self.image_ids)} image(s) use them" if self.image_ids else ""
        fix = "re-extract the images' features" if self.kind == "features" else "rebuild it from the feature store"
        return f"{self.file}{where}: {self.problem}{images} (repair: {fix})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": self.file,
            "rows": list(self.rows) if self.rows is not None else None,
            "problem": self.problem,
            "images": len(self.image_ids),
        }


@dataclass(frozen=True)
class RepairReport:
    """What ``--repair`` did: feature files extended to their committed size, derived files rebuilt, images
    re-extracted, images it could not repair (path, why), and the check after it."""

    padded: tuple[str, ...]
    rebuilt: tuple[str, ...]
    reindexed: tuple[str, ...]
    unrepairable: tuple[tuple[str, str], ...]
    after: CheckReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "padded": list(self.padded),
            "rebuilt": list(self.rebuilt),
            "reindexed": list(self.reindexed),
            "unrepairable": [{"path": p, "reason": r} for p, r in self.unrepairable],
            "after": self.after.to_dict(),
        }


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_index` found. ``unrecorded_rows``: committed feature rows (summed over arrays) no
    checksum covers (written before checksums were recorded; checked for NaN/inf only). ``notes``: findings
    that need nothing (damage in dead rows only, files saved before checksums or after their record)."""

    index: Path
    generation: int
    committed_rows: int
    live_rows: int
    files_checked: int
    segments_checked: int
    unrecorded_rows: int
    damaged: tuple[DamagedPart, ...]
    notes: tuple[str, ...] = ()
    repair: RepairReport | None = None

    @property
    def clean(self) -> bool:
        """No damage found."""
        return not self.damaged

    @property
    def ok(self) -> bool:
        """No damage left: none found, or ``--repair`` repaired all of it."""
        return self.clean if self.repair is None else self.repair.after.clean

    def summary(self) -> str:
        head = (
            f"checked {self.index}: {self.files_checked} files, {self.segments_checked} checksummed segments, "
            f"{self.committed_rows} feature rows ({self.live_rows} live, {self.unrecorded_rows} array rows without checksum)"
        )
        if self.clean:
            return f"{head}: no damage"
        found = f"{head}: {len(self.damaged)} damaged part(s)"
        if self.repair is None:
            return f"{found}; repair with `engine check --index {self.index} --repair`"
        left = len(self.repair.after.damaged)
        return f"{found}; repaired: {'all' if not left else f'{len(self.damaged)} found, {left} left'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": str(self.index),
            "ok": self.ok,
            "generation": self.generation,
            "committed_rows": self.committed_rows,
            "live_rows": self.live_rows,
            "files_checked": self.files_checked,
            "segments_checked": self.segments_checked,
            "unrecorded_rows": self.unrecorded_rows,
            "damaged": [d.to_dict() for d in self.damaged],
            "notes": list(self.notes),
            "repair": self.repair.to_dict() if self.repair is not None else None,
        }


# ----------------------------------------------------------------------------------------------
# checking
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DbState:
    """What the database says about the files, in one snapshot."""

    specs: dict[str, ArraySpec]
    generation: int
    next_row: int
    region_seq: int
    tomb_seq: int
    segments: dict[str, list[Segment]]
    live_rows: np.ndarray  # sorted feature rows of the live regions
    live_images: np.ndarray  # their image ids
    files: dict[str, dict[str, Any]]

    def images_in(self, first: int, end: int) -> tuple[int, ...]:
        lo, hi = np.searchsorted(self.live_rows, [first, end])
        return tuple(sorted(set(self.live_images[lo:hi].tolist())))

    def live_mask(self, first: int, end: int) -> np.ndarray:
        """Which rows of ``[first, end)`` live regions use."""
        lo, hi = np.searchsorted(self.live_rows, [first, end])
        mask = np.zeros(end - first, bool)
        mask[self.live_rows[lo:hi] - first] = True
        return mask


def _read_state(session: Session) -> _DbState:
    db = snapshot_state(session)
    meta = {k: json.loads(v) for k, v in session.execute(select(Meta.key, Meta.value)).all()}
    segments: dict[str, list[Segment]] = {}
    generation = db.generation
    for row in session.execute(
        select(FeatureSegment).where(FeatureSegment.generation == generation).order_by(FeatureSegment.array, FeatureSegment.first_row)
    ).scalars():
        segments.setdefault(row.array, []).append(Segment(row.array, row.generation, row.first_row, row.n_rows, row.crc32))
    live = np.asarray(session.execute(select(Region.row, Region.image_id).order_by(Region.row)).all(), np.int64).reshape(-1, 2)
    return _DbState(
        specs={name: ArraySpec.from_json(value) for name, value in meta.get("arrays", {}).items()},
        generation=generation,
        next_row=db.next_row,
        region_seq=db.region_seq,
        tomb_seq=db.tomb_seq,
        segments=segments,
        live_rows=live[:, 0].copy(),
        live_images=live[:, 1].copy(),
        files={k[len(FILE_KEY) :]: v for k, v in meta.items() if k.startswith(FILE_KEY)},
    )


def _db_state(db: Database) -> _DbState:
    with db.read() as session:
        return _read_state(session)


@dataclass
class _Findings:
    damaged: list[DamagedPart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: int = 0
    segments: int = 0
    unrecorded: int = 0


def check_index(index_dir: Path, *, config: StoreConfig | None = None) -> CheckReport:
    """Verify every file of the index at ``index_dir`` against its database (read-only; migrates it first)."""
    from indexer.store import IndexStore, StoreConfig

    with IndexStore.open(index_dir, config=config or StoreConfig()) as store:
        return check_layout(store.layout, store.database)


def check_layout(layout: IndexLayout, db: Database) -> CheckReport:
    """Verify the files of an (opened, migrated) index against one snapshot of its database. Runs again
    (up to three times) when a compaction switched the feature files meanwhile: the old ones are gone."""
    for _ in range(3):
        report = _check_once(layout, db)
        if db.state().generation == report.generation:
            break
        logger.info("a compaction of %s committed during the check; checking again", layout.root)
    return report


def _check_once(layout: IndexLayout, db: Database) -> CheckReport:
    state = _db_state(db)
    found = _Findings()
    for name, spec in sorted(state.specs.items()):
        _check_feature_file(layout, state, name, spec, found)
    for array in _VECTOR_ARRAYS:
        if array in state.specs:
            _check_vector_file(layout, state, array, found)
    _check_region_table(layout, state, found)
    return CheckReport(
        index=layout.root,
        generation=state.generation,
        committed_rows=state.next_row,
        live_rows=int(state.live_rows.size),
        files_checked=found.files,
        segments_checked=found.segments,
        unrecorded_rows=found.unrecorded,
        damaged=tuple(found.damaged),
        notes=tuple(found.notes),
    )


def ensure_features_intact(layout: IndexLayout, db: Database) -> None:
    """Raise :class:`IndexCorruptError` when live feature rows are damaged (compaction would copy them into
    a new generation with fresh checksums, hiding the damage)."""
    state = _db_state(db)
    found = _Findings()
    for name, spec in sorted(state.specs.items()):
        _check_feature_file(layout, state, name, spec, found)
    if found.damaged:
        raise IndexCorruptError(
            f"{found.damaged[0].line()}; the index at {layout.root} is damaged on disk and compaction would keep "
            f"the damage; run `engine check --index {layout.root} --repair` first"
        )


def _rel(layout: IndexLayout, path: Path) -> str:
    return str(path.relative_to(layout.root))


def _check_feature_file(layout: IndexLayout, state: _DbState, name: str, spec: ArraySpec, found: _Findings) -> None:
    path = layout.feature_path(name, state.generation)
    rel = _rel(layout, path)
    found.files += 1
    need = state.next_row
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = None
    have = min(need, (size or 0) // spec.row_bytes)
    present_from = have  # rows from here on are missing (or only partly present in a segment)
    covered = np.zeros(need, bool)
    with _open_or_none(path) as handle:
        for segment in state.segments.get(name, []):
            if segment.end_row > need:
                found.damaged.append(DamagedPart("features", rel, f"a checksum covers rows up to {segment.end_row}, past the {need} committed rows (database inconsistent)", (segment.first_row, segment.end_row)))
                continue
            covered[segment.first_row : segment.end_row] = True
            if segment.end_row > have:
                present_from = min(present_from, segment.first_row)
                continue
            found.segments += 1
            crc, bad = _scan(handle, spec, segment.first_row, segment.end_row)
            if crc != segment.crc32:
                _report_rows(found, state, rel, (segment.first_row, segment.end_row), _crc_problem(segment.crc32, crc, bad.size))
        unrecorded = np.flatnonzero(~covered[:have])
        found.unrecorded += int((~covered).sum())
        for first, end in _runs(unrecorded):
            _, bad = _scan(handle, spec, first, end)
            live = state.live_mask(first, end)
            for a, b in _runs(bad[live[bad]] + first if bad.size else bad):
                _report_rows(found, state, rel, (a, b), "NaN/inf values (rows without a checksum, written before checksums were recorded)")
    if present_from < need:
        what = "missing" if size is None else f"holds {(size or 0) // spec.row_bytes} rows"
        _report_rows(found, state, rel, (present_from, need), f"file {what}, the database refers to {need} rows (truncated or deleted)")


class _open_or_none:
    """``open(path, 'rb')`` as a context manager that yields ``None`` for a missing file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: Any = None

    def __enter__(self) -> Any:  # noqa: ANN401
        try:
            self.handle = open(self.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            self.handle = None
        return self.handle

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()


def _scan(handle: Any, spec: ArraySpec, first: int, end: int) -> tuple[int, np.ndarray]:  # noqa: ANN401
    """crc32 of rows ``[first, end)`` and the rows among them (offsets from ``first``) holding NaN/inf."""
    step = max(1, _READ_BYTES // spec.row_bytes)
    crc = 0
    bad = []
    for start in range(first, end, step):
        stop = min(end, start + step)
        data = os.pread(handle.fileno(), (stop - start) * spec.row_bytes, start * spec.row_bytes)
        crc = zlib.crc32(data, crc)
        rows = np.frombuffer(data, dtype=spec.np_dtype)
        if rows.size != (stop - start) * int(np.prod(spec.shape)):  # short read: the file changed under us
            raise EngineError(f"could not read rows {start}-{stop - 1} of {handle.name}; is a writer truncating it? run `engine check` again")
        bad.append(nonfinite_rows(rows.reshape(stop - start, -1)) + (start - first))
    return crc, np.concatenate(bad) if bad else np.zeros(0, np.int64)


def _crc_problem(recorded: int, found: int, nonfinite: int) -> str:
    nan = f"; {nonfinite} row(s) hold NaN/inf" if nonfinite else ""
    return f"checksum mismatch (crc32 recorded {recorded:08x}, found {found:08x}){nan}"


def _runs(positions: np.ndarray) -> Iterator[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of consecutive integers in the sorted ``positions``."""
    if positions.size == 0:
        return
    breaks = np.flatnonzero(np.diff(positions) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [positions.size - 1]])
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield int(positions[s]), int(positions[e]) + 1


def _report_rows(found: _Findings, state: _DbState, rel: str, rows: tuple[int, int], problem: str) -> None:
    images = state.images_in(*rows)
    if images:
        found.damaged.append(DamagedPart("features", rel, problem, rows, images))
    else:
        found.notes.append(f"{rel} rows {rows[0]}-{rows[1] - 1}: {problem}, in dead rows only (no live region uses them; `engine compact` drops them)")


def _digest(path: Path) -> FileDigest:
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_BYTES):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return FileDigest(size=size, crc32=crc)


def _check_saved_file(
    layout: IndexLayout, state: _DbState, path: Path, kind: str, own_state: Callable[[], tuple[int, ...] | str], db_state: tuple[int, ...], found: _Findings
) -> None:
    """A derived file (FAISS file, region table): its own readability, its state against the database's, and
    its size and crc32 against the record of its last save."""
    rel = _rel(layout, path)
    record = state.files.get(rel)
    if not path.is_file():
        if record is not None or state.live_rows.size:
            found.damaged.append(DamagedPart(kind, rel, "missing"))
        return
    found.files += 1
    saved = own_state()
    if isinstance(saved, str):
        found.damaged.append(DamagedPart(kind, rel, saved))
        return
    if any(s > d for s, d in zip(saved[-2:], db_state[-2:])):
        found.damaged.append(DamagedPart(kind, rel, f"ahead of the database (holds region/tombstone sequence {saved[-2:]}, the database {db_state[-2:]})"))
        return
    if record is None:
        found.notes.append(f"{rel}: saved before checksums were recorded (its own checks hold)")
        return
    digest = _digest(path)
    if (digest.size, digest.crc32) == (record["size"], record["crc32"]):
        return
    if tuple(record.get("state", ())) != saved:
        found.notes.append(f"{rel}: saved after its checksum was recorded (an interrupted save); its own checks hold")
        return
    found.damaged.append(DamagedPart(kind, rel, f"size/checksum mismatch (recorded {record['size']} bytes crc32 {record['crc32']:08x}, found {digest.size} bytes crc32 {digest.crc32:08x})"))


def _check_vector_file(layout: IndexLayout, state: _DbState, array: str, found: _Findings) -> None:
    path = layout.vector_file(array)
    dim = state.specs[array].shape[0]

    def own_state() -> tuple[int, ...] | str:
        try:
            header = read_header(path)
        except (VectorFileError, OSError, KeyError, TypeError) as exc:
            return f"unreadable ({exc})"
        if header.get("dim") != dim:
            return f"holds {header.get('dim')}-d vectors, the index {dim}-d"
        return int(header["max_region_id"]), int(header["max_tombstone_seq"])

    _check_saved_file(layout, state, path, "vectors", own_state, (state.region_seq, state.tomb_seq), found)


def _check_region_table(layout: IndexLayout, state: _DbState, found: _Findings) -> None:
    path = layout.region_table_path

    def own_state() -> tuple[int, ...] | str:
        table = load_table(path)
        if table is None:
            return "unreadable (bad zip member checksum or inconsistent columns)"
        return table.generation, table.region_seq, table.tomb_seq

    _check_saved_file(layout, state, path, "region-table", own_state, (state.generation, state.region_seq, state.tomb_seq), found)


# ----------------------------------------------------------------------------------------------
# repairing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReindexJob:
    """Images to extract again, as one ``engine index`` run of ``corpus`` with region source ``proposals``
    (``gt``, ``selective-search`` or ``rpn``) and the ``models`` their run recorded."""

    corpus: Path
    proposals: str
    models: dict[str, str]
    paths: tuple[Path, ...]


Reindexer = Callable[["IndexStore", ReindexJob], None]
"""Runs the indexing pipeline over a job's files into the open, writable store (``Engine`` provides it);
raises :class:`EngineError` when it cannot (e.g. other models than the run's)."""


def repair_index(index_dir: Path, *, reindex: Reindexer, config: StoreConfig | None = None) -> CheckReport:
    """Check the index, then repair what is damaged (under the writer lock): extend truncated feature files,
    re-extract the images whose live rows are damaged (their files must exist with the same content hash),
    rebuild damaged FAISS files and the region table. Returns the first check with a :class:`RepairReport`."""
    from indexer.store import IndexStore, StoreConfig

    config = config or StoreConfig()
    before = check_index(index_dir, config=config)
    layout = IndexLayout(before.index)
    if before.clean:
        return replace(before, repair=RepairReport((), (), (), (), after=before))
    padded = _pad_short_files(layout)
    unrepairable: list[tuple[str, str]] = []
    reindexed: list[str] = []
    with IndexStore.open(index_dir, writable=True, config=config) as store:
        found = check_layout(layout, store.database)  # under the writer lock: nothing moves now
        rebuilt = _remove_damaged_derived(layout, found)
        jobs, refused = _reindex_jobs(store.database, found)
        unrepairable += refused
        for job in jobs:
            try:
                reindex(store, job)
            except EngineError as exc:
                unrepairable += [(str(p), str(exc)) for p in job.paths]
            else:
                reindexed += [str(p) for p in job.paths]
        try:
            store.save_vectors()  # rebuilds the removed FAISS files and region table from the feature store
        except IndexCorruptError as exc:
            unrepairable.append(("(vector files)", f"{exc}; remove the unrepairable images with `engine remove PATH...`, then run `engine check --repair` again"))
    after = check_index(index_dir, config=config)
    for path, why in unrepairable:
        logger.warning("could not repair %s: %s", path, why)
    return replace(before, repair=RepairReport(tuple(padded), tuple(rebuilt), tuple(reindexed), tuple(unrepairable), after=after))


def _pad_short_files(layout: IndexLayout) -> list[str]:
    """Extend feature files shorter than the committed rows to that size with NaN (under the writer lock,
    briefly): a writer can open the index again, the missing rows read as damaged and get re-extracted."""
    padded = []
    with WriterLock(layout.lock_path):
        db = Database(layout, writable=False)
        try:
            state = _db_state(db)
        finally:
            db.close()
        for name, spec in state.specs.items():
            path = layout.feature_path(name, state.generation)
            need = state.next_row * spec.row_bytes
            size = path.stat().st_size if path.exists() else -1
            if size >= need:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                start = max(size, 0)
                os.ftruncate(fd, start)
                while start < need:
                    n = min(need - start, _READ_BYTES)
                    start += os.pwrite(fd, _NAN_BYTE * n, start)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(path.parent)
            logger.warning("extended %s from %d to %d bytes with NaN rows (re-extracted next)", path, max(size, 0), need)
            padded.append(_rel(layout, path))
    return padded


def _remove_damaged_derived(layout: IndexLayout, found: CheckReport) -> list[str]:
    """Delete the damaged FAISS files and region table: the next save rebuilds them from the feature store."""
    removed = []
    for part in found.damaged:
        if part.kind in ("vectors", "region-table"):
            (layout.root / part.file).unlink(missing_ok=True)
            removed.append(part.file)
    return removed


def _reindex_jobs(db: Database, found: CheckReport) -> tuple[list[ReindexJob], list[tuple[str, str]]]:
    """The images whose live rows are damaged, grouped by corpus, region source and models; and those that
    cannot be re-extracted (file gone or changed) with the reason."""
    from indexer.scan import content_hash

    image_ids = sorted({i for part in found.damaged if part.kind == "features" for i in part.image_ids})
    if not image_ids:
        return [], []
    with db.read() as s:
        rows = s.execute(
            select(Image.path, Image.content_hash, IndexRun.corpus, IndexRun.models)
            .outerjoin(IndexRun, Image.run_id == IndexRun.id)
            .where(Image.id.in_(image_ids))
            .order_by(Image.path)
        ).all()
    groups: dict[tuple[str, str, str], list[Path]] = {}
    refused: list[tuple[str, str]] = []
    for path, digest, corpus, models in rows:
        file = Path(path)
        if corpus is None:
            refused.append((path, "the index run that indexed it is not recorded; re-index its corpus with `engine index CORPUS`"))
            continue
        try:
            same = file.is_file() and content_hash(file) == digest
        except OSError as exc:
            refused.append((path, f"cannot read it ({exc.strerror or exc}); restore the file, or `engine remove {path}`"))
            continue
        if not same:
            why = "is gone" if not file.exists() else "changed since it was indexed"
            refused.append((path, f"the image file {why}; restore it, or `engine remove {path}` (or `engine index {corpus}` for a changed file)"))
            continue
        source = json.loads(models or "{}").get("proposals", "rpn")
        groups.setdefault((corpus, source if source in _PROPOSAL_SOURCES else "rpn", models or "{}"), []).append(file)
    jobs = [ReindexJob(Path(corpus), source, json.loads(models), tuple(paths)) for (corpus, source, models), paths in groups.items()]
    return jobs, refused
