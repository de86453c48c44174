"""``engine train rpn``: train the class-agnostic region proposal network on cached backbone maps.

Targets are every region box and every object box of ``annotations.jsonl`` (DenseCap-style
proposals: single objects and multi-object regions alike), scaled into the resized frame the
backbone saw. The backbone never runs during training: its padded ``c3`` / ``c4`` / ``c5`` maps come
from the dataset's :class:`~indexer.feature_cache.FeatureCache` (built first when missing)
and are held in memory as float16.

Two stages: the anchor RPN first, then, with it frozen, the box head that refines and rescores its
proposals (:mod:`engine.models.rpn_box_head`: IoU-balanced samples of the first stage's inference
proposals, their IoU and box deltas to the target they overlap most); ``--init rpn.pt`` keeps a trained
first stage and trains the box head only. Images of the ``train`` split train; after each epoch of each stage the recall@100 (IoU > 0.5) of the ``val``
split's region and object boxes picks the best epoch; the ``test`` split's recall at 10 / 50 / 100 /
300 proposals, regions and objects separately, goes into the manifest.

Speed: 12 epochs over the 1195 training images of the 1500-image synthetic corpus take about 6 minutes on
2 CPU cores (about 30 s per epoch); the box head's epochs over both worlds' 3,308 train images about 1 minute each. On a CPU shared with other processes, run with ``OMP_NUM_THREADS=1``:
oversubscribed OpenMP threads made the same epoch several times slower here.
"""
from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.datasets.annotations import read_annotations
from engine.datasets.types import ImageAnn
from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest, save_checkpoint
from engine.imaging import resized_size
from engine.models.rpn import MODEL_NAME, MODEL_VERSION, ProposalNetwork, RpnConfig
from engine.protocols.proposals import DEFAULT_NS, propose_images, recall_table
from engine.training.loop import FitResult, fit
from engine.training.options import TrainOptions
from indexer.backbone import BackboneConfig, create_backbone
from indexer.feature_cache import CachedImage, FeatureCache
from indexer.region_features import RegionFeatureExtractor

__all__ = ["RpnTrainConfig", "DEFAULT_EPOCHS", "train_rpn"]

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 12
DEFAULT_OUT = Path("rpn.pt")
VAL_METRIC = "recall@100"


@dataclass(frozen=True)
class RpnTrainConfig:
    """Optimisation settings of :func:`train_rpn` (the architecture is :class:`RpnConfig`)."""

    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_proposals: int = 100
    box_head: int = 512  # the box head's settings: RpnConfig; chosen on the val splits (README, issue 15)
    box_head_epochs: int = 8
    box_head_lr: float = 1e-3
    refine_steps: int = 2
    quality_weight: float = 0.5
    refine_top: int = 500
    roi_sampling: int = 1
    box_rank: int = 64

    def box_head_settings(self) -> dict[str, Any]:
        """The :class:`RpnConfig` fields of the box head these settings train."""
        return {name: getattr(self, name) for name in ("box_head", "refine_steps", "quality_weight", "refine_top", "roi_sampling", "box_rank")}


@dataclass(frozen=True)
class _Item:
    image: str
    size: tuple[int, int]  # original (w, h)
    frame: tuple[int, int]  # resized (w, h)
    maps: dict[str, torch.Tensor]  # float16 [C, H, W]
    targets: torch.Tensor  # float32 [G, 4] resized-frame pixels

    def get_cached(self) -> CachedImage:
        return CachedImage(image=self.image, size=self.size, maps=self.maps)  # type: ignore[arg-type]


class _Memory:
    """The in-memory maps, with the ``get(image)`` interface of :class:`FeatureCache`."""

    def __init__(self, items: Sequence[_Item]) -> None:
        self._by_image = {it.image: it for it in items}

    def get(self, image: str) -> CachedImage:
        return self._by_image[image].get_cached()

    def item(self, image: str) -> _Item:
        return self._by_image[image]


@dataclass(frozen=True)
class _Corpus:
    """One training dataset's splits and in-memory maps. With several datasets each image's name is
    prefixed by its dataset's tag (``shapes:images/000001.jpg``) so that equal relative paths stay apart."""

    tag: str
    train: list[ImageAnn]
    val: list[ImageAnn]
    val_split: str
    test: list[ImageAnn]
    items: list[_Item]


