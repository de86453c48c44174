"""What a user sees: ``engine eval search`` measures :meth:`engine.api.Engine.search` end to end.

The protocol (``docs/eval-search.md``):

* the split's images (default ``test``) are indexed with the engine's default settings, exactly as
  ``engine index`` would (``IndexConfig()``: RPN proposals, the shipped models), from a folder of
  symbolic links to the corpus images (hit paths map back to the corpus by their relative path);
* every query of the split with a positive in another indexed image is searched as a user would:
  ``region`` mode with its image and region, ``region+text`` with its text too, ``text`` mode with
  its text only; hits from the query's own image are excluded (``exclude_self=True``; a text-only
  query has no image, so it asks for ``k + 1`` hits and drops the one its own image may take);
  ``k = 10`` and the default filter (one hit per image: the list a user sees);
* a hit is a *right box* when it lies in a positive's image with IoU > 0.5 with that positive's box
  (positive ids resolve against the ``regions``, then the ``objects`` of ``annotations.jsonl``); a
  hit's image is *right* when it holds a positive;
* per query: box@1, box@10, img@1, img@10 (0 or 1), the rank of the first right box in a deeper
  search (``k = 100``, still one hit per image; infinite when none of the 100 is right), and the
  wall time of the ``k = 10`` search (after one warm-up query);
* each figure over queries (mean of the 0/1 values; median rank; median latency) with a 95 %
  percentile bootstrap interval (:mod:`engine.evaluation.bootstrap`: 10,000 resamples, seed 0).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.boxes import Box, box_iou
from engine.datasets.annotations import ANNOTATIONS_FILE, QUERIES_FILE, read_dataset
from engine.datasets.types import Dataset, RetrievalQuery
from engine.errors import CheckpointError, EngineError, IndexNotFoundError, InvalidInputError
from indexer.component_configs import RegionFeatureConfig
from engine.evaluation.bootstrap import CONFIDENCE, RESAMPLES, SEED, Interval, bootstrap_interval

__all__ = [
    "MODES",
    "SearchEvalConfig",
    "SearchEvalResult",
    "Target",
    "QueryOutcome",
    "evaluate_search",
    "split_queries",
    "corpus_path",
    "LINKS_FOLDER",
    "query_targets",
    "score_hits",
    "first_right_rank",
    "metrics_table",
]

log = logging.getLogger(__name__)

MODES = ("region", "region+text", "text")
"""What a query gives the engine: its image and region, plus its text, or its text alone."""

IOU = 0.5
"""A hit is a right box with IoU above this with a positive's box (in the positive's image)."""

LINKS_FOLDER = "eval-search-corpus"
"""The folder of links to the split's images, inside the index folder (the index itself skips it)."""

HitRef = tuple[str, Box]
"""A hit as the metrics see it: its image path relative to the corpus, and its box."""


@dataclass(frozen=True)
class SearchEvalConfig:
    """One ``engine eval search`` run. ``k``: hits a user sees; ``depth``: hits searched for the rank."""

    data: Path
    split: str = "test"
    mode: str = "region"
    index_dir: Path | None = None
    limit: int | None = None
    device: str = "auto"
    k: int = 10
    depth: int = 100
    resamples: int = RESAMPLES
    seed: int = SEED
    progress: bool = True
    features: RegionFeatureConfig = field(default_factory=RegionFeatureConfig)
    layout_weight: float | None = None  # None: the engine's default (EngineConfig.layout_weight)
    layout_shortlist: int | None = None  # None: the engine's default (EngineConfig.layout_shortlist)
    instance_shortlist: int | None = None  # None: the engine's default (EngineConfig.instance_shortlist)
    instance_weight: float | None = None  # None: the engine's default (EngineConfig.instance_weight)
    concept_weight: float | None = None  # None: the engine's default (EngineConfig.concept_weight)
    san_gate: float | None = None  # None: the engine's default (EngineConfig.san_gate)
    projection_weight: float | None = None  # None: the engine's default (EngineConfig.projection_weight)
    proposal_weight: float | None = None  # None: the engine's default (EngineConfig.proposal_weight)
    san_weight: float | None = None  # None: the engine's default (EngineConfig.san_weight)
    combined_san_weight: float | None = None  # None: the engine's default (EngineConfig.combined_san_weight)
    san_text_gate: tuple[float, float] | None = None  # None: the engine's default (EngineConfig.san_text_gate)
    san_checkpoint: Path | None = None  # None: the shipped SAN (EngineConfig.san_checkpoint)
    grn_checkpoint: Path | None = None  # None: the engine's choice (EngineConfig.grn_checkpoint)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(f"--mode {self.mode!r} is not known; choose one of {', '.join(MODES)}")
        if self.limit is not None and self.limit < 1:
            raise InvalidInputError(f"--limit must be a positive number of queries, got {self.limit}")
        if not 1 <= self.k <= self.depth:
            raise InvalidInputError(f"k ({self.k}) must be >= 1 and at most the rank depth ({self.depth})")


