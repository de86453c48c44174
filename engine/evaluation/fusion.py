"""Fitting the weight of SAN's text score in a combined query (``engine eval fusion``).

Stage 2 of a combined query (image + region + text) ranks by ``image_weight · grn + w · san``
(:func:`query.rerank.fuse_scores`). This module measures the engine itself, end to end, for a
list of weights on one split of a dataset:

* the split's images are copied into a temporary corpus (with their lines of ``annotations.jsonl``)
  and indexed by :class:`engine.api.Engine` (ground-truth boxes by default, or RPN proposals);
* every benchmark query with a positive in another image is searched with its image, region and
  text, ``k = 100``, hits from the query image excluded, every region a possible hit
  (``HitFilter(max_per_image=0)``: the per-region protocol, where a user's search shows one hit per
  image by default);
* a hit is a positive when it lies in a positive's image with IoU > 0.5 with its box (per-image
  duplicate suppression may keep an overlapping region in the positive's place);
* ``R@1``, ``R@10``, ``R@100`` (percent) and the median rank of the first positive;
* text sensitivity: for each query, the same search with the text of the next query of another
  meaning (``queries.jsonl``'s ``meaning``); ``wins`` / ``losses`` count the queries whose own text
  ranks their first positive earlier / later than the other text.

The fitted weight is the one with the best R@10 (then R@1, then the smaller weight).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.boxes import box_iou
from engine.datasets.annotations import ANNOTATIONS_FILE, QUERIES_FILE, read_dataset
from engine.datasets.types import RetrievalQuery
from engine.errors import InvalidInputError
from query.filters import HitFilter

__all__ = ["FusionRow", "evaluate_fusion", "best_weight", "first_positive_rank", "rows_to_markdown"]

MISS = 10**9
"""The rank given to a query whose positives are not among its hits."""

PER_REGION = HitFilter(max_per_image=0)
"""The evaluations' filter: any number of hits per image (region-level recall, as in the papers)."""


@dataclass(frozen=True)
class FusionRow:
    """Measured figures of one text weight (recalls in percent)."""

    weight: float
    r1: float
    r10: float
    r100: float
    med_r: float | None
    wins: int
    losses: int
    queries: int

    def to_dict(self) -> dict[str, float | int | None]:
        return {"weight": self.weight, "R@1": self.r1, "R@10": self.r10, "R@100": self.r100, "med_r": self.med_r, "wins": self.wins, "losses": self.losses, "queries": self.queries}


def evaluate_fusion(
    data: Path,
    weights: Sequence[float],
    *,
    split: str = "val",
    proposals: str = "gt",
    device: str = "cpu",
    progress: bool = True,
) -> list[FusionRow]:
    """One :class:`FusionRow` per weight, measured through :meth:`Engine.search` on ``split`` of ``data``."""
    from engine.api import Engine
    from engine.config import EngineConfig, IndexConfig

    if not weights or any(w < 0 for w in weights):
        raise InvalidInputError(f"--weights must be one or more numbers >= 0, got {list(weights)}")
    dataset = read_dataset(Path(data)).split(split)
    boxes = {r.id: (im.image, r.box) for im in dataset.images for r in im.regions}
    queries = [q for q in dataset.queries if _elsewhere(q, boxes)]
    if not queries:
        raise InvalidInputError(f"split {split!r} of {data} has no query with a positive in another image")
    meanings = _meanings(Path(data) / QUERIES_FILE)
    with tempfile.TemporaryDirectory(prefix="engine-fusion-") as tmp:
        corpus = _split_corpus(Path(data), {im.image for im in dataset.images}, Path(tmp) / "corpus")
        rows = []
        for w in weights:
            engine = Engine(Path(tmp) / "index", config=EngineConfig(device=device, text_weight=float(w)))
            try:
                if not rows:
                    engine.index(corpus, config=IndexConfig(proposals=proposals), progress=progress)
                rows.append(_measure(engine, corpus, queries, boxes, meanings, float(w), progress=progress))
            finally:
                engine.close()
    return rows


