"""``engine train instance-head``: train the region instance embedding (:mod:`engine.models.instance_head`).

Boxes and labels come from each dataset's ``train`` queries: a query's box and its positives (regions
of other images) show one thing; queries that share a region are merged (union-find), so the stamps
world's labels are its stamps and the shapes world's are its meanings. Each box's stored 7×7 map and
visual key are computed as indexing stores them, from the dataset's backbone feature cache (built
when missing). Training: supervised contrastive loss over batches of ``labels_per_batch`` labels ×
``boxes_per_label`` boxes. After each epoch the ``val`` queries (each query's box against the annotated
boxes of the other val images, R@1 then R@10: the protocol of ``engine train key-whitening``) pick the
best epoch; the test splits' R@1 / R@10, head and key, go into the manifest. Several ``--data`` folders
are pooled (labels kept apart per dataset).
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from engine.datasets.types import Dataset
from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest
from engine.models.instance_head import MODEL_NAME, MODEL_VERSION, InstanceHead, InstanceHeadConfig, supervised_contrastive
from engine.training.key_whitening import _annotated, _right
from engine.training.options import TrainOptions, read_splits
from indexer.backbone import BackboneConfig, create_backbone
from indexer.component_configs import RegionFeatureConfig
from indexer.feature_cache import FeatureCache, cached_keys, pool_region_maps
from indexer.region_features import RegionFeatureExtractor

__all__ = ["InstanceHeadTrainConfig", "DEFAULT_EPOCHS", "train_instance_head", "query_labels"]

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 15
DEFAULT_OUT = Path("instance-head.pt")


@dataclass(frozen=True)
class InstanceHeadTrainConfig:
    """Optimisation and architecture settings of :func:`train_instance_head`."""

    hidden: int = 512
    out_dim: int = 256
    temperature: float = 0.1
    labels_per_batch: int = 64
    boxes_per_label: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class _Boxes:
    maps: np.ndarray  # [N, C, S, S] float16
    keys: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N] int64


@dataclass(frozen=True)
class _Gallery:
    """A val or test split for the R@k measure: its annotated boxes and its queries."""

    maps: np.ndarray
    keys: np.ndarray
    images: list[str]
    boxes: np.ndarray
    queries: list[tuple[np.ndarray, np.ndarray, str, list[tuple[str, np.ndarray]]]]  # (map, key, image, positives)


def query_labels(split: Dataset) -> dict[int, int]:
    """Region id → label: each query's region and its positives share one label, and queries sharing a
    region are merged (union-find). Regions of no query have none."""
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    regions = {r.id for im in split.images for r in im.regions}
    for q in split.queries:
        ids = [i for i in (q.region_id, *q.positives) if i in regions]
        for other in ids[1:]:
            parent[find(ids[0])] = find(other)
        for i in ids:
            find(i)
    roots = sorted({find(i) for i in parent})
    index = {root: n for n, root in enumerate(roots)}
    return {i: index[find(i)] for i in parent}


def _features(extractor: RegionFeatureExtractor, cache: FeatureCache, image: str, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cached = cache.get(image)
    return pool_region_maps(extractor, cached, boxes).astype(np.float16), cached_keys(extractor, cached, boxes)


def _train_boxes(extractor: RegionFeatureExtractor, cache: FeatureCache, split: Dataset, offset: int) -> _Boxes:
    labels = query_labels(split)
    maps, keys, out = [], [], []
    for ann in split.images:
        chosen = [r for r in ann.regions if r.id in labels and r.box[2] > r.box[0] and r.box[3] > r.box[1]]
        if chosen:
            m, k = _features(extractor, cache, ann.image, np.asarray([r.box for r in chosen], np.float64))
            maps.append(m), keys.append(k)
            out += [labels[r.id] + offset for r in chosen]
    if not out:
        c, s, _ = extractor.map_shape
        return _Boxes(np.zeros((0, c, s, s), np.float16), np.zeros((0, extractor.dim), np.float32), np.zeros(0, np.int64))
    return _Boxes(np.concatenate(maps), np.concatenate(keys), np.asarray(out, np.int64))


def _gallery(extractor: RegionFeatureExtractor, cache: FeatureCache, split: Dataset) -> _Gallery:
    where = {r.id: (im.image, np.asarray(r.box, np.float64)) for im in split.images for r in im.regions}
    asked: dict[str, list] = {}
    for q in split.queries:
        positives = [where[p] for p in q.positives if p in where and where[p][0] != q.image]
        if positives:
            asked.setdefault(q.image, []).append((np.asarray(q.region, np.float64), positives))
    maps, keys, images, boxes, queries = [], [], [], [], []
    for ann in split.images:
        annotated, wanted = _annotated(ann), asked.get(ann.image, [])
        both = np.concatenate([annotated, np.asarray([b for b, _ in wanted], np.float64).reshape(-1, 4)])
        if not len(both):
            continue
        m, k = _features(extractor, cache, ann.image, both)
        n = len(annotated)
        maps.append(m[:n]), keys.append(k[:n]), boxes.append(annotated)
        images += [ann.image] * n
        queries += [(m[n + i], k[n + i], ann.image, positives) for i, (_, positives) in enumerate(wanted)]
    if not maps:
        return _Gallery(np.zeros((0,)), np.zeros((0,)), [], np.zeros((0, 4)), [])
    return _Gallery(np.concatenate(maps), np.concatenate(keys), images, np.concatenate(boxes), queries)


def _recall(gallery: _Gallery, head: InstanceHead | None) -> dict[str, float]:
    """R@1 / R@10 of the split's queries by the head's cosine (``None``: the visual key's)."""
    if not gallery.queries:
        return {"queries": 0, "r1": 0.0, "r10": 0.0}
    qmaps = np.stack([q[0] for q in gallery.queries])
    qkeys = np.stack([q[1] for q in gallery.queries])
    if head is None:
        g, q = gallery.keys, qkeys
    else:
        g, q = head.embed(gallery.maps, gallery.keys), head.embed(qmaps, qkeys)
    names = np.asarray(gallery.images)
    hits = {1: 0, 10: 0}
    for vec, (_, _, image, positives) in zip(q, gallery.queries):
        scores = g @ vec
        scores[names == image] = -np.inf
        order = np.argsort(-scores)[:10]
        first = next((r for r, j in enumerate(order) if _right(gallery.images[j], gallery.boxes[j], positives)), None)
        for k in hits:
            hits[k] += first is not None and first < k
    n = len(gallery.queries)
    return {"queries": n, "r1": hits[1] / n, "r10": hits[10] / n}


def _pooled(parts: Sequence[_Gallery], head: InstanceHead | None) -> dict[str, float]:
    found = [_recall(p, head) for p in parts]
    n = sum(f["queries"] for f in found)
    return {"queries": n, **{k: sum(f[k] * f["queries"] for f in found) / max(n, 1) for k in ("r1", "r10")}}


def train_instance_head(options: TrainOptions, config: InstanceHeadTrainConfig = InstanceHeadTrainConfig()) -> Manifest:
    """Train the head on ``options.datasets``' train queries, keep the best epoch on val, write the checkpoint."""
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    device = resolve_device(options.device)
    backbone = create_backbone(BackboneConfig(), device=device)
    extractor = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig())
    train_parts: list[_Boxes] = []
    vals: list[_Gallery] = []
    tests: list[_Gallery] = []
    offset = 0
    for data in options.datasets:
        _, train, val, test = read_splits(data)
        cache = FeatureCache(Path(data), extractor, levels=sorted(set(extractor.levels)), cache_dir=options.cache_dir)
        cache.build(train.images + val.images + test.images, progress=options.progress)
        part = _train_boxes(extractor, cache, train, offset)
        offset += int(part.labels.max()) + 1 if len(part.labels) else 0
        train_parts.append(part)
        vals.append(_gallery(extractor, cache, val))
        tests.append(_gallery(extractor, cache, test))
    maps = torch.from_numpy(np.concatenate([p.maps for p in train_parts]))
    keys = torch.from_numpy(np.concatenate([p.keys for p in train_parts]))
    labels = np.concatenate([p.labels for p in train_parts])
    by_label: dict[int, np.ndarray] = {}
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        if len(members) >= 2:
            by_label[int(label)] = members
    if len(by_label) < 2:
        raise InvalidInputError(f"the train splits of {', '.join(map(str, options.datasets))} hold fewer than two things shown in two boxes (queries with positives); the instance head has nothing to learn from")
    c, s, _ = extractor.map_shape
    head = InstanceHead(InstanceHeadConfig(key_version=f"{backbone.name}:{extractor.config.key_version}", map_shape=(c, s, s), key_dim=extractor.dim, hidden=config.hidden, out_dim=config.out_dim, temperature=config.temperature)).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    usable = np.asarray(sorted(by_label))
    per_batch = min(config.labels_per_batch, len(usable))
    steps = max(1, len(labels) // (per_batch * config.boxes_per_label))
    epochs = options.epochs or DEFAULT_EPOCHS
    labels_t = torch.from_numpy(labels)
    best: tuple[tuple[float, float], int, dict[str, Any]] | None = None
    history = []
    for epoch in tqdm(range(1, epochs + 1), desc="instance head", unit="epoch", disable=not options.progress, dynamic_ncols=True):
        head.train()
        total = 0.0
        for _ in range(steps):
            chosen = rng.choice(usable, size=per_batch, replace=False)
            batch = torch.from_numpy(np.concatenate([rng.choice(by_label[int(y)], size=config.boxes_per_label, replace=len(by_label[int(y)]) < config.boxes_per_label) for y in chosen]))
            loss = supervised_contrastive(head(maps[batch], keys[batch]), labels_t[batch].to(device), config.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        head.eval()
        val = _pooled(vals, head)
        history.append({"epoch": epoch, "loss": round(total / steps, 4), "val_r1": round(val["r1"], 4), "val_r10": round(val["r10"], 4)})
        score = (val["r1"], val["r10"])
        if best is None or score > best[0]:
            best = (score, epoch, copy.deepcopy(head.state_dict()))
    assert best is not None
    head.load_state_dict(best[2])
    head.eval()
    val, val_key = _pooled(vals, head), _pooled(vals, None)
    metrics: dict[str, Any] = {"best_epoch": best[1], "train_boxes": int(len(labels)), "train_labels": len(by_label), "val_queries": val["queries"], "val_r1": val["r1"], "val_r10": val["r10"], "val_r1_key": val_key["r1"], "val_r10_key": val_key["r10"]}
    if any(t.queries for t in tests):
        test, test_key = _pooled(tests, head), _pooled(tests, None)
        metrics.update({"test_queries": test["queries"], "test_r1": test["r1"], "test_r10": test["r10"], "test_r1_key": test_key["r1"], "test_r10_key": test_key["r10"]})
    seconds = time.perf_counter() - start
    manifest = options.manifest(
        MODEL_NAME,
        MODEL_VERSION,
        "instance-head",
        config=head.config.to_dict(),
        metrics=metrics,
        extra={"epochs": epochs, "steps_per_epoch": steps, "history": history, "seconds": round(seconds, 1), "device": str(device), **asdict(config)},
    )
    out = Path(options.out) if options.out is not None else DEFAULT_OUT
    saved = head.cpu().save(out, manifest)
    log.info("saved instance head %s (%d bytes) in %.1f s", out, saved.size_bytes, seconds)
    return saved