@dataclass(frozen=True)
class Target:
    """A positive of a query: its image (relative to the corpus) and box."""

    image: str
    box: Box


@dataclass(frozen=True)
class QueryOutcome:
    """One query's measures: right box / image at 1 and at k, rank of the first right box, search seconds."""

    box_at_1: bool
    box_at_k: bool
    img_at_1: bool
    img_at_k: bool
    rank: float
    seconds: float
    refused: bool = False  # the engine refused the query (an EngineError, e.g. a text it cannot read): no hits, a miss


@dataclass(frozen=True)
class SearchEvalResult:
    """The figures of a run: ``metrics`` maps a name (``box@1``, …, ``median rank``, ``latency p50 ms``)
    to its :class:`Interval`; ``index`` is what ``engine info --json`` reports of the index searched."""

    config: SearchEvalConfig
    metrics: dict[str, Interval]
    queries: int
    skipped: int
    images: int
    index: dict[str, Any]
    index_settings: dict[str, Any]
    index_reused: bool
    index_seconds: float
    query_seconds: float
    outcomes: tuple[QueryOutcome, ...] = field(repr=False, default=())

    @property
    def refused(self) -> int:
        """Queries the engine refused (counted as misses: a user gets no hit)."""
        return sum(o.refused for o in self.outcomes)

    def to_dict(self, *, command: str | None = None) -> dict[str, Any]:
        from engine.config import CONCEPT_GATE, CONCEPT_WEIGHT, INSTANCE_SHORTLIST, INSTANCE_WEIGHT, LAYOUT_SHORTLIST, LAYOUT_WEIGHT, COMBINED_SAN_WEIGHT, PROJECTION_WEIGHT, PROPOSAL_WEIGHT, SAN_GATE, SAN_TEXT_GATE, SAN_WEIGHT

        c = self.config
        return {
            "command": command,
            "data": str(c.data),
            "split": c.split,
            "mode": c.mode,
            "k": c.k,
            "rank_depth": c.depth,
            "max_per_image": _default_max_per_image(),
            "visual_key": _visual_key(c.features),
            "layout_weight": c.layout_weight if c.layout_weight is not None else LAYOUT_WEIGHT,
            "layout_shortlist": c.layout_shortlist if c.layout_shortlist is not None else LAYOUT_SHORTLIST,
            "instance_shortlist": c.instance_shortlist if c.instance_shortlist is not None else INSTANCE_SHORTLIST,
            "instance_weight": c.instance_weight if c.instance_weight is not None else INSTANCE_WEIGHT,
            "concept_weight": c.concept_weight if c.concept_weight is not None else CONCEPT_WEIGHT,
            "concept_gate": list(CONCEPT_GATE),
            "san_gate": c.san_gate if c.san_gate is not None else SAN_GATE,
            "projection_weight": c.projection_weight if c.projection_weight is not None else PROJECTION_WEIGHT,
            "proposal_weight": c.proposal_weight if c.proposal_weight is not None else PROPOSAL_WEIGHT,
            "san_weight": c.san_weight if c.san_weight is not None else SAN_WEIGHT,
            "combined_san_weight": c.combined_san_weight if c.combined_san_weight is not None else COMBINED_SAN_WEIGHT,
            "san_text_gate": list(c.san_text_gate if c.san_text_gate is not None else SAN_TEXT_GATE),
            "san_checkpoint": str(c.san_checkpoint) if c.san_checkpoint is not None else "san",
            "grn_checkpoint": str(c.grn_checkpoint) if c.grn_checkpoint is not None else "default",
            "queries": self.queries,
            "skipped_queries": self.skipped,
            "refused_queries": self.refused,
            "images": self.images,
            "metrics": {name: _json_interval(iv) for name, iv in self.metrics.items()},
            "bootstrap": {"resamples": c.resamples, "seed": c.seed, "confidence": CONFIDENCE, "method": "percentile"},
            "index": self.index,
            "index_settings": self.index_settings,
            "index_reused": self.index_reused,
            "index_seconds": round(self.index_seconds, 3),
            "query_seconds": round(self.query_seconds, 3),
        }


