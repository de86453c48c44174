"""Training of the GRN family (GRN paper §3.3–3.4, §4.2) on a dataset's train split.

``train_grn(method, options)`` reads the texts' word features (``options.text_encoder``: the frozen
MiniLM's, or a vocabulary learned from the training text), builds the method's
:class:`~engine.models.grn.RetrievalNet`, trains it with Eq. 6 on (query region, text, positive
region) pairs with in-batch and hard negatives, keeps the epoch with the best validation R@10
(ground-truth boxes), measures the test split, and writes ``<method>.pt`` + its manifest.

Training pairs (see ``docs/grn.md``):

* When the regions carry structured meanings (the synthetic corpus, ``docs/synth.md``), every
  training region is a query with its own description, and its positives are derived exactly as
  the benchmark defines them (:class:`engine.synth.queries.SplitIndex`: the regions whose contents
  satisfy the meaning), as are its hard negatives (one attribute or the relation changed).
* Otherwise the split's ``queries.jsonl`` lines are used, each positive also serving as the query
  (with the same text) for the other positives, with the lines' ``hard_negatives``.

Only positives in another image make training pairs (the benchmark never answers a query from its
own image). Every epoch each query is paired with one of its positives at random (seeded). The
negatives of query ``i`` are the other pairs' positives in the batch that are not positives of
``i`` (§3.4) plus up to ``hard_negatives`` of its hard negatives; the query text gates the query
region and every candidate.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from engine.datasets.annotations import QUERIES_FILE
from engine.datasets.types import Dataset, ImageAnn
from engine.device import resolve_device
from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest, save_checkpoint
from engine.models.grn import METHODS, GRNConfig, RetrievalNet, create_retrieval_net, grn_loss, method_config
from engine.models.registry import family, load_model
from engine.models.retrieval import FORMAT_VERSION, MODEL_NAME, RegionRetrievalModel
from engine.models.text_encoders import pad_words, word_tensors
from engine.models.word_features import TextWords, build_words, words_payload
from engine.training.loop import cosine_schedule, epoch_rngs, fit
from engine.training.options import TrainOptions, read_splits

__all__ = ["GRN_METHODS", "GRNTrainConfig", "TrainingPairs", "ProposalPool", "build_training_pairs", "build_proposal_pool", "train_grn"]

log = logging.getLogger(__name__)

GRN_METHODS = family("grn-family").names
"""Every trainable method name: GRN Table 2's rows, then the ablations of Tables 3–5."""
assert set(GRN_METHODS) == set(METHODS)


@dataclass(frozen=True)
class GRNTrainConfig:
    """Optimisation settings (the model's own settings are in :class:`GRNConfig`).

    ``negatives``: in-batch negatives per query (``None``: all the batch offers); ``hard_negatives``:
    hard negatives per query and step.

    RPN proposals (GRN §4.2: "we use the proposals got from the pretrained RPN for training"):
    ``proposals`` turns them on (when an RPN checkpoint is available); a positive is replaced with
    probability ``proposal_positive_prob`` by one of its proposals with IoU > 0.7, and each query
    gets ``proposal_negatives`` false-positive proposals (IoU <= 0.5 with all of its positives) of
    its positive's image. Per image, up to ``jitter_per_region`` proposals per region and
    ``other_proposals`` further ones are kept (of the top ``RPN_TOP``).

    ``text_swap`` (not in the paper): each query also gets one *wrong-text* negative, the similarity
    of its own region and its positive both gated by the text of another batch query that neither
    of them satisfies. Eq. 6 alone never contrasts texts for the same pair of regions, so a model
    can score mostly on looks; this term asks that the right text make the pair more similar than
    a wrong one (docs/grn.md).
    """

    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    negatives: int | None = None
    hard_negatives: int = 2
    min_word_count: int = 2
    proposals: bool = True
    proposal_positive_prob: float = 0.5
    proposal_negatives: int = 2
    jitter_per_region: int = 4
    other_proposals: int = 16
    text_swap: bool = False


DEFAULT_EPOCHS: dict[str, int] = {"visual": 0}