def _load_corpus(data: Path, extractor: RegionFeatureExtractor, config: RpnConfig, options: TrainOptions, *, tagged: bool) -> _Corpus:
    """Read ``data``'s annotations, build its backbone feature cache if needed and load its maps."""
    data = Path(data)
    by_split: dict[str, list[ImageAnn]] = defaultdict(list)
    for ann in read_annotations(data):
        by_split[ann.split or "none"].append(ann)
    train = by_split.get("train", [])
    if not train:
        raise InvalidInputError(f"{data} has no images of split 'train' (splits: {sorted(by_split)}); give each image a \"split\" in annotations.jsonl, e.g. with `engine synth`")
    val, val_split = by_split.get("val", []), "val"
    if not val:
        log.warning("%s has no 'val' images: the best epoch is chosen on the training images", data)
        val, val_split = train, "train"
    test = by_split.get("test", [])
    cache = FeatureCache(data, extractor, levels=config.levels, cache_dir=options.cache_dir)
    needed = train + ([] if val_split == "train" else val) + test
    cache.build(needed, progress=options.progress)
    tag = data.resolve().name
    items: list[_Item] = []
    renamed: dict[str, ImageAnn] = {}
    for ann in needed:
        key = f"{tag}:{ann.image}" if tagged else ann.image
        items.append(replace(_load_item(cache, ann, config), image=key))
        renamed[ann.image] = replace(ann, image=key)
    return _Corpus(
        tag=tag,
        train=[renamed[a.image] for a in train],
        val=[renamed[a.image] for a in val],
        val_split=val_split,
        test=[renamed[a.image] for a in test],
        items=items,
    )


def _test_metrics(network: ProposalNetwork, memory: _Memory, images: Sequence[ImageAnn], prefix: str) -> dict[str, float]:
    """Recall of ``images``' region and object boxes at :data:`DEFAULT_NS` proposals, keys ``{prefix}test_{kind}@{n}``."""
    proposals = propose_images(network, memory, images, max_proposals=max(DEFAULT_NS))
    table = recall_table(proposals, images, DEFAULT_NS)
    out: dict[str, float] = {f"{prefix}test_images": table["images"]}
    for kind in ("regions", "objects"):
        for n, value in table[kind].items():
            out[f"{prefix}test_{kind}@{n}"] = value
    log.info("RPN test recall %s(%d images): regions %s, objects %s", prefix, len(images), table["regions"], table["objects"])
    return out