# --------------------------------------------------------------------------- the measures


def query_targets(query: RetrievalQuery, dataset: Dataset) -> list[Target]:
    """The positives of ``query`` a search excluding its own image can find: those in other images of ``dataset``.

    A positive id names a region of ``annotations.jsonl``, else an object; unknown ids are left out.
    """
    regions = {r.id: (im.image, r.box) for im in dataset.images for r in im.regions}
    objects = {o.id: (im.image, o.box) for im in dataset.images for o in im.objects}
    return _targets(query, regions, objects)


def _targets(query: RetrievalQuery, regions: dict[int, tuple[str, Box]], objects: dict[int, tuple[str, Box]]) -> list[Target]:
    out = []
    for pid in query.positives:
        found = regions.get(pid) or objects.get(pid)
        if found is not None and found[0] != query.image:
            out.append(Target(image=found[0], box=tuple(found[1])))  # type: ignore[arg-type]
    return out


def _right_box(hit: HitRef, targets: Sequence[Target]) -> bool:
    image, box = hit
    boxes = [t.box for t in targets if t.image == image]
    return bool(boxes) and bool((box_iou([box], boxes)[0] > IOU).any())


def score_hits(hits: Sequence[HitRef], targets: Sequence[Target], k: int) -> tuple[bool, bool, bool, bool]:
    """``(box@1, box@k, img@1, img@k)`` of a ranked hit list against a query's positives."""
    images = {t.image for t in targets}
    right_box = [_right_box(h, targets) for h in hits[:k]]
    right_img = [h[0] in images for h in hits[:k]]
    return (right_box[:1] == [True], any(right_box), right_img[:1] == [True], any(right_img))


def first_right_rank(hits: Sequence[HitRef], targets: Sequence[Target]) -> float:
    """1-based rank of the first right box among ``hits``; ``inf`` when there is none."""
    for rank, hit in enumerate(hits, start=1):
        if _right_box(hit, targets):
            return float(rank)
    return float("inf")


def summarize(outcomes: Sequence[QueryOutcome], *, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Interval]:
    """Each figure over the queries with its bootstrap interval (fractions in [0, 1]; rank; milliseconds)."""
    def col(name: str) -> np.ndarray:
        return np.asarray([float(getattr(o, name)) for o in outcomes], np.float64)

    def ci(values: np.ndarray, stat=np.mean) -> Interval:  # noqa: ANN001
        return bootstrap_interval(values, stat, resamples=resamples, seed=seed)

    k_names = {"box_at_1": "box@1", "box_at_k": "box@10", "img_at_1": "img@1", "img_at_k": "img@10"}
    out = {label: ci(col(name)) for name, label in k_names.items()}
    out["median rank"] = ci(col("rank"), np.median)
    out["latency p50 ms"] = ci(1000.0 * col("seconds"), np.median)
    return out


# --------------------------------------------------------------------------- the run


