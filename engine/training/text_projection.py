"""``engine train text-projection``: learn the map from English into the visual key space
(:mod:`engine.models.text_projection`).

Pairs: every described region of the ``train`` split's images (``regions``: an object's description
such as "a round tower", or a phrase over several objects) and the engine's visual key of its box
(whitened, exactly as indexed), from each dataset's :class:`~indexer.feature_cache.FeatureCache` (built
when missing). Several ``--data`` folders (the shapes and the stamps worlds) are pooled. Sentence
vectors come from the frozen all-MiniLM-L6-v2, once per distinct text.

Training: InfoNCE with Adam, batches of 256 pairs; after every epoch the ``val`` split is searched —
each distinct description against all val regions, a hit being a region with that description —
and the epoch with the best pooled R@10 (then R@1) is kept. The test split's figures go into the
manifest. Both worlds' train splits (≈ 30K pairs) train in about a minute on 2 CPU cores once the
keys are read.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from engine.datasets.types import Dataset
from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest
from engine.models.text_projection import MODEL_NAME, MODEL_VERSION, ProjectionConfig, TextProjection, info_nce
from engine.training.options import TrainOptions, read_splits
from indexer.backbone import BackboneConfig, create_backbone
from indexer.component_configs import RegionFeatureConfig
from indexer.feature_cache import FeatureCache, cached_keys
from indexer.region_features import RegionFeatureExtractor

__all__ = ["ProjectionTrainConfig", "DescribedBoxes", "train_text_projection", "described_boxes", "text_recall"]

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("text-projection.pt")
DEFAULT_EPOCHS = 30


@dataclass(frozen=True)
class ProjectionTrainConfig:
    """``batch``: pairs per InfoNCE batch; ``lr`` / ``weight_decay``: Adam's; ``temperature``: InfoNCE's τ;
    ``proposals``: the shipped RPN's top proposals per image whose keys that show no annotated region
    become background (0: none); ``negatives``: background keys drawn into each batch's negatives."""

    batch: int = 256
    proposals: int = 30
    negatives: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05


@dataclass(frozen=True)
class DescribedBoxes:
    """One split's described regions: ``texts[i]`` describes the box whose unit visual key is ``keys[i]``."""

    texts: list[str]
    keys: np.ndarray  # [N, key_dim] float32, unit rows
    background: np.ndarray  # [M, key_dim] float32, unit keys of proposals that show no annotated region (negatives)

    def __len__(self) -> int:
        return len(self.texts)


def train_text_projection(options: TrainOptions, config: ProjectionTrainConfig = ProjectionTrainConfig()) -> Manifest:
    """Train the projection on ``options.datasets``' train splits, keep the best epoch on val, write the checkpoint."""
    from engine.models.minilm import MINILM_VERSION, MiniLMEncoder

    start = time.perf_counter()
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    backbone = create_backbone(BackboneConfig(), device=device)
    extractor = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig())
    rpn = None
    if config.proposals > 0:
        from engine.models.registry import load_model

        rpn = load_model(None, family="rpn", device=device)
    levels = sorted({*extractor.config.key_levels, *(rpn.config.levels if rpn is not None else ())})
    splits: dict[str, list[DescribedBoxes]] = {"train": [], "val": [], "test": []}
    for data in options.datasets:
        _, *parts = read_splits(data)
        cache = FeatureCache(Path(data), extractor, levels=levels, cache_dir=options.cache_dir)
        for name, split in zip(("train", "val", "test"), parts):
            cache.build(split.images, progress=options.progress)
            splits[name].append(described_boxes(extractor, cache, split, rpn=rpn, proposals=config.proposals, progress=options.progress))
    train = _pooled(splits["train"])
    if not len(train):
        raise InvalidInputError(f"the train splits of {', '.join(map(str, options.datasets))} hold no described regions to learn from")
    encoder = MiniLMEncoder(device=device)
    texts = sorted({t for part in splits.values() for boxes in part for t in boxes.texts})
    sentence = dict(zip(texts, encoder.encode(texts)))
    model = TextProjection(ProjectionConfig(key_version=f"{backbone.name}:{extractor.config.key_version}", text_encoder=MINILM_VERSION, text_dim=encoder.dim, key_dim=extractor.dim, temperature=config.temperature)).to(device)
    x = torch.from_numpy(np.stack([sentence[t] for t in train.texts])).to(device)
    y = torch.from_numpy(train.keys).to(device)
    groups = torch.from_numpy(np.unique(np.asarray(train.texts), return_inverse=True)[1]).to(device)
    background = torch.from_numpy(train.background).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)
    epochs = options.epochs or DEFAULT_EPOCHS
    best: tuple[tuple[float, float], int, dict[str, Any]] | None = None
    history = []
    for epoch in tqdm(range(1, epochs + 1), desc="text projection", unit="epoch", disable=not options.progress, dynamic_ncols=True):
        model.train()
        total = 0.0
        for batch in torch.randperm(len(x), generator=generator).split(config.batch):
            batch = batch.to(device)
            drawn = background[torch.randint(len(background), (config.negatives,), generator=generator).to(device)] if len(background) and config.negatives else None
            loss = info_nce(model(x[batch]), y[batch], groups[batch], config.temperature, drawn)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        model.eval()
        val = _pooled_recall(splits["val"], model, sentence) if any(len(v) for v in splits["val"]) else {"r1": 0.0, "r10": 0.0, "queries": 0}
        history.append({"epoch": epoch, "loss": round(total / len(x), 4), "val_r1": round(val["r1"], 4), "val_r10": round(val["r10"], 4)})
        score = (val["r10"], val["r1"])
        if best is None or score > best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    model.eval()
    metrics: dict[str, Any] = {"best_epoch": best[1], "train_pairs": len(train), "train_texts": len(set(train.texts))}
    val = _pooled_recall(splits["val"], model, sentence)
    metrics.update({"val_queries": val["queries"], "val_r1": val["r1"], "val_r10": val["r10"]})
    if any(len(t) for t in splits["test"]):
        test = _pooled_recall(splits["test"], model, sentence)
        metrics.update({"test_queries": test["queries"], "test_r1": test["r1"], "test_r10": test["r10"]})
    seconds = time.perf_counter() - start
    manifest = options.manifest(
        MODEL_NAME,
        MODEL_VERSION,
        "text-projection",
        config=model.config.to_dict(),
        metrics=metrics,
        extra={"epochs": epochs, "batch": config.batch, "proposals": config.proposals, "negatives": config.negatives, "background_keys": {"train": len(train.background)}, "lr": config.lr, "weight_decay": config.weight_decay, "history": history, "seconds": round(seconds, 1), "device": str(device)},
    )
    out = Path(options.out) if options.out is not None else DEFAULT_OUT
    saved = model.cpu().save(out, manifest)
    log.info("saved text projection %s (%d bytes) in %.1f s", out, saved.size_bytes, seconds)
    return saved


