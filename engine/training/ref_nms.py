"""Training Ref-NMS's relatedness module (``engine train ref-nms-b`` / ``ref-nms-r``).

* Boxes: the shipped RPN's top :data:`~engine.protocols.proposals.POOL` proposals of each training
  image with objectness ``≥ δ`` (the detector stays frozen, as in the paper); their RoIAlign maps come
  from the dataset's backbone cache.
* Foreground of an expression: its referent and the context objects it mentions. On synthetic data
  the mentioned objects are known (each ``ref``'s ``context_objects``), so no noun/GloVe matching is
  needed; a dataset without them trains on the referent alone.
* ``ref-nms-b``: binary XE (Eq. 3), ``r*_i = 1`` when the box has IoU > 0.5 with a foreground box.
* ``ref-nms-r``: ranking loss (Eq. 4) with margin α = 0.1 and the sampling-after-splitting scheme:
  ``q_i = ⌈max(0, ρ_i − 0.5) / 0.1⌉`` (ρ_i: the box's largest IoU with the foreground); every box
  with ρ > 0.5 is a positive; its negatives are the top-h boxes by predicted relatedness among those
  with a smaller q.
* Words: the frozen MiniLM's word-piece features (``--text-encoder minilm``, the default) or the
  vocabulary of the training expressions (``--text-encoder vocab``, the ablation).
* Each step samples up to ``boxes_per_text`` of an expression's boxes (all with ρ > 0.5, the rest
  at random) to keep a CPU step short; 8 expressions per step (the paper's batch size), Adam (lr 5e-3 for the module, cosine decay);
  the epoch with the best validation referent recall in the ``real`` setting is kept.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from engine.boxes import box_iou
from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest, save_checkpoint
from engine.models.ref_nms import FORMAT_VERSION, MODEL_NAME, REF_NMS_NAMES, RefNMSConfig, RefNMSModel, RelatednessModule
from engine.models.word_features import MiniLMWords, TextWords, build_words
from engine.protocols.proposals import image_proposals
from engine.protocols.ref_nms import RefTarget, evaluate_ref_proposals, ref_targets
from engine.training.loop import cosine_schedule, epoch_rngs, fit
from engine.training.options import TrainOptions, read_splits

__all__ = ["RefNMSTrainConfig", "train_ref_nms", "rank_pairs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefNMSTrainConfig:
    """``top_h``: negatives per positive of the ranking loss; ``margin``: α of Eq. 4."""

    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-3
    weight_decay: float = 1e-4
    margin: float = 0.1
    top_h: int = 20
    boxes_per_text: int = 48
    min_word_count: int = 2


def rank_pairs(rho: np.ndarray, scores: np.ndarray, *, top_h: int) -> list[tuple[int, int]]:
    """Sampling-after-splitting (Eq. 4): ``(negative, positive)`` index pairs of one expression's boxes.

    ``rho``: each box's largest IoU with the foreground; ``scores``: the predicted relatedness that
    picks the hardest ``top_h`` negatives among the boxes of smaller q-value.
    """
    q = np.ceil(np.maximum(0.0, rho - 0.5) / 0.1 - 1e-9).astype(np.int64)
    pairs = []
    for p in np.flatnonzero(rho > 0.5):
        lower = np.flatnonzero(q < q[p])
        if len(lower) == 0:
            continue
        hardest = lower[np.argsort(-scores[lower], kind="stable")[:top_h]]
        pairs.extend((int(n), int(p)) for n in hardest)
    return pairs


@dataclass
class _Item:
    target: RefTarget
    boxes: np.ndarray  # proposals with objectness >= δ
    rho: np.ndarray  # largest IoU with the foreground


def _items(targets: list[RefTarget], proposals: dict[str, tuple[np.ndarray, np.ndarray]], delta: float) -> list[_Item]:
    out = []
    for t in targets:
        boxes, objectness = proposals[t.image]
        boxes = boxes[objectness >= delta]
        if len(boxes) == 0:
            continue
        foreground = np.concatenate([t.referent[None], t.context])
        out.append(_Item(target=t, boxes=boxes, rho=box_iou(boxes, foreground).max(axis=1)))
    return out


class _Batcher:
    def __init__(self, items: list[_Item], region_maps: Any, vocab: TextWords, loss: str, cfg: RefNMSTrainConfig) -> None:
        self.items, self.region_maps, self.vocab, self.kind, self.cfg = items, region_maps, vocab, loss, cfg

    def batches(self, rng: np.random.Generator) -> Iterator[list[_Item]]:
        order = rng.permutation(len(self.items))
        for start in range(0, len(order), self.cfg.batch_size):
            yield [self._sample(self.items[i], rng) for i in order[start : start + self.cfg.batch_size]]

    def _sample(self, item: _Item, rng: np.random.Generator) -> _Item:
        """Up to ``boxes_per_text`` boxes: every positive (ρ > 0.5), the others drawn at random."""
        n = self.cfg.boxes_per_text
        if len(item.boxes) <= n:
            return item
        pos, rest = np.flatnonzero(item.rho > 0.5), np.flatnonzero(item.rho <= 0.5)
        take = np.concatenate([pos, rng.choice(rest, size=max(0, min(len(rest), n - len(pos))), replace=False)])
        return _Item(target=item.target, boxes=item.boxes[take], rho=item.rho[take])

    def loss(self, net: RelatednessModule, items: list[_Item]) -> torch.Tensor:
        device = net.input_scale.device
        maps = torch.as_tensor(np.concatenate([self.region_maps(it.target.image, it.boxes) for it in items]), device=device)
        text_index = torch.as_tensor(np.concatenate([np.full(len(it.boxes), k) for k, it in enumerate(items)]), device=device)
        ids, lengths = self.vocab.encode_batch([it.target.expression for it in items])
        logits, _ = net(maps, text_index, ids.to(device), lengths.to(device))
        rho = np.concatenate([it.rho for it in items])
        if self.kind == "bce":  # Eq. 3
            return F.binary_cross_entropy_with_logits(logits, torch.as_tensor(rho > 0.5, dtype=torch.float32, device=device))
        r = torch.sigmoid(logits)  # Eq. 4: max(0, r_i − r_j + α) over pairs with ρ_i < ρ_j
        pairs, offset = [], 0
        scores = r.detach().cpu().numpy()
        for it in items:
            n = len(it.boxes)
            pairs += [(a + offset, b + offset) for a, b in rank_pairs(it.rho, scores[offset : offset + n], top_h=self.cfg.top_h)]
            offset += n
        if not pairs:
            return (r * 0).sum()
        neg, pos = (torch.as_tensor(x, device=device) for x in zip(*pairs))
        return F.relu(r[neg] - r[pos] + self.cfg.margin).mean()


def train_ref_nms(name: str, options: TrainOptions, *, train_config: RefNMSTrainConfig | None = None, rpn_checkpoint: Path | None = None) -> Manifest:
    """Train ``ref-nms-b`` (Eq. 3) or ``ref-nms-r`` (Eq. 4) on ``options.data`` and write its checkpoint.

    The manifest's metrics hold each epoch's loss and validation recall (referent and context, real
    setting and N = 5), the best epoch, the test split's Table 1 rows and the training time.
    """
    if name not in REF_NMS_NAMES:
        raise InvalidInputError(f"{name!r} is not a Ref-NMS model name; choose one of {', '.join(REF_NMS_NAMES)}")
    from engine.models.registry import load_model
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor

    started = time.perf_counter()
    cfg = train_config or RefNMSTrainConfig()
    config = RefNMSConfig(loss="bce" if name == "ref-nms-b" else "rank", word_features=options.text_encoder)
    epochs = options.epochs if options.epochs is not None else cfg.epochs
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    data = Path(options.data)
    dataset, train, val, test = read_splits(data)
    backbone = create_backbone(BackboneConfig(), device=device)
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), cache_dir=options.cache_dir)
    cache.build(dataset.images, progress=options.progress)
    network = load_model(rpn_checkpoint, device=device, family="rpn")
    network.check_backbone(backbone.version, backbone.max_size)
    proposals = image_proposals(network, cache, dataset.images, progress=options.progress)

    targets = ref_targets(train.images)
    if not targets:
        raise InvalidInputError(f"{data} has no referring expressions (refs) in the train split to train Ref-NMS on")
    vocab = build_words(config.word_features, [t.expression for t in targets], min_count=cfg.min_word_count, device=device)
    if isinstance(vocab, MiniLMWords):  # batched MiniLM passes over every split's texts, not one pass per evaluated text
        vocab.features([t.expression for t in targets + ref_targets(val.images) + ref_targets(test.images)])
    net = RelatednessModule(config, vocab_size=len(vocab))
    items = _items(targets, proposals, config.delta)
    sample = np.concatenate([cache.region_maps(it.target.image, it.boxes[:8]) for it in items[:: max(1, len(items) // 200)]])
    net.input_scale.fill_(1.0 / max(float(np.sqrt((sample.astype(np.float64) ** 2).mean())), 1e-6))
    net.to(device)
    batcher = _Batcher(items, cache.region_maps, vocab, config.loss, cfg)
    log.info("%s: %d training expressions, %d RPN boxes, words %r, device %s", name, len(items), sum(len(it.boxes) for it in items), vocab, device)

    def validate(model: RelatednessModule) -> dict[str, float]:
        rows = evaluate_ref_proposals(val.images, proposals, cache.region_maps, [RefNMSModel(model, vocab, name=name)], ns=(5,), delta=config.delta, nms_iou=config.nms_iou)
        model.train()
        out = {}
        for r in rows:
            if r.method == name:
                out[f"referent@{r.n}"] = r.referent_recall
                out[f"context@{r.n}"] = r.context_recall
        return out

    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, epochs)
    rngs = epoch_rngs(options.seed, epochs)
    result = fit(
        net,
        batches=lambda e: list(batcher.batches(rngs[e - 1])),
        loss_fn=batcher.loss,
        validate=validate,
        metric="referent@real",
        epochs=epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=options.progress,
        desc=name,
        device=device,
    )
    net.eval()
    model = RefNMSModel(net, vocab, name=name)
    test_rows = evaluate_ref_proposals(test.images, proposals, cache.region_maps, [model], delta=config.delta, nms_iou=config.nms_iou) if ref_targets(test.images) else []
    seconds = time.perf_counter() - started
    out = Path(options.out) if options.out is not None else Path(f"{name}.pt")
    manifest = Manifest(
        model=MODEL_NAME,
        version=f"{MODEL_NAME}:{FORMAT_VERSION}",
        config={**config.to_dict(), "train": {**asdict(cfg), "epochs": epochs, "rpn": network.version}, "vocab_size": len(vocab), "text": repr(vocab)},
        command=options.command or f"train_ref_nms({name!r}, TrainOptions(data={str(data)!r}, seed={options.seed}, epochs={epochs}, text_encoder={options.text_encoder!r}))",
        data=f"{data} ({dataset.name}: {len(train.images)} train / {len(val.images)} val / {len(test.images)} test images; {len(items)} training expressions)",
        seed=options.seed,
        metrics={
            "name": name,
            "best_epoch": result.best_epoch,
            "val": result.best_metrics,
            "history": result.history,
            "test": [r.to_dict() for r in test_rows],
            "train_seconds": round(seconds, 1),
        },
    )
    return save_checkpoint(out, manifest, model.payload())
