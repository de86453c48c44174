"""Helpers shared by the public-format readers: JSON loading, field access, image paths, box conversion."""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from engine.boxes import Box
from engine.errors import DatasetFormatError

logger = logging.getLogger(__name__)

_COCO_NAME_RE = re.compile(r"^COCO_([a-z]+\d{4})_\d+\.\w+$")


def load_json(path: Path, *, what: str) -> Any:
    """Parse the JSON file ``path``; a missing or unparsable file raises :class:`DatasetFormatError`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{what} file {path} does not exist; pass the path of the downloaded {path.name}")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path} is not valid JSON ({e}); re-download or re-extract the {what} file") from None


def field(record: Any, key: str, types: type | tuple[type, ...], *, path: Path, where: str) -> Any:
    """``record[key]`` checked to be one of ``types``; anything else raises :class:`DatasetFormatError`."""
    if not isinstance(record, Mapping):
        raise DatasetFormatError(f"{path}: {where} must be a JSON object, got {type(record).__name__}; is this the right file?")
    if key not in record:
        raise DatasetFormatError(f"{path}: {where} lacks the field {key!r} (has {sorted(record)[:8]}); is this the right file?")
    value = record[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        value = None  # bool is an int subclass; never accept it as a number
    if value is None or not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DatasetFormatError(f"{path}: {where} field {key!r} must be {names}, got {record[key]!r}")
    return value


def list_field(record: Any, key: str, *, path: Path, where: str) -> list[Any]:
    """``record[key]``, which must be a JSON list."""
    return field(record, key, list, path=path, where=where)


def expect_list(value: Any, *, path: Path, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise DatasetFormatError(f"{path}: {where} must be a JSON list, got {type(value).__name__}; is this the right file?")
    return value


def xywh_to_xyxy(x: float, y: float, w: float, h: float, width: int, height: int) -> Box | None:
    """Pixel ``(x, y, w, h)`` → ``(x1, y1, x2, y2)`` clipped to the image; ``None`` when empty after clipping."""
    x1, y1 = max(float(x), 0.0), max(float(y), 0.0)
    x2, y2 = min(float(x) + float(w), float(width)), min(float(y) + float(h), float(height))
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2, y2)


def coco_candidates(file_name: str, *extra_dirs: str) -> list[str]:
    """Relative paths an image may have under the images root: ``file_name``, then ``<dir>/file_name``.

    ``COCO_train2014_000000000009.jpg`` also tries ``train2014/COCO_train2014_000000000009.jpg``.
    """
    out = [file_name]
    dirs = [d for d in extra_dirs if d]
    m = _COCO_NAME_RE.match(PurePosixPath(file_name).name)
    if m:
        dirs.append(m.group(1))
    for d in dirs:
        cand = str(PurePosixPath(d) / file_name)
        if cand not in out:
            out.append(cand)
    return out


class ImageResolver:
    """Picks, for each image, the first candidate relative path that exists under ``images_root``.

    When none exists the first candidate is used and the image is counted; :meth:`report` logs one
    warning with the count (never a silent fallback).
    """

    def __init__(self, images_root: Path | None, *, dataset: str) -> None:
        self.root = Path(images_root) if images_root is not None else None
        self.dataset = dataset
        self.missing = 0
        self.example: str | None = None

    def __call__(self, candidates: Iterable[str]) -> str:
        cands = list(candidates)
        if self.root is not None:
            for c in cands:
                if (self.root / c).is_file():
                    return c
        self.missing += 1
        if self.example is None:
            self.example = cands[0]
        return cands[0]

    def exists(self, rel: str) -> bool:
        return self.root is not None and (self.root / rel).is_file()

    def report(self) -> None:
        if self.missing and self.root is not None:
            logger.warning(
                "%s: %d image files are not under %s (e.g. %s); searching them will fail until they are there",
                self.dataset, self.missing, self.root, self.example,
            )


def log_dropped(dataset: str, counts: Mapping[str, int]) -> None:
    """Log what a reader dropped, one line, only when something was dropped."""
    parts = [f"{n} {what}" for what, n in counts.items() if n]
    if parts:
        logger.warning("%s: dropped %s", dataset, ", ".join(parts))
