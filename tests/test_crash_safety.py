"""kill -9 in the middle of `engine index`: the index opens, answers over what was committed, and a re-run completes it."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.api import Engine
from engine.config import EngineConfig
from engine.synth import SynthConfig, generate_corpus


def _committed_images(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        return 0


def _index_cmd(corpus: Path, index_dir: Path) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "index", str(corpus), "--index", str(index_dir), "--device", "cpu", "--batch-size", "2", "--quiet", "--json"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    generate_corpus(corpus, SynthConfig(images=40, seed=3, size=192))
    index_dir = tmp_path / "idx"
    db = index_dir / "engine.db"

    kills = 0
    for target in (2, 12):  # kill once early and once later in the run
        proc = subprocess.Popen(_index_cmd(corpus, index_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _committed_images(db) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "indexing finished before it could be killed; make the corpus larger"

    committed = _committed_images(db)
    engine = Engine(index_dir, config=EngineConfig(device="cpu"))
    info = engine.info().to_dict()
    assert info["images"] == committed and info["regions"] > 0
    # every committed region is searchable, and nothing else is
    hits = engine.search(image=next(corpus.rglob("*.jpg")), k=info["regions"])
    assert len({h.region_id for h in hits}) == len(hits)
    engine.close()

    done = subprocess.run(_index_cmd(corpus, index_dir), capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["processed"] == 40 - committed and summary["errors"] == 0

    # compare with a clean, uninterrupted index of the same corpus: same images, same regions, no duplicates
    clean = Engine(tmp_path / "clean", config=EngineConfig(device="cpu"))
    clean.index(corpus)
    resumed = Engine(index_dir, config=EngineConfig(device="cpu"))
    a, b = resumed.info().to_dict(), clean.info().to_dict()
    assert (a["images"], a["regions"]) == (b["images"], b["regions"]) == (40, b["regions"])
    q = next(corpus.rglob("*.jpg"))
    ra, rb = resumed.search(image=q, k=20), clean.search(image=q, k=20)
    assert [(h.image, h.box) for h in ra] == [(h.image, h.box) for h in rb]
    assert [h.score for h in ra] == pytest.approx([h.score for h in rb], abs=1e-5)
    resumed.close()
    clean.close()
