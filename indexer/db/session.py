"""Opening ``engine.db``: SQLite pragmas, real transactions, and Alembic upgrades.

Every connection gets ``journal_mode=WAL`` (readers never block the writer), ``synchronous=FULL``
(a commit survives power loss), ``foreign_keys=ON`` (``ON DELETE CASCADE`` works) and
``busy_timeout=30000``. The pysqlite driver's own transaction handling is switched off
(``isolation_level=None``) and ``BEGIN`` is emitted on SQLAlchemy's ``begin`` event, so that DDL is
transactional too: a migration is applied completely or not at all, even under ``kill -9``.

The schema is created and changed only by the Alembic revisions in :mod:`migrations`; Alembic is
configured here without an ``alembic.ini`` (``script_location`` is the directory of the installed
:mod:`migrations` package, which works for editable and regular installs alike).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy.exc import DatabaseError

from engine.errors import EngineError, IndexVersionError

if TYPE_CHECKING:  # Alembic is imported only to migrate: opening an up-to-date index needs none of it
    from alembic.config import Config

__all__ = [
    "BUSY_TIMEOUT_MS",
    "create_db_engine",
    "alembic_config",
    "head_revision",
    "known_revisions",
    "current_revision",
    "read_revision",
    "upgrade_database",
    "downgrade_database",
]

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000


def create_db_engine(
    db_path: Path, *, immediate: bool = False, foreign_keys: bool = True, read_only: bool = False
) -> Engine:
    """A SQLAlchemy engine on the SQLite file ``db_path`` with the pragmas of the module docstring.

    ``immediate=True`` starts every transaction with ``BEGIN IMMEDIATE`` (takes SQLite's write lock
    up front, so a read-then-write transaction can never fail with ``SQLITE_BUSY`` half-way); use it
    for the writer. ``foreign_keys=False`` is for migrations only: SQLite batch migrations recreate
    tables, and dropping a parent table with foreign keys on would cascade-delete its children.

    ``read_only=True`` is for an index folder this process cannot write: the file is opened with the
    URI flags ``mode=ro&immutable=1``, so SQLite writes nothing (no ``-wal`` / ``-shm`` files, no
    journal-mode change) and takes no locks; nothing may change the file while such an engine is open.
    """
    if read_only:
        url = URL.create(
            "sqlite",
            database=f"file:{quote(str(Path(db_path)))}",
            query={"mode": "ro", "immutable": "1", "uri": "true"},
        )
        engine = create_engine(url)
    else:
        engine = create_engine(f"sqlite:///{Path(db_path)}")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if not read_only:  # both write the file (the journal mode) or concern writes only
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def alembic_config(connection: Connection | None = None, *, url: str | None = None) -> Config:
    """An Alembic :class:`Config` for :mod:`migrations`, built in code (no ``alembic.ini``).

    Pass the ``connection`` to migrate (it is handed to ``migrations/env.py`` through
    ``config.attributes``); commands then run inside that connection's transaction. ``url`` is the
    alternative for offline (``--sql``) use.
    """
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).resolve().parent))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision id this code knows (e.g. ``"0002_tombstones"``): the last of
    :data:`migrations.REVISIONS` (no Alembic import)."""
    from migrations import REVISIONS

    return REVISIONS[-1]


def known_revisions() -> set[str]:
    """All revision ids of :mod:`migrations` (:data:`migrations.REVISIONS`)."""
    from migrations import REVISIONS

    return set(REVISIONS)


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, or ``None`` for a database Alembic never touched."""
    # Read Alembic's version table directly: MigrationContext would log on every open.
    has_table = connection.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'"
    ).first()
    if has_table is None:
        return None
    heads = [r[0] for r in connection.exec_driver_sql("SELECT version_num FROM alembic_version")]
    if len(heads) > 1:
        raise IndexVersionError(
            f"engine.db has several Alembic heads {sorted(heads)}; an index has exactly one; "
            "rebuild the index with `engine index CORPUS --index NEWDIR`"
        )
    return heads[0] if heads else None


def read_revision(db_path: Path, *, read_only: bool = False) -> str | None:
    """The revision of the existing database ``db_path`` (``None``: Alembic never touched it), read
    without any write lock (``read_only``: opened immutable); an unreadable file is a clear error."""
    probe = create_db_engine(db_path, read_only=read_only)
    try:
        with probe.connect() as connection:
            return current_revision(connection)
    except DatabaseError as exc:
        raise EngineError(
            f"{db_path} is not a readable SQLite database ({exc.orig}); restore it from a "
            "backup or rebuild the index with `engine index CORPUS --index NEWDIR`"
        ) from None
    finally:
        probe.dispose()


def _check_known(revision: str | None, index_dir: Path) -> None:
    if revision is not None and revision not in known_revisions():
        raise IndexVersionError(
            f"index at {index_dir} was written by a newer engine (revision {revision}); "
            "upgrade the engine"
        )


def upgrade_database(db_path: Path, *, revision: str = "head") -> bool:
    """Bring ``db_path`` (created if missing) to ``revision``; return whether anything changed.

    Checks first, without any write lock, whether the database is already there, so that
    readers opening an up-to-date index never wait on a writer. Otherwise the whole upgrade runs
    in one ``BEGIN IMMEDIATE`` transaction with foreign keys off, followed by
    ``PRAGMA foreign_key_check``. Raises :class:`IndexVersionError` for a revision this code does
    not know (an index written by a newer engine).
    """
    db_path = Path(db_path)
    index_dir = db_path.parent
    target = head_revision() if revision == "head" else revision
    if db_path.is_file():
        current = read_revision(db_path)
        _check_known(current, index_dir)
        if current == target:
            return False

    migrator = create_db_engine(db_path, immediate=True, foreign_keys=False)
    try:
        with migrator.begin() as connection:
            current = current_revision(connection)  # again, now under the write lock
            _check_known(current, index_dir)
            if current == target:
                return False
            logger.info("upgrading %s from revision %s to %s", db_path, current, target)
            from alembic import command

            command.upgrade(alembic_config(connection), target)
            _check_foreign_keys(connection, db_path)
    finally:
        migrator.dispose()
    return True


def downgrade_database(db_path: Path, *, revision: str) -> None:
    """Take ``db_path`` down to ``revision`` (``"base"`` drops every table). For tests and tools."""
    migrator = create_db_engine(Path(db_path), immediate=True, foreign_keys=False)
    try:
        with migrator.begin() as connection:
            _check_known(current_revision(connection), Path(db_path).parent)
            from alembic import command

            command.downgrade(alembic_config(connection), revision)
            _check_foreign_keys(connection, Path(db_path))
    finally:
        migrator.dispose()


def _check_foreign_keys(connection: Connection, db_path: Path) -> None:
    violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if violations:
        raise EngineError(
            f"migrating {db_path} would break {len(violations)} foreign keys (first: {violations[0]}); "
            "the migration was rolled back; report this as an engine bug"
        )
