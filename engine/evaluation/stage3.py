"""Fitting and measuring query stage 3 (``engine eval stage3``).

Stage 3 (``query/localize.py``) grounds the text of a combined query in the best ``M`` images of
stage 2 and ranks their Ref-NMS-kept regions by ``stage2 + w_r · relatedness + w_g · grounding``.
This module measures it end to end on one split, through :class:`engine.api.Engine`:

* the split's images are indexed (RPN proposals by default: localizing matters when the indexed
  boxes are proposals, not the described regions themselves);
* every query with a positive in another image runs stages 1–2 once (image, region, text; its own
  image excluded) and stage 3's parts are computed once for its best ``max(M)`` images;
* each ``(M, w_r, w_g)`` of the grid re-ranks those parts; ``M = 0`` is stage 2 alone;
* a hit is a positive when it lies in a positive's image with IoU > 0.5 (as ``engine eval fusion``).

Queries run through the engine's own :class:`query.pipeline.QueryPipeline` (prepare, rank, ground),
with one difference from a user's search: every region may be a hit (``HitFilter(max_per_image=0)``),
where a search shows one hit per image by default — the per-region protocol of the papers.

The fitted setting has the best R@1 (then R@10, then the smaller ``M`` and weights).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.datasets.annotations import read_dataset
from engine.errors import InvalidInputError
from engine.evaluation.fusion import MISS, PER_REGION, _elsewhere, _split_corpus, first_positive_rank
from query.localize import Stage3Candidates, Stage3Weights, best_images, rank_stage3

__all__ = ["Stage3Row", "Stage3Grid", "collect_stage3", "grid_rows", "best_row", "rows_to_markdown"]

_PARTS_FORMAT = 2
"""The collected parts' pickled layout (2: typed :class:`Stage3Candidates`); part of the cache key."""

IMAGES = (0, 1, 3, 5, 10, 20)
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Stage3Grid:
    """The settings to try: ``images`` (M) and the weights ``w_r`` / ``w_g``."""

    images: tuple[int, ...] = IMAGES
    relatedness: tuple[float, ...] = WEIGHTS
    grounding: tuple[float, ...] = WEIGHTS

    def __post_init__(self) -> None:
        if not self.images or min(self.images) < 0 or min(self.relatedness + self.grounding, default=-1) < 0:
            raise InvalidInputError("stage 3 grid: images must be integers >= 0 and weights numbers >= 0, at least one of each")

    def settings(self) -> list[Stage3Weights]:
        out = [Stage3Weights(images=0)]
        for m, r, g in itertools.product(self.images, self.relatedness, self.grounding):
            if m > 0:
                out.append(Stage3Weights(images=int(m), relatedness=float(r), grounding=float(g)))
        return out


@dataclass(frozen=True)
class Stage3Row:
    """Recalls (percent) of one stage-3 setting."""

    weights: Stage3Weights
    r1: float
    r10: float
    r100: float
    med_r: float | None
    queries: int

    def to_dict(self) -> dict[str, object]:
        return {**self.weights.to_dict(), "R@1": self.r1, "R@10": self.r10, "R@100": self.r100, "med_r": self.med_r, "queries": self.queries}


@dataclass
class _Collected:
    ranked: list  # stage-2 hits
    grounded: dict[str, Stage3Candidates]  # best max(M) images, in stage-2 order
    targets: set[int]


def collect_stage3(data: Path, *, split: str, max_images: int, proposals: str = "rpn", device: str = "cpu", progress: bool = True, work_dir: Path | None = None, grounding_model: str | None = None) -> tuple[list[_Collected], dict]:
    """Stage-2 rankings and stage-3 parts of every answerable query of ``split`` (see the module doc).

    ``work_dir`` keeps the split's corpus copy, its index and the collected parts (keyed by the
    bytes of every checkpoint involved) for the next run; by default all live in a temporary folder. ``grounding_model``: the CM-Att checkpoint (file or
    installed name; default the engine's, ``cm-att-erase-region``)."""
    if work_dir is not None:
        cache = Path(work_dir) / f"stage3-parts-{_parts_key(proposals, max_images, grounding_model)}.pkl"
        if cache.is_file():
            with cache.open("rb") as f:
                return pickle.load(f)
        collected = _collect(data, split, max_images, proposals, device, progress, Path(work_dir), grounding_model)
        tmp = cache.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(collected, f)
        tmp.replace(cache)
        return collected
    with tempfile.TemporaryDirectory(prefix="engine-stage3-") as tmp:
        return _collect(data, split, max_images, proposals, device, progress, Path(tmp), grounding_model)