def evaluate_search(config: SearchEvalConfig) -> SearchEvalResult:
    """Index ``config.split`` of ``config.data`` with the default settings and measure every query's search."""
    from engine.config import IndexConfig

    dataset, queries, skipped = split_queries(config)
    images = sorted({im.image for im in dataset.images})
    with _indexed(config, images) as indexed:
        run_query = _query_runner(indexed.engine, indexed.links, config)
        _measure(run_query, *queries[0], config.k)  # warm-up: models loaded, caches filled
        started = time.perf_counter()
        outcomes = tuple(_measure(run_query, q, t, config.k) for q, t in tqdm(queries, desc=f"searching ({config.mode})", unit="query", disable=not config.progress, dynamic_ncols=True))
        query_seconds = time.perf_counter() - started
        info = indexed.engine.info().to_dict()
    if indexed.temporary:
        info["path"] = None  # removed with its temporary folder
    labels = {"box@10": f"box@{config.k}", "img@10": f"img@{config.k}"}
    metrics = {labels.get(n, n): v for n, v in summarize(outcomes, resamples=config.resamples, seed=config.seed).items()}
    return SearchEvalResult(
        config=config, metrics=metrics, queries=len(outcomes), skipped=skipped, images=len(images), index=info,
        index_settings=asdict(IndexConfig()), index_reused=indexed.reused, index_seconds=indexed.seconds, query_seconds=query_seconds, outcomes=outcomes,
    )


def _splits(dataset: Dataset, split: str) -> Dataset:
    """The images and queries of ``split``: one split name, or several joined by ``+`` (``val+test``: both
    indexed together, each query answered from both; for a corpus none of whose splits was fitted on)."""
    names = split.split("+")
    unknown = [n for n in names if n not in ("train", "val", "test")]
    if unknown or len(set(names)) != len(names):
        raise InvalidInputError(f"--split {split!r}: name train, val or test, or several joined by + (e.g. val+test)")
    parts = [dataset.split(n) for n in names]
    return Dataset(root=dataset.root, images=[im for p in parts for im in p.images], queries=[q for p in parts for q in p.queries], name=f"{dataset.name}:{split}")


def split_queries(config: SearchEvalConfig) -> tuple[Dataset, list[tuple[RetrievalQuery, list[Target]]], int]:
    """The split, its answerable queries with their targets (first ``limit``), and how many were left out."""
    data = Path(config.data)
    if not (data / QUERIES_FILE).is_file():
        raise InvalidInputError(f"{data / QUERIES_FILE} does not exist; engine eval search needs a corpus with queries (e.g. from `engine synth DIR`)")
    dataset = _splits(read_dataset(data), config.split)  # AnnotationError when annotations.jsonl is missing or bad
    if not dataset.images:
        raise InvalidInputError(f"split {config.split!r} of {data} has no images in {ANNOTATIONS_FILE}; choose train, val or test")
    regions = {r.id: (im.image, r.box) for im in dataset.images for r in im.regions}
    objects = {o.id: (im.image, o.box) for im in dataset.images for o in im.objects}
    paired = [(q, _targets(q, regions, objects)) for q in dataset.queries]
    answerable = [(q, t) for q, t in paired if t]
    if not answerable:
        raise InvalidInputError(f"split {config.split!r} of {data} has no query with a positive in another image of the split ({len(dataset.queries)} queries in all)")
    chosen = answerable[: config.limit] if config.limit else answerable
    return dataset, chosen, len(paired) - len(answerable)


def _measure(run_query, query: RetrievalQuery, targets: list[Target], k: int) -> QueryOutcome:  # noqa: ANN001
    """One query's outcome; a query the engine refuses (:class:`EngineError`) is a miss with ``refused=True``,
    as a user gets no hit for it (its time is that of the refusal). A model that cannot be loaded
    (:class:`CheckpointError`, e.g. a wrong ``--grn`` or ``--san`` file) is not a refusal: it ends the run."""
    started = time.perf_counter()
    try:
        shown, deep, seconds = run_query(query)
    except CheckpointError:
        raise
    except EngineError as exc:
        log.debug("query %s refused: %s", query.region_id, exc)
        return QueryOutcome(box_at_1=False, box_at_k=False, img_at_1=False, img_at_k=False, rank=float("inf"), seconds=time.perf_counter() - started, refused=True)
    box1, boxk, img1, imgk = score_hits(shown, targets, k)
    return QueryOutcome(box_at_1=box1, box_at_k=boxk, img_at_1=img1, img_at_k=imgk, rank=first_right_rank(deep, targets), seconds=seconds)


