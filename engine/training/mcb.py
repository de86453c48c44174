"""``engine train mcb`` / ``mcb-no-sparsity``: weakly supervised attention (MCB paper §2.3) on cached maps.

Only image-level phrase labels are used, never a box: the phrases of an image (its region
descriptions and referring expressions, :func:`engine.protocols.attention.image_phrases`) are its
positives, phrases of other images (whose text is not one of its own) its negatives. Each step takes
``images_per_batch`` training images, ``positives`` of their phrases and ``negatives`` phrases of other
images each (a phrase of another image is a negative only when it names a shape or colour that
none of the image's objects has: the image-level tags of :func:`image_tags`, no boxes; otherwise
"the triangle" of another image would be a false negative for about half the synthetic scenes;
at least half of the negatives are hard: they also name a shape or colour the image shows),
and minimises Eq. 1 ``L = L_ce + λ·L_p + β·R``:

* ``L_ce``: binary cross-entropy of the classifier's match logit (phrase in the image or not);
* ``L_p`` (Eq. 2) over the batch's positive pairs, on their L2-normalised attended features ``f'``:
  ``max(0, ‖f'_i − f'_j‖ − m)²`` when both carry the same phrase (``y_i = y_j``), and
  ``max(0, M − ‖f'_i − f'_j‖)²`` otherwise. The paper's ``−‖f'_i − f'_j‖²`` is unbounded below; the
  hinge at ``M`` bounds it (a contrastive loss, as in the centre/range losses it cites);
* ``R`` (Eq. 3): the mean of ``r²`` over the map's valid cells (every pair); ``β = 0`` for ``mcb-no-sparsity``.

The epoch with the best validation classification accuracy (image-level labels, no boxes) is kept;
localization on the validation and test splits (boxes used only for measuring) goes into the manifest.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.datasets.types import ImageAnn
from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest, save_checkpoint
from engine.models.mcb import MODEL_NAME, MODEL_VERSION, GroundingModel, MCBConfig, MCBGrounder, valid_cells, visual_map
from engine.models.registry import family
from engine.models.text_encoders import pad_words, word_tensors
from engine.models.vocab import tokenize
from engine.models.word_features import TextWords, build_words, words_payload
from engine.protocols.attention import ground_split, image_phrases, localization_row
from engine.training.loop import cosine_schedule, epoch_rngs, fit
from engine.training.options import TrainOptions, read_splits

__all__ = ["MCB_NAMES", "MCBTrainConfig", "PhraseData", "build_phrase_data", "image_tags", "mcb_loss", "train_mcb"]

log = logging.getLogger(__name__)

MCB_NAMES = family("mcb-attention").names
"""``engine train`` names: the full loss, and the ablation without the sparsity term (β = 0)."""


@dataclass(frozen=True)
class MCBTrainConfig:
    """Optimisation settings. ``lam`` (λ) is the paper's 0.1 (§3); ``beta`` (β) 0.02, because the paper's
    0.1 localized worse on the synthetic corpus (validation acc@0.5 8.3 % against 11.2 %, docs/mcb.md);
    ``sparsity=False`` sets β to 0. ``max_images`` subsamples the training split (seeded)."""

    epochs: int = 5
    images_per_batch: int = 16
    positives: int = 2
    negatives: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-4
    lam: float = 0.1
    beta: float = 0.02
    sparsity: bool = True
    same_margin: float = 0.2
    diff_margin: float = 1.0
    min_word_count: int = 2
    max_images: int | None = None


@dataclass
class PhraseData:
    """Maps and phrases of a list of images: ``maps`` float16 ``[N, C, H, W]`` (padded to a common grid),
    ``valid`` bool ``[N, H, W]``; phrase ``k`` is ``texts[k]`` of image ``owner[k]``."""

    images: list[ImageAnn]
    maps: torch.Tensor
    valid: torch.Tensor
    texts: list[str]
    owner: np.ndarray
    keys: list[str]  # normalised phrase text: equal keys are the same label y
    by_image: list[np.ndarray]
    tags: list[frozenset[str]]  # per image: the shape / colour / category words of its objects
    tag_words: list[frozenset[str]]  # per phrase: its words that are tag words of the corpus

    def __len__(self) -> int:
        return len(self.images)


def build_phrase_data(images: list[ImageAnn], get: Any, config: MCBConfig) -> PhraseData:
    """Read every image's cached maps (``get(image)`` → :class:`~indexer.feature_cache.CachedImage`)
    and list its phrases; images without a phrase are left out."""
    kept, grids, sizes, texts, owner, by_image = [], [], [], [], [], []
    for im in images:
        phrases = image_phrases(im)
        if not phrases:
            continue
        cached = get(im.image)
        grids.append(visual_map(cached.maps, config.levels).half())
        sizes.append(cached.size)
        start = len(texts)
        texts += [p.text for p in phrases]
        owner += [len(kept)] * len(phrases)
        by_image.append(np.arange(start, len(texts)))
        kept.append(im)
    if not kept:
        raise InvalidInputError("no image has a phrase (region description or referring expression) to train on")
    hh = max(g.shape[1] for g in grids)
    ww = max(g.shape[2] for g in grids)
    maps = torch.zeros((len(grids), grids[0].shape[0], hh, ww), dtype=torch.float16)
    valid = torch.zeros((len(grids), hh, ww), dtype=torch.bool)
    for i, (g, size) in enumerate(zip(grids, sizes)):
        maps[i, :, : g.shape[1], : g.shape[2]] = g
        valid[i] = valid_cells(size, (hh, ww), stride=config.stride, max_size=config.max_size)
    tags = [image_tags(im) for im in kept]
    vocabulary = frozenset().union(*tags)
    tag_words = [frozenset(tokenize(t)) & vocabulary for t in texts]
    return PhraseData(kept, maps, valid, texts, np.asarray(owner, np.int64), [" ".join(tokenize(t)) for t in texts], by_image, tags, tag_words)


def image_tags(image: ImageAnn) -> frozenset[str]:
    """Image-level tags (no boxes): the words of its objects' categories, shapes and colours."""
    words: set[str] = set()
    for o in image.objects:
        for value in (o.category, o.attributes.get("shape", ""), o.attributes.get("color", "")):
            words.update(tokenize(value))
    return frozenset(words)


