"""The feature store: named, append-only, memory-mapped float16 arrays with one row per region.

Each array is a headerless file ``features/NAME.f16`` (``NAME.gG.f16`` after compaction ``G``,
:mod:`indexer.compaction`) of fixed-shape float16 rows in row-major order; row ``r`` of every array
belongs to the region whose ``regions.row`` is ``r``. The shapes
and dtype live in the ``meta`` table of ``engine.db`` (key ``arrays``), and so does the number of
*committed* rows (key ``next_row``): the files may be longer than that after a crash, and those
tail bytes are garbage that the next :meth:`FeatureArray.append` truncates and overwrites.

Write protocol (driven by :class:`indexer.store.IndexStore`): ``append`` -> ``flush`` (fsync) ->
commit the rows to SQLite (with the new ``next_row``) -> :meth:`FeatureStore.mark_committed`. A
reader only ever asks for rows that committed region rows point at, which are durable on disk
before the commit, so readers never see a partial row. A reader maps each file through a
descriptor it opened once, so a file that compaction deletes stays readable to it.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import EngineError, IndexCorruptError, InvalidInputError
from indexer.index_dir import feature_file_name, fsync_dir

__all__ = ["ArraySpec", "FeatureArray", "FeatureStore", "nonfinite_rows"]

logger = logging.getLogger(__name__)

_DTYPES = {"float16": np.float16}
_F16_EXPONENT = 0x7C00  # float16 bits: exponent all ones is inf or NaN
_F16_MAGNITUDE = 0x7FFF
_CHECK_CHUNK = 1 << 16  # float16 values checked per step (128 KiB)


def nonfinite_rows(rows: np.ndarray) -> np.ndarray:
    """Positions (along the first axis) of the float16 rows ``rows`` that hold a NaN or inf value.

    Works on the bits (no float conversion), in cache-sized chunks: ~1 ms for 1,000 rows of 112x7x7. The engine never
    commits non-finite features, so such a row was damaged on disk.
    """
    bits = np.ascontiguousarray(rows).view(np.uint16).reshape(rows.shape[0], -1) if rows.shape[0] else None
    if bits is None or bits.shape[1] == 0:
        return np.zeros(0, np.int64)
    flat = bits.reshape(-1)
    buffer = np.empty(min(flat.size, _CHECK_CHUNK), np.uint16)  # chunks that stay in cache, no big temporary
    for start in range(0, flat.size, _CHECK_CHUNK):
        part = flat[start : start + _CHECK_CHUNK]
        magnitude = np.bitwise_and(part, _F16_MAGNITUDE, out=buffer[: part.size])
        if int(magnitude.max()) >= _F16_EXPONENT:
            return np.flatnonzero(((bits & _F16_EXPONENT) == _F16_EXPONENT).any(axis=1))
    return np.zeros(0, np.int64)  # the common case: one pass over the bits


@dataclass(frozen=True)
class ArraySpec:
    """Shape of one row (e.g. ``(112, 7, 7)`` or ``(112,)``) and its dtype (only ``float16``)."""

    shape: tuple[int, ...]
    dtype: str = "float16"

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if not shape or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
            raise InvalidInputError(
                f"feature array row shape {self.shape!r} is not allowed; give positive integer "
                "dimensions, e.g. (112,) or (112, 7, 7)"
            )
        if self.dtype not in _DTYPES:
            raise InvalidInputError(
                f"feature array dtype {self.dtype!r} is not allowed; the feature store holds "
                f"{sorted(_DTYPES)}"
            )
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.dtype])

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, value: Mapping) -> ArraySpec:
        return cls(shape=tuple(value["shape"]), dtype=value.get("dtype", "float16"))


class FeatureArray:
    """One append-only array file. Not thread-safe; one writer process at a time (the index lock).

    ``committed_rows`` is the number of rows the database refers to. A writable array truncates
    anything past it (an uncommitted tail left by a crash) before writing.
    """

    def __init__(self, path: Path, spec: ArraySpec, *, committed_rows: int, writable: bool) -> None:
        self.path = Path(path)
        self.spec = spec
        self.writable = writable
        self._committed = int(committed_rows)
        self._end = self._committed
        self._fd: int | None = None
        self._read_fd: int | None = None  # a reader's handle: the file stays readable if unlinked
        self._map: np.memmap | np.ndarray | None = None
        self._map_rows = 0
        if not writable:
            self._open_for_reading()
            return
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if created:
            fsync_dir(self.path.parent)
        size = os.fstat(self._fd).st_size
        need = self._committed * spec.row_bytes
        if size < need:
            self.close()
            raise self._damaged(size // spec.row_bytes, self._committed)
        if size > need:
            logger.info(
                "truncating %s from %d to %d rows (uncommitted tail of an interrupted write)",
                self.path, size // spec.row_bytes, self._committed,
            )
            self._truncate(need)

    # -- writing ------------------------------------------------------------------------------
    @property
    def committed_rows(self) -> int:
        return self._committed

    @property
    def end_rows(self) -> int:
        """Rows written so far: committed rows plus appended, not yet committed ones."""
        return self._end

    def append(self, array: np.ndarray) -> int:
        """Write ``array`` (``[n, *shape]``, cast to float16) after the last row; return its first row.

        Rows are not durable until :meth:`flush` and not part of the index until the database
        commit that refers to them (then :meth:`mark_committed`).
        """
        fd = self._writable_fd()
        array = np.asarray(array)
        if array.ndim != 1 + len(self.spec.shape) or tuple(array.shape[1:]) != self.spec.shape:
            raise InvalidInputError(
                f"feature array {self.path.stem!r} got rows of shape {tuple(array.shape[1:])} "
                f"(array shape {tuple(array.shape)}); this index stores rows of shape "
                f"{self.spec.shape}; pass an array of shape [n, {', '.join(map(str, self.spec.shape))}]"
            )
        first = self._end
        offset = first * self.spec.row_bytes
        if os.fstat(fd).st_size != offset:
            self._truncate(offset)  # uncommitted garbage (or a rolled-back append) past the end
        with np.errstate(over="ignore"):  # callers check finiteness after the float16 cast
            flat = np.ascontiguousarray(array, dtype=self.spec.np_dtype).reshape(-1)
        data = memoryview(flat.view(np.uint8))
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], offset + written)
        except OSError as exc:
            raise EngineError(
                f"could not write feature rows to {self.path}: {exc}; free disk space and re-run "
                "`engine index`, which resumes where it stopped"
            ) from exc
        self._end = first + array.shape[0]
        return first

    def flush(self) -> None:
        """Make every appended row durable (``fsync``)."""
        os.fsync(self._writable_fd())

    def mark_committed(self) -> None:
        """The database now refers to every appended row."""
        self._committed = self._end

    def rollback(self, committed_rows: int | None = None) -> None:
        """Forget rows appended since the last commit.

        ``committed_rows`` (default: the last known commit point) is what the database says is
        committed. The file is not cut here: the next :meth:`append` truncates whatever lies past
        the commit point before it writes, and readers never look there.
        """
        if committed_rows is not None:
            self._committed = int(committed_rows)
        self._end = self._committed

    def _truncate(self, size: int) -> None:
        fd = self._writable_fd()
        os.ftruncate(fd, size)
        os.fsync(fd)

    def _writable_fd(self) -> int:
        if self._fd is None:
            raise EngineError(
                f"feature array {self.path} is open read-only or closed; open the index with "
                "writable=True to add rows"
            )
        return self._fd

    # -- reading ------------------------------------------------------------------------------
    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any integer array) as a new float16 array ``[*rows.shape, *shape]``.

        Reads through a memory map, remapped when the file has grown since it was mapped (a
        writer appended).
        """
        rows = np.asarray(rows)
        if rows.size == 0:
            return np.empty((*rows.shape, *self.spec.shape), dtype=self.spec.np_dtype)
        if not np.issubdtype(rows.dtype, np.integer):
            raise InvalidInputError(
                f"feature rows must be integers, got dtype {rows.dtype}; pass regions' `row` values"
            )
        low, high = int(rows.min()), int(rows.max())
        if low < 0:
            raise InvalidInputError(
                f"feature row {low} is negative; rows are >= 0 (regions' `row` values)"
            )
        if high >= self._map_rows:
            self._remap()
            if high >= self._map_rows:
                raise self._damaged(self._map_rows, high + 1)
        assert self._map is not None
        out = np.asarray(self._map[rows])
        bad = nonfinite_rows(out.reshape(-1, *self.spec.shape))
        if bad.size:
            damaged = np.unique(rows.reshape(-1)[bad])
            raise IndexCorruptError(
                f"feature file {self.path} holds NaN/inf values in {damaged.size} of the rows read "
                f"(rows {', '.join(map(str, damaged[:5].tolist()))}{', ...' if damaged.size > 5 else ''}); the "
                f"index is damaged on disk; run `engine check --index {self.path.parent.parent} --repair`"
            )
        return out

    def _remap(self) -> None:
        """Map the file through the open descriptor (not the path: compaction may unlink it)."""
        self._drop_map()
        fd = self._fd if self._fd is not None else self._open_for_reading()
        size = os.fstat(fd).st_size if fd is not None else 0
        rows = size // self.spec.row_bytes
        if rows == 0:
            self._map = np.empty((0, *self.spec.shape), dtype=self.spec.np_dtype)
        else:
            with open(fd, "rb", closefd=False) as handle:  # mmap keeps its own duplicate
                self._map = np.memmap(
                    handle, dtype=self.spec.np_dtype, mode="r", shape=(rows, *self.spec.shape)
                )
        self._map_rows = rows

    def _open_for_reading(self) -> int | None:
        """A reader's descriptor of the file, opened once; ``None`` while the file does not exist."""
        if self._read_fd is None:
            try:
                self._read_fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
        return self._read_fd

    def _drop_map(self) -> None:
        self._map = None
        self._map_rows = 0

    def _damaged(self, have: int, need: int) -> EngineError:
        return IndexCorruptError(
            f"feature file {self.path} holds {have} rows but the index refers to {need}; the index "
            f"is damaged on disk (a file truncated, copied or edited by hand?); run "
            f"`engine check --index {self.path.parent.parent} --repair`"
        )

    def close(self) -> None:
        self._drop_map()
        for attr in ("_fd", "_read_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                os.close(fd)


class FeatureStore:
    """A named set of :class:`FeatureArray` s sharing one row numbering and one commit point.

    ``generation`` picks the files (:func:`indexer.index_dir.feature_file_name`): 0 for an index
    never compacted, ``G`` after compaction ``G`` (``meta.feature_generation``).
    """

    def __init__(
        self,
        directory: Path,
        specs: Mapping[str, ArraySpec],
        *,
        committed_rows: int,
        writable: bool,
        generation: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.specs = dict(specs)
        self.generation = int(generation)
        if writable and not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.directory.parent)
        self._arrays: dict[str, FeatureArray] = {}
        try:
            for name, spec in self.specs.items():
                self._arrays[name] = FeatureArray(
                    self.directory / feature_file_name(name, self.generation),
                    spec,
                    committed_rows=committed_rows,
                    writable=writable,
                )
        except BaseException:
            self.close()
            raise
        self._committed = int(committed_rows)

    @property
    def names(self) -> list[str]:
        return list(self._arrays)

    @property
    def committed_rows(self) -> int:
        return self._committed

    def array(self, name: str) -> FeatureArray:
        try:
            return self._arrays[name]
        except KeyError:
            raise InvalidInputError(
                f"feature array {name!r} does not exist in this index; it holds {sorted(self._arrays)}"
            ) from None

    def append(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Append the same number of rows to every array; return the first row.

        ``arrays`` must name exactly the store's arrays. On any error nothing stays appended.
        """
        if set(arrays) != set(self._arrays):
            raise InvalidInputError(
                f"feature arrays {sorted(arrays)} do not match this index's arrays "
                f"{sorted(self._arrays)}; pass exactly those names"
            )
        counts = {name: int(np.shape(a)[0]) if np.ndim(a) else -1 for name, a in arrays.items()}
        if len(set(counts.values())) != 1:
            raise InvalidInputError(
                f"feature arrays have different row counts {counts}; every array needs one row per "
                "region"
            )
        first = self._committed if not self._arrays else next(iter(self._arrays.values())).end_rows
        try:
            for name, feature_array in self._arrays.items():
                at = feature_array.append(arrays[name])
                if at != first:  # pragma: no cover - arrays always move together
                    raise EngineError(
                        f"feature arrays are out of step ({name} at row {at}, expected {first}); "
                        "report this as an engine bug"
                    )
        except BaseException:
            self.rollback()
            raise
        return first

    def flush(self) -> None:
        """fsync every array."""
        for feature_array in self._arrays.values():
            feature_array.flush()

    def mark_committed(self) -> None:
        for feature_array in self._arrays.values():
            feature_array.mark_committed()
        if self._arrays:
            self._committed = next(iter(self._arrays.values())).committed_rows

    def rollback(self, committed_rows: int | None = None) -> None:
        """Forget appended, uncommitted rows (see :meth:`FeatureArray.rollback`)."""
        for feature_array in self._arrays.values():
            feature_array.rollback(committed_rows)
        if committed_rows is not None:
            self._committed = int(committed_rows)

    def read(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self.array(name).read(rows)

    def close(self) -> None:
        for feature_array in self._arrays.values():
            feature_array.close()