@dataclass
class TrainingPairs:
    """The training queries: region row, text, positives for pairing (other images), every positive, hard negatives.

    Rows index ``region_ids`` (and the region map tensor built from them).
    """

    region_ids: np.ndarray  # int64 [R]: every region of the split
    images: list[str]  # [R]
    boxes: np.ndarray  # [R, 4]
    anchors: np.ndarray  # int [A]: row of each query region
    texts: list[str]  # [A]
    pair_positives: list[np.ndarray]  # [A] rows, other images only (non-empty)
    all_positives: list[frozenset[int]]  # [A] rows, any image (never negatives)
    hard: list[np.ndarray]  # [A] rows
    source: str  # "meanings" or "queries"

    def __len__(self) -> int:
        return len(self.anchors)


def build_training_pairs(split: Dataset, *, queries_path: Path | None = None) -> TrainingPairs:
    """The training queries of ``split`` (see the module doc for the two sources)."""
    regions = [(im, r) for im in split.images for r in im.regions]
    if not regions:
        raise InvalidInputError(f"{split.name or 'the split'} holds no regions to train on")
    row = {r.id: i for i, (_, r) in enumerate(regions)}
    image_of = [im.image for im, _ in regions]
    anchors, texts, pair_pos, all_pos, hard = [], [], [], [], []
    if all(r.meaning is not None for _, r in regions):
        from engine.synth.meaning import SceneObject, objects_in_region
        from engine.synth.queries import RegionRecord, SplitIndex

        records = []
        for im, r in regions:
            objs = [SceneObject(o.id, o.attributes, o.box) for o in im.objects]
            records.append(RegionRecord(r.id, im.image, im.split or "", r.box, r.description, r.meaning, "", tuple(objects_in_region(r.box, objs)), im.width, im.height))
        index = SplitIndex(records)
        for i, (im, r) in enumerate(regions):
            positives = index.positives(r.meaning, exclude=r.id)
            cross = [row[p] for p in positives if image_of[row[p]] != im.image]
            if not cross:
                continue
            anchors.append(i)
            texts.append(r.description)
            pair_pos.append(np.asarray(cross, np.int64))
            all_pos.append(frozenset(row[p] for p in positives) | {i})
            hard.append(np.asarray([row[h] for h in index.hard_negatives(r.meaning, positives, exclude=r.id)], np.int64))
        source = "meanings"
    else:
        extra = _hard_negatives_by_query(queries_path) if queries_path is not None else {}
        for q in split.queries:
            group = [q.region_id, *q.positives]
            group = [g for g in group if g in row]
            negs = np.asarray([row[h] for h in extra.get(q.region_id, ()) if h in row], np.int64)
            for anchor in group:
                cross = [row[p] for p in group if p != anchor and image_of[row[p]] != image_of[row[anchor]]]
                if not cross:
                    continue
                anchors.append(row[anchor])
                texts.append(q.text)
                pair_pos.append(np.asarray(cross, np.int64))
                all_pos.append(frozenset(row[g] for g in group))
                hard.append(negs)
        source = "queries"
    if not anchors:
        raise InvalidInputError(f"{split.name or 'the split'} yields no training pair (a query with a positive region in another image); check the corpus")
    return TrainingPairs(
        region_ids=np.asarray([r.id for _, r in regions], np.int64),
        images=image_of,
        boxes=np.asarray([r.box for _, r in regions], np.float64),
        anchors=np.asarray(anchors, np.int64),
        texts=texts,
        pair_positives=pair_pos,
        all_positives=all_pos,
        hard=hard,
        source=source,
    )


def _hard_negatives_by_query(path: Path) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            out[int(obj["region_id"])] = [int(h) for h in obj.get("hard_negatives", [])]
    return out