def _pairs(data: PhraseData, rows: np.ndarray, cfg: MCBTrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``positives`` own phrases and ``negatives`` phrases of other images for each image row."""
    img, phrase, label = [], [], []
    n_phr = len(data.texts)
    for i in rows:
        own = data.by_image[i]
        own_keys = {data.keys[k] for k in own}
        for k in rng.choice(own, size=min(cfg.positives, len(own)), replace=False):
            img.append(i), phrase.append(k), label.append(1.0)
        found, hard = 0, 0
        for k in rng.integers(n_phr, size=16 * max(cfg.negatives, 1)):
            if found == cfg.negatives:
                break
            if data.owner[k] != i and data.keys[k] not in own_keys and data.tag_words[k] - data.tags[i]:
                # at least half of them hard: they also name a shape or colour that the image shows
                is_hard = bool(data.tag_words[k] & data.tags[i])
                if not is_hard and found - hard >= cfg.negatives - cfg.negatives // 2:
                    continue
                img.append(i), phrase.append(int(k)), label.append(0.0)
                found += 1
                hard += is_hard
    return {"image": np.asarray(img, np.int64), "phrase": np.asarray(phrase, np.int64), "label": np.asarray(label, np.float32)}


def _batches(data: PhraseData, cfg: MCBTrainConfig, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    order = rng.permutation(len(data))
    for start in range(0, len(order), cfg.images_per_batch):
        rows = order[start : start + cfg.images_per_batch]
        if len(rows) >= 2:
            yield _pairs(data, rows, cfg, rng)


def mcb_loss(r: torch.Tensor, z: torch.Tensor, logit: torch.Tensor, label: torch.Tensor, keys: list[str], valid: torch.Tensor, cfg: MCBTrainConfig) -> torch.Tensor:
    """Eq. 1: ``L_ce + λ·L_p + β·R`` (see the module doc); ``keys`` are the pairs' phrase labels."""
    ce = F.binary_cross_entropy_with_logits(logit, label)
    pos = torch.nonzero(label > 0.5).squeeze(1)
    pair = logit.new_zeros(())
    if len(pos) >= 2 and cfg.lam > 0:
        f = F.normalize(z[pos], dim=-1)
        dist = torch.cdist(f, f).clamp_min(0)
        pk = [keys[int(i)] for i in pos]
        same = torch.tensor([[a == b for b in pk] for a in pk], device=z.device)
        upper = torch.triu(torch.ones_like(same), diagonal=1)
        same_loss = F.relu(dist - cfg.same_margin).pow(2)  # Eq. 2, y_i = y_j
        diff_loss = F.relu(cfg.diff_margin - dist).pow(2)  # Eq. 2, otherwise (hinged)
        pair = torch.where(same, same_loss, diff_loss)[upper].mean()
    beta = cfg.beta if cfg.sparsity else 0.0
    reg = (r.pow(2) * valid).sum() / valid.sum().clamp_min(1) if beta > 0 else logit.new_zeros(())  # Eq. 3
    return ce + cfg.lam * pair + beta * reg


class _Batcher:
    def __init__(self, data: PhraseData, vocab: TextWords, cfg: MCBTrainConfig) -> None:
        self.data = data
        self.cfg = cfg
        self.ids = word_tensors(vocab, data.texts)  # each phrase's ids [L] or MiniLM features [L, 384], read once

    def tensors(self, batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
        """The batch's image maps, valid cells, phrase words (ids ``[P, L]`` or MiniLM features ``[P, L, 384]``)
        and lengths, on ``device``."""
        ids, lengths = pad_words([self.ids[k] for k in batch["phrase"]])
        rows = torch.as_tensor(batch["image"])
        return self.data.maps[rows].to(device), self.data.valid[rows].to(device), ids.to(device), lengths.to(device)

    def loss(self, net: MCBGrounder, batch: dict[str, np.ndarray]) -> torch.Tensor:
        device = net.input_scale.device
        maps, valid, ids, lengths = self.tensors(batch, device)
        r, z, logit = net(maps, ids, lengths, valid)
        keys = [self.data.keys[k] for k in batch["phrase"]]
        return mcb_loss(r, z, logit, torch.as_tensor(batch["label"], device=device), keys, valid, self.cfg)

    @torch.no_grad()
    def accuracy(self, net: MCBGrounder, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
        correct, total, loss = 0, 0, 0.0
        device = net.input_scale.device
        for batch in batches:
            maps, valid, ids, lengths = self.tensors(batch, device)
            _, _, logit = net(maps, ids, lengths, valid)
            label = torch.as_tensor(batch["label"], device=device)
            correct += int(((logit > 0).float() == label).sum())
            total += len(label)
            loss += float(F.binary_cross_entropy_with_logits(logit, label, reduction="sum"))
        return {"cls_acc": 100.0 * correct / max(total, 1), "cls_loss": loss / max(total, 1)}


def train_mcb(name: str, options: TrainOptions, *, train_config: MCBTrainConfig | None = None, model_overrides: dict[str, Any] | None = None) -> Manifest:
    """Train ``mcb`` or ``mcb-no-sparsity`` on ``options.data`` and write its checkpoint and manifest.

    The manifest's metrics hold the best epoch, each epoch's loss and validation classification
    accuracy, localization (acc@0.3/0.4/0.5, mean IoU; percent) on the validation and test splits,
    and the training time. Reproducible: the same options give the same weights. The phrases' word
    features are ``options.text_encoder``'s (MiniLM, or a vocabulary of the training phrases).
    """
    if name not in MCB_NAMES:
        raise InvalidInputError(f"{name!r} is not an MCB model name; choose one of {', '.join(MCB_NAMES)}")
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor

    started = time.perf_counter()
    cfg = train_config or MCBTrainConfig()
    if name == "mcb-no-sparsity":
        cfg = MCBTrainConfig(**{**asdict(cfg), "sparsity": False})
    epochs = options.epochs if options.epochs is not None else cfg.epochs
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)

    device = resolve_device(options.device)
    data = Path(options.data)
    dataset, train, val, test = read_splits(data)
    backbone = create_backbone(BackboneConfig(), device=device)
    level_names = ("c3", "c4")
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), levels=level_names, cache_dir=options.cache_dir)
    cache.build(dataset.images, progress=options.progress)
    train_images = list(train.images)
    if cfg.max_images is not None and len(train_images) > cfg.max_images:
        train_images = [train_images[i] for i in sorted(rng.choice(len(train_images), size=cfg.max_images, replace=False))]

    overrides = {"word_features": options.text_encoder, **(model_overrides or {})}
    vocab = build_words(overrides["word_features"], [p.text for im in train_images for p in image_phrases(im)], min_count=cfg.min_word_count, device=device)
    channels = sum(backbone.channels[lvl] for lvl in level_names)
    config = MCBConfig(
        vocab_size=len(vocab),
        visual_channels=channels,
        levels=level_names,
        stride=backbone.strides[level_names[-1]],
        offset=float(backbone.offsets[level_names[-1]]),
        max_size=backbone.max_size,
        backbone=backbone.version,
        sketch_seed=options.seed,
        **overrides,
    )
    train_data = build_phrase_data(train_images, cache.get, config)
    net = MCBGrounder(config)
    with torch.no_grad():
        sample = train_data.maps[:: max(1, len(train_data) // 200)].float()
        rms = sample.pow(2).mean().sqrt().item()
    net.input_scale.fill_(1.0 / max(rms, 1e-6))
    net.to(device)
    batcher = _Batcher(train_data, vocab, cfg)
    log.info("%s: %d training images, %d phrases, text %r, device %s", name, len(train_data), len(train_data.texts), vocab, device)

    val_batches: list[dict[str, np.ndarray]] = []
    val_batcher = None
    if val.images:
        val_data = build_phrase_data(list(val.images), cache.get, config)
        val_batcher = _Batcher(val_data, vocab, cfg)
        val_batches = list(_batches(val_data, cfg, np.random.default_rng(options.seed + 1)))

    def validate(model: MCBGrounder) -> dict[str, float]:
        return val_batcher.accuracy(model, val_batches) if val_batcher is not None else {}

    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, epochs)
    rngs = epoch_rngs(options.seed, epochs)
    result = fit(
        net,
        batches=lambda e: list(_batches(train_data, cfg, rngs[e - 1])),
        loss_fn=batcher.loss,
        validate=validate,
        metric="cls_acc",
        epochs=epochs,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=options.progress,
        desc=name,
        device=device,
    )
    net.eval()
    train_seconds = time.perf_counter() - started
    model = GroundingModel(net, vocab, name=name)
    localization: dict[str, dict[str, Any]] = {}
    for split_name, part in (("val", val), ("test", test)):
        if part.images:
            pred, gt, _ = ground_split(model, part.images, cache.get)
            if pred:
                localization[split_name] = localization_row(name, pred, gt).to_dict()
    log.info("%s: localization %s, %.0f s", name, localization, train_seconds)

    payload = {"state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, "vocab": words_payload(vocab), "config": config.to_dict()}
    out = Path(options.out) if options.out is not None else Path(f"{name}.pt")
    manifest = Manifest(
        model=MODEL_NAME,
        version=MODEL_VERSION,
        config={**config.to_dict(), "train": {**asdict(cfg), "epochs": epochs}, "text": repr(vocab)},
        command=options.command or f"train_mcb({name!r}, TrainOptions(data={str(data)!r}, seed={options.seed}, epochs={epochs}))",
        data=f"{data} ({dataset.name}: {len(train_data)} of {len(train.images)} train / {len(val.images)} val / {len(test.images)} test images; {len(train_data.texts)} training phrases, image-level labels only)",
        seed=options.seed,
        metrics={
            "method": name,
            "best_epoch": result.best_epoch,
            "val": result.best_metrics,
            "history": result.history,
            "val_localization": localization.get("val", {}),
            "test_localization": localization.get("test", {}),
            "train_seconds": round(train_seconds, 1),
        },
    )
    return save_checkpoint(out, manifest, payload)