def train_rpn(options: TrainOptions, *, config: RpnConfig | None = None, train_config: RpnTrainConfig = RpnTrainConfig()) -> Manifest:
    """Train a :class:`ProposalNetwork` on ``options.data`` and save its best epoch to ``options.out`` (default ``rpn.pt``).

    Two stages: the anchor RPN (default 12 epochs), then, with it frozen, the box head that refines and rescores
    its proposals (:mod:`engine.models.rpn_box_head`, default ``train_config.box_head_epochs``); ``options.epochs``
    sets both. Each stage keeps its best epoch by the val split's recall@100. ``options.init`` skips the first stage: that checkpoint's
    anchor RPN is kept as it is and only the box head trains. ``config.box_head`` 0 trains the first stage only.

    Returns the saved checkpoint's :class:`Manifest`; its metrics hold the best validation recall@100 and the
    test split's recall of regions and objects at 10 / 50 / 100 / 300 proposals (``test_regions@N``,
    ``test_objects@N``). Seeds ``random``, ``numpy`` and ``torch`` from ``options.seed`` before each stage.
    """
    start = time.perf_counter()
    _seed_everything(options.seed)
    device = resolve_device(options.device)
    data = Path(options.data)
    out = Path(options.out) if options.out is not None else DEFAULT_OUT
    epochs = options.epochs if options.epochs is not None else DEFAULT_EPOCHS

    backbone_config = BackboneConfig()
    backbone = create_backbone(backbone_config, device=device)
    initial: tuple[ProposalNetwork, Manifest] | None = None
    if options.init is not None:
        initial = _from_init(Path(options.init), train_config)
        config = initial[0].config
    elif config is None:
        config = RpnConfig(
            in_channels=tuple(backbone.channels[lvl] for lvl in RpnConfig.levels),
            strides=tuple(backbone.strides[lvl] for lvl in RpnConfig.levels),
            offsets=tuple(backbone.offsets[lvl] for lvl in RpnConfig.levels),
            backbone=backbone.version,
            max_size=backbone.max_size,
            **train_config.box_head_settings(),
        )
    if config.backbone != backbone.version:
        raise InvalidInputError(f"the RPN to train reads {config.backbone} maps, but the backbone is {backbone.version}; train from scratch (without --init)")
    extractor = RegionFeatureExtractor(backbone=backbone)
    corpora = [_load_corpus(path, extractor, config, options, tagged=len(options.datasets) > 1) for path in options.datasets]
    train_images = [ann for c in corpora for ann in c.train]
    val_images = [ann for c in corpora for ann in c.val]
    val_split = "val" if all(c.val_split == "val" for c in corpora) else "train"
    test_images = [ann for c in corpora for ann in c.test]
    memory = _Memory([it for c in corpora for it in c.items])
    train_items = [memory.item(a.image) for a in train_images]
    log.info("RPN training on %d images (%d val from %r, %d test) of %d dataset(s), device %s", len(train_items), len(val_images), val_split, len(test_images), len(corpora), device)

    def validate(model: ProposalNetwork) -> dict[str, float]:
        proposals = propose_images(model, memory, val_images, max_proposals=train_config.val_proposals)
        n = train_config.val_proposals
        table = recall_table(proposals, val_images, (n,))
        return {VAL_METRIC: _combined_recall(table, val_images, n), f"regions@{n}": table["regions"][n], f"objects@{n}": table["objects"][n]}

    extra: dict[str, Any] = {"train_images": len(train_items), "val_images": len(val_images), "device": str(device), "batch_size": train_config.batch_size, "weight_decay": train_config.weight_decay}
    if initial is None:
        network = ProposalNetwork(config=config).to(device)
        if network.box_head is not None:
            network.box_head.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=train_config.lr, weight_decay=train_config.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=train_config.lr * 0.05)

        def batches(epoch: int) -> Iterator[list[_Item]]:
            return _batches(train_items, train_config.batch_size, np.random.default_rng([options.seed, epoch]))

        def loss_fn(model: ProposalNetwork, batch: list[_Item]) -> torch.Tensor:
            losses = model.loss(_stack_maps(batch, config, device), [it.frame for it in batch], [it.targets for it in batch])
            return losses["objectness"] + losses["box"]

        with _first_stage_only(network):
            result = fit(network, batches=batches, loss_fn=loss_fn, validate=validate, metric=VAL_METRIC, epochs=epochs, optimizer=optimizer, scheduler=scheduler, progress=options.progress, desc="rpn", device=device)
        extra.update(epochs=epochs, lr=train_config.lr, history=result.history)
        metrics: dict[str, Any] = {"best_epoch": result.best_epoch, f"val_{VAL_METRIC}": result.best_metrics[VAL_METRIC], "val_split": val_split}
    else:
        network, init_manifest = initial
        network = network.to(device)
        first = init_manifest.extra or {}
        extra.update(epochs=first.get("epochs"), lr=first.get("lr"), history=first.get("history", []))
        extra["init"] = {"checkpoint": str(options.init), "sha256": init_manifest.sha256, "command": init_manifest.command, "seconds": first.get("seconds")}
        metrics = {"best_epoch": (init_manifest.metrics or {}).get("best_epoch"), "val_split": val_split}
    if network.box_head is not None:
        _seed_everything(options.seed)
        box_epochs = options.epochs if options.epochs is not None else train_config.box_head_epochs
        box_result = _train_box_head(network, train_items, config, train_config, options, validate, device, box_epochs)
        extra.update(box_head_epochs=box_epochs, box_head_lr=train_config.box_head_lr, box_head_history=box_result.history)
        metrics.update({"box_head_best_epoch": box_result.best_epoch, f"val_{VAL_METRIC}": box_result.best_metrics[VAL_METRIC]})
    network.eval()

    if test_images:
        metrics.update(_test_metrics(network, memory, test_images, ""))
        if len(corpora) > 1:
            for c in corpora:
                if c.test:
                    metrics.update(_test_metrics(network, memory, c.test, f"{c.tag}/"))
    else:
        log.warning("%s has no 'test' images: the manifest records no test recall", data)
        metrics["test_images"] = 0
    seconds = time.perf_counter() - start
    extra["seconds"] = round(seconds, 1)
    manifest = options.manifest(MODEL_NAME, MODEL_VERSION, "rpn", config=config.to_dict(), metrics=metrics, extra=extra)
    saved = save_checkpoint(out, manifest, network.payload())
    log.info("saved RPN checkpoint %s (%d bytes) in %.1f s", out, saved.size_bytes, seconds)
    return saved


