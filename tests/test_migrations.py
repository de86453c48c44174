"""Alembic migrations of engine.db: old indexes upgrade with their data intact; downgrades work."""
from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from engine.errors import IndexVersionError
from indexer.db.models import Base
from indexer.db.session import (
    alembic_config,
    create_db_engine,
    current_revision,
    downgrade_database,
    head_revision,
    known_revisions,
    upgrade_database,
)
from indexer.feature_store import ArraySpec, FeatureStore
from indexer.store import IndexStore

FIRST = "0001_initial"


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    return {r[0] for r in rows} - {"sqlite_sequence"}


def _revision(db: Path) -> str | None:
    engine = create_db_engine(db)
    try:
        with engine.connect() as con:
            return current_revision(con)
    finally:
        engine.dispose()


def _fill_first_revision(db: Path) -> None:
    """Rows as an engine at revision 0001 wrote them (plain SQL, no models)."""
    now = dt.datetime(2026, 1, 2, 3, 4, 5)
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA foreign_keys=ON")
        con.execute(
            "INSERT INTO index_runs (id, started_at, finished_at, corpus, status, processed, unchanged,"
            " removed, regions_added, errors, seconds, models) VALUES"
            " (1, ?, ?, '/corpus', 'completed', 2, 0, 0, 3, 0, 1.5, ?)",
            (now, now, json.dumps({"backbone": "effnet-lite0@1"})),
        )
        con.executemany(
            "INSERT INTO images (id, path, content_hash, size_bytes, mtime_ns, width, height, status,"
            " error, run_id, indexed_at) VALUES (?, ?, ?, 10, 20, 64, 48, 'indexed', NULL, 1, ?)",
            [(1, "/corpus/a.jpg", "a" * 64, now), (2, "/corpus/b.jpg", "b" * 64, now)],
        )
        con.executemany(
            "INSERT INTO regions (id, image_id, x1, y1, x2, y2, objectness, source, row) VALUES"
            " (?, ?, 1, 2, 30, 40, 0.5, 'rpn', ?)",
            [(1, 1, 0), (2, 1, 1), (3, 2, 2)],
        )
        con.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [
                ("arrays", json.dumps({"visual": {"shape": [8], "dtype": "float16"}})),
                ("vector_array", json.dumps("visual")),
                ("next_row", "3"),
            ],
        )


def test_revisions_are_typed_and_chained() -> None:
    assert {"0001_initial", "0002_tombstones", "0003_image_vectors"} <= known_revisions()
    assert head_revision() in known_revisions()


def test_the_revision_list_is_alembics_chain() -> None:
    """``migrations.REVISIONS`` (read on every open without Alembic) is exactly Alembic's chain, oldest first."""
    from alembic.script import ScriptDirectory

    import migrations

    script = ScriptDirectory.from_config(alembic_config())
    chain = [s.revision for s in script.walk_revisions()][::-1]
    assert list(migrations.REVISIONS) == chain
    assert head_revision() == script.get_current_head()


