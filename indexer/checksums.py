"""Checksums recorded as an index's files are written, for ``engine check`` (:mod:`indexer.integrity`).

* every commit appends rows to every feature array; ``commit_images`` records, per array, the crc32 of
  the bytes it appended with their rows (``feature_segments``: array, generation, first row, row count),
  in the same transaction as the rows. A compaction records the segments of the generation it writes
  (at most :data:`SEGMENT_ROWS` rows each) in the transaction that switches to it. Rows written before
  schema revision 0004 have no segment: they are *unrecorded*, checked for NaN/inf only.
* each save of a FAISS file or of the region table (``regions.npz``) records the file's size, crc32 and
  the database state it reflects in ``meta`` (key ``file:NAME``), in the transaction after the save.

Readers check what they get cheaply: :func:`check_scores` refuses NaN scores from a FAISS search.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from engine.errors import IndexCorruptError
from indexer.db.models import FeatureSegment, Meta
from indexer.index_dir import FileDigest

__all__ = [
    "SEGMENT_ROWS",
    "FILE_KEY",
    "Segment",
    "SavedFile",
    "commit_segments",
    "generation_segments",
    "record_segments",
    "replace_segments",
    "record_file",
    "check_scores",
]

SEGMENT_ROWS = 4096
"""At most this many rows per segment a compaction records: a damaged segment re-extracts its images."""
FILE_KEY = "file:"
"""``meta`` key prefix of a saved file's record."""


# ----------------------------------------------------------------------------------------------
# recording
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """Rows ``first_row .. first_row + n_rows - 1`` of feature array ``array`` (generation ``generation``)
    as one commit (or compaction step) wrote them, and the crc32 of their bytes."""

    array: str
    generation: int
    first_row: int
    n_rows: int
    crc32: int

    @property
    def end_row(self) -> int:
        return self.first_row + self.n_rows


def _crc32(block: np.ndarray, crc: int = 0) -> int:
    return zlib.crc32(np.ascontiguousarray(block).view(np.uint8).reshape(-1), crc)


def commit_segments(arrays: Mapping[str, np.ndarray], first_row: int, generation: int) -> list[Segment]:
    """One segment per array for the rows ``arrays`` (float16, as appended) written at ``first_row``."""
    return [
        Segment(name, int(generation), int(first_row), int(block.shape[0]), _crc32(block))
        for name, block in arrays.items()
        if block.shape[0]
    ]


def generation_segments(name: str, block: np.ndarray, first_row: int, generation: int) -> list[Segment]:
    """Segments of at most :data:`SEGMENT_ROWS` rows for ``block`` written at ``first_row`` by a compaction."""
    return [
        Segment(name, int(generation), int(first_row + start), int(part.shape[0]), _crc32(part))
        for start in range(0, block.shape[0], SEGMENT_ROWS)
        for part in (block[start : start + SEGMENT_ROWS],)
    ]


def _upsert_segments(session: Session, segments: Sequence[Segment]) -> None:
    if not segments:
        return
    stmt = sqlite_insert(FeatureSegment)
    stmt = stmt.on_conflict_do_update(
        index_elements=[FeatureSegment.array, FeatureSegment.generation, FeatureSegment.first_row],
        set_={"n_rows": stmt.excluded.n_rows, "crc32": stmt.excluded.crc32},
    )
    session.execute(
        stmt,
        [{"array": s.array, "generation": s.generation, "first_row": s.first_row, "n_rows": s.n_rows, "crc32": s.crc32} for s in segments],
    )


def record_segments(session: Session, segments: Sequence[Segment]) -> None:
    """Record ``segments`` in the caller's transaction (the one that commits their rows)."""
    _upsert_segments(session, segments)


def replace_segments(session: Session, generation: int, segments: Sequence[Segment]) -> None:
    """A compaction's commit: forget the segments of every other generation, record ``segments``."""
    session.execute(delete(FeatureSegment).where(FeatureSegment.generation != int(generation)))
    _upsert_segments(session, segments)


@dataclass(frozen=True)
class SavedFile:
    """A file a save wrote (``vectors.faiss``, ``regions.npz``, ...): its size and crc32, and the database
    ``state`` it reflects (its header's region id and tombstone seq; the table's generation too)."""

    name: str
    digest: FileDigest
    state: tuple[int, ...]


def record_file(session: Session, saved: SavedFile) -> None:
    """Record ``saved`` in the caller's transaction, for ``engine check``."""
    value = json.dumps(
        {"size": int(saved.digest.size), "crc32": int(saved.digest.crc32), "state": [int(v) for v in saved.state]},
        sort_keys=True,
    )
    session.execute(
        sqlite_insert(Meta)
        .values(key=FILE_KEY + saved.name, value=value)
        .on_conflict_do_update(index_elements=[Meta.key], set_={"value": value})
    )


def check_scores(scores: np.ndarray, ids: np.ndarray, index_dir: Path) -> None:
    """Raise :class:`IndexCorruptError` when a FAISS search returned a NaN score for a real hit (id >= 0)."""
    if np.isnan(scores[ids >= 0]).any():
        raise IndexCorruptError(
            f"the vector index of {index_dir} returned NaN scores: a FAISS file or the feature rows it was built "
            f"from are damaged on disk; run `engine check --index {index_dir} --repair`"
        )
