"""Scanning a corpus folder: which image files are new, changed, unchanged or deleted since the last run."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import InvalidInputError
from indexer.images import IMAGE_EXTENSIONS

__all__ = ["FileEntry", "ScanPlan", "IMAGE_EXTENSIONS", "list_image_files", "plan_scan", "content_hash"]

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """An image file found by the scan. ``path`` is absolute and resolved."""

    path: Path
    size_bytes: int
    mtime_ns: int


@dataclass
class ScanPlan:
    """What a run has to do. ``todo`` are new and changed files, in path order."""

    todo: list[FileEntry] = field(default_factory=list)
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)


def list_image_files(root: Path, *, skip: tuple[Path, ...] = ()) -> list[FileEntry]:
    """All image files under ``root`` (recursive, extensions in :data:`IMAGE_EXTENSIONS`, any case), sorted by path.

    Hidden files and folders (names starting with ``.``) and the folders in ``skip`` are not entered.
    """
    root = root.resolve()
    if not root.exists():
        raise InvalidInputError(f"corpus folder {root} does not exist; pass a folder of images")
    if not root.is_dir():
        raise InvalidInputError(f"corpus {root} is not a folder; pass a folder of images")
    skipped = {p.resolve() for p in skip}
    entries: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skipped)
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = here / name
            try:
                st = path.stat()
            except OSError as exc:  # vanished or unreadable between listing and stat
                log.warning("cannot stat %s: %s", path, exc)
                continue
            entries.append(FileEntry(path=path, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns))
    entries.sort(key=lambda e: str(e.path))
    return entries


def plan_scan(files: list[FileEntry], known: Mapping[str, tuple[int, int, str, str]]) -> ScanPlan:
    """Compare the files on disk with what the index knows (path -> size, mtime_ns, hash, status).

    A file whose size and mtime are unchanged is unchanged. One whose size or mtime moved is hashed:
    the same content hash still counts as unchanged (a ``touch`` does not re-index). Known paths that
    are no longer on disk are deleted.
    """
    plan = ScanPlan()
    on_disk = set()
    for entry in files:
        key = str(entry.path)
        on_disk.add(key)
        prior = known.get(key)
        if prior is None:
            plan.todo.append(entry)
            plan.new += 1
            continue
        size, mtime, digest, _status = prior
        if size == entry.size_bytes and mtime == entry.mtime_ns:
            plan.unchanged += 1
        elif size == entry.size_bytes and content_hash(entry.path) == digest:
            plan.unchanged += 1
        else:
            plan.todo.append(entry)
            plan.changed += 1
    plan.deleted = sorted(p for p in known if p not in on_disk)
    return plan


def content_hash(path: Path) -> str:
    """SHA-256 of the file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
