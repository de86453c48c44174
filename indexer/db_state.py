"""``engine.db`` of an opened index: creating and opening it, its transactions, and its state.

* **State.** What the rest of the store keys its caches on is read ONE way, :func:`read_state`: the
  feature generation and ``next_row`` from ``meta``, and the highest region id and tombstone seq ever
  handed out (``sqlite_sequence``), in one statement (:class:`DbState`). :meth:`Database.state` reads it
  on a connection held for the purpose (each search checks it, ~0.05 ms); inside a transaction
  :func:`snapshot_state` reads it in that transaction's snapshot.
* **Creation is atomic.** A new database is built under a temporary name in the index folder
  (``.engine.db.tmp-PID``), migrated to head, given its feature-array shapes, fsynced and only then
  renamed to ``engine.db``: readers see no index or a complete one. An ``engine.db`` left by an older
  engine killed while creating (0 bytes, or no feature arrays recorded and no images) is an
  *unfinished creation*: a creator (``create=True``, under the writer lock) removes it and creates the
  index again; a reader gets an error naming ``engine index``, which does exactly that.
* **Read-only folders.** When the process cannot write the index folder (or ``engine.db``), readers
  open the database with ``mode=ro&immutable=1`` (no ``-wal`` / ``-shm`` files, no migration, nothing
  written); a writer gets :class:`IndexReadOnlyError`.
"""
from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from engine.errors import (
    EngineError,
    IndexLockedError,
    IndexNotFoundError,
    IndexReadOnlyError,
    IndexVersionError,
    InvalidInputError,
)
from indexer.arrays import VECTOR_ARRAY, describe_specs
from indexer.db.models import Meta
from indexer.db.session import (
    create_db_engine,
    head_revision,
    known_revisions,
    read_revision,
    upgrade_database,
)
from indexer.feature_store import ArraySpec
from indexer.index_dir import IndexLayout, WriterLock, fsync_dir, remove_stale_temps

__all__ = [
    "DbState",
    "Database",
    "OpenedDatabase",
    "Creation",
    "open_database",
    "creation_state",
    "read_state",
    "snapshot_state",
    "dbapi",
    "get_meta",
    "set_meta",
    "stored_visual_key",
    "VISUAL_KEY_META",
    "utc_now",
]

logger = logging.getLogger(__name__)

VISUAL_KEY_META = "visual_key"
"""The ``meta`` key of the index's visual key version (migration ``0005_visual_key``)."""

_DB_STATE = (
    "SELECT key, value FROM meta WHERE key IN ('feature_generation', 'next_row') "
    "UNION ALL SELECT name, seq FROM sqlite_sequence WHERE name IN ('regions', 'tombstones')"
)


@dataclass(frozen=True)
class DbState:
    """Where the database is: which feature files are current (``generation``), how many feature rows
    are committed (``next_row``), and the highest region id and tombstone seq ever handed out (0 if none)."""

    generation: int
    next_row: int
    region_seq: int
    tomb_seq: int


def read_state(connection: Any) -> DbState:  # noqa: ANN401
    """The :class:`DbState` in one statement on a DB-API (sqlite3) ``connection``."""
    values = dict(connection.execute(_DB_STATE).fetchall())
    generation, next_row = (int(json.loads(values.get(key, "0"))) for key in ("feature_generation", "next_row"))
    return DbState(generation, next_row, int(values.get("regions") or 0), int(values.get("tombstones") or 0))


def dbapi(session: Session) -> Any:  # noqa: ANN401
    """The session's DB-API (sqlite3) connection, for statements that run per query or per region."""
    return session.connection().connection.driver_connection


def snapshot_state(session: Session) -> DbState:
    """The :class:`DbState` in ``session``'s snapshot."""
    return read_state(dbapi(session))


def get_meta(session: Session, key: str, default: Any) -> Any:  # noqa: ANN401
    value = session.scalar(select(Meta.value).where(Meta.key == key))
    return default if value is None else json.loads(value)


