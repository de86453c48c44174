"""engine/diskspace.py: a full disk is recognised through wrapped and chained errors, and only then."""
from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

import engine.diskspace as diskspace
from engine.diskspace import disk_full_error, is_disk_full
from engine.errors import DiskFullError, EngineError, InvalidInputError


def _raised_from(cause: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise outer from exc
    except BaseException as final:  # noqa: BLE001
        return final


def _raised_during(first: BaseException, second: BaseException) -> BaseException:
    try:
        try:
            raise first
        except BaseException:
            raise second  # noqa: B904 - the implicit __context__ is the point
    except BaseException as final:  # noqa: BLE001
        return final


def test_full_disk_is_recognised_through_chains_and_wrappers() -> None:
    enospc = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(enospc) and is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(_raised_from(enospc, EngineError("could not write feature rows")))
    assert is_disk_full(_raised_during(enospc, OSError(errno.EIO, "I/O error")))
    sqlite_full = sqlite3.OperationalError("database or disk is full")
    assert is_disk_full(sqlite_full) and is_disk_full(OperationalError("INSERT", {}, sqlite_full))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(ValueError("x")) and not is_disk_full(None)


def test_disk_full_error_is_one_line_naming_what_and_the_fix(tmp_path: Path) -> None:
    err = disk_full_error(OSError(errno.ENOSPC, "No space"), doing="writing x.png", advice="free space and re-run the query", where=tmp_path)
    assert isinstance(err, DiskFullError) and str(err) == "disk full while writing x.png: free space and re-run the query"
    assert disk_full_error(err, doing="again", advice="-", where=tmp_path) is None  # not wrapped twice
    assert disk_full_error(OSError(errno.EACCES, "Permission denied"), doing="d", advice="a", where=tmp_path) is None


def test_an_unclear_error_on_a_disk_without_space_is_put_down_to_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite reports a -shm file it cannot create on a full disk as a "disk I/O error"."""
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 4096})())
    unclear = EngineError("engine.db is not a readable SQLite database (disk I/O error)")
    err = disk_full_error(unclear, doing="indexing c into i", advice="free space and re-run `engine index`", where=tmp_path / "not-yet")
    assert str(err) == "disk full (4,096 bytes free) while indexing c into i: free space and re-run `engine index`"
    assert disk_full_error(InvalidInputError("corpus folder c does not exist"), doing="d", advice="a", where=tmp_path) is None


def test_a_reader_that_cannot_open_the_index_on_a_full_disk_gets_one_line(tiny_engine, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """SQLite cannot create a reader's -shm file on a full disk: the query says so instead of a traceback."""
    from engine.api import Engine
    from engine.config import EngineConfig
    from indexer.store import IndexStore

    def no_shm(*args: object, **kwargs: object) -> None:
        raise OperationalError("PRAGMA journal_mode=WAL", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(IndexStore, "open", no_shm)
    with Engine(tiny_engine.index_dir, config=EngineConfig(device="cpu")) as engine:
        with pytest.raises(OperationalError):  # space left: the error is not put down to the disk
            engine.info()
        monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 4096})())
        with pytest.raises(DiskFullError, match=r"^disk full \(4,096 bytes free\) while opening the index at .*run the query again$") as info:
            engine.info()
    assert "\n" not in str(info.value)
