"""``engine train san`` (and its ablations): stage 2 of SAN training (SAN §3.5) on cached backbone maps.

Stage 1 is ``engine train saliency``; its network is frozen here (the paper fine-tunes it in stage 2;
freezing keeps the indexed saliency grids and the shipped ``saliency.pt`` consistent, see ``docs/san.md``).

Training items come in two kinds, batched separately (a region's description is never a negative
of the image it lies in):

* **images**: the full-image box's RoIAlign ``c4`` map and saliency grid, paired with one of the
  image's ``captions`` (drawn anew each epoch);
* **regions**: each ``regions[]`` box's map and saliency grid, paired with its ``description``.

Two texts that are the same sentence (or, for regions with structured meanings, describe the same
meaning) are never each other's negatives. The loss is Eq. 10 with the hardest in-batch negatives
(after ``warmup_epochs`` epochs of the sum over all violating negatives, VSE++'s warm-up), plus
``global_weight`` × the same loss on ``(v, t_g)`` that trains the text-only search path. The
validation split's mR (mean of R@1/5/10 over the four directions) picks the best epoch.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest, save_checkpoint
from engine.models.san import METHODS, MODEL_NAME, MODEL_VERSION, SANet, method_config, triplet_loss
from engine.models.registry import family, load_model
from engine.models.word_features import TextWords, build_words
from engine.protocols.matching import MatchingItems, build_matching_items, evaluate_items
from engine.training.loop import fit
from engine.training.options import TrainOptions, read_splits

__all__ = ["SAN_NAMES", "SAN_ABLATIONS", "SANTrainConfig", "train_san"]

log = logging.getLogger(__name__)

SAN_ABLATIONS = tuple(f"san-{m}" for m in METHODS if m != "fv+ft")
"""Checkpoint / ``engine train`` names of the ablation rows (``san-gv+gt``, …); ``san`` is ``fv+ft``."""
SAN_NAMES = ("san", *SAN_ABLATIONS)
assert SAN_NAMES == family("san").names, "the model registry lists SAN's checkpoints"


def method_of(name: str) -> str:
    """The SAN method (``fv+ft``, ``gv+gt``, …) of a train / checkpoint name (``san``, ``san-gv+gt``, …)."""
    if name == "san":
        return "fv+ft"
    if name.startswith("san-") and name[4:] in METHODS:
        return name[4:]
    raise InvalidInputError(f"{name!r} is not a SAN model name; choose one of {', '.join(SAN_NAMES)}")


@dataclass(frozen=True)
class SANTrainConfig:
    """Optimisation settings (the model's own settings are in :class:`~engine.models.san.SANConfig`).

    Batches of 32: with 128 the hardest in-batch negative was too often a near-paraphrase of the
    positive on the synthetic corpus (validation mR 30 after 5 epochs against 42 with 32, measured).
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    min_word_count: int = 2


def _batches(items: MatchingItems, cfg: SANTrainConfig, rng: np.random.Generator, epoch: int) -> Iterator[dict[str, Any]]:
    """Batches of one kind each; an image's caption is drawn anew every epoch."""
    chunks = []
    for kind in ("image", "region"):
        rows = items.rows(kind)
        order = rows[rng.permutation(len(rows))]
        chunks += [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size) if len(order[i : i + cfg.batch_size]) >= 2]
    for c in rng.permutation(len(chunks)):
        rows = chunks[c]
        pick = [int(rng.integers(len(items.texts[r]))) for r in rows]
        yield {"rows": rows, "texts": [items.texts[r][j] for r, j in zip(rows, pick)], "keys": [items.keys[r][j] for r, j in zip(rows, pick)], "epoch": epoch}


class _Batcher:
    def __init__(self, items: MatchingItems, vocab: TextWords, cfg: SANTrainConfig) -> None:
        self.items = items
        self.vocab = vocab
        self.cfg = cfg

    def loss(self, net: SANet, batch: dict[str, Any]) -> torch.Tensor:
        device = net.input_scale.device
        rows = torch.as_tensor(batch["rows"])
        v = net.visual(self.items.maps[rows].to(device), self.items.saliency[rows].to(device))
        ids, lengths = self.vocab.encode_batch(batch["texts"])
        ids, lengths = ids.to(device), lengths.to(device)
        keys = batch["keys"]
        same = torch.tensor([[a == b for b in keys] for a in keys], device=device)  # [B, B] the sentence also fits item i
        same.fill_diagonal_(True)
        margin = net.config.margin
        hardest = batch["epoch"] > self.cfg.warmup_epochs
        loss = _ranking(net.score_matrix(v, ids, lengths), same, margin, hardest)
        if net.config.text != "gt" and net.config.global_weight > 0:
            loss = loss + net.config.global_weight * _ranking(net.global_score_matrix(v, ids, lengths), same, margin, hardest)
        return loss


