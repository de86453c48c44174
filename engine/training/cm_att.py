"""Training CM-Att and CM-Att-Erase (``engine train cm-att`` / ``cm-att-erase``).

* Candidates: the ground-truth object boxes of each training image (as the paper trains on
  ground-truth regions); RoIAlign maps from the dataset's backbone cache; context objects: the five
  nearest other objects.
* Each expression ``Q_i`` with its referent ``O_i`` is paired with a negative object ``O_j`` of the
  same image and a negative expression ``Q_j`` of another image in the batch; ranking loss Eq. 1
  with margin ``m``.
* ``cm-att``: ``epochs + erase_epochs`` epochs of Eq. 1. ``cm-att-erase``: the same first ``epochs``
  (stage 1, no erasing), then ``erase_epochs`` with ``L = L_erase + L_rank`` (Eq. 2–3): per
  expression one word drawn from the overall word attention is replaced by ``<unk>`` (Q*; with MiniLM
  word features the drawn word piece's features are zeroed instead, :func:`erase_query`), and one
  module drawn from the module weights has its input erased (O*): subject — the 3×3 window of the RoI
  map with the most spatial attention is zeroed; location / relationship — the most attended context
  object is dropped.
* Words: the frozen MiniLM's word-piece features (``--text-encoder minilm``, the default) or the
  vocabulary of the training expressions (``--text-encoder vocab``, the ablation).
* The epoch with the best validation top-1 accuracy (ground-truth boxes) is kept.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest, save_checkpoint
from engine.models.cm_att import CM_ATT_NAMES, FORMAT_VERSION, REGION_GROUNDING_NAME, MODEL_NAME, CMAttConfig, CMAttNet, GroundingScorer, erase_context, erase_query, erase_subject
from engine.models.vocab import Vocabulary
from engine.models.word_features import MiniLMWords, TextWords, build_words
from engine.protocols.grounding import GroundingData, build_grounding_data, grounding_accuracy
from engine.training.loop import cosine_schedule, epoch_rngs, fit
from engine.training.options import TrainOptions, read_splits

__all__ = ["CMAttTrainConfig", "train_cm_att"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CMAttTrainConfig:
    epochs: int = 6
    erase_epochs: int = 4
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    margin: float = 0.1
    min_word_count: int = 2


class _Batcher:
    """Turns batches of expression indices into Eq. 1 (and Eq. 2) losses."""

    def __init__(self, data: GroundingData, vocab: TextWords, cfg: CMAttTrainConfig, seed: int) -> None:
        self.data, self.vocab, self.cfg = data, vocab, cfg
        self.unk = vocab.unk_index if isinstance(vocab, Vocabulary) else 0  # MiniLM: erasing zeroes features, no id is written
        self.gen = torch.Generator().manual_seed(seed)

    def batches(self, rng: np.random.Generator, erase: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]]:
        d = self.data
        usable = np.flatnonzero(d.counts[d.ref_image] >= 2)
        order = rng.permutation(usable)
        out = []
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start : start + self.cfg.batch_size]
            if len(idx) < 2 or len(set(d.ref_image[idx].tolist())) < 2:
                continue
            neg_obj = np.asarray([self._other_object(i, rng) for i in idx])
            neg_text = np.asarray([self._other_text(idx, b, rng) for b in range(len(idx))])
            out.append((idx, neg_obj, neg_text, erase))
        return out

    def _other_object(self, i: int, rng: np.random.Generator) -> int:
        d = self.data
        first = d.offsets[d.ref_image[i]]
        choices = [first + k for k in range(d.counts[d.ref_image[i]]) if first + k != d.ref_row[i]]
        return int(rng.choice(choices))

    def _other_text(self, idx: np.ndarray, b: int, rng: np.random.Generator) -> int:
        d = self.data
        choices = [k for k in range(len(idx)) if d.ref_image[idx[k]] != d.ref_image[idx[b]]]
        return int(rng.choice(choices))

    def loss(self, net: CMAttNet, batch: tuple[np.ndarray, np.ndarray, np.ndarray, bool]) -> torch.Tensor:
        idx, neg_obj, neg_text, erase = batch
        d, m = self.data, self.cfg.margin
        device = net.input_scale.device
        ids, lengths = self.vocab.encode_batch([d.texts[i] for i in idx])
        ids, lengths = ids.to(device), lengths.to(device)
        image = d.image_vectors[torch.as_tensor(d.ref_image[idx])].to(device)
        pos = d.candidates.select(torch.as_tensor(d.ref_row[idx])).to(device)
        neg = d.candidates.select(torch.as_tensor(neg_obj)).to(device)
        own, other = torch.arange(len(idx), device=device), torch.as_tensor(neg_text, device=device)
        s_ii, att = net(pos, own, ids, lengths, image)
        s_ij, _ = net(pos, other, ids, lengths, image)
        s_ji, _ = net(neg, own, ids, lengths, image)
        loss = (F.relu(m - s_ii + s_ij) + F.relu(m - s_ii + s_ji)).mean()  # Eq. 1
        if not erase:
            return loss
        # Eq. 2: erased query Q*_i with O_i and O_j; erased visual input O*_i with Q_i and Q_j
        q_star = erase_query(ids, lengths, att["words"], self.unk, self.gen)
        s_iq, _ = net(pos, own, q_star, lengths, image)
        s_jq, _ = net(neg, own, q_star, lengths, image)
        o_star = self._erase_visual(pos, att)
        s_oi, _ = net(o_star, own, ids, lengths, image)
        s_oj, _ = net(o_star, other, ids, lengths, image)
        erase_loss = (F.relu(m - s_oi + s_oj) + F.relu(m - s_iq + s_jq)).mean()
        return loss + erase_loss  # Eq. 3

    def _erase_visual(self, pos, att: dict[str, torch.Tensor]):  # noqa: ANN001, ANN202
        """O*: per expression, a module drawn from ``w`` (``Multinomial(3, [w_subj, w_loc, w_rel])``) has its input erased."""
        weights = att["w"].detach()
        module = torch.multinomial(weights.cpu(), 1, generator=self.gen).squeeze(1).to(weights.device)  # drawn on the CPU generator
        maps = erase_subject(pos.maps, att["subj"], self.data.config.erase_k)
        loc_mask = erase_context(pos.loc_mask, att["loc"], keep_first=True)
        rel_mask = erase_context(pos.rel_mask, att["rel"])
        pick = module[:, None, None, None]
        return type(pos)(
            maps=torch.where(pick == 0, maps, pos.maps),
            loc_ctx=pos.loc_ctx,
            rel_ctx=pos.rel_ctx,
            loc_mask=torch.where(module[:, None] == 1, loc_mask, pos.loc_mask),
            rel_mask=torch.where(module[:, None] == 2, rel_mask, pos.rel_mask),
        )


def train_cm_att(name: str, options: TrainOptions, *, train_config: CMAttTrainConfig | None = None) -> Manifest:
    """Train ``cm-att`` or ``cm-att-erase`` on ``options.data`` and write its checkpoint and manifest
    (validation and test top-1 accuracy with ground-truth boxes, per-epoch history, training time)."""
    names = (*CM_ATT_NAMES, REGION_GROUNDING_NAME)
    if name not in names:
        raise InvalidInputError(f"{name!r} is not a CM-Att model name; choose one of {', '.join(names)}")
    targets = "regions" if name == REGION_GROUNDING_NAME else "refs"
    erasing = name != "cm-att"
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor

    started = time.perf_counter()
    cfg = train_config or CMAttTrainConfig()
    stage1 = options.epochs if options.epochs is not None else cfg.epochs
    stage2 = cfg.erase_epochs if options.epochs is None else max(1, options.epochs // 2)
    epochs = stage1 + stage2
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    data = Path(options.data)
    dataset, train, val, test = read_splits(data)
    backbone = create_backbone(BackboneConfig(), device=device)
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), cache_dir=options.cache_dir)
    cache.build(dataset.images, progress=options.progress)
    config = CMAttConfig(word_features=options.text_encoder)
    train_data = build_grounding_data(train.images, cache, config, targets=targets)
    if not len(train_data.texts):
        raise InvalidInputError(f"{data} has no {'region descriptions' if targets == 'regions' else 'referring expressions (refs)'} in the train split to train {name} on")
    val_data = build_grounding_data(val.images, cache, config, targets=targets)
    test_data = build_grounding_data(test.images, cache, config, targets=targets)
    vocab = build_words(config.word_features, train_data.texts, min_count=cfg.min_word_count, device=device)
    if isinstance(vocab, MiniLMWords):  # batched MiniLM passes over every split's texts, not one pass per evaluated text
        vocab.features([*train_data.texts, *val_data.texts, *test_data.texts])
    net = CMAttNet(config, vocab_size=len(vocab))
    rms = float(train_data.candidates.maps.float().pow(2).mean().sqrt())
    net.input_scale.fill_(1.0 / max(rms, 1e-6))
    net.to(device)
    batcher = _Batcher(train_data, vocab, cfg, options.seed)
    log.info("%s: %d training expressions over %d objects, words %r, device %s", name, len(train_data.texts), len(train_data.candidates.maps), vocab, device)

    def validate(model: CMAttNet) -> dict[str, float]:
        return {"acc": grounding_accuracy(GroundingScorer(model, vocab, name=name), val_data)} if len(val_data.texts) else {}

    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, epochs)
    rngs = epoch_rngs(options.seed, epochs)
    result = fit(
        net,
        batches=lambda e: batcher.batches(rngs[e - 1], erase=erasing and e > stage1),
        loss_fn=batcher.loss,
        validate=validate,
        metric="acc",
        epochs=epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=options.progress,
        desc=name,
        device=device,
    )
    net.eval()
    scorer = GroundingScorer(net, vocab, name=name)
    test_acc = grounding_accuracy(scorer, test_data) if len(test_data.texts) else None
    seconds = time.perf_counter() - started
    out = Path(options.out) if options.out is not None else Path(f"{name}.pt")
    manifest = Manifest(
        model=MODEL_NAME,
        version=f"{MODEL_NAME}:{FORMAT_VERSION}",
        config={**config.to_dict(), "train": {**asdict(cfg), "stage1_epochs": stage1, "stage2_epochs": stage2, "erasing": erasing, "targets": targets}, "vocab_size": len(vocab), "text": repr(vocab)},
        command=options.command or f"train_cm_att({name!r}, TrainOptions(data={str(data)!r}, seed={options.seed}, text_encoder={options.text_encoder!r}))",
        data=f"{data} ({dataset.name}: {len(train.images)} train / {len(val.images)} val / {len(test.images)} test images; {len(train_data.texts)} training expressions)",
        seed=options.seed,
        metrics={"name": name, "best_epoch": result.best_epoch, "val": result.best_metrics, "history": result.history, "test_gt_acc": test_acc, "train_seconds": round(seconds, 1)},
    )
    return save_checkpoint(out, manifest, scorer.payload())
