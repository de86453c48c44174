"""Corpus files shared by every synthetic world: the output-folder check, atomic writes and the per-image loop.

A world hands :func:`write_corpus` a function that makes image ``i`` and a function that turns the
collected region records into query lines; this module writes ``images/``, ``annotations.jsonl`` and
``queries.jsonl`` through temporary names, so an interrupted run leaves no half-written file.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from tqdm import tqdm

from engine.datasets.annotations import ANNOTATIONS_FILE, QUERIES_FILE
from engine.datasets.types import ImageAnn
from engine.errors import InvalidInputError

__all__ = ["CorpusImage", "CorpusWritten", "image_rng", "write_atomic", "check_out_dir", "write_corpus"]

logger = logging.getLogger(__name__)

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

_CORPUS_ENTRIES = {"images", ANNOTATIONS_FILE, QUERIES_FILE, ANNOTATIONS_FILE + ".tmp", QUERIES_FILE + ".tmp"}
_IMAGE_NAME = re.compile(r"^\d{6,}\.(jpg|png)(\.tmp)?$")


class CorpusImage(Protocol[R_co]):
    """What a world's generator returns for one image."""

    @property
    def annotation(self) -> ImageAnn: ...

    @property
    def line(self) -> dict[str, Any]: ...

    @property
    def data(self) -> bytes: ...

    @property
    def regions(self) -> Sequence[R_co]: ...


@dataclass(frozen=True)
class CorpusWritten(Generic[R]):
    """What :func:`write_corpus` wrote: the counts, every region record, the query lines, the time taken."""

    images: int
    objects: int
    regions: int
    refs: int
    records: tuple[R, ...]
    queries: tuple[dict[str, Any], ...]
    seconds: float


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of image ``index``: ``SeedSequence(seed, spawn_key=(0, index))``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` under a ``.tmp`` name, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_out_dir(out_dir: Path) -> None:
    """Refuse a file, or a non-empty directory that holds anything but a (possibly half-written) synthetic corpus."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"output {out_dir} is a file, not a directory; choose a new or empty directory")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _CORPUS_ENTRIES)
        if foreign:
            raise InvalidInputError(
                f"output directory {out_dir} is not empty and is not a synthetic corpus (it holds {', '.join(foreign[:3])}); "
                "choose a new or empty directory (an existing synthetic corpus is overwritten)"
            )


def _remove_stale_images(images_dir: Path, written: set[str]) -> None:
    """Delete generator-named images of an earlier, larger corpus (and leftovers of an interrupted run)."""
    if not images_dir.is_dir():
        return
    stale = [p for p in images_dir.iterdir() if _IMAGE_NAME.match(p.name) and p.name not in written]
    for p in stale:
        p.unlink()
    if stale:
        logger.info("removed %d images of an earlier corpus from %s", len(stale), images_dir)


def write_corpus(
    out_dir: Path,
    count: int,
    generate: Callable[[int], CorpusImage[R]],
    make_queries: Callable[[list[R]], list[dict[str, Any]]],
    *,
    progress: bool = False,
    desc: str = "synth",
) -> CorpusWritten[R]:
    """Generate images ``0 .. count-1`` with ``generate`` and write the corpus files under ``out_dir``.

    ``make_queries`` gets every image's region records in index order and returns the query lines.
    ``annotations.jsonl`` and ``queries.jsonl`` appear (renamed from ``.tmp``) only when all is done.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records: list[R] = []
    n_objects = n_regions = n_refs = 0
    ann_path = out_dir / ANNOTATIONS_FILE
    ann_tmp = ann_path.with_name(ann_path.name + ".tmp")
    written: set[str] = set()
    try:
        with open(ann_tmp, "w", encoding="utf-8") as ann, tqdm(
            total=count, disable=not progress, unit="img", desc=desc, dynamic_ncols=True
        ) as bar:
            for index in range(count):
                image = generate(index)
                write_atomic(out_dir / image.annotation.image, image.data)
                written.add(Path(image.annotation.image).name)
                ann.write(json.dumps(image.line) + "\n")
                records.extend(image.regions)
                n_objects += len(image.annotation.objects)
                n_regions += len(image.annotation.regions)
                n_refs += len(image.annotation.refs)
                bar.update(1)
    except BaseException:
        ann_tmp.unlink(missing_ok=True)
        raise
    _remove_stale_images(out_dir / "images", written)
    queries = make_queries(records)
    q_path = out_dir / QUERIES_FILE
    q_tmp = q_path.with_name(q_path.name + ".tmp")
    q_tmp.write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    os.replace(ann_tmp, ann_path)
    os.replace(q_tmp, q_path)
    return CorpusWritten(
        images=count,
        objects=n_objects,
        regions=n_regions,
        refs=n_refs,
        records=tuple(records),
        queries=tuple(queries),
        seconds=time.perf_counter() - start,
    )