def described_boxes(extractor: RegionFeatureExtractor, cache: FeatureCache, split: Dataset, *, rpn: Any = None, proposals: int = 0, progress: bool = False) -> DescribedBoxes:
    """Every described region of ``split``'s images with the unit visual key of its box; with an ``rpn``, the
    keys of its top ``proposals`` boxes per image that overlap no annotated box (IoU < 0.5) as background.
    Each image's maps are read once."""
    from engine.boxes import box_iou
    from engine.protocols.proposals import propose_images

    texts: list[str] = []
    keys: list[np.ndarray] = []
    background: list[np.ndarray] = []
    chunk = 32  # a few images at a time: the maps of a whole split do not fit in memory
    with tqdm(total=len(split.images), desc=f"region keys ({split.name or 'split'})", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(split.images), chunk):
            part = split.images[start : start + chunk]
            loaded = {ann.image: cache.get(ann.image) for ann in part}
            proposed = propose_images(rpn, SimpleNamespace(get=loaded.__getitem__), part, max_proposals=proposals) if rpn is not None and proposals > 0 else [None] * len(part)
            for ann, props in zip(part, proposed):
                bar.update(1)
                regions = [r for r in ann.regions if r.description.strip() and r.box[2] > r.box[0] and r.box[3] > r.box[1]]
                annotated = np.asarray([r.box for r in ann.regions] + [o.box for o in ann.objects], np.float64).reshape(-1, 4)
                boxes = np.asarray([r.box for r in regions], np.float64).reshape(-1, 4)
                if props is not None and len(props[0]):
                    free = np.asarray(props[0], np.float64)
                    if len(annotated):
                        free = free[box_iou(free, annotated).max(axis=1) < 0.5]
                else:
                    free = np.zeros((0, 4), np.float64)
                if not len(boxes) and not len(free):
                    continue
                found = _unit(cached_keys(extractor, loaded[ann.image], np.concatenate([boxes, free])))
                keys.append(found[: len(boxes)])
                background.append(found[len(boxes) :])
                texts.extend(r.description for r in regions)
    empty = np.zeros((0, extractor.dim), np.float32)
    return DescribedBoxes(texts=texts, keys=np.concatenate(keys) if keys else empty, background=np.concatenate(background) if background else empty)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def text_recall(boxes: DescribedBoxes, model: TextProjection, sentence: dict[str, np.ndarray], ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """R@k of each distinct description of ``boxes`` searching all of them and the background keys (a hit:
    a box with that description)."""
    if not len(boxes):
        return {"queries": 0, **{f"r{k}": 0.0 for k in ks}}
    texts = np.asarray(boxes.texts + [""] * len(boxes.background))
    gallery = np.concatenate([boxes.keys, boxes.background])
    queries = sorted(set(boxes.texts))
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), 256):
        part = queries[start : start + 256]
        scores = model.apply(np.stack([sentence[t] for t in part])) @ gallery.T
        for row, text in zip(scores, part):
            top = np.argpartition(-row, max(ks) - 1)[: max(ks)] if len(row) > max(ks) else np.arange(len(row))
            order = top[np.argsort(-row[top], kind="stable")]
            right = np.nonzero(texts[order] == text)[0]
            for k in ks:
                hits[k] += bool(len(right)) and int(right[0]) < k
    return {"queries": len(queries), **{f"r{k}": hits[k] / len(queries) for k in ks}}


def _pooled_recall(parts: Sequence[DescribedBoxes], model: TextProjection, sentence: dict[str, np.ndarray]) -> dict[str, float]:
    """:func:`text_recall` of several datasets' splits (each searched on its own), weighted by their queries."""
    found = [text_recall(p, model, sentence) for p in parts]
    n = sum(f["queries"] for f in found)
    return {"queries": n, **{k: sum(f[k] * f["queries"] for f in found) / max(n, 1) for k in ("r1", "r10")}}


def _pooled(parts: Sequence[DescribedBoxes]) -> DescribedBoxes:
    return DescribedBoxes(texts=[t for p in parts for t in p.texts], keys=np.concatenate([p.keys for p in parts]), background=np.concatenate([p.background for p in parts]))
