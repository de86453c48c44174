"""Resident memory of a fresh reader process: ``python -m engine.benchmarking.memory REQUEST_JSON``.

The process opens an :class:`~engine.api.Engine` on the index, runs the given combined queries and
prints its resident set (``VmRSS``) and peak (``VmHWM``) as JSON. :func:`reader_memory` runs it in a
subprocess, so that nothing the benchmark itself holds (seed arrays, other indexes) is counted.
Comparing two index sizes gives the marginal memory per region.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.benchmarking.seed import BenchQuery
from engine.benchmarking.timing import rss_bytes
from engine.errors import EngineError

__all__ = ["reader_memory"]


def reader_memory(index_dir: Path, queries: Sequence[BenchQuery], *, grn: Path | None = None, timeout: float = 1800) -> dict[str, int]:
    """``{"rss", "peak_rss"}`` in bytes of a fresh process after searching ``queries`` on ``index_dir``."""
    request = {
        "index": str(index_dir),
        "grn": str(grn) if grn is not None else None,
        "queries": [{"image": str(q.image), "box": list(q.box), "text": q.text} for q in queries],
    }
    done = subprocess.run([sys.executable, "-m", "engine.benchmarking.memory", json.dumps(request)], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise EngineError(f"the memory probe on {index_dir} failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(request: dict[str, Any]) -> dict[str, int]:
    from dataclasses import fields

    from engine.api import Engine
    from engine.config import EngineConfig

    values: dict[str, Any] = {"device": "cpu"}
    if request.get("grn"):
        values["grn_checkpoint"] = Path(request["grn"])
    if "stage3" in {f.name for f in fields(EngineConfig)}:
        values["stage3"] = False
    with Engine(Path(request["index"]), config=EngineConfig(**values)) as engine:
        for q in request["queries"]:
            engine.search(image=q["image"], region=q["box"], text=q["text"], k=10, exclude_self=True)
        return rss_bytes()


if __name__ == "__main__":
    print(json.dumps(_probe(json.loads(sys.argv[1]))))
