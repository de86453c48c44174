"""Compaction of the feature store: copy the rows of live regions into a new generation of files.

Deleted and replaced images leave dead rows in the append-only feature arrays. Compaction
``G`` (:meth:`indexer.store.IndexStore.compact`, under the writer lock) works like this:

1. write every array's live rows, in their old order, to ``features/NAME.gG.f16`` and the row map
   ``features/previous-rows.gG.i64`` (``old_row[new_row]`` in generation ``G - 1``), then
   ``fsync`` each file and the directory (this module, :func:`write_generation`);
2. one SQLite transaction renumbers ``regions.row`` to ``0..n-1`` and sets ``meta.next_row = n``
   and ``meta.feature_generation = G`` — the commit *is* the switch;
3. the files of every other generation are deleted (:func:`remove_stale_generations`); the next
   writer deletes them if a crash came first.

Before the commit the database still names generation ``G - 1``, whose files were never touched,
and the new files are unreferenced garbage; after it, the new files are complete and durable. So
an interruption at any point leaves an index that opens and answers queries over everything.
Region ids, and so the FAISS files (ids are region ids), do not change.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.feature_store import ArraySpec, FeatureStore
from indexer.index_dir import IndexLayout, fsync_dir, parse_generation_file
from indexer.checksums import Segment, generation_segments

__all__ = [
    "CompactSummary",
    "write_generation",
    "remove_generation",
    "remove_stale_generations",
    "read_row_map",
    "files_bytes",
    "feature_files",
]

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 64 << 20  # feature bytes copied per step
_ROW_MAP_DTYPE = np.dtype("<i8")


@dataclass(frozen=True)
class CompactSummary:
    """What one compaction did. Bytes are on-disk file sizes; ``generation`` is the one now current."""

    rows_before: int
    rows_after: int
    feature_bytes_before: int
    feature_bytes_after: int
    vector_bytes_before: int
    vector_bytes_after: int
    generation: int
    compacted: bool

    @property
    def dead_rows(self) -> int:
        """Feature rows no region referred to; compaction dropped them."""
        return self.rows_before - self.rows_after

    @property
    def bytes_before(self) -> int:
        return self.feature_bytes_before + self.vector_bytes_before

    @property
    def bytes_after(self) -> int:
        return self.feature_bytes_after + self.vector_bytes_after

    def to_dict(self) -> dict[str, Any]:
        """The stable ``engine compact --json`` form."""
        return {
            "compacted": self.compacted,
            "rows_before": self.rows_before,
            "rows_after": self.rows_after,
            "dead_rows": self.dead_rows,
            "feature_bytes_before": self.feature_bytes_before,
            "feature_bytes_after": self.feature_bytes_after,
            "vector_bytes_before": self.vector_bytes_before,
            "vector_bytes_after": self.vector_bytes_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "generation": self.generation,
        }


def write_generation(
    source: FeatureStore,
    layout: IndexLayout,
    specs: Mapping[str, ArraySpec],
    old_rows: np.ndarray,
    generation: int,
) -> list[Segment]:
    """Write rows ``old_rows`` of every array of ``source`` as generation ``generation``, durably.

    The new files (arrays and row map) are complete and fsynced, and so is the directory, when
    this returns; nothing refers to them until the caller commits the generation. Returns the
    checksummed segments of the new files, for the caller to record in that commit.
    """
    old_rows = np.asarray(old_rows, dtype=np.int64).reshape(-1)
    row_bytes = max(1, sum(spec.row_bytes for spec in specs.values()))
    step = max(1, _CHUNK_BYTES // row_bytes)
    target = FeatureStore(
        layout.features_dir, specs, committed_rows=0, writable=True, generation=generation
    )  # a leftover file of this generation (an earlier, interrupted compaction) is cut to 0
    segments: list[Segment] = []
    try:
        for start in range(0, old_rows.size, step):
            chunk = old_rows[start : start + step]
            blocks = {name: source.read(name, chunk) for name in specs}
            first = target.append(blocks)
            for name, block in blocks.items():
                segments += generation_segments(name, block, first, generation)
        target.flush()
    finally:
        target.close()
    _write_durably(layout.row_map_path(generation), old_rows.astype(_ROW_MAP_DTYPE).tobytes())
    fsync_dir(layout.features_dir)
    return segments


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_row_map(layout: IndexLayout, generation: int) -> np.ndarray | None:
    """``old_row[new_row]`` of compaction ``generation``, or ``None`` if its file is gone."""
    path = layout.row_map_path(generation)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return np.empty(0, dtype=_ROW_MAP_DTYPE)
    return np.memmap(path, dtype=_ROW_MAP_DTYPE, mode="r", shape=(size // _ROW_MAP_DTYPE.itemsize,))


def feature_files(layout: IndexLayout, names: Iterable[str]) -> list[tuple[Path, str, int]]:
    """``(path, stem, generation)`` of the array files of ``names`` and of the row maps, any generation."""
    wanted = set(names) | {"previous-rows"}
    try:
        entries = list(os.scandir(layout.features_dir))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        parsed = parse_generation_file(entry.name)
        if parsed is not None and parsed[0] in wanted and entry.is_file(follow_symlinks=False):
            found.append((Path(entry.path), parsed[0], parsed[1]))
    return sorted(found)


def remove_generation(layout: IndexLayout, names: Iterable[str], generation: int) -> None:
    """Delete the files of generation ``generation`` (an uncommitted, abandoned compaction)."""
    _unlink([p for p, _, gen in feature_files(layout, names) if gen == generation], layout)


def remove_stale_generations(layout: IndexLayout, names: Iterable[str], current: int) -> list[Path]:
    """Delete array files of ``names`` and row maps of every generation but ``current``.

    Call it only under the writer lock, with ``current`` read from the database: the files of
    any other generation are either superseded (a finished compaction) or were never committed
    (an interrupted one). Readers that still map an old file keep reading it through their open
    descriptor. Returns the deleted paths.
    """
    stale = [p for p, _, gen in feature_files(layout, names) if gen != current]
    for path in stale:
        logger.info("removing %s (feature-store generation other than the current %d)", path, current)
    _unlink(stale, layout)
    return stale


def _unlink(paths: list[Path], layout: IndexLayout) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        fsync_dir(layout.features_dir)


def files_bytes(paths: Iterable[Path]) -> int:
    """Total size of the files among ``paths`` that exist."""
    total = 0
    for path in paths:
        try:
            total += Path(path).stat().st_size
        except FileNotFoundError:
            continue
    return total