def _query_runner(engine, links: Path, config: SearchEvalConfig):  # noqa: ANN001, ANN202
    """``query -> (hits shown (k), hits of the deeper search, seconds of the shown search)``."""
    text_only = config.mode == "text"

    def search(query: RetrievalQuery, k: int) -> list[HitRef]:
        if text_only:  # no query image to exclude by hash: one more hit, then drop the query's own image
            hits = engine.search(text=query.text, k=k + 1)
        else:
            text = query.text if config.mode == "region+text" else None
            hits = engine.search(image=links / query.image, region=query.region, text=text, k=k, exclude_self=True)
        refs = [(corpus_path(h.image, links), tuple(h.box)) for h in hits]
        return [r for r in refs if r[0] != query.image][:k]

    def run(query: RetrievalQuery) -> tuple[list[HitRef], list[HitRef], float]:
        started = time.perf_counter()
        shown = search(query, config.k)
        seconds = time.perf_counter() - started
        return shown, search(query, config.depth), seconds

    return run


def corpus_path(image: str, links: Path) -> str:
    """An indexed image's path relative to the folder of links ``links``: its path in ``annotations.jsonl``."""
    try:
        return Path(image).relative_to(links).as_posix()
    except ValueError:  # not one of the split's links (cannot happen with an index this run checked)
        return Path(image).as_posix()


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class _Indexed:
    """An engine over an index of exactly the split's images, and how that index came about."""

    engine: Any
    links: Path
    reused: bool
    temporary: bool
    seconds: float


@contextmanager
def _indexed(config: SearchEvalConfig, images: Sequence[str]) -> Iterator[_Indexed]:
    """The split's index (default settings). ``config.index_dir``: built there when it is missing or
    empty, reused when it holds exactly these images, else (with a warning) a temporary one, as without it."""
    target = Path(config.index_dir) if config.index_dir is not None else None
    if target is not None and _usable(target, Path(config.data), images, config.features):
        with _engine_over(config, target, images, temporary=False) as out:
            yield out
        return
    if target is not None:
        _warn(f"--index {target} holds other images or settings than split {config.split!r} of {config.data}; indexing into a temporary folder instead (nothing in {target} is changed)")
    with tempfile.TemporaryDirectory(prefix="engine-eval-search-") as tmp:
        with _engine_over(config, Path(tmp) / "index", images, temporary=True) as out:
            yield out


@contextmanager
def _engine_over(config: SearchEvalConfig, index_dir: Path, images: Sequence[str], *, temporary: bool) -> Iterator[_Indexed]:
    from engine.api import Engine
    from engine.config import EngineConfig, IndexConfig

    reused = index_dir.is_dir() and any(index_dir.iterdir())
    links = _link_split(Path(config.data), images, index_dir / LINKS_FOLDER)
    started = time.perf_counter()
    settings = EngineConfig(device=config.device, features=config.features)
    if config.layout_weight is not None:
        settings = replace(settings, layout_weight=config.layout_weight)
    if config.layout_shortlist is not None:
        settings = replace(settings, layout_shortlist=config.layout_shortlist)
    if config.instance_shortlist is not None:
        settings = replace(settings, instance_shortlist=config.instance_shortlist)
    if config.features.key_version != RegionFeatureConfig().key_version:
        settings = replace(settings, instance_head=None)  # the shipped head reads the default key only (an ablation of the key)
    if config.instance_weight is not None:
        settings = replace(settings, instance_weight=config.instance_weight)
    if config.concept_weight is not None:
        settings = replace(settings, concept_weight=config.concept_weight)
    if config.san_gate is not None:
        settings = replace(settings, san_gate=config.san_gate)
    if config.projection_weight is not None:
        settings = replace(settings, projection_weight=config.projection_weight)
    if config.proposal_weight is not None:
        settings = replace(settings, proposal_weight=config.proposal_weight)
    if config.san_weight is not None:
        settings = replace(settings, san_weight=config.san_weight)
    if config.combined_san_weight is not None:
        settings = replace(settings, combined_san_weight=config.combined_san_weight)
    if config.san_text_gate is not None:
        settings = replace(settings, san_text_gate=tuple(config.san_text_gate))
    if config.san_checkpoint is not None:
        settings = replace(settings, san_checkpoint=Path(config.san_checkpoint))
    if config.grn_checkpoint is not None:
        settings = replace(settings, grn_checkpoint=Path(config.grn_checkpoint))
    with Engine(index_dir, config=settings) as engine:
        summary = engine.index(links, config=IndexConfig(), progress=config.progress)  # a reused index: nothing to do
        if summary.errors:
            raise InvalidInputError(f"{summary.errors} image(s) of split {config.split!r} could not be indexed; see engine info --index {index_dir} --errors")
        yield _Indexed(engine=engine, links=links.resolve(), reused=reused, temporary=temporary, seconds=time.perf_counter() - started)


