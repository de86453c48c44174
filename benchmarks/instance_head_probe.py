"""Probe: how well does the instance head (:mod:`engine.models.instance_head`) find the same real object
when trained on stamp labels instead of the engine trainer's query labels?

``engine train instance-head`` labels boxes by train queries and their positives (11,095 boxes of both
worlds). This probe trains the same model (``--hidden``, default 1,024) on the stamps world's train
objects labelled by their stamp (8,507 objects, 554 stamps) with the same loss, and measures it with the
trainer's protocol on the ``val`` split: each val query's box against the annotated boxes of the other
val images, R@1 / R@10, the head alone and head + key cosines. The test split is never read.

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.models.instance_head import InstanceHead, InstanceHeadConfig, supervised_contrastive  # noqa: E402
from engine.training.instance_head import _features, _gallery, _recall  # noqa: E402
from engine.training.options import read_splits  # noqa: E402
from indexer.backbone import BackboneConfig, create_backbone  # noqa: E402
from indexer.feature_cache import FeatureCache  # noqa: E402
from indexer.region_features import RegionFeatureExtractor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/stamps"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    backbone = create_backbone(BackboneConfig())
    extractor = RegionFeatureExtractor(backbone=backbone)
    _, train, val, _ = read_splits(args.data)
    cache = FeatureCache(args.data, extractor, levels=sorted(set(extractor.levels)))
    cache.build(train.images + val.images, progress=False)
    stamps = {}
    for line in (args.data / "annotations.jsonl").open():
        row = json.loads(line)
        for obj in row["objects"]:
            stamps[(row["image"], obj["id"])] = obj.get("stamp")

    maps, keys, labels = [], [], []
    for ann in train.images:  # labelled by stamp (the engine's trainer labels by queries instead)
        objs = [o for o in ann.objects if stamps.get((ann.image, o.id))]
        if objs:
            m, k = _features(extractor, cache, ann.image, np.asarray([o.box for o in objs], np.float64))
            maps.append(m), keys.append(k)
            labels += [stamps[(ann.image, o.id)] for o in objs]
    maps_t, keys_t = torch.from_numpy(np.concatenate(maps)), torch.from_numpy(np.concatenate(keys))
    names = sorted(set(labels))
    y_train = torch.tensor([names.index(s) for s in labels])
    gallery = _gallery(extractor, cache, val)

    def evaluate(head: InstanceHead, mix: bool) -> dict[str, float]:
        head.eval()
        if not mix:
            found = _recall(gallery, head)
        else:  # head and key cosines summed: the concatenation of both unit vectors
            class Both:
                def embed(self, m: np.ndarray, k: np.ndarray) -> np.ndarray:
                    return np.concatenate([head.embed(m, k), np.asarray(k, np.float32)], axis=1)

            found = _recall(gallery, Both())  # type: ignore[arg-type]
        head.train()
        return {k: round(v, 4) for k, v in found.items() if k != "queries"}

    c, size, _ = extractor.map_shape
    result: dict = {"train_objects": len(y_train), "train_stamps": len(names), "val_queries": len(gallery.queries), "hidden": args.hidden, "shipped_key": _recall(gallery, None), "epochs": []}
    print("shipped key", result["shipped_key"], flush=True)
    head = InstanceHead(InstanceHeadConfig(key_version=f"{backbone.name}:{extractor.config.key_version}", map_shape=(c, size, size), key_dim=extractor.dim, hidden=args.hidden))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    by_label = defaultdict(list)
    for i, y in enumerate(y_train.tolist()):
        by_label[y].append(i)
    usable = [y for y, idx in by_label.items() if len(idx) >= 2]
    for epoch in range(1, args.epochs + 1):
        losses = []
        for _ in range(len(y_train) // 256):
            chosen = rng.choice(usable, size=64, replace=False)
            batch = torch.from_numpy(np.concatenate([rng.choice(by_label[y], size=4, replace=len(by_label[y]) < 4) for y in chosen]))
            loss = supervised_contrastive(head(maps_t[batch], keys_t[batch]), y_train[batch], 0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if epoch % 5 == 0 or epoch == args.epochs:
            row = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4), "head": evaluate(head, False), "head+key": evaluate(head, True)}
            result["epochs"].append(row)
            print(row, flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