def _parts_key(proposals: str, max_images: int, grounding_model: str | None) -> str:
    """The collected parts depend on the proposals, M and every model of stages 1–3: their checkpoint bytes."""
    from engine.models.checkpoint import checkpoint_path
    from engine.models.cm_att import REGION_GROUNDING_NAME

    digest = hashlib.sha256(f"{_PARTS_FORMAT}:{proposals}:{max_images}".encode())
    for spec, default in ((grounding_model, REGION_GROUNDING_NAME), (None, "ref-nms-r"), (None, "grn"), (None, "san"), (None, "rpn"), (None, "saliency")):
        digest.update(checkpoint_path(spec, default=default).read_bytes())
    return digest.hexdigest()[:16]


def _collect(data: Path, split: str, max_images: int, proposals: str, device: str, progress: bool, work: Path, grounding_model: str | None) -> tuple[list[_Collected], dict]:
    from engine.api import Engine, SearchRequest
    from engine.config import EngineConfig, IndexConfig

    dataset = read_dataset(Path(data)).split(split)
    boxes = {r.id: (im.image, r.box) for im in dataset.images for r in im.regions}
    queries = [q for q in dataset.queries if _elsewhere(q, boxes)]
    if not queries:
        raise InvalidInputError(f"split {split!r} of {data} has no query with a positive in another image")
    out = []
    corpus = work / "corpus"
    if not corpus.is_dir():
        _split_corpus(Path(data), {im.image for im in dataset.images}, corpus)
    with Engine(work / f"index-{proposals}", config=EngineConfig(device=device, stage3=False, stage3_weights=Stage3Weights(), grounding_checkpoint=grounding_model)) as engine:
        engine.index(corpus, config=IndexConfig(proposals=proposals), progress=progress)
        pipeline = engine.pipeline
        for q in tqdm(queries, desc=f"stage 3 ({split})", unit="query", disable=not progress, dynamic_ncols=True):
            prepared = pipeline.prepare(SearchRequest(image=corpus / q.image, region=q.region, text=q.text, k=100, exclude_self=True, filters=PER_REGION))
            ranked = pipeline.rank(prepared, k=engine.config.shortlist)
            grounded = pipeline.ground(prepared, ranked, max_images)
            out.append(_Collected(ranked=ranked, grounded=grounded, targets=_elsewhere(q, boxes)))
    return out, boxes


def grid_rows(collected: Sequence[_Collected], boxes: dict, settings: Sequence[Stage3Weights]) -> list[Stage3Row]:
    """One :class:`Stage3Row` per setting, re-ranking the collected parts."""
    rows = []
    for w in settings:
        ranks = []
        for c in collected:
            chosen = {p: c.grounded[p] for p in best_images(c.ranked, w.images) if p in c.grounded}
            ranks.append(first_positive_rank(rank_stage3(c.ranked, chosen, w, 100), c.targets, boxes))
        r = np.asarray(ranks, np.float64)
        med = float(np.median(r)) if len(r) else float(MISS)
        rows.append(Stage3Row(w, 100.0 * float((r <= 1).mean()), 100.0 * float((r <= 10).mean()), 100.0 * float((r <= 100).mean()), None if med >= MISS else med, len(r)))
    return rows


def best_row(rows: Sequence[Stage3Row]) -> Stage3Row:
    """Best R@1, then R@10, then the smaller M and weights."""
    return max(rows, key=lambda r: (r.r1, r.r10, -r.weights.images, -r.weights.relatedness - r.weights.grounding))


def rows_to_markdown(rows: Sequence[Stage3Row]) -> str:
    lines = ["| setting | images M | w_r (relatedness) | w_g (grounding) | R@1 | R@10 | R@100 | med r |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, r in _labelled(rows):
        med = "—" if r.med_r is None else f"{r.med_r:g}"
        w = r.weights
        lines.append(f"| {label} | {w.images} | {w.relatedness:g} | {w.grounding:g} | {r.r1:.2f} | {r.r10:.2f} | {r.r100:.2f} | {med} |")
    return "\n".join(lines) + "\n"


def _labelled(rows: Sequence[Stage3Row]) -> list[tuple[str, Stage3Row]]:
    out = []
    for r in rows:
        w = r.weights
        if w.images == 0:
            label = "stage 2 alone"
        elif w.relatedness == 0 and w.grounding == 0:
            label = "stage 3, stage-2 score only"
        elif w.grounding == 0:
            label = "stage 3, + relatedness"
        elif w.relatedness == 0:
            label = "stage 3, + grounding"
        else:
            label = "stage 3, + both"
        out.append((label, r))
    return out


def write_weights(path: Path, row: Stage3Row, *, data: Path, split: str, proposals: str, command: str) -> None:
    """The fitted setting as ``stage3.json`` (read by :func:`query.localize.load_stage3_weights`)."""
    payload = {**row.weights.to_dict(), "fitted_on": {"data": str(data), "split": split, "proposals": proposals, "R@1": row.r1, "R@10": row.r10, "queries": row.queries}, "command": command}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
