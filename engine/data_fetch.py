"""``engine data fetch``: the Debian data packages of the stamps world, downloaded and unpacked into a cache folder.

``apt-get download NAME`` then ``dpkg -x NAME_*.deb ROOT`` for each package (nothing is installed).
The cache is ``$ENGINE_DATA``, default ``~/.cache/engine/data``:

    <dest>/debs/*.deb          the downloaded packages
    <dest>/root/usr/share/...  their files (the stamps: root/usr/share/tuxpaint/stamps)
    <dest>/done/<package>      written last, once a package is unpacked

A package whose marker exists is skipped, so a second fetch does nothing and an interrupted one
redoes only the packages it had not finished.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import DataFetchError

__all__ = ["PACKAGES", "FetchResult", "data_dir", "stamps_dir", "has_stamps", "fetch_data", "ensure_stamps"]

logger = logging.getLogger(__name__)

#: the stamps, the opencv sample photos, and the two wallpaper packages that hold photographs
PACKAGES: tuple[str, ...] = ("tuxpaint-stamps-default", "opencv-doc", "mate-backgrounds", "plasma-workspace-wallpapers")
_STAMPS_PACKAGE = "tuxpaint-stamps-default"
_STAMPS_SUBDIR = Path("usr/share/tuxpaint/stamps")
_NO_APT = (
    "{tool} was not found: `engine data fetch` needs Debian's apt-get and dpkg; on another system unpack the "
    "tuxpaint-stamps-default package yourself and pass --stamps-dir DIR (its usr/share/tuxpaint/stamps folder)"
)


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_data` did: the cache folder, the packages fetched now and those already there."""

    dest: Path
    fetched: tuple[str, ...]
    skipped: tuple[str, ...]


def data_dir() -> Path:
    """The data cache: ``$ENGINE_DATA``, default ``~/.cache/engine/data``."""
    env = os.environ.get("ENGINE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "engine" / "data"


def stamps_dir(dest: Path) -> Path:
    """The stamps folder inside the cache ``dest``."""
    return Path(dest) / "root" / _STAMPS_SUBDIR


def has_stamps(dest: Path) -> bool:
    """Whether the stamps package was completely unpacked into ``dest``."""
    return (Path(dest) / "done" / _STAMPS_PACKAGE).is_file()


def _run(args: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout or "").strip().splitlines()
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise DataFetchError(f"{what} failed ({last}); run `apt-get update` once and retry, or pass --stamps-dir DIR")


def _downloaded(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def fetch_data(
    dest: Path | None = None, packages: Sequence[str] = PACKAGES, *, log: Callable[[str], None] = logger.info
) -> FetchResult:
    """Download (``apt-get download``) and unpack (``dpkg -x``) ``packages`` into ``dest`` (default :func:`data_dir`).

    Idempotent: packages already unpacked are skipped. Raises :class:`DataFetchError` without
    apt-get / dpkg or when a download or an unpack fails.
    """
    dest = Path(dest) if dest is not None else data_dir()
    todo = [p for p in packages if not (dest / "done" / p).is_file()]
    skipped = tuple(p for p in packages if p not in todo)
    if not todo:
        log(f"data already in {dest} ({', '.join(skipped)})")
        return FetchResult(dest=dest, fetched=(), skipped=skipped)
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise DataFetchError(_NO_APT.format(tool=tool))
    debs, root, done = dest / "debs", dest / "root", dest / "done"
    for d in (debs, root, done):
        d.mkdir(parents=True, exist_ok=True)
    for i, package in enumerate(todo, 1):
        deb = _downloaded(debs, package)
        if deb is None:
            log(f"[{i}/{len(todo)}] downloading {package} ...")
            _run(["apt-get", "download", package], debs, f"apt-get download {package}")
            deb = _downloaded(debs, package)
            if deb is None:
                raise DataFetchError(f"apt-get download {package} left no {package}_*.deb in {debs}; pass --stamps-dir DIR instead")
        log(f"[{i}/{len(todo)}] unpacking {deb.name} into {root} ...")
        _run(["dpkg", "-x", str(deb), str(root)], debs, f"dpkg -x {deb.name}")
        (done / package).write_text(deb.name + "\n", encoding="utf-8")
    log(f"data ready in {dest}")
    return FetchResult(dest=dest, fetched=tuple(todo), skipped=skipped)


def ensure_stamps(dest: Path | None = None, *, log: Callable[[str], None] = logger.info) -> Path:
    """The stamps folder of the cache, fetching the data packages first when the stamps are not there."""
    dest = Path(dest) if dest is not None else data_dir()
    if not has_stamps(dest):
        log(f"the tuxpaint stamps are not in {dest}: fetching the data packages (once; `engine data fetch`) ...")
        fetch_data(dest, log=log)
    return stamps_dir(dest)
