"""Writing query results to files (``--out``, ``--save-vis``, ``--html``, ``--explain``): a failed
write, a full disk above all, is one :class:`~engine.errors.EngineError` naming the file, and no
partial file is left behind."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.diskspace import disk_full_error
from engine.errors import InvalidInputError

__all__ = ["writing"]


@contextmanager
def writing(path: Path, *, partial: Path | None = None) -> Iterator[Path]:
    """Guard the writing of ``path``: an :class:`OSError` inside becomes :class:`DiskFullError` (a
    full disk) or :class:`InvalidInputError` (any other failure: a folder in the way, no permission,
    ...), the cause chained, after ``partial`` (the file being written, if any) is removed."""
    try:
        yield path
    except OSError as exc:
        _remove(partial)
        full = disk_full_error(exc, doing=f"writing {path}", advice="free space (or write to another disk) and re-run the query", where=path.parent)
        if full is not None:
            raise full from exc
        raise InvalidInputError(f"cannot write {path}: {exc.strerror or exc}; pass a path in a writable folder") from exc


def _remove(partial: Path | None) -> None:
    if partial is None:
        return
    try:
        if partial.is_file():
            partial.unlink()
    except OSError:  # nothing more can be done; the first error is the one to report
        pass
