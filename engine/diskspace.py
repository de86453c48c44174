"""Telling a full disk apart from other write failures, so that each command reports it in one line
(:class:`~engine.errors.DiskFullError`) naming what it was writing and what to re-run."""
from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

from engine.errors import DiskFullError, ImageReadError, IndexLockedError, IndexNotFoundError, InvalidInputError

__all__ = ["LOW_SPACE_BYTES", "is_disk_full", "disk_full_error"]

log = logging.getLogger(__name__)

LOW_SPACE_BYTES = 1 << 20
"""Free space below which a failed write is put down to a full disk even when the error does not say
so (SQLite reports a ``-shm`` file it cannot create as a "disk I/O error")."""

_SQLITE_FULL = 13
_NOT_WRITES = (InvalidInputError, ImageReadError, IndexLockedError, IndexNotFoundError)
"""Errors that never come from a failed write (a bad option, a locked index, ...): reported as they are."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is a full disk:
    ``ENOSPC``/``EDQUOT``, or SQLite's ``SQLITE_FULL`` ("database or disk is full", also when
    SQLAlchemy wraps it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException, *, doing: str, advice: str, where: Path) -> DiskFullError | None:
    """The one-line error to raise (``from exc``) when ``exc``, raised while ``doing``, comes from a
    full disk (the error says so, or the disk holding ``where`` has less than :data:`LOW_SPACE_BYTES`
    free); ``None`` otherwise, and for an ``exc`` that already is a :class:`DiskFullError`."""
    if isinstance(exc, DiskFullError):
        return None
    if is_disk_full(exc):
        return DiskFullError(f"disk full while {doing}: {advice}")
    if isinstance(exc, _NOT_WRITES):
        return None
    free = _free_bytes(where)
    if free is not None and free < LOW_SPACE_BYTES:
        log.info("put down to the full disk (%d bytes free): %s", free, _first_line(exc))
        return DiskFullError(f"disk full ({free:,} bytes free) while {doing}: {advice}")
    return None


def _free_bytes(where: Path) -> int | None:
    """Free bytes on the disk holding ``where`` (its nearest existing folder); ``None`` when unknown."""
    path = Path(where).absolute()
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
