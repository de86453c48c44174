"""``engine train key-whitening``: fit the visual key's PCA-whitening (:mod:`engine.models.key_whitening`).

The un-whitened key of every region box of the ``train`` split's images is accumulated (mean and
covariance, streamed): the annotated object and region boxes, and, with ``boxes="annotations+proposals"``
(the default), the shipped RPN's top proposals too, since an index holds proposals, most of them
partial objects and background. Several ``--data`` folders (the shapes and the stamps worlds) are
pooled. The shrinkage is chosen on the ``val`` split: each val query's box (``queries.jsonl``) against
the annotated boxes of the other val images, R@1 (a hit lies in a positive's image with IoU > 0.5 with
the positive's box); the test split's R@1 / R@10, un-whitened and whitened, go into the manifest.

Then the supervised step (:func:`engine.models.key_whitening.fit_matching`, Radenović et al. Eq. 4): each
train query's box and its positives in other train images show one thing; their keys' scatter around
the group mean, in the whitened space, is ``C_S``. Each ``λ`` of ``pairs_shrinks`` gives a candidate; the
best on val R@1 (then R@10) is kept, the PCA-whitening alone among the candidates, so that the step is
kept only where val says it helps.

Backbone maps come from each dataset's :class:`~indexer.feature_cache.FeatureCache` (built when
missing): no backbone runs once it exists. Fitting the 3,300 train images of both worlds takes a few
minutes on 2 CPU cores, most of it reading the cache.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.boxes import box_iou
from engine.datasets.types import Dataset, ImageAnn
from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest
from engine.models.key_whitening import MODEL_NAME, MODEL_VERSION, CovarianceAccumulator, KeyWhitening, fit_matching, fit_whitening, matching_scatter
from engine.training.options import TrainOptions, read_splits
from indexer.backbone import BackboneConfig, create_backbone
from indexer.component_configs import RegionFeatureConfig
from indexer.feature_cache import FeatureCache, cached_keys
from indexer.region_features import RegionFeatureExtractor

__all__ = ["WhiteningTrainConfig", "BOX_SOURCES", "train_key_whitening", "query_recall"]

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("key-whitening.pt")
BOX_SOURCES = ("annotations", "annotations+proposals")


@dataclass(frozen=True)
class WhiteningTrainConfig:
    """``boxes``: which boxes of the train images are fitted (:data:`BOX_SOURCES`); ``proposals``: the RPN's
    top proposals per image then; ``shrinks``: the shrinkages tried, the best on val kept (the first when
    no dataset has val queries); ``out_dim``: whitened key length (``None``: the key's own);
    ``pairs_shrinks``: the ``λ`` of the matching-pairs step tried (needs val queries and train queries)."""

    boxes: str = "annotations+proposals"
    proposals: int = 100
    shrinks: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
    out_dim: int | None = None
    pairs_shrinks: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)  # λ of the matching-pairs step tried on val; () skips it

    def __post_init__(self) -> None:
        if self.boxes not in BOX_SOURCES:
            raise InvalidInputError(f"boxes must be one of {', '.join(BOX_SOURCES)}, got {self.boxes!r}")
        if not self.shrinks:
            raise InvalidInputError("at least one shrinkage is needed")


@dataclass(frozen=True)
class _Split:
    """One split's annotated boxes and their un-whitened keys, for the query recall."""

    keys: np.ndarray  # [N, d]
    images: list[str]  # per row
    boxes: np.ndarray  # [N, 4]
    queries: list[tuple[np.ndarray, str, list[tuple[str, np.ndarray]]]]  # (key, image, positives (image, box))


def train_key_whitening(options: TrainOptions, config: WhiteningTrainConfig = WhiteningTrainConfig()) -> Manifest:
    """Fit the whitening on ``options.datasets``' train splits, choose the shrinkage on val, write the checkpoint."""
    if options.epochs is not None:
        raise InvalidInputError("key-whitening is fitted in closed form: it takes no --epochs")
    start = time.perf_counter()
    device = resolve_device(options.device)
    backbone_config = BackboneConfig()
    backbone = create_backbone(backbone_config, device=device)
    extractor = RegionFeatureExtractor(backbone=backbone, config=replace(RegionFeatureConfig(), key_whitening=None))
    recipe = f"{backbone.name}:{extractor.config.key_recipe}"
    rpn = None
    if config.boxes == "annotations+proposals":
        from engine.models.registry import load_model

        rpn = load_model(None, family="rpn", device=device)
    stats = CovarianceAccumulator(extractor.dim)
    vals: list[_Split] = []
    tests: list[_Split] = []
    groups: list[np.ndarray] = []
    fitted_boxes = 0
    for data in options.datasets:
        dataset, train, val, test = read_splits(data)
        levels = sorted({*extractor.levels, *(rpn.config.levels if rpn is not None else ())})
        cache = FeatureCache(Path(data), extractor, levels=levels, cache_dir=options.cache_dir)
        cache.build(train.images + val.images + test.images, progress=options.progress)
        for keys in _train_keys(extractor, cache, train.images, rpn, config, progress=options.progress):
            stats.add(keys)
            fitted_boxes += len(keys)
        if config.pairs_shrinks and train.queries:
            groups.extend(_matching_groups(extractor, cache, train))
        if val.queries:
            vals.append(_split_keys(extractor, cache, val))
        if test.queries:
            tests.append(_split_keys(extractor, cache, test))
    log.info("fitting the key whitening on %d boxes of %d dataset(s)", fitted_boxes, len(options.datasets))

    candidates = {s: fit_whitening(stats, recipe=recipe, shrink=s, out_dim=config.out_dim) for s in config.shrinks}
    val_recall = {s: _pooled_recall(vals, w) for s, w in candidates.items()} if vals else {}
    shrink = max(config.shrinks, key=lambda s: (val_recall[s]["r1"], val_recall[s]["r10"])) if vals else config.shrinks[0]
    whitening = candidates[shrink]
    chosen = val_recall.get(shrink)
    metrics: dict[str, Any] = {"shrink": shrink, "fitted_boxes": fitted_boxes}
    if vals and config.pairs_shrinks and any(len(g) > 1 for g in groups):
        scatter, boxes = matching_scatter(whitening, groups)
        matched = {lam: fit_matching(whitening, scatter, pairs_shrink=lam, boxes=boxes) for lam in config.pairs_shrinks}
        pair_recall = {lam: _pooled_recall(vals, w) for lam, w in matched.items()}
        plain = val_recall[shrink]
        best = max(config.pairs_shrinks, key=lambda lam: (pair_recall[lam]["r1"], pair_recall[lam]["r10"]))
        metrics["pairs_boxes"] = boxes
        metrics["val_r1_pca_only"] = plain["r1"]
        metrics["val_r1_by_pairs_shrink"] = {str(lam): round(r["r1"], 4) for lam, r in pair_recall.items()}
        if (pair_recall[best]["r1"], pair_recall[best]["r10"]) > (plain["r1"], plain["r10"]):
            whitening, chosen = matched[best], pair_recall[best]
        metrics["pairs_shrink"] = whitening.config.pairs_shrink
    if vals:
        metrics["val_queries"] = chosen["queries"]
        metrics["val_r1"] = chosen["r1"]
        metrics["val_r1_by_shrink"] = {str(s): round(r["r1"], 4) for s, r in val_recall.items()}
        metrics["val_r1_unwhitened"] = _pooled_recall(vals, None)["r1"]
    if tests:
        raw, white = _pooled_recall(tests, None), _pooled_recall(tests, whitening)
        metrics.update({"test_queries": white["queries"], "test_r1": white["r1"], "test_r10": white["r10"], "test_r1_unwhitened": raw["r1"], "test_r10_unwhitened": raw["r10"]})
    seconds = time.perf_counter() - start
    manifest = options.manifest(
        MODEL_NAME,
        MODEL_VERSION,
        "key-whitening",
        config=whitening.config.to_dict(),
        metrics=metrics,
        extra={"boxes": config.boxes, "proposals": config.proposals if rpn is not None else 0, "shrinks": list(config.shrinks), "pairs_shrinks": list(config.pairs_shrinks), "seconds": round(seconds, 1), "device": str(device)},
    )
    out = Path(options.out) if options.out is not None else DEFAULT_OUT
    saved = whitening.save(out, manifest)
    log.info("saved key whitening %s (%d bytes) in %.1f s", out, saved.size_bytes, seconds)
    return saved


def query_recall(split: _Split, whitening: KeyWhitening | None, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """R@k of ``split``'s queries against its annotated boxes in other images (module docstring)."""
    gallery = split.keys if whitening is None else whitening.apply(split.keys)
    images = np.asarray(split.images)
    hits = {k: 0 for k in ks}
    for key, image, positives in split.queries:
        q = key[None] if whitening is None else whitening.apply(key[None])
        scores = gallery @ q[0]
        scores[images == image] = -np.inf
        order = np.argsort(-scores)[: max(ks)]
        first = next((rank for rank, j in enumerate(order) if _right(split.images[j], split.boxes[j], positives)), None)
        for k in ks:
            hits[k] += first is not None and first < k
    n = max(len(split.queries), 1)
    return {"queries": len(split.queries), **{f"r{k}": hits[k] / n for k in ks}}


def _pooled_recall(splits: Sequence[_Split], whitening: KeyWhitening | None) -> dict[str, float]:
    """Query recall of several datasets' splits, weighted by their queries."""
    parts = [query_recall(s, whitening) for s in splits]
    n = sum(p["queries"] for p in parts)
    return {"queries": n, **{k: sum(p[k] * p["queries"] for p in parts) / max(n, 1) for k in ("r1", "r10")}}


def _right(image: str, box: np.ndarray, positives: Sequence[tuple[str, np.ndarray]]) -> bool:
    return any(image == p_image and box_iou(box[None], p_box[None])[0, 0] > 0.5 for p_image, p_box in positives)


def _annotated(ann: ImageAnn) -> np.ndarray:
    boxes = [o.box for o in ann.objects] + [r.box for r in ann.regions]
    arr = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.unique(arr[(arr[:, 2] > arr[:, 0]) & (arr[:, 3] > arr[:, 1])], axis=0)


def _train_keys(extractor: RegionFeatureExtractor, cache: FeatureCache, images: Sequence[ImageAnn], rpn: Any, config: WhiteningTrainConfig, *, progress: bool) -> Iterator[np.ndarray]:
    """The un-whitened keys of each train image's boxes (annotated, and the RPN's proposals when given);
    each image's maps are read from the cache once, for both."""
    from engine.protocols.proposals import propose_images

    chunk = 32  # a few images at a time: the maps of a whole split do not fit in memory
    with tqdm(total=len(images), desc="whitening keys", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(images), chunk):
            part = images[start : start + chunk]
            loaded = {ann.image: cache.get(ann.image) for ann in part}
            proposed = propose_images(rpn, SimpleNamespace(get=loaded.__getitem__), part, max_proposals=config.proposals) if rpn is not None else [None] * len(part)
            for ann, props in zip(part, proposed):
                boxes = _annotated(ann)
                if props is not None and len(props[0]):
                    boxes = np.concatenate([boxes, np.asarray(props[0], np.float64)])
                if len(boxes):
                    yield cached_keys(extractor, loaded[ann.image], boxes)
                bar.update(1)


def _split_keys(extractor: RegionFeatureExtractor, cache: FeatureCache, split: Dataset) -> _Split:
    """The annotated boxes of ``split``'s images with their keys, and its queries' keys and positives
    (each image's maps read once: its annotated boxes and its queries' boxes in one pooling)."""
    where = {r.id: (im.image, np.asarray(r.box, np.float64)) for im in split.images for r in im.regions}
    asked: dict[str, list] = {}
    for q in split.queries:
        positives = [where[p] for p in q.positives if p in where and where[p][0] != q.image]
        if positives:
            asked.setdefault(q.image, []).append((np.asarray(q.region, np.float64), positives))
    keys, images, boxes, queries = [], [], [], []
    for ann in split.images:
        annotated, wanted = _annotated(ann), asked.get(ann.image, [])
        if not len(annotated) and not wanted:
            continue
        both = np.concatenate([annotated, np.asarray([box for box, _ in wanted], np.float64).reshape(-1, 4)])
        found = cached_keys(extractor, cache.get(ann.image), both)
        keys.append(found[: len(annotated)])
        images.extend([ann.image] * len(annotated))
        boxes.append(annotated)
        queries.extend((key, ann.image, positives) for key, (_, positives) in zip(found[len(annotated) :], wanted))
    return _Split(keys=np.concatenate(keys), images=images, boxes=np.concatenate(boxes), queries=queries)


def _matching_groups(extractor: RegionFeatureExtractor, cache: FeatureCache, split: Dataset) -> list[np.ndarray]:
    """Per query of ``split`` with positives in other images: the un-whitened keys of its box and of those
    positives (boxes showing one thing in different photos). Each image's maps are read once."""
    where = {r.id: (im.image, np.asarray(r.box, np.float64)) for im in split.images for r in im.regions}
    wanted: dict[str, list[tuple[int, np.ndarray]]] = {}
    count = 0
    for q in split.queries:
        positives = [where[p] for p in q.positives if p in where and where[p][0] != q.image]
        if not positives:
            continue
        for image, box in [(q.image, np.asarray(q.region, np.float64)), *positives]:
            wanted.setdefault(image, []).append((count, box))
        count += 1
    members: list[list[np.ndarray]] = [[] for _ in range(count)]
    for image, asks in wanted.items():
        keys = cached_keys(extractor, cache.get(image), np.stack([box for _, box in asks]))
        for (group, _), key in zip(asks, keys):
            members[group].append(key)
    return [np.stack(m) for m in members]