def _usable(index_dir: Path, data: Path, images: Sequence[str], features: RegionFeatureConfig) -> bool:
    """Whether ``index_dir`` may be built or reused: missing or empty, or an index of exactly the links to
    ``images`` with the visual key of ``features``."""
    from indexer.store import IndexStore

    if not index_dir.exists() or (index_dir.is_dir() and not any(index_dir.iterdir())):
        return True
    links = (index_dir / LINKS_FOLDER).resolve()
    expected = {str(links / rel) for rel in images}
    if not all(_links_to(links / rel, data / rel) for rel in images):
        return False
    try:
        with IndexStore.open(index_dir) as store:
            known = store.known_images(os.sep)
            models = store.models()
            key = store.visual_key
    except IndexNotFoundError:
        return False
    if key != _visual_key(features):
        return False
    indexed = {p for p, row in known.items() if row[3] == "indexed"}
    return indexed == expected and len(known) == len(expected) and str(models.get("proposals", "")).startswith("rpn")


def _links_to(link: Path, file: Path) -> bool:
    try:
        return link.is_symlink() and link.resolve() == file.resolve()
    except OSError:
        return False


def _link_split(data: Path, images: Sequence[str], out: Path) -> Path:
    """A folder of symbolic links ``out/REL -> data/REL`` for the split's images (made or completed)."""
    for rel in images:
        link = out / rel
        source = (data / rel).resolve()
        if not source.is_file():
            raise InvalidInputError(f"image {data / rel} of {ANNOTATIONS_FILE} does not exist")
        if link.is_symlink() and link.resolve() == source:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(source, link)
    return out


def _warn(message: str) -> None:
    """A warning in the log (the CLI shows warnings on stderr)."""
    log.warning(message)


# --------------------------------------------------------------------------- output


def _visual_key(features: RegionFeatureConfig) -> str:
    from indexer.component_configs import BackboneConfig, visual_key_version

    return visual_key_version(BackboneConfig(), features)


def _json_interval(interval: Interval) -> dict[str, Any]:
    def num(v: float) -> float | None:
        return None if not np.isfinite(v) else round(float(v), 6)

    return {"value": num(interval.value), "low": num(interval.low), "high": num(interval.high), "n": interval.n}


def _default_max_per_image() -> int:
    from query.filters import DEFAULT_MAX_PER_IMAGE

    return DEFAULT_MAX_PER_IMAGE


def _show(value: float, name: str, depth: int) -> str:
    if not np.isfinite(value):
        return f"> {depth}"
    if name.startswith(("box@", "img@")):
        return f"{value:.3f}"
    return f"{value:.1f}" if "ms" in name else f"{value:g}"


def metrics_table(result: SearchEvalResult) -> str:
    """The figures as a markdown table: metric, value, 95 % interval, queries."""
    depth = result.config.depth
    lines = ["| metric | value | 95 % CI | queries |", "| --- | ---: | ---: | ---: |"]
    for name, iv in result.metrics.items():
        lines.append(f"| {name} | {_show(iv.value, name, depth)} | [{_show(iv.low, name, depth)}, {_show(iv.high, name, depth)}] | {iv.n} |")
    return "\n".join(lines) + "\n"