def best_weight(rows: Sequence[FusionRow]) -> FusionRow:
    """The row with the best R@10, then R@1, then the smaller weight."""
    return max(rows, key=lambda r: (r.r10, r.r1, -r.weight))


def rows_to_markdown(rows: Sequence[FusionRow]) -> str:
    lines = ["| text weight | R@1 | R@10 | R@100 | med r | own text better / worse | queries |", "| ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        med = "—" if r.med_r is None else f"{r.med_r:g}"
        lines.append(f"| {r.weight:g} | {r.r1:.2f} | {r.r10:.2f} | {r.r100:.2f} | {med} | {r.wins} / {r.losses} | {r.queries} |")
    return "\n".join(lines) + "\n"


def _measure(engine, corpus: Path, queries: Sequence[RetrievalQuery], boxes, meanings: dict[int, str], weight: float, *, progress: bool) -> FusionRow:  # noqa: ANN001
    ranks, wins, losses = [], 0, 0
    for i, q in enumerate(tqdm(queries, desc=f"text weight {weight:g}", unit="query", disable=not progress, dynamic_ncols=True)):
        targets = _elsewhere(q, boxes)
        own = first_positive_rank(engine.search(image=corpus / q.image, region=q.region, text=q.text, k=100, exclude_self=True, filters=PER_REGION), targets, boxes)
        ranks.append(own)
        other = _other_text(queries, i, meanings)
        if other is not None:
            rank_other = first_positive_rank(engine.search(image=corpus / q.image, region=q.region, text=other, k=100, exclude_self=True, filters=PER_REGION), targets, boxes)
            wins += own < rank_other
            losses += own > rank_other
    r = np.asarray(ranks, np.float64)
    med = float(np.median(r))
    return FusionRow(
        weight=weight,
        r1=100.0 * float((r <= 1).mean()),
        r10=100.0 * float((r <= 10).mean()),
        r100=100.0 * float((r <= 100).mean()),
        med_r=None if med >= MISS else med,
        wins=wins,
        losses=losses,
        queries=len(queries),
    )


def _elsewhere(q: RetrievalQuery, boxes: dict[int, tuple[str, tuple]]) -> set[int]:
    """The query's positives in other images (the only ones a search that excludes its own image can find)."""
    return {p for p in q.positives if p in boxes and boxes[p][0] != q.image}


def first_positive_rank(hits, positives: set[int], boxes: dict[int, tuple[str, tuple]]) -> int:  # noqa: ANN001
    """1-based rank of the first hit on a positive (same image, IoU > 0.5); :data:`MISS` if none."""
    for rank, h in enumerate(hits, start=1):
        for p in positives:
            image, box = boxes[p]
            if Path(h.image).name == Path(image).name and box_iou([h.box], [box])[0, 0] > 0.5:
                return rank
    return MISS


def _meanings(path: Path) -> dict[int, str]:
    """Region id → structured meaning (as canonical JSON) of each query line that has one."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        if obj.get("meaning") is not None:
            out[int(obj["region_id"])] = json.dumps(obj["meaning"], sort_keys=True)
    return out


def _other_text(queries: Sequence[RetrievalQuery], i: int, meanings: dict[int, str]) -> str | None:
    """The text of the next query (cyclically) with another meaning; ``None`` without meanings."""
    mine = meanings.get(queries[i].region_id)
    if mine is None:
        return None
    for q in list(queries[i + 1 :]) + list(queries[:i]):
        other = meanings.get(q.region_id)
        if other is not None and other != mine:
            return q.text
    return None


def _split_corpus(data: Path, images: set[str], out: Path) -> Path:
    """Copy the split's images and their ``annotations.jsonl`` lines (for ground-truth boxes) into ``out``."""
    out.mkdir(parents=True)
    lines = []
    for line in (data / ANNOTATIONS_FILE).read_text(encoding="utf-8").splitlines():
        if line.strip() and json.loads(line)["image"] in images:
            lines.append(line)
    for rel in images:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data / rel, out / rel)
    (out / ANNOTATIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
