"""SQLite schema of an index (:mod:`indexer.db.models`); opening and upgrading it (:mod:`.session`)."""
from __future__ import annotations

from indexer.db.models import Base, Image, IndexRun, Meta, Region, Tombstone
from indexer.db.session import (
    alembic_config,
    create_db_engine,
    current_revision,
    downgrade_database,
    head_revision,
    upgrade_database,
)

__all__ = [
    "Base",
    "Image",
    "IndexRun",
    "Meta",
    "Region",
    "Tombstone",
    "alembic_config",
    "create_db_engine",
    "current_revision",
    "downgrade_database",
    "head_revision",
    "upgrade_database",
]
