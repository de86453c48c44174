"""Shared by the val-split fitting scripts (``layout_fit.py``, ``text_fit.py``): the protocol of ``engine eval
search`` on precomputed candidates, and writing a fit's result.

The scripts import this module by name (``from fit_common import ...``): run them as
``python benchmarks/layout_fit.py`` so that ``benchmarks/`` is on ``sys.path``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def first_hits(final: np.ndarray, iou: np.ndarray, images: np.ndarray, k: int = 10) -> tuple[bool, bool, bool]:
    """``(box@1, box@k, img@1)`` of one query whose candidates are ranked by ``final``, one hit per image:
    a hit is right with IoU > 0.5 with a positive (``iou``: -1 in an image without positives)."""
    order = np.argsort(-final, kind="stable")
    seen: set[str] = set()
    top: list[int] = []
    for j in order:
        if images[j] not in seen:
            seen.add(images[j])
            top.append(int(j))
            if len(top) == k:
                break
    return bool(iou[top[0]] > 0.5), any(iou[j] > 0.5 for j in top), bool(iou[top[0]] >= 0)


def rates(outcomes: list[tuple[bool, bool, bool]], queries: int, k: int = 10) -> dict[str, float]:
    """box@1, box@k, img@1 over ``queries`` queries (those without an outcome, no candidates, count as misses)."""
    n = max(queries, 1)
    box1, boxk, img1 = (sum(o[i] for o in outcomes) for i in range(3))
    return {"box@1": box1 / n, f"box@{k}": boxk / n, "img@1": img1 / n, "queries": queries}


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a fit's JSON result (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
