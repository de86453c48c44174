"""Probe: would a small trained head on the stored 7×7 maps find the same real object better than the
shipped visual key (PCA + matching-pairs whitening)?

Not a shipped model: it measures whether the next step for region-only retrieval (issue 15's box@10)
should be a trained instance embedding. Stamps world only (real cut-outs): a head (MLP, the
L2-normalised 7×7 ``c4`` RoI map and the shipped key in, 256-d unit vector out) is trained on the
``train`` split's annotated objects, labelled by stamp, with a supervised contrastive loss (Khosla et
al., NeurIPS 2020, Eq. 2) over batches of P stamps × K instances. Measured on the ``val`` split with the
protocol of ``engine train key-whitening``: each val query's box against the annotated boxes of the
other val images, R@1 / R@10 (a hit lies in a positive's image with IoU > 0.5). The test split is
never read. Backbone maps come from the dataset's feature cache (built when missing).

    python benchmarks/instance_head_probe.py --data data/stamps --json benchmarks/results/instance-head-probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.training.key_whitening import _annotated, _right  # noqa: E402
from engine.training.options import read_splits  # noqa: E402
from indexer.backbone import BackboneConfig, create_backbone  # noqa: E402
from indexer.feature_cache import FeatureCache, cached_keys, pool_region_maps  # noqa: E402
from indexer.region_features import RegionFeatureExtractor  # noqa: E402


def box_features(extractor: RegionFeatureExtractor, cache: FeatureCache, image: str, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shipped key ``[n, 432]`` and the L2-normalised flattened 7×7 map ``[n, 5488]`` of ``boxes``."""
    cached = cache.get(image)
    keys = cached_keys(extractor, cached, boxes)
    maps = pool_region_maps(extractor, cached, boxes).reshape(len(boxes), -1)
    return keys, maps / np.maximum(np.linalg.norm(maps, axis=1, keepdims=True), 1e-12)


class Head(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 1024, out: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


def supcon(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, Eq. 2, "out" form)."""
    sim = z @ z.T / tau
    eye = torch.eye(len(z), dtype=torch.bool)
    sim = sim.masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None]) & ~eye
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -(log_prob * pos).sum(1).div(pos.sum(1).clamp_min(1)).mean()


def recall(queries: list, gallery: np.ndarray, images: list[str], boxes: np.ndarray) -> dict[str, float]:
    hits = {1: 0, 10: 0}
    names = np.asarray(images)
    for vec, image, positives in queries:
        scores = gallery @ vec
        scores[names == image] = -np.inf
        order = np.argsort(-scores)[:10]
        first = next((r for r, j in enumerate(order) if _right(images[j], boxes[j], positives)), None)
        for k in hits:
            hits[k] += first is not None and first < k
    return {f"r{k}": v / len(queries) for k, v in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/stamps"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    extractor = RegionFeatureExtractor(backbone=create_backbone(BackboneConfig()))
    _, train, val, _ = read_splits(args.data)
    cache = FeatureCache(args.data, extractor, levels=sorted(set(extractor.levels)))
    cache.build(train.images + val.images, progress=False)
    stamps = {}
    for line in (args.data / "annotations.jsonl").open():
        row = json.loads(line)
        for obj in row["objects"]:
            stamps[(row["image"], obj["id"])] = obj.get("stamp")

    keys, maps, labels = [], [], []
    for ann in train.images:
        objs = [o for o in ann.objects if stamps.get((ann.image, o.id))]
        if objs:
            k, m = box_features(extractor, cache, ann.image, np.asarray([o.box for o in objs], np.float64))
            keys.append(k), maps.append(m)
            labels += [stamps[(ann.image, o.id)] for o in objs]
    x_train = torch.from_numpy(np.concatenate([np.concatenate(maps), np.concatenate(keys)], axis=1)).float()
    names = sorted(set(labels))
    y_train = torch.tensor([names.index(s) for s in labels])

    where = {r.id: (im.image, np.asarray(r.box, np.float64)) for im in val.images for r in im.regions}
    asked: dict[str, list] = defaultdict(list)
    for q in val.queries:
        positives = [where[p] for p in q.positives if p in where and where[p][0] != q.image]
        if positives:
            asked[q.image].append((np.asarray(q.region, np.float64), positives))
    g_keys, g_maps, g_images, g_boxes, queries = [], [], [], [], []
    for ann in val.images:
        annotated, wanted = _annotated(ann), asked.get(ann.image, [])
        both = np.concatenate([annotated, np.asarray([b for b, _ in wanted], np.float64).reshape(-1, 4)])
        if not len(both):
            continue
        k, m = box_features(extractor, cache, ann.image, both)
        n = len(annotated)
        g_keys.append(k[:n]), g_maps.append(m[:n]), g_boxes.append(annotated)
        g_images += [ann.image] * n
        queries += [(k[n + i], m[n + i], ann.image, positives) for i, (_, positives) in enumerate(wanted)]
    g_keys, g_maps, g_boxes = np.concatenate(g_keys), np.concatenate(g_maps), np.concatenate(g_boxes)

    def evaluate(head: Head | None, mix: float = 0.0) -> dict[str, float]:
        if head is None:
            return recall([(k, im, p) for k, _, im, p in queries], g_keys, g_images, g_boxes)
        with torch.no_grad():
            head.eval()
            g = head(torch.from_numpy(np.concatenate([g_maps, g_keys], axis=1)).float()).numpy()
            q = head(torch.from_numpy(np.stack([np.concatenate([m, k]) for k, m, _, _ in queries])).float()).numpy()
            head.train()
        if mix:
            g = np.concatenate([g, np.sqrt(mix) * g_keys], axis=1)
            q = np.concatenate([q, np.sqrt(mix) * np.stack([k for k, _, _, _ in queries])], axis=1)
        return recall([(v, im, p) for v, (_, _, im, p) in zip(q, queries)], g, g_images, g_boxes)

    result: dict = {"train_objects": len(y_train), "train_stamps": len(names), "val_queries": len(queries), "shipped_key": evaluate(None), "epochs": []}
    print("shipped key", result["shipped_key"], flush=True)
    head = Head(x_train.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    by_label = defaultdict(list)
    for i, y in enumerate(y_train.tolist()):
        by_label[y].append(i)
    usable = [y for y, idx in by_label.items() if len(idx) >= 2]
    for epoch in range(1, args.epochs + 1):
        losses = []
        for _ in range(len(y_train) // 256):
            chosen = rng.choice(usable, size=64, replace=False)
            batch = np.concatenate([rng.choice(by_label[y], size=4, replace=len(by_label[y]) < 4) for y in chosen])
            loss = supcon(head(x_train[batch]), y_train[batch], tau=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if epoch % 5 == 0 or epoch == args.epochs:
            row = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "head": evaluate(head), "head+key": evaluate(head, mix=1.0)}
            result["epochs"].append(row)
            print(row, flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