def _train_box_head(network: ProposalNetwork, items: Sequence[_Item], config: RpnConfig, train_config: RpnTrainConfig, options: TrainOptions, validate: Callable[[ProposalNetwork], dict[str, float]], device: torch.device, epochs: int) -> FitResult:
    """The second stage: the box head on the frozen first stage's inference proposals (:meth:`ProposalNetwork.box_head_loss`)."""
    assert network.box_head is not None
    network.requires_grad_(False)
    network.box_head.requires_grad_(True)
    optimizer = torch.optim.AdamW(network.box_head.parameters(), lr=train_config.box_head_lr, weight_decay=train_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=train_config.box_head_lr * 0.05)
    generator = torch.Generator().manual_seed(options.seed)

    def batches(epoch: int) -> Iterator[list[_Item]]:
        return _batches(items, train_config.batch_size, np.random.default_rng([options.seed, 1000 + epoch]))

    def loss_fn(model: ProposalNetwork, batch: list[_Item]) -> torch.Tensor:
        losses = model.box_head_loss(_stack_maps(batch, config, device), [it.frame for it in batch], [it.targets for it in batch], generator)
        return losses["quality"] + losses["box"]

    result = fit(network, batches=batches, loss_fn=loss_fn, validate=validate, metric=VAL_METRIC, epochs=epochs, optimizer=optimizer, scheduler=scheduler, progress=options.progress, desc="rpn box head", device=device)
    network.requires_grad_(True)
    return result


@contextmanager
def _first_stage_only(network: ProposalNetwork) -> Iterator[None]:
    """While training the first stage, the network proposes (validation) without its untrained box head."""
    head = network.box_head
    network.box_head = None
    try:
        yield
    finally:
        network.box_head = head


def _from_init(path: Path, train_config: RpnTrainConfig) -> tuple[ProposalNetwork, Manifest]:
    """The network of checkpoint ``path`` with a fresh box head as ``train_config`` sets it (its own, if any, is dropped)."""
    from engine.models.checkpoint import read_manifest

    if train_config.box_head <= 0:
        raise InvalidInputError("--init trains the box head of an RPN checkpoint's first stage; a config without a box head has nothing to train")
    old = ProposalNetwork.from_checkpoint(path)  # reads and verifies the file once
    manifest = read_manifest(path)
    network = ProposalNetwork(config=replace(old.config, **train_config.box_head_settings()))
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("box_head.")}
    missing, unexpected = network.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("box_head.") for k in missing), (missing, unexpected)
    return network, manifest


def _stack_maps(batch: Sequence[_Item], config: RpnConfig, device: torch.device) -> dict[str, torch.Tensor]:
    return {lvl: torch.stack([it.maps[lvl] for it in batch]).to(device=device, dtype=torch.float32) for lvl in config.levels}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_item(cache: FeatureCache, ann: ImageAnn, config: RpnConfig) -> _Item:
    cached = cache.get(ann.image)
    w, h = cached.size
    nw, nh = resized_size(w, h, config.max_size)
    boxes = [r.box for r in ann.regions] + [o.box for o in ann.objects]
    arr = np.unique(np.asarray(boxes, np.float32).reshape(-1, 4), axis=0) * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    maps = {lvl: torch.from_numpy(np.ascontiguousarray(cached.maps[lvl], dtype=np.float16)) for lvl in config.levels}
    return _Item(image=ann.image, size=(w, h), frame=(nw, nh), maps=maps, targets=torch.from_numpy(arr))


def _batches(items: Sequence[_Item], batch_size: int, rng: np.random.Generator) -> Iterator[list[_Item]]:
    """Shuffled batches of images whose maps share one shape (so they stack without padding)."""
    groups: dict[tuple, list[_Item]] = defaultdict(list)
    for it in items:
        groups[tuple(m.shape for m in it.maps.values())].append(it)
    chunks: list[list[_Item]] = []
    for group in groups.values():
        order = rng.permutation(len(group))
        chunks.extend([group[j] for j in order[i : i + batch_size]] for i in range(0, len(group), batch_size))
    for k in rng.permutation(len(chunks)):
        yield chunks[k]


def _combined_recall(table: dict[str, Any], images: Sequence[ImageAnn], n: int) -> float:
    """Recall@n over all region and object boxes pooled (the validation metric), from a :func:`recall_table`."""
    counts = {kind: sum(len(getattr(im, kind)) for im in images) for kind in ("regions", "objects")}
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return sum(table[kind][n] * counts[kind] for kind in counts if counts[kind]) / total
