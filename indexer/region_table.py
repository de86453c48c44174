"""What a query needs of every candidate region, as numpy columns in memory: id, feature row, image id
and box of every live region, kept in step with the database the way the FAISS index is (regions added
since, tombstones), and re-read whole after a compaction renumbered the feature rows.

Stages 1–2 need, per candidate, only its feature row (to read its features), its image (per-image
suppression, self-exclusion) and its box. Reading those from SQLite as Python rows cost ~55 ms for a
shortlist of 2,000 candidates at a million regions; a ``searchsorted`` over these columns costs well
under a millisecond. Paths and content hashes are read from SQLite for the hits that are shown only.
The table takes ~32 bytes a region (32 MB at a million) and ~2 s to read at a million regions, once per
reader (and again after a compaction).
"""
from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Regions", "RegionTable", "read_regions"]

_SELECT = "SELECT id, row, image_id, x1, y1, x2, y2 FROM regions WHERE id > ? ORDER BY id"
_FETCH = 65_536  # rows converted per step (bounds the Python objects alive at once)


@dataclass(frozen=True)
class Regions:
    """Regions as columns: ``ids``, feature ``rows``, ``image_ids`` (int64 ``[n]``), ``boxes`` (float32 xyxy ``[n, 4]``)."""

    ids: np.ndarray
    rows: np.ndarray
    image_ids: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def empty(cls) -> Regions:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32))

    @classmethod
    def from_records(cls, records: np.ndarray) -> Regions:
        """From ``[n, 7]`` records ``(id, row, image_id, x1, y1, x2, y2)``."""
        records = np.asarray(records, np.float64).reshape(-1, 7)
        ints = records[:, :3].astype(np.int64)
        return cls(ints[:, 0].copy(), ints[:, 1].copy(), ints[:, 2].copy(), np.ascontiguousarray(records[:, 3:], np.float32))

    def take(self, index: np.ndarray) -> Regions:
        """The regions at positions ``index`` (an int array or a boolean mask), in that order."""
        return Regions(self.ids[index], self.rows[index], self.image_ids[index], self.boxes[index])

    def concat(self, other: Regions) -> Regions:
        return Regions(*(np.concatenate([a, b]) for a, b in zip(self.columns(), other.columns())))

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.ids, self.rows, self.image_ids, self.boxes


def read_regions(cursor: sqlite3.Connection, after_id: int = 0) -> Regions:
    """The regions with ids above ``after_id``, by id, from the ``regions`` table (one statement)."""
    found = cursor.execute(_SELECT, (int(after_id),))
    parts = []
    while chunk := found.fetchmany(_FETCH):
        parts.append(np.asarray(chunk, np.float64))
    return Regions.from_records(np.concatenate(parts)) if parts else Regions.empty()


@dataclass(frozen=True)
class RegionTable:
    """Every live region, by ascending id, and the database state it reflects: the feature
    ``generation`` its rows belong to, the highest region id (``region_seq``) and tombstone seq
    (``tomb_seq``) it has seen."""

    regions: Regions
    generation: int
    region_seq: int
    tomb_seq: int

    def __len__(self) -> int:
        return len(self.regions)

    def lookup(self, ids: Sequence[int] | np.ndarray) -> Regions:
        """The regions with these ids, in the given order; unknown (deleted) ids and -1 are dropped."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        held = self.regions.ids
        if held.shape[0] == 0 or ids.shape[0] == 0:
            return Regions.empty()
        pos = np.minimum(np.searchsorted(held, ids), held.shape[0] - 1)
        return self.regions.take(pos[held[pos] == ids])

    def updated(self, added: Regions, removed: Sequence[int] | np.ndarray, *, region_seq: int, tomb_seq: int) -> RegionTable:
        """This table with ``added`` (ids above every id held: new regions get higher ids) appended and
        the regions ``removed`` (ids; unknown ones ignored) dropped."""
        regions = self.regions
        if len(added):
            if len(regions) and added.ids[0] <= regions.ids[-1]:
                raise ValueError(f"region {int(added.ids[0])} is not newer than the table's last region {int(regions.ids[-1])}")
            regions = regions.concat(added)
        removed = np.asarray(removed, np.int64).reshape(-1)
        if removed.shape[0] and len(regions):
            regions = regions.take(~np.isin(regions.ids, removed))
        return RegionTable(regions, self.generation, region_seq, tomb_seq)
