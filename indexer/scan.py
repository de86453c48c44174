"""Scanning a corpus folder: which image files are new, changed, unchanged or deleted since the last run."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import InvalidInputError
from indexer.images import IMAGE_EXTENSIONS

__all__ = ["FileEntry", "ScanIssue", "CorpusScan", "ScanPlan", "IMAGE_EXTENSIONS", "scan_corpus", "list_image_files", "plan_scan", "content_hash", "printable_path", "is_utf8"]

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """An image file found by the scan. ``path`` is absolute and resolved."""

    path: Path
    size_bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class ScanIssue:
    """Something under the corpus that the scan found but cannot index, and why.

    A file issue (a FIFO, a broken or looping link, a name that is not UTF-8, ...) is recorded as an
    error of the run in its place. A folder issue (a folder that cannot be listed) is recorded too,
    and the images already indexed under it are kept: they were not seen, not deleted. ``path`` is
    absolute and printable: bytes of a name that are not UTF-8 are shown as ``\\xNN``.
    """

    path: str
    reason: str
    folder: bool = False


@dataclass
class CorpusScan:
    """What :func:`scan_corpus` found: the image files it can index, in path order, and its issues."""

    files: list[FileEntry] = field(default_factory=list)
    issues: list[ScanIssue] = field(default_factory=list)


@dataclass
class ScanPlan:
    """What a run has to do. ``todo`` are new and changed files, in path order; ``issues`` are
    recorded as errors; ``deleted`` are known paths gone from disk (never those under a folder that
    could not be listed)."""

    todo: list[FileEntry] = field(default_factory=list)
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    issues: list[ScanIssue] = field(default_factory=list)


def list_image_files(root: Path, *, skip: tuple[Path, ...] = ()) -> list[FileEntry]:
    """The image files that :func:`scan_corpus` finds under ``root`` (its issues are logged)."""
    scan = scan_corpus(root, skip=skip)
    for issue in scan.issues:
        log.warning("skipping %s: %s", issue.path, issue.reason)
    return scan.files


def scan_corpus(root: Path, *, skip: tuple[Path, ...] = ()) -> CorpusScan:
    """All image files under ``root`` (recursive, extensions in :data:`IMAGE_EXTENSIONS`, any case), sorted by path.

    Hidden files and folders (names starting with ``.``) and the folders in ``skip`` are not entered;
    links to folders are not followed. Only regular files (or links to them) are image files: a
    FIFO, socket or device named ``*.jpg`` would block or never end when read. Whatever cannot be
    taken (a folder that cannot be listed, a broken link, a name that is not UTF-8, ...) becomes a
    :class:`ScanIssue`; nothing is skipped without a word.
    """
    root = root.resolve()
    if not root.exists():
        raise InvalidInputError(f"corpus folder {printable_path(root)} does not exist; pass a folder of images")
    if not root.is_dir():
        raise InvalidInputError(f"corpus {printable_path(root)} is not a folder; pass a folder of images")
    if not is_utf8(str(root)):
        raise InvalidInputError(f"corpus folder {printable_path(root)} has a name that is not UTF-8, which the index stores paths in; rename the folder (e.g. convmv -f latin1 -t utf-8)")
    skipped = {p.resolve() for p in skip}
    scan = CorpusScan()
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                listed = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            scan.issues.append(ScanIssue(printable_path(folder), f"cannot list folder: {_strerror(exc)}; its images already indexed are kept; make it readable and re-run engine index", folder=True))
            continue
        subfolders = []
        for entry in listed:
            if entry.name.startswith("."):
                continue
            if _is_folder(entry):
                path = Path(entry.path)
                if path.resolve() not in skipped:
                    subfolders.append(path)
            elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                _take_file(Path(entry.path), scan)
        pending.extend(reversed(subfolders))
    scan.files.sort(key=lambda e: str(e.path))
    scan.issues.sort(key=lambda i: i.path)
    return scan


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _take_file(path: Path, scan: CorpusScan) -> None:
    """Add ``path`` to ``scan``'s files, or the reason it cannot be indexed to its issues."""
    shown = printable_path(path)
    if not is_utf8(str(path)):
        scan.issues.append(ScanIssue(shown, "file name is not UTF-8, which the index stores paths in; rename the file (e.g. convmv -f latin1 -t utf-8) and re-run engine index"))
        return
    try:
        st = path.stat()
    except OSError as exc:
        reason = _stat_failure(path, exc)
        if reason is not None:
            scan.issues.append(ScanIssue(shown, reason))
        return
    if not stat.S_ISREG(st.st_mode):
        scan.issues.append(ScanIssue(shown, f"not a regular file (a {_file_kind(st.st_mode)}); only image files are indexed: remove it or rename it without an image suffix"))
        return
    scan.files.append(FileEntry(path=path, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns))


def _stat_failure(path: Path, exc: OSError) -> str | None:
    """Why ``path`` cannot be read; ``None`` when it vanished between listing and stat."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop; fix or remove the link"
    try:
        is_link = path.is_symlink()
    except OSError:
        is_link = False
    if isinstance(exc, FileNotFoundError):
        if not is_link:
            log.debug("%s vanished during the scan", printable_path(path))
            return None
        try:
            target = printable_path(os.readlink(path))
        except OSError:  # replaced or removed since
            return None
        return f"broken symbolic link: its target {target} does not exist; fix or remove the link"
    return f"cannot read file: {_strerror(exc)}; check its permissions"


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (a name decoded with surrogates for undecodable bytes does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path: Path | str) -> str:
    """``path`` as UTF-8 text: bytes of a name that are not UTF-8 (the surrogates Python decodes them
    to) become ``\\xNN``, so the path can be printed, logged, JSON-encoded and stored."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def plan_scan(files: list[FileEntry], known: Mapping[str, tuple[int, int, str, str]], issues: Sequence[ScanIssue] = ()) -> ScanPlan:
    """Compare the files on disk with what the index knows (path -> size, mtime_ns, hash, status).

    A file whose size and mtime are unchanged is unchanged. One whose size or mtime moved is hashed:
    the same content hash still counts as unchanged (a ``touch`` does not re-index). Known paths that
    are no longer on disk are deleted, except those under a folder that could not be listed (an
    issue with ``folder=True``) and the paths of ``issues`` (they are recorded again as errors).
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
    for issue in issues:
        if issue.path in on_disk:  # an escaped non-UTF-8 name that equals a real file's name: keep the file
            log.warning("not recording %s (%s): a file of that name is indexed", issue.path, issue.reason)
            continue
        plan.issues.append(issue)
    present = on_disk | {i.path for i in plan.issues}
    unlisted = tuple(i.path.rstrip(os.sep) + os.sep for i in plan.issues if i.folder)
    plan.deleted = sorted(p for p in known if p not in present and not p.startswith(unlisted))
    return plan


def content_hash(path: Path) -> str:
    """SHA-256 of the file's bytes, hex. Raises :class:`OSError` for anything but a regular file
    (opened without blocking: a FIFO put in an image's place after the scan must not hang the run)."""
    h = hashlib.sha256()
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
