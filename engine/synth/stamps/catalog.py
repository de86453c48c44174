"""The stamp catalog: tuxpaint PNG stamps, their English descriptions, flags and the split rule.

A stamp is ``<root>/<category path>/<name>.png`` with ``<name>.txt`` beside it whose first line is the
English description (the other lines are translations), and sometimes ``<name>.dat`` with flags
(``nomirror``, ``noflip``). SVG stamps and sounds are ignored; PNGs without a description (tuxpaint's
pre-mirrored ``*_mirror.png`` variants) are left out.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from engine.errors import DataNotFoundError, InvalidInputError
from engine.synth.stamps.language import noun_phrase, short_name

__all__ = ["Stamp", "stamp_split", "load_catalog", "SPLIT_RULE"]

logger = logging.getLogger(__name__)

SPLIT_RULE = "h = int(sha256(stamp_key).hexdigest(), 16) % 10: test if h in {0, 1}, val if h == 2, else train"


@dataclass(frozen=True)
class Stamp:
    """One stamp. ``key`` is its path below the stamps root without extension, ``category`` its folder path."""

    key: str
    category: str
    path: Path
    description: str  # the English description as a noun phrase: "a US 25 cent piece ($.25) called a quarter"
    name: str  # a short name for relations, refs and captions: "US 25 cent piece"
    mirror: bool  # False when the .dat says nomirror
    split: str


def stamp_split(key: str) -> str:
    """The split of a stamp, from its key alone (:data:`SPLIT_RULE`)."""
    h = int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 10
    if h in (0, 1):
        return "test"
    if h == 2:
        return "val"
    return "train"


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().strip()


def _nested_stamps_folder(root: Path) -> Path | None:
    """A ``…/tuxpaint/stamps`` folder strictly below ``root`` (the user pointed above the stamps folder), or None."""
    for candidate in root.rglob("stamps"):
        if candidate.is_dir() and candidate.parent.name == "tuxpaint" and candidate != root:
            return candidate
    return None


def load_catalog(root: Path) -> tuple[Stamp, ...]:
    """Every PNG stamp with a description under ``root``, sorted by key.

    Raises :class:`DataNotFoundError` when ``root`` is not a folder or holds no PNG + TXT stamp.
    """
    root = Path(root)
    hint = "pass --stamps-dir DIR (the usr/share/tuxpaint/stamps folder of tuxpaint-stamps-default) or run `engine data fetch`"
    if not root.is_dir():
        raise DataNotFoundError(f"stamps folder {root} does not exist; {hint}")
    nested = _nested_stamps_folder(root)
    if nested is not None:  # keys (and so the split) are paths below the stamps folder itself
        raise InvalidInputError(f"--stamps-dir {root} holds the tuxpaint stamps folder {nested} deeper down; pass --stamps-dir {nested}")
    stamps: list[Stamp] = []
    for png in sorted(root.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        first = _first_line(txt)
        if not first:
            continue
        dat = png.with_suffix(".dat")
        flags = dat.read_text(encoding="utf-8", errors="replace").split() if dat.is_file() else []
        rel = png.relative_to(root).with_suffix("")
        key = rel.as_posix()
        stamps.append(
            Stamp(
                key=key,
                category=rel.parent.as_posix() if rel.parent != Path(".") else "",
                path=png,
                description=noun_phrase(first),
                name=short_name(first, png.stem),
                mirror="nomirror" not in flags,
                split=stamp_split(key),
            )
        )
    if not stamps:
        raise DataNotFoundError(f"stamps folder {root} holds no PNG stamp with a .txt description; {hint}")
    logger.info("stamp catalog: %d stamps under %s", len(stamps), root)
    return tuple(stamps)
