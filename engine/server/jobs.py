"""Indexing over HTTP: one job at a time, in a background thread, through its own writer ``Engine``.

The job's ``Engine`` takes the index's writer lock and commits image by image; the server's reader
``Engine`` (:mod:`engine.server.service`) keeps answering queries meanwhile over what is committed (readers
take no lock and catch up with each commit: see ``indexer/store.py``). Folders are only ever taken at or
under the server's corpus root (:func:`resolve_folder`).
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.api import Engine
from engine.config import EngineConfig, IndexConfig
from engine.errors import EngineError, InvalidInputError
from engine.server.errors import ConflictError, ForbiddenError, NotFoundError

__all__ = ["IndexStatus", "IndexJobs", "resolve_folder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexStatus:
    """Where the latest indexing job stands. ``state``: ``idle`` (none yet), ``running``, ``done`` or
    ``failed`` (``error`` says why); ``done`` of ``total`` images to process (``total`` is known once the
    folder is scanned); ``summary``: the ``engine index --json`` counts of a finished job."""

    state: str = "idle"
    folder: str | None = None
    done: int = 0
    total: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_folder(folder: str, corpus_root: Path | None) -> Path:
    """``folder`` (relative to ``corpus_root``, or absolute) as a resolved folder at or under the root.

    :class:`ForbiddenError` without a root or for a folder outside it (links are followed first, so a
    link out of the root is outside); :class:`NotFoundError` when it is not an existing folder.
    """
    if corpus_root is None:
        raise ForbiddenError("indexing over HTTP is off; start the server with --corpus-root DIR to allow indexing folders under DIR")
    root = corpus_root.resolve()
    try:
        candidate = (root / folder).resolve()  # an absolute ``folder`` replaces the root here
    except (OSError, ValueError, RuntimeError):
        raise InvalidInputError(f"folder {folder!r} is not a valid path; give a folder under the corpus root") from None
    if not candidate.is_relative_to(root):
        raise ForbiddenError(f"folder {folder!r} is outside the server's corpus root; give a folder under it (relative paths are taken from the root)")
    if not candidate.is_dir():
        raise NotFoundError(f"folder {folder!r} does not exist under the corpus root (or is not a folder)")
    return candidate


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class IndexJobs:
    """Runs indexing jobs into ``index_dir`` one at a time, each in a daemon thread with a new ``Engine``
    of ``config`` (closed when the job ends), and keeps the status of the latest."""

    def __init__(self, *, index_dir: Path, config: EngineConfig, corpus_root: Path | None) -> None:
        self.index_dir = index_dir
        self.config = config
        self.corpus_root = corpus_root
        self._lock = threading.Lock()
        self._status = IndexStatus()
        self._thread: threading.Thread | None = None

    def status(self) -> IndexStatus:
        with self._lock:
            return self._status

    def start(self, folder: str, *, proposals: str = "auto", batch_size: int = 8) -> IndexStatus:
        """Start indexing ``folder`` (see :func:`resolve_folder`); :class:`ConflictError` while a job runs."""
        path = resolve_folder(folder, self.corpus_root)
        config = IndexConfig(proposals=proposals, batch_size=batch_size)
        with self._lock:
            if self._status.state == "running":
                raise ConflictError(f"an indexing job of {self._status.folder!r} is running; wait for it (GET /api/index/status)")
            self._status = IndexStatus(state="running", folder=folder, started_at=_now())
            self._thread = threading.Thread(target=self._run, args=(path, config), name="engine-index", daemon=True)
            self._thread.start()
            return self._status

    def wait(self, timeout: float | None = None) -> IndexStatus:
        """The status once the running job (if any) has ended, or after ``timeout`` seconds."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)

    def _run(self, folder: Path, config: IndexConfig) -> None:
        engine = Engine(self.index_dir, config=self.config)
        try:
            summary = engine.index(folder, config=config, on_progress=lambda done, total: self._update(done=done, total=total))
            self._update(state="done", summary=summary.to_dict(), finished_at=_now())
        except EngineError as exc:
            self._update(state="failed", error=str(exc), finished_at=_now())
        except Exception as exc:  # the thread must record every end; the log has the traceback
            log.exception("indexing %s failed", folder)
            self._update(state="failed", error=f"internal error ({type(exc).__name__}: {exc}); the server log has the details", finished_at=_now())
        finally:
            engine.close()