def _region_maps(cache: Any, images: Sequence[str], boxes: np.ndarray, *, progress: bool) -> torch.Tensor:
    """float16 ``[R, C, 7, 7]`` maps of every (image, box) row, read once per image from the feature cache."""
    rows_by_image: dict[str, list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        rows_by_image[image].append(i)
    out: torch.Tensor | None = None
    for image, rows in tqdm(rows_by_image.items(), desc="region maps", unit="img", disable=not progress, dynamic_ncols=True):
        maps = torch.from_numpy(cache.region_maps(image, boxes[rows]))
        if out is None:
            out = torch.zeros((len(images), *maps.shape[1:]), dtype=torch.float16)
        out[torch.as_tensor(rows)] = maps.half()
    assert out is not None
    return out


@dataclass
class ProposalPool:
    """RPN proposals of the training images, as map rows after the ``start`` region rows.

    ``overlaps[k]``: the region rows that proposal row ``start + k`` overlaps with IoU > 0.5 (it is a
    positive for a query exactly when one of them is); ``jitter[r]``: proposal rows with IoU > 0.7
    with region row ``r``; ``by_image``: each image's proposal rows.
    """

    start: int
    maps: torch.Tensor  # float16 [M, C, 7, 7]
    overlaps: list[frozenset[int]]
    jitter: list[np.ndarray]
    by_image: dict[str, np.ndarray]
    version: str = ""


def build_proposal_pool(pairs: TrainingPairs, images: Sequence[ImageAnn], cache: Any, network: Any, cfg: GRNTrainConfig, rng: np.random.Generator, *, progress: bool = False) -> ProposalPool:
    """Run the RPN (``network``, a :class:`~engine.models.rpn.ProposalNetwork`) on the training ``images``
    (maps from ``cache``) and keep the proposals that training samples from."""
    from engine.boxes import box_iou
    from engine.protocols.proposals import RPN_TOP, propose_images

    rows_by_image: dict[str, list[int]] = defaultdict(list)
    for r, image in enumerate(pairs.images):
        rows_by_image[image].append(r)
    images = [im for im in images if im.image in rows_by_image]
    proposals = propose_images(network, cache, images, max_proposals=RPN_TOP, progress=progress)
    start = len(pairs.images)
    jitter: list[list[int]] = [[] for _ in range(start)]
    overlaps: list[frozenset[int]] = []
    by_image: dict[str, np.ndarray] = {}
    maps: list[torch.Tensor] = []
    row = start
    for ann, (boxes, _) in tqdm(zip(images, proposals), total=len(images), desc="proposal maps", unit="img", disable=not progress, dynamic_ncols=True):
        image = ann.image
        regions = np.asarray(rows_by_image[image])
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            by_image[image] = np.zeros(0, np.int64)
            continue
        iou = box_iou(boxes, pairs.boxes[regions])  # [P, R_img]
        keep: set[int] = set()
        for j in range(len(regions)):
            close = np.flatnonzero(iou[:, j] > 0.7)
            keep.update(rng.choice(close, size=min(cfg.jitter_per_region, len(close)), replace=False).tolist())
        rest = np.asarray(sorted(set(range(len(boxes))) - keep), np.int64)
        keep.update(rng.choice(rest, size=min(cfg.other_proposals, len(rest)), replace=False).tolist())
        kept = np.asarray(sorted(keep), np.int64)
        maps.append(torch.from_numpy(cache.region_maps(image, boxes[kept])).half())
        ids = np.arange(row, row + len(kept), dtype=np.int64)
        by_image[image] = ids
        for k, p in zip(ids, kept):
            overlaps.append(frozenset(int(regions[j]) for j in np.flatnonzero(iou[p] > 0.5)))
            for j in np.flatnonzero(iou[p] > 0.7):
                jitter[int(regions[j])].append(int(k))
        row += len(kept)
    return ProposalPool(
        start=start,
        maps=torch.cat(maps) if maps else torch.zeros((0, *cache.extractor.map_shape), dtype=torch.float16),
        overlaps=overlaps,
        jitter=[np.asarray(j, np.int64) for j in jitter],
        by_image=by_image,
        version=str(getattr(network, "version", "")),
    )


def _is_negative(row: int, positives: frozenset[int], pool: ProposalPool | None) -> bool:
    """Whether map row ``row`` (a region, or a proposal after ``pool.start``) is a negative for a query with ``positives``."""
    if pool is None or row < pool.start:
        return row not in positives
    return not (pool.overlaps[row - pool.start] & positives)


def _batches(pairs: TrainingPairs, cfg: GRNTrainConfig, rng: np.random.Generator, pool: ProposalPool | None = None) -> Iterator[dict[str, np.ndarray]]:
    order = rng.permutation(len(pairs))
    n_prop = cfg.proposal_negatives if pool is not None else 0
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        if len(idx) < 2:
            continue
        pos = np.asarray([rng.choice(pairs.pair_positives[a]) for a in idx], np.int64)
        orig_pos = pos.copy()
        hard = np.full((len(idx), cfg.hard_negatives + n_prop), -1, np.int64)
        for b, a in enumerate(idx):
            h = pairs.hard[a]
            if len(h) and cfg.hard_negatives:
                pick = rng.choice(h, size=min(cfg.hard_negatives, len(h)), replace=False)
                hard[b, : len(pick)] = pick
            if pool is None:
                continue
            # false-positive proposals of the positive's image (GRN §4.2), then maybe the positive as a proposal
            allp = pairs.all_positives[a]
            false = [r for r in pool.by_image.get(pairs.images[pos[b]], ()) if _is_negative(int(r), allp, pool)]
            if false and n_prop:
                pick = rng.choice(np.asarray(false), size=min(n_prop, len(false)), replace=False)
                hard[b, cfg.hard_negatives : cfg.hard_negatives + len(pick)] = pick
            if len(pool.jitter[pos[b]]) and rng.random() < cfg.proposal_positive_prob:
                pos[b] = rng.choice(pool.jitter[pos[b]])
        swap = _wrong_texts(pairs, idx, pairs.anchors[idx], orig_pos, rng) if cfg.text_swap else np.full(len(idx), -1, np.int64)
        yield {"pairs": idx, "anchor": pairs.anchors[idx], "positive": pos, "hard": hard, "swap": swap, "neg_seed": rng.integers(2**31, size=1)}


def _wrong_texts(pairs: TrainingPairs, idx: np.ndarray, anchors: np.ndarray, positives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each batch query, another batch query (position) whose text neither its anchor nor its positive satisfies; -1 if none."""
    out = np.full(len(idx), -1, np.int64)
    for b in range(len(idx)):
        ok = [j for j in range(len(idx)) if j != b and int(anchors[b]) not in pairs.all_positives[idx[j]] and int(positives[b]) not in pairs.all_positives[idx[j]]]
        if ok:
            out[b] = rng.choice(ok)
    return out


class _Batcher:
    """Turns a sampled batch into the loss of Eq. 6 (the texts' words, ids ``[L]`` or MiniLM features ``[L, 384]``,
    and region maps are held here)."""

    def __init__(self, pairs: TrainingPairs, maps: torch.Tensor, vocab: TextWords, cfg: GRNTrainConfig, config: GRNConfig, pool: ProposalPool | None = None) -> None:
        self.pairs = pairs
        self.pool = pool
        self.maps = maps if pool is None else torch.cat([maps, pool.maps])
        self.cfg = cfg
        self.temperature = config.temperature
        self.uses_text = config.uses_text
        # a text-blind method reads no words: one placeholder id each (its text features are empty)
        self.text_ids = word_tensors(vocab, pairs.texts) if self.uses_text else [torch.ones(1, dtype=torch.long)] * len(pairs.texts)

    def loss(self, net: RetrievalNet, batch: dict[str, np.ndarray]) -> torch.Tensor:
        idx, anchor, pos, hard = batch["pairs"], batch["anchor"], batch["positive"], batch["hard"]
        b = len(idx)
        # unique region rows of the batch: anchors, positives, hard negatives
        rows = np.concatenate([anchor, pos, hard[hard >= 0]])
        uniq, inverse = np.unique(rows, return_inverse=True)
        a_col, p_col = inverse[:b], inverse[b : 2 * b]
        h_col = np.full(hard.shape, -1, np.int64)
        h_col[hard >= 0] = inverse[2 * b :]
        # candidates of query i: its positive, the other pairs' positives that are not its positives, its hard negatives
        cols = [np.concatenate([[p_col[i]], np.delete(p_col, i), h_col[i]]) for i in range(b)]
        cand_rows = [np.concatenate([[pos[i]], np.delete(pos, i), hard[i]]) for i in range(b)]
        valid = np.zeros((b, len(cols[0])), bool)
        for i in range(b):
            allp = self.pairs.all_positives[idx[i]]
            valid[i] = [(k == 0) or (c >= 0 and _is_negative(int(r), allp, self.pool)) for k, (c, r) in enumerate(zip(cols[i], cand_rows[i]))]
        if self.cfg.negatives is not None:
            neg_rng = np.random.default_rng(int(batch["neg_seed"][0]))
            for i in range(b):
                in_batch = np.flatnonzero(valid[i, 1:b]) + 1
                if len(in_batch) > self.cfg.negatives:
                    valid[i, neg_rng.choice(in_batch, size=len(in_batch) - self.cfg.negatives, replace=False)] = False
        cols_arr = np.stack(cols)
        use = valid.copy()
        cols_arr[~use] = 0
        device = net.input_scale.device
        ids, lengths = pad_words([self.text_ids[a] for a in idx])
        text = net.text_features(ids.to(device), lengths.to(device))
        prepared = net.prepare(self.maps[torch.as_tensor(uniq)].to(device))
        # only the valid (query, candidate) pairs are embedded; the query text gates both sides (§3.4)
        qi, kj = np.nonzero(use)
        query = net.embed_prepared(prepared, text, torch.as_tensor(a_col), torch.arange(b))
        cand_flat = net.embed_prepared(prepared, text, torch.as_tensor(cols_arr[qi, kj]), torch.as_tensor(qi))
        cands = torch.zeros(b, use.shape[1], cand_flat.shape[1], device=device)
        cands[torch.as_tensor(qi, device=device), torch.as_tensor(kj, device=device)] = cand_flat
        swap = torch.as_tensor(batch.get("swap", np.full(b, -1)))
        if not self.uses_text or not bool((swap >= 0).any()):
            return grn_loss(query, cands, torch.as_tensor(use, device=device), temperature=self.temperature)
        # wrong-text negative: anchor and positive both gated by another query's text (GRNTrainConfig.text_swap)
        has = torch.nonzero(swap >= 0).squeeze(1)
        q_sw = net.embed_prepared(prepared, text, torch.as_tensor(a_col)[has], swap[has])
        p_sw = net.embed_prepared(prepared, text, torch.as_tensor(p_col)[has], swap[has])
        wrong = torch.full((b,), float("-inf"), device=device)
        wrong[has] = (q_sw * p_sw).sum(-1)
        return grn_loss(query, cands, torch.as_tensor(use, device=device), temperature=self.temperature, extra_negatives=wrong)


def train_grn(
    method: str,
    options: TrainOptions,
    *,
    train_config: GRNTrainConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    rpn_checkpoint: Path | None = None,
) -> Manifest:
    """Train ``method`` (one of :data:`GRN_METHODS`) on ``options.data`` and write its checkpoint.

    Proposals of the RPN ``rpn_checkpoint`` (``None``: the shipped one) join the training data when
    ``train_config.proposals`` is on; without a shipped RPN the training uses ground-truth boxes only
    and says so in the log and the manifest. ``visual`` has nothing to learn: it is evaluated and written as is. The manifest's metrics hold the
    best epoch's validation R@K and the test split's R@1/10/50/100 and median rank with ground-truth
    boxes (percent), and the training time. Reproducible: the same options give the same weights.
    The texts' word features are ``options.text_encoder``'s (``model_overrides["word_features"]`` wins).
    """
    if method not in GRN_METHODS:
        raise InvalidInputError(f"method {method!r} is not known; choose one of {', '.join(GRN_METHODS)}")
    from engine.protocols.retrieval import build_benchmark, gt_candidates, score_benchmark
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor

    started = time.perf_counter()
    cfg = train_config or GRNTrainConfig()
    epochs = options.epochs if options.epochs is not None else DEFAULT_EPOCHS.get(method, cfg.epochs)
    config = method_config(method, **{"word_features": options.text_encoder, **(model_overrides or {})})
    torch.manual_seed(options.seed)

    device = resolve_device(options.device)
    data = Path(options.data)
    dataset, train, val, test = read_splits(data)
    backbone = create_backbone(BackboneConfig(), device=device)
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone), cache_dir=options.cache_dir)
    cache.build(dataset.images, progress=options.progress)

    pairs = build_training_pairs(train, queries_path=data / QUERIES_FILE)
    texts = [r.description for im in train.images for r in im.regions] + [q.text for q in train.queries]
    vocab = build_words(config.word_features, texts, min_count=cfg.min_word_count, device=device)
    net = create_retrieval_net(config, vocab_size=len(vocab))
    maps = _region_maps(cache, pairs.images, pairs.boxes, progress=options.progress)
    with torch.no_grad():
        rms = maps[:: max(1, len(maps) // 2000)].float().pow(2).mean().sqrt().item()
    net.input_scale.fill_(1.0 / max(rms, 1e-6))
    net.to(device)
    log.info("%s: %d training queries from %s, %d regions, text %r, device %s", method, len(pairs), pairs.source, len(maps), vocab, device)

    benches = {}
    for name, part in (("val", val), ("test", test)):
        if part.images and part.queries:
            benches[name] = (build_benchmark(part, cache.region_maps), gt_candidates(part.images, cache.region_maps))

    def evaluate(model: RetrievalNet, name: str) -> dict[str, float]:
        if name not in benches:
            return {}
        was_training = model.training
        result = score_benchmark(RegionRetrievalModel(net=model, vocab=vocab, device=device), *benches[name])
        model.train(was_training)
        out = {f"R@{k}": 100.0 * v for k, v in result.r_at.items()}
        out["med_r"] = result.median_rank
        return out

    history: list[dict[str, float]] = []
    best_epoch = 0
    rpn_version = None
    if config.uses_text and epochs > 0:
        if "val" not in benches:
            raise InvalidInputError(f"{data} has no val split with queries; validation R@10 picks the best epoch")
        pool = None
        if cfg.proposals:
            network = _load_rpn(rpn_checkpoint, backbone, device)
            if network is not None:
                pool = build_proposal_pool(pairs, train.images, cache, network, cfg, np.random.default_rng(np.random.SeedSequence(options.seed).spawn(epochs + 1)[-1]), progress=options.progress)
                rpn_version = pool.version
                log.info("%s: %d RPN proposals of %d training images join the training data", method, len(pool.maps), len(pool.by_image))
        batcher = _Batcher(pairs, maps, vocab, cfg, config, pool)
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = cosine_schedule(optimizer, epochs)
        rngs = epoch_rngs(options.seed, epochs)
        result = fit(
            net,
            batches=lambda e: list(_batches(pairs, cfg, rngs[e - 1], pool)),
            loss_fn=batcher.loss,
            validate=lambda m: evaluate(m, "val"),
            metric="R@10",
            epochs=epochs,
            optimizer=optimizer,
            scheduler=scheduler,
            progress=options.progress,
            desc=method,
            device=device,
        )
        history, best_epoch = result.history, result.best_epoch
    net.eval()
    with torch.no_grad():
        val_metrics = evaluate(net, "val")
        test_metrics = evaluate(net, "test")
    seconds = time.perf_counter() - started
    log.info("%s: val %s, test %s, %.0f s", method, val_metrics, test_metrics, seconds)

    payload = {"state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, "vocab": words_payload(vocab) if config.uses_text else None, "config": config.to_dict()}
    out = Path(options.out) if options.out is not None else Path(f"{method}.pt")
    manifest = Manifest(
        model=MODEL_NAME,
        version=FORMAT_VERSION,
        config={**config.to_dict(), "train": {**cfg.__dict__, "epochs": epochs, "rpn": rpn_version}, "vocab_size": len(vocab), "text": repr(vocab) if config.uses_text else None},
        command=options.command or f"train_grn({method!r}, TrainOptions(data={str(data)!r}, seed={options.seed}, epochs={epochs}))",
        data=f"{data} ({dataset.name}: {len(train.images)} train / {len(val.images)} val / {len(test.images)} test images; {len(pairs)} training queries from {pairs.source})",
        seed=options.seed,
        metrics={
            "method": method,
            "val_gt": _finite(val_metrics),
            "test_gt": _finite(test_metrics),
            "best_epoch": best_epoch,
            "history": [_finite(h) for h in history],
            "train_seconds": round(seconds, 1),
            "val_queries": len(benches["val"][0].queries) if "val" in benches else 0,
            "test_queries": len(benches["test"][0].queries) if "test" in benches else 0,
        },
    )
    return save_checkpoint(out, manifest, payload)


def _load_rpn(path: Path | None, backbone: Any, device: torch.device) -> Any:
    """The RPN whose proposals join training: ``path``, else the shipped one; ``None`` (with a warning)
    when no path is given and none is shipped."""
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS

    if path is None and not (PACKAGE_CHECKPOINTS / "rpn.pt").is_file():
        log.warning("no RPN checkpoint is installed (engine/checkpoints/rpn.pt): training on ground-truth boxes only; pass rpn_checkpoint to train with proposals")
        return None
    network = load_model(path, device=device, family="rpn")
    network.check_backbone(backbone.version, backbone.max_size)
    return network


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics for a JSON manifest: an infinite median rank becomes ``None``."""
    return {k: (None if isinstance(v, float) and np.isinf(v) else v) for k, v in metrics.items()}
