"""What a query needs of every candidate region, as numpy columns in memory: id, feature row, image id
and box of every live region, kept in step with the database the way the FAISS index is (regions added
since, tombstones), and re-read whole after a compaction renumbered the feature rows.

Stages 1–2 need, per candidate, only its feature row (to read its features), its image (per-image
suppression, self-exclusion) and its box. Reading those from SQLite as Python rows cost ~55 ms for a
shortlist of 2,000 candidates at a million regions; a ``searchsorted`` over these columns costs well
under a millisecond. Paths and content hashes are read from SQLite for the hits that are shown only.
The table takes 44 bytes a region (ids, rows, image ids, boxes, proposal scores: 44 MB at a million) and ~2 s to read at a million regions, once per
reader (and again after a compaction).
"""
from __future__ import annotations

import io
import logging
import sqlite3
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.index_dir import FileDigest, atomic_write

__all__ = ["Regions", "RegionTable", "read_regions", "save_table", "load_table"]

log = logging.getLogger(__name__)

_SELECT = "SELECT id, row, image_id, x1, y1, x2, y2, objectness FROM regions WHERE id > ? ORDER BY id"
_FETCH = 65_536  # rows converted per step (bounds the Python objects alive at once)
_FORMAT = 2  # of the saved file (2: with each region's proposal score; a file of format 1 is re-read from the database)


@dataclass(frozen=True)
class Regions:
    """Regions as columns: ``ids``, feature ``rows``, ``image_ids`` (int64 ``[n]``), ``boxes`` (float32 xyxy ``[n, 4]``)
    and ``scores`` (float32 ``[n]``: each proposal's score as indexed, 1 for annotated boxes)."""

    ids: np.ndarray
    rows: np.ndarray
    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def empty(cls) -> Regions:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))

    @classmethod
    def from_records(cls, records: np.ndarray) -> Regions:
        """From ``[n, 8]`` records ``(id, row, image_id, x1, y1, x2, y2, score)``."""
        records = np.asarray(records, np.float64).reshape(-1, 8)
        ints = records[:, :3].astype(np.int64)
        return cls(ints[:, 0].copy(), ints[:, 1].copy(), ints[:, 2].copy(), np.ascontiguousarray(records[:, 3:7], np.float32), records[:, 7].astype(np.float32))

    def take(self, index: np.ndarray) -> Regions:
        """The regions at positions ``index`` (an int array or a boolean mask), in that order."""
        return Regions(*(column[index] for column in self.columns()))

    def concat(self, other: Regions) -> Regions:
        return Regions(*(np.concatenate([a, b]) for a, b in zip(self.columns(), other.columns())))

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.ids, self.rows, self.image_ids, self.boxes, self.scores


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


def save_table(table: RegionTable, path: Path) -> FileDigest:
    """Write ``table`` to ``path`` atomically (an uncompressed ``.npz``: its columns and its state); return
    the file's size and crc32."""
    buffer = io.BytesIO()
    state = np.asarray([_FORMAT, table.generation, table.region_seq, table.tomb_seq], np.int64)
    np.savez(buffer, state=state, ids=table.regions.ids, rows=table.regions.rows, image_ids=table.regions.image_ids, boxes=table.regions.boxes, scores=table.regions.scores)
    return atomic_write(path, [buffer.getbuffer()])


def load_table(path: Path) -> RegionTable | None:
    """The table saved at ``path``; ``None`` (with a warning when the file exists) when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            version, generation, region_seq, tomb_seq = (int(v) for v in saved["state"])
            if version != _FORMAT:
                raise ValueError(f"format {version}, this engine reads {_FORMAT}")
            regions = Regions(saved["ids"].astype(np.int64), saved["rows"].astype(np.int64), saved["image_ids"].astype(np.int64), saved["boxes"].astype(np.float32).reshape(-1, 4), saved["scores"].astype(np.float32))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("region table %s is unreadable (%s); reading the regions from the database", path, exc)
        return None
    n = len(regions)
    if not (regions.rows.shape[0] == regions.image_ids.shape[0] == regions.boxes.shape[0] == regions.scores.shape[0] == n) or (n > 1 and not (np.diff(regions.ids) > 0).all()):
        log.warning("region table %s is inconsistent; reading the regions from the database", path)
        return None
    return RegionTable(regions, generation, region_seq, tomb_seq)
