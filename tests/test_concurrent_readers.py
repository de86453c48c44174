"""Queries while `engine index` adds images: readers never see a half-written image and never crash.

The writer is a real ``engine index`` subprocess committing one image at a time; this process
reads the index meanwhile through a long-lived :class:`Engine`, a long-lived :class:`IndexStore`
and freshly opened engines. Every search must succeed: empty before the first commit, afterwards
with hits whose images have all the regions that the finished index gives them.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from engine.api import Engine
from engine.config import EngineConfig, IndexConfig
from engine.synth import SynthConfig, generate_corpus
from indexer.store import IndexStore

IMAGES = 8
WRITER_TIMEOUT_S = 300


@dataclass
class Census:
    """What one reader saw: regions per image path over every FAISS id, and ids without a region row."""

    per_image: Counter
    dangling: int


@dataclass
class ReaderLog:
    censuses: list[Census] = field(default_factory=list)
    hit_images: list[set[str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    searches: int = 0


def _census(store: IndexStore, dim: int) -> Census:
    """Every region FAISS returns (k beyond the total), grouped by image."""
    query = np.ones((1, dim), np.float32) / np.sqrt(dim)
    _, ids = store.search(query, 100_000)
    wanted = [int(i) for i in ids[0] if i >= 0]
    rows = store.regions(wanted)
    return Census(Counter(r.image_path for r in rows), len(wanted) - len(rows))


def _read_once(engine: Engine, store: IndexStore, query: Path, step: int, log: ReaderLog) -> None:
    dim = store.array_specs["visual"].shape[0]
    try:
        hits = engine.search(image=query, k=1000) if step % 2 == 0 else engine.search(text="a red circle", k=1000)
        log.hit_images.append({h.image for h in hits})
        log.censuses.append(_census(store, dim))
        if step % 8 == 0:  # a reader that opens the index in the middle of the run
            with Engine(engine.index_dir, config=EngineConfig(device="cpu")) as fresh:
                fresh.search(image=query, k=5)
        log.searches += 1
    except Exception as exc:  # noqa: BLE001 - any exception is the failure this test looks for
        log.errors.append(f"search {step}: {type(exc).__name__}: {exc}")


def _final_counts(index_dir: Path) -> dict[str, int]:
    with IndexStore.open(index_dir) as store:
        ids = store.all_region_ids()
        return dict(Counter(r.image_path for r in store.regions(ids.tolist())))


@pytest.mark.slow
def test_readers_see_whole_images_while_engine_index_adds_them(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    generate_corpus(corpus, SynthConfig(images=IMAGES, seed=11, size=96))
    index_dir = tmp_path / "idx"
    empty = tmp_path / "empty"
    empty.mkdir()
    engine = Engine(index_dir, config=EngineConfig(device="cpu"))
    engine.index(empty, config=IndexConfig(proposals="selective-search"))  # an index with no regions yet
    query = corpus / "images" / "000000.jpg"
    assert engine.search(image=query, k=5) == []

    log = ReaderLog()
    cmd = [sys.executable, "-m", "engine.cli", "index", str(corpus), "--index", str(index_dir), "--device", "cpu", "--proposals", "gt", "--batch-size", "1", "--quiet", "--json"]
    with IndexStore.open(index_dir) as store:
        writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + WRITER_TIMEOUT_S
        step = 0
        while writer.poll() is None and time.monotonic() < deadline:
            _read_once(engine, store, query, step, log)
            step += 1
        out, err = writer.communicate(timeout=WRITER_TIMEOUT_S)
        _read_once(engine, store, query, step, log)  # and once after the last commit
    engine.close()

    assert writer.returncode == 0, err[-2000:]
    assert not log.errors, log.errors[:5]
    final = _final_counts(index_dir)
    assert len(final) == IMAGES and out.strip()
    for census in log.censuses:
        assert census.dangling == 0
        partial = {path: n for path, n in census.per_image.items() if n != final.get(path)}
        assert not partial, f"a reader saw images with some of their regions: {partial} (finished index: {final})"
    for images, census in zip(log.hit_images, log.censuses):
        assert images <= set(census.per_image), "a hit names an image that is not (fully) indexed"
    seen = [len(c.per_image) for c in log.censuses]
    assert seen[0] < IMAGES and seen[-1] == IMAGES, f"images seen by successive searches: {seen}"