def _ranking(scores: torch.Tensor, same: torch.Tensor, margin: float, hardest: bool) -> torch.Tensor:
    """Eq. 10: hardest negatives, or (warm-up) the mean over all negatives' violations."""
    if hardest:
        return triplet_loss(scores, same, margin)
    pos = scores.diagonal()
    cost_t = F.relu(margin - pos[:, None] + scores).masked_fill(same, 0.0)
    cost_v = F.relu(margin - pos[None, :] + scores).masked_fill(same, 0.0)
    return (cost_t.sum(1) + cost_v.sum(0)).mean() / max(1, scores.shape[0] - 1)


def train_san(name: str, options: TrainOptions, *, train_config: SANTrainConfig | None = None, model_overrides: dict[str, Any] | None = None, saliency_checkpoint: Path | None = None) -> Manifest:
    """Train SAN model ``name`` (``san`` or an ablation of :data:`SAN_ABLATIONS`) on ``options.data``.

    The frozen saliency network is ``saliency_checkpoint`` (``None``: the shipped ``saliency.pt``).
    The manifest's metrics hold the best epoch's validation metrics and the test split's
    image↔sentence and region↔sentence R@1/5/10 and mR (percent).
    """
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor
    from indexer.san_features import SALIENCY_LEVELS, SaliencyPooler

    method = method_of(name)
    started = time.perf_counter()
    cfg = train_config or SANTrainConfig()
    epochs = options.epochs if options.epochs is not None else cfg.epochs
    config = method_config(method, **{"word_features": options.text_encoder, **(model_overrides or {})})
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    data = Path(options.data)
    dataset, train_split, val_split, test_split = read_splits(data)
    splits = {"train": train_split.images, "val": val_split.images, "test": test_split.images}
    backbone = create_backbone(BackboneConfig(), device=device)
    saliency = load_model(saliency_checkpoint, device=device, family="saliency")
    saliency.check_backbone(backbone.version, backbone.max_size)
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), levels=SALIENCY_LEVELS, cache_dir=options.cache_dir)
    cache.build(dataset.images, progress=options.progress)
    pooler = SaliencyPooler(backbone=backbone, network=saliency)
    items = {s: build_matching_items(ims, cache, pooler, progress=options.progress) for s, ims in splits.items() if ims}
    train = items["train"]
    vocab = build_words(config.word_features, [t for ts in train.texts for t in ts], min_count=cfg.min_word_count, device=device)
    net = SANet(config, vocab_size=len(vocab))
    with torch.no_grad():
        sample = train.maps[:: max(1, len(train.maps) // 2000)].float()
        net.input_scale.fill_(1.0 / max(sample.pow(2).mean().sqrt().item(), 1e-6))
    net.to(device)
    log.info("%s: %d train items (%d images, %d regions), vocabulary of %d, device %s", name, len(train.kind), len(train.rows("image")), len(train.rows("region")), len(vocab), device)

    val = items.get("val", train)

    def validate(model: SANet) -> dict[str, float]:
        return evaluate_items(model, vocab, val).summary()

    batcher = _Batcher(train, vocab, cfg)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.lr * 0.05)
    result = fit(
        net,
        batches=lambda e: list(_batches(train, cfg, np.random.default_rng([options.seed, e]), e)),
        loss_fn=batcher.loss,
        validate=validate,
        metric="mR",
        epochs=epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=options.progress,
        desc=name,
        device=device,
    )
    net.eval()
    test = evaluate_items(net, vocab, items["test"]) if "test" in items else None
    seconds = time.perf_counter() - started
    log.info("%s: val %s, test %s, %.0f s", name, result.best_metrics, test.summary() if test else {}, seconds)
    out = Path(options.out) if options.out is not None else Path(f"{name}.pt")
    manifest = Manifest(
        model=MODEL_NAME,
        version=MODEL_VERSION,
        config={**config.to_dict(), "train": {**cfg.__dict__, "epochs": epochs}, "vocab_size": len(vocab), "text": repr(vocab), "saliency": saliency.version},
        command=options.command or f"engine train {name} --data {data} --seed {options.seed}",
        data=f"{data} ({dataset.name}: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test images; {len(train.kind)} training items)",
        seed=options.seed,
        metrics={
            "method": method,
            "best_epoch": result.best_epoch,
            **{f"val_{k}": v for k, v in result.best_metrics.items()},
            "test": test.rows(method) if test else [],
            "train_seconds": round(seconds, 1),
            "history": result.history,
        },
    )
    return save_checkpoint(out, manifest, net.payload(vocab))