def set_meta(session: Session, key: str, value: Any) -> None:  # noqa: ANN401
    encoded = json.dumps(value, sort_keys=True)
    session.execute(
        sqlite_insert(Meta)
        .values(key=key, value=encoded)
        .on_conflict_do_update(index_elements=[Meta.key], set_={"value": encoded})
    )


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Database:
    """The SQLAlchemy engine on ``engine.db`` of an opened index, its transactions and its state.

    ``writable``: this process holds the writer lock (write transactions start ``BEGIN IMMEDIATE``).
    ``read_only``: the folder cannot be written; the file is opened immutable (see the module docstring).
    """

    def __init__(self, layout: IndexLayout, *, writable: bool, read_only: bool = False) -> None:
        self.layout = layout
        self.writable = writable
        self.read_only = read_only
        self._engine = create_db_engine(layout.db_path, immediate=writable, read_only=read_only)
        self._state_connection: Any = None

    @contextmanager
    def read(self) -> Iterator[Session]:
        """One read transaction: every query inside sees the same snapshot (WAL)."""
        with Session(self._engine) as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction (``BEGIN IMMEDIATE``), committed on leaving the block."""
        self.require_writable()
        with Session(self._engine) as session, session.begin():
            yield session

    def require_writable(self) -> None:
        if not self.writable:
            raise EngineError(
                f"index at {self.layout.root} is open read-only; open it with writable=True to change it"
            )

    def state(self) -> DbState:
        """The :class:`DbState` now, by one statement on a connection held for it (a lone SELECT reads
        one snapshot): ~0.05 ms instead of ~0.6 ms through a session."""
        if self._state_connection is None:
            self._state_connection = self._engine.raw_connection()
        return read_state(self._state_connection.driver_connection)

    def close(self) -> None:
        if self._state_connection is not None:
            self._state_connection.close()
            self._state_connection = None
        self._engine.dispose()


# ----------------------------------------------------------------------------------------------
# opening and creating
# ----------------------------------------------------------------------------------------------
class Creation(enum.Enum):
    """How far the creation of the database at an index folder got."""

    MISSING = "missing"  # no engine.db
    UNFINISHED = "unfinished"  # an engine.db a killed creator left: 0 bytes, or no arrays and no images
    CREATED = "created"


@dataclass(frozen=True)
class OpenedDatabase:
    """What :func:`open_database` hands the store: the database, the feature-array specs it records,
    and the writer lock (held when the store was opened ``writable``)."""

    database: Database
    specs: dict[str, ArraySpec]
    lock: WriterLock | None


def open_database(
    layout: IndexLayout, *, create: bool, writable: bool, wanted: dict[str, ArraySpec] | None, visual_key: str | None = None
) -> OpenedDatabase:
    """Open (``create``: create, or finish an unfinished creation of) the database of ``layout``.

    A writer (``writable``) and a creator take the writer lock; a creator that is not ``writable``
    releases it once the database exists. Readers migrate an old schema when they can write the folder
    (as the writer would), and on a read-only folder open it immutable and never write.
    ``wanted``: the feature-array specs to create the index with, checked against the stored ones.
    ``visual_key``: the engine's visual key version (``meta.visual_key``), recorded by a creation and
    checked against the stored one before anything else (an :class:`IndexVersionError` on a mismatch);
    ``None`` checks nothing (commands that read no vectors of the engine's own: info, check, remove).
    """
    read_only = not layout.is_writable()
    if writable or (create and _creation_of(layout, read_only=read_only) is not Creation.CREATED):
        return _open_as_writer(layout, create=create, writable=writable, wanted=wanted, visual_key=visual_key)
    creation = _creation_of(layout, read_only=read_only)
    if creation is not Creation.CREATED:
        raise _not_created(layout, creation)
    if read_only:
        _require_head(layout)
        _warn_of_unseen_commits(layout)
    else:
        upgrade_database(layout.db_path)
    database = Database(layout, writable=False, read_only=read_only)
    try:
        _check_visual_key(database, visual_key)
        specs = _read_specs(database, wanted)
    except BaseException:
        database.close()
        raise
    return OpenedDatabase(database, specs, None)


def _open_as_writer(
    layout: IndexLayout, *, create: bool, writable: bool, wanted: dict[str, ArraySpec] | None, visual_key: str | None = None
) -> OpenedDatabase:
    if layout.root.exists():
        unwritable = layout.unwritable_paths()
        if unwritable:
            raise IndexReadOnlyError(
                f"index at {layout.root} cannot be changed: {unwritable[0]} is read-only for this user; "
                f"give write access (e.g. `chmod -R u+w {layout.root}`) or index into another folder with "
                "`engine index CORPUS --index NEWDIR` (queries work on a read-only index)"
            )
    elif not create:
        raise _not_created(layout, Creation.MISSING)
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IndexReadOnlyError(
            f"cannot create the index folder {layout.root} ({exc.strerror}); pass an --index folder you can write"
        ) from None
    lock = WriterLock(layout.lock_path)
    try:
        lock.acquire()
    except IndexLockedError:
        if _creation_of(layout) is Creation.CREATED:
            raise
        raise IndexLockedError(
            f"index at {layout.root} is being created by another process (lock {layout.lock_path} is "
            "held); wait for that `engine index` run to finish, then run yours"
        ) from None
    database: Database | None = None
    try:
        remove_stale_temps(layout.db_path)  # a creation killed before its rename
        creation = _creation_of(layout)
        if creation is not Creation.CREATED:
            if not create:
                raise _not_created(layout, creation)
            if wanted is None:
                raise InvalidInputError(
                    f"array_shapes is required to create the index at {layout.root}; pass the row "
                    "shape of every feature array, e.g. {'visual': (112,), 'maps': (112, 7, 7)}"
                )
            if creation is Creation.UNFINISHED:
                logger.warning("%s was left by an interrupted creation; creating the index again", layout.db_path)
                _remove_database(layout)
            _create_database(layout, wanted, visual_key)
        upgrade_database(layout.db_path)
        database = Database(layout, writable=writable)
        _check_visual_key(database, visual_key)
        specs = _read_specs(database, wanted)
        if not writable:
            lock.release()
        return OpenedDatabase(database, specs, lock if writable else None)
    except BaseException:
        if database is not None:
            database.close()
        lock.release()
        raise


def _creation_of(layout: IndexLayout, *, read_only: bool = False) -> Creation:
    return creation_state(layout.db_path, read_only=read_only)


def creation_state(db_path: Path, *, read_only: bool = False) -> Creation:
    """How far the creation of the database ``db_path`` got, read without writing anything
    (``read_only``: the folder cannot be written; the file is opened immutable)."""
    try:
        size = db_path.stat().st_size
    except FileNotFoundError:
        return Creation.MISSING
    if size == 0:
        return Creation.UNFINISHED
    uri = f"file:{quote(str(db_path))}" + ("?mode=ro&immutable=1" if read_only else "")
    try:
        connection = sqlite3.connect(uri, uri=True)
        try:
            tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            has_arrays = "meta" in tables and connection.execute(
                "SELECT 1 FROM meta WHERE key='arrays'"
            ).fetchone() is not None
            has_images = "images" in tables and connection.execute("SELECT 1 FROM images LIMIT 1").fetchone() is not None
            revisions = {r[0] for r in connection.execute("SELECT version_num FROM alembic_version")} if "alembic_version" in tables else set()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise EngineError(
            f"{db_path} is not a readable SQLite database ({exc}); restore it from a backup or rebuild "
            "the index with `engine index CORPUS --index NEWDIR`"
        ) from None
    newer = bool(revisions - known_revisions())  # a newer engine's index: never ours to redo
    return Creation.CREATED if has_arrays or has_images or newer else Creation.UNFINISHED


def _not_created(layout: IndexLayout, creation: Creation) -> IndexNotFoundError:
    if creation is Creation.MISSING:
        return IndexNotFoundError(
            f"no index at {layout.root}; create one with `engine index CORPUS --index {layout.root}`"
        )
    return IndexNotFoundError(
        f"index at {layout.root} was never completely created (its creation was interrupted); run "
        f"`engine index CORPUS --index {layout.root}` to create it again"
    )


def _remove_database(layout: IndexLayout) -> None:
    """Delete an unfinished ``engine.db`` and its ``-wal`` / ``-shm`` (under the writer lock)."""
    for suffix in ("-wal", "-shm", ""):
        layout.db_path.with_name(layout.db_path.name + suffix).unlink(missing_ok=True)
    fsync_dir(layout.root)


def _create_database(layout: IndexLayout, specs: Mapping[str, ArraySpec], visual_key: str | None = None) -> None:
    """Build the database under a temporary name, migrate it, record ``specs`` (and ``visual_key``), then
    rename it into place."""
    temp = layout.db_path.with_name(f".{layout.db_path.name}.tmp-{os.getpid()}")
    try:
        upgrade_database(temp)
        engine = create_db_engine(temp, immediate=True)
        try:
            with Session(engine) as s, s.begin():
                set_meta(s, "arrays", {n: spec.to_json() for n, spec in specs.items()})
                set_meta(s, "vector_array", VECTOR_ARRAY)
                set_meta(s, "next_row", 0)
                set_meta(s, "created_at", utc_now().isoformat())
                if visual_key is not None:
                    set_meta(s, VISUAL_KEY_META, visual_key)
            raw = engine.raw_connection()  # everything into the main file: no -wal to carry along
            try:
                raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()
        finally:
            engine.dispose()
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, layout.db_path)
    except BaseException:
        for suffix in ("-wal", "-shm", ""):
            temp.with_name(temp.name + suffix).unlink(missing_ok=True)
        raise
    fsync_dir(layout.root)
    logger.info("created the index database %s", layout.db_path)


def _require_head(layout: IndexLayout) -> None:
    """On a read-only folder: the database must be at the schema this code reads (it cannot be migrated)."""
    current = read_revision(layout.db_path, read_only=True)
    head = head_revision()
    if current == head:
        return
    if current is not None and current not in known_revisions():
        raise IndexVersionError(
            f"index at {layout.root} was written by a newer engine (revision {current}); upgrade the engine"
        )
    raise IndexVersionError(
        f"index at {layout.root} has schema revision {current} and this engine reads {head}, but the "
        f"folder is read-only so it cannot be upgraded; open it once with write access (e.g. "
        f"`engine info --index {layout.root}` as a user who can write it)"
    )


def _warn_of_unseen_commits(layout: IndexLayout) -> None:
    wal = layout.db_path.with_name(layout.db_path.name + "-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        logger.warning(
            "%s holds commits that a read-only open cannot see (a writer did not close cleanly); the index "
            "answers as of its last checkpoint; open it once with write access to fold them in", wal,
        )


def _check_visual_key(database: Database, visual_key: str | None) -> None:
    """One line, never a traceback, when the index's vectors were built with another visual key."""
    if visual_key is None:
        return
    with database.read() as s:
        stored = get_meta(s, VISUAL_KEY_META, None)
    if stored != visual_key:
        root = database.layout.root
        raise IndexVersionError(
            f"index {root} was built with visual key {stored or 'unrecorded'}; this engine uses {visual_key}: "
            f"re-index into a new directory (engine index CORPUS --index NEW)"
        )


def stored_visual_key(database: Database) -> str | None:
    """The visual key version an index records (``None``: none recorded)."""
    with database.read() as s:
        return get_meta(s, VISUAL_KEY_META, None)


def _read_specs(database: Database, wanted: dict[str, ArraySpec] | None) -> dict[str, ArraySpec]:
    root = database.layout.root
    with database.read() as s:
        stored = get_meta(s, "arrays", None)
    if stored is None:
        raise IndexVersionError(
            f"index at {root} records no feature arrays; re-index it with `engine index CORPUS --index NEWDIR`"
        )
    specs = {name: ArraySpec.from_json(value) for name, value in stored.items()}
    if wanted is not None and wanted != specs:
        raise IndexVersionError(
            f"index at {root} stores feature arrays [{describe_specs(specs)}] but this engine "
            f"writes [{describe_specs(wanted)}]; re-index into a new directory with "
            "`engine index CORPUS --index NEWDIR` (or use the models the index was built with)"
        )
    if VECTOR_ARRAY not in specs:
        raise IndexVersionError(
            f"index at {root} has no {VECTOR_ARRAY!r} feature array; re-index it with "
            "`engine index CORPUS --index NEWDIR`"
        )
    return specs