def test_models_match_migrated_schema(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    upgrade_database(db)
    engine = create_db_engine(db)
    try:
        with engine.connect() as con:
            assert compare_metadata(MigrationContext.configure(con), Base.metadata) == []
    finally:
        engine.dispose()


def test_first_revision_rows_survive_upgrade(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    assert upgrade_database(db, revision=FIRST)
    assert _revision(db) == FIRST
    assert "tombstones" not in _tables(db)
    _fill_first_revision(db)

    assert upgrade_database(db)  # the normal open path
    assert not upgrade_database(db)  # idempotent
    assert _revision(db) == head_revision()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT id, path, content_hash FROM images ORDER BY id").fetchall() == [
            (1, "/corpus/a.jpg", "a" * 64),
            (2, "/corpus/b.jpg", "b" * 64),
        ]
        assert con.execute("SELECT id, image_id, row FROM regions ORDER BY id").fetchall() == [
            (1, 1, 0), (2, 1, 1), (3, 2, 2)
        ]
        assert con.execute("SELECT corpus, regions_added FROM index_runs").fetchall() == [("/corpus", 3)]
        assert con.execute("SELECT value FROM meta WHERE key='next_row'").fetchone() == ("3",)
        assert con.execute("SELECT count(*) FROM tombstones").fetchone() == (0,)
        indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "ix_images_content_hash" in indexes


def test_first_revision_index_opens_and_searches(tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    index_dir.mkdir()
    upgrade_database(index_dir / "engine.db", revision=FIRST)
    _fill_first_revision(index_dir / "engine.db")
    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float16)
    features = FeatureStore(
        index_dir / "features", {"visual": ArraySpec((8,))}, committed_rows=0, writable=True
    )
    assert features.append({"visual": vectors}) == 0
    features.flush()
    features.close()

    with IndexStore.open(index_dir) as store:
        assert _revision(index_dir / "engine.db") == head_revision()
        scores, ids = store.search(vectors[1:2].astype(np.float32), k=3)
        assert ids[0, 0] == 2 and scores[0, 0] == pytest.approx(1.0, abs=1e-3)
        assert sorted(ids[0].tolist()) == [1, 2, 3]
        (region,) = store.regions([3])
        assert (region.image_path, region.box, region.row) == ("/corpus/b.jpg", (1.0, 2.0, 30.0, 40.0), 2)
        info = store.info()
        assert (info.images, info.regions, info.runs) == (2, 3, 1)
        assert info.models == {"backbone": "effnet-lite0@1"}


def test_downgrade_to_first_and_base(tmp_path: Path) -> None:
    db = tmp_path / "engine.db"
    upgrade_database(db, revision=FIRST)
    _fill_first_revision(db)
    upgrade_database(db)
    downgrade_database(db, revision=FIRST)
    assert _revision(db) == FIRST
    assert "tombstones" not in _tables(db)
    with sqlite3.connect(db) as con:  # data kept; regions not cascaded away by the downgrade
        assert con.execute("SELECT count(*) FROM regions").fetchone() == (3,)
    downgrade_database(db, revision="base")
    assert _revision(db) is None
    assert _tables(db) == {"alembic_version"}
    upgrade_database(db)  # and back up from nothing
    assert _revision(db) == head_revision()
    assert {"images", "regions", "index_runs", "meta", "tombstones"} <= _tables(db)


def test_newer_revision_is_refused(tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    index_dir.mkdir()
    db = index_dir / "engine.db"
    upgrade_database(db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num='0099_from_the_future'")
    with pytest.raises(IndexVersionError, match=r"written by a newer engine \(revision 0099_from_the_future\); upgrade the engine"):
        upgrade_database(db)
    with pytest.raises(IndexVersionError, match=str(index_dir)):
        IndexStore.open(index_dir)


def test_garbage_database_is_a_clear_error(tmp_path: Path) -> None:
    from engine.errors import EngineError

    (tmp_path / "engine.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(EngineError, match="is not a readable SQLite database"):
        upgrade_database(tmp_path / "engine.db")


def test_pragmas_and_transactional_ddl(tmp_path: Path) -> None:
    engine = create_db_engine(tmp_path / "engine.db")
    try:
        with engine.connect() as con:
            assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert con.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert con.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        with pytest.raises(RuntimeError):
            with engine.begin() as con:
                con.execute(text("CREATE TABLE t (x INTEGER)"))
                raise RuntimeError("crash mid-migration")
        with engine.connect() as con:
            assert con.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE name='t'").scalar() == 0
    finally:
        engine.dispose()


def test_migrations_ship_with_the_package() -> None:
    import setuptools

    import migrations

    root = Path(__file__).resolve().parents[1]
    config = alembic_config()
    location = Path(config.get_main_option("script_location"))
    assert location == Path(migrations.__file__).resolve().parent
    assert (location / "script.py.mako").is_file() and (location / "env.py").is_file()
    packages = setuptools.find_packages(str(root), include=["migrations", "migrations.*"])
    assert "migrations.versions" in packages  # regular (non-editable) installs carry the revisions
