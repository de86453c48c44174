"""The in-memory region table of an opened index (:mod:`indexer.region_table`), kept in step with the
database the way the FAISS indexes are: loaded from the writer's ``regions.npz`` (or read whole from
SQLite), then regions added since and tombstones applied, and read whole again after a compaction
renumbered the feature rows or when tombstones it never saw were pruned."""
from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from indexer.catalog import tombstones_since
from indexer.db_state import Database, DbState, dbapi, snapshot_state
from indexer.feature_sync import FeatureSync
from indexer.index_dir import IndexLayout
from indexer.checksums import SavedFile
from indexer.region_table import RegionTable, load_table, read_regions, save_table

__all__ = ["TableSync"]

logger = logging.getLogger(__name__)


class TableSync:
    """The region table of the index at ``layout``, brought to one database snapshot on each use."""

    def __init__(self, *, db: Database, layout: IndexLayout, features: FeatureSync) -> None:
        self._db = db
        self._layout = layout
        self._features = features
        self._table: RegionTable | None = None

    def synced(self) -> RegionTable:
        """The region table, brought to one database snapshot: regions added and removed since applied,
        or read whole (first use, a compaction's new generation, tombstones pruned before it saw them)."""
        state = self._db.state()
        table = self._table
        if table is not None and (table.generation, table.region_seq, table.tomb_seq) == (state.generation, state.region_seq, state.tomb_seq):
            self._features.follow(state)
            return table
        with self._db.read() as s:  # one snapshot for the state and the catch-up
            state = snapshot_state(s)
            table = self._table if self._table is not None else self._saved(state)
            if table is not None and table.generation != state.generation:  # a compaction renumbered the rows
                table = None
            if table is not None and (table.region_seq, table.tomb_seq) != (state.region_seq, state.tomb_seq):
                table = _caught_up(s, table, state)
            if table is None:
                table = RegionTable(read_regions(dbapi(s)), state.generation, state.region_seq, state.tomb_seq)
        self._features.follow(state)
        self._table = table
        return table

    def save(self) -> SavedFile:
        """Save the region table (caught up) for readers to load instead of reading SQLite (``regions.npz``);
        return what was written (for ``engine check``)."""
        self._db.require_writable()
        table = self.synced()
        path = self._layout.region_table_path
        digest = save_table(table, path)
        return SavedFile(path.name, digest, (table.generation, table.region_seq, table.tomb_seq))

    def clear(self) -> None:
        self._table = None

    def _saved(self, state: DbState) -> RegionTable | None:
        """The table the writer saved, when it belongs to the feature generation of ``state`` and is not
        ahead of the database (e.g. a database restored from an older copy)."""
        path = self._layout.region_table_path
        table = load_table(path)
        if table is None or table.generation != state.generation:
            return None
        if table.region_seq > state.region_seq or table.tomb_seq > state.tomb_seq:
            logger.warning("%s is ahead of the database; reading the regions from the database", path)
            return None
        return table


def _caught_up(session: Session, table: RegionTable, state: DbState) -> RegionTable | None:
    """``table`` brought to the session's snapshot ``state``: newer regions added, newer tombstones
    applied; ``None`` when tombstones it never saw were pruned."""
    tombs = tombstones_since(session, table.tomb_seq, state.tomb_seq)
    if tombs is None:
        return None
    added = read_regions(dbapi(session), table.region_seq)
    return table.updated(added, [t.region_id for t in tombs], region_seq=state.region_seq, tomb_seq=state.tomb_seq)
