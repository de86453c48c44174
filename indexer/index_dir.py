"""The on-disk layout of an index directory, the writer lock, and durable-write helpers.

::

    DIR/
      engine.db            SQLite database (+ engine.db-wal, engine.db-shm while open); created as
                           .engine.db.tmp-PID and renamed into place once complete
      vectors.faiss        FAISS index: header + faiss.serialize_index bytes (atomic replace)
      regions.npz          the region table (id, feature row, image id, box per live region) as of
                           the last save of the FAISS files (atomic replace; indexer/region_table.py)
      features/NAME.f16    feature-store arrays, float16, row-major, append-only
                           (NAME.gG.f16 after compaction G; meta.feature_generation names G)
      features/previous-rows.gG.i64  row map of compaction G: new row -> row of generation G-1
      .lock                flock()ed by the one writer; readers take no lock

See ``docs/index-layout.md``.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from engine.errors import IndexLockedError, InvalidInputError

__all__ = [
    "IndexLayout",
    "FileDigest",
    "WriterLock",
    "fsync_dir",
    "atomic_write",
    "remove_stale_temps",
    "check_array_name",
    "feature_file_name",
    "row_map_file_name",
    "parse_generation_file",
]

logger = logging.getLogger(__name__)

_ARRAY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_GENERATION_FILE = re.compile(r"^(?P<stem>[a-z][a-z0-9_-]{0,63})(?:\.g(?P<gen>[1-9][0-9]*))?\.(?P<ext>f16|i64)$")
_ROW_MAP_STEM = "previous-rows"  # '-' is not allowed in array names, so it never collides with one


def check_array_name(name: str) -> str:
    """Return ``name`` if it may name a feature-store array (a file name), else raise."""
    if not isinstance(name, str) or not _ARRAY_NAME.match(name):
        raise InvalidInputError(
            f"feature array name {name!r} is not allowed; use lowercase letters, digits and '_', "
            "starting with a letter (e.g. 'visual', 'maps')"
        )
    return name


def feature_file_name(name: str, generation: int = 0) -> str:
    """File name of feature array ``name`` in generation ``generation``.

    Generation 0 (an index never compacted) is ``NAME.f16``; compaction ``G`` writes ``NAME.gG.f16``.
    """
    check_array_name(name)
    _check_generation(generation)
    return f"{name}.f16" if generation == 0 else f"{name}.g{generation}.f16"


def row_map_file_name(generation: int) -> str:
    """File of compaction ``generation`` (>= 1): int64 ``old_row[new_row]`` into generation - 1."""
    _check_generation(generation)
    if generation == 0:
        raise InvalidInputError("generation 0 has no row map; it was never compacted")
    return f"{_ROW_MAP_STEM}.g{generation}.i64"


def parse_generation_file(file_name: str) -> tuple[str, int] | None:
    """``(array name or "previous-rows", generation)`` of a feature-store file name, else ``None``."""
    match = _GENERATION_FILE.match(file_name)
    if match is None:
        return None
    stem, ext = match["stem"], match["ext"]
    generation = int(match["gen"] or 0)
    is_row_map = stem == _ROW_MAP_STEM and ext == "i64" and generation > 0
    is_array = ext == "f16" and _ARRAY_NAME.match(stem) is not None
    return (stem, generation) if is_row_map or is_array else None


def _check_generation(generation: int) -> None:
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise InvalidInputError(
            f"feature-store generation {generation!r} is not allowed; use an integer >= 0"
        )


@dataclass(frozen=True)
class IndexLayout:
    """Paths inside an index directory ``root``."""

    root: Path

    @property
    def db_path(self) -> Path:
        return self.root / "engine.db"

    @property
    def vectors_path(self) -> Path:
        return self.root / "vectors.faiss"

    def vector_file(self, array: str) -> Path:
        """The FAISS file of feature array ``array``: ``vectors.faiss`` for ``visual``, else ``vectors-NAME.faiss``."""
        return self.vectors_path if array == "visual" else self.root / f"vectors-{check_array_name(array)}.faiss"

    @property
    def region_table_path(self) -> Path:
        return self.root / "regions.npz"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def feature_path(self, name: str, generation: int = 0) -> Path:
        return self.features_dir / feature_file_name(name, generation)

    def row_map_path(self, generation: int) -> Path:
        return self.features_dir / row_map_file_name(generation)

    def exists(self) -> bool:
        """Whether an index (its database) exists here."""
        return self.db_path.is_file()

    def is_writable(self) -> bool:
        """Whether this process may write the folder and ``engine.db`` (readers of a folder it cannot
        write open the database immutable and write nothing)."""
        return _may_write(self.root) and (not self.db_path.exists() or _may_write(self.db_path))

    def unwritable_paths(self) -> list[Path]:
        """The folder, database, feature and derived files that exist and this process may not write."""
        paths = [self.root, self.db_path, self.features_dir, self.region_table_path, self.lock_path]
        paths += sorted(self.root.glob("vectors*.faiss"))
        if self.features_dir.is_dir():
            paths += sorted(self.features_dir.iterdir())
        return [p for p in paths if p.exists() and not _may_write(p)]


def _may_write(path: Path) -> bool:
    """``os.access(path, W_OK)`` (the one place that asks; tests replace it to act as a user without
    write permission, since root may write anything)."""
    return os.access(path, os.W_OK)


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``DIR/.lock``: at most one writer per index.

    The kernel drops the lock when the process dies (even by ``kill -9``), so a crashed writer
    never leaves a stale lock behind. Locks are per open file, so two writers in one process
    exclude each other too.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise IndexLockedError(
                    f"index at {self.path.parent} is being written by another process (lock "
                    f"{self.path} is held); wait for that `engine index` run to finish, or stop it"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def fsync_dir(path: Path) -> None:
    """fsync a directory, making renames and file creations inside it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class FileDigest:
    """Size and crc32 of a file's bytes, as written (what ``engine check`` compares the file with)."""

    size: int
    crc32: int


def atomic_write(path: Path, chunks: Iterable[bytes | memoryview]) -> FileDigest:
    """Write ``chunks`` to ``path`` atomically: temp file in the same dir, fsync, rename, fsync dir.

    After a crash at any point ``path`` holds either its old content or the complete new one; a
    leftover ``.NAME.tmp-PID`` file is garbage that :func:`remove_stale_temps` deletes. Returns the
    size and crc32 of the bytes written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    size, crc = 0, 0
    try:
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                size += memoryview(chunk).nbytes
                crc = zlib.crc32(chunk, crc)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return FileDigest(size=size, crc32=crc)


def remove_stale_temps(path: Path) -> None:
    """Delete temp files that :func:`atomic_write` of ``path`` left behind in a crash."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        logger.info("removing %s left by an interrupted save", stale)
        stale.unlink(missing_ok=True)
