"""Probe (val only): does a linear map from MiniLM sentence vectors into the visual key space, trained on the
train split's object descriptions, find objects never seen in training better than ConSE?

For every object of the stamps world's train split: its description ("a round tower") and its visual
key (the engine's whitened c4+c5 key of its box, from the dataset's feature cache). A linear map
``P: 384 -> key`` is trained with InfoNCE (text to the batch's keys, temperature 0.05) for a few epochs.
On the val split (stamps never seen in training) each distinct description searches the val objects:
R@1 / R@10 (a hit is an object of the same stamp), for P, for ConSE over the objects' class evidence,
and for their sum. Test splits are never read. Writes ``benchmarks/results/text-projection-probe.json``.

    python benchmarks/text_projection_probe.py --data data/stamps
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from fit_common import write_result

ROOT = Path(__file__).resolve().parents[1]


def objects(data: Path, split: str) -> list[tuple[str, tuple[float, ...], str, str]]:
    """``(image, box, description, stamp)`` of every object of ``split``."""
    out = []
    for line in (data / "annotations.jsonl").read_text().splitlines():
        ann = json.loads(line)
        if ann.get("split") == split:
            out += [(ann["image"], tuple(o["box"]), o["description"], o["stamp"]) for o in ann["objects"] if o.get("description")]
    return out


def features(data: Path, items: list, extractor, evidence) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Keys ``[n, D]`` and class evidence ``[n, 2, T]`` of ``items``' boxes from the feature cache."""
    from indexer.feature_cache import FeatureCache, cached_keys

    cache = FeatureCache(data, extractor, levels=("c3", "c4", "c5"))
    by_image: dict[str, list[int]] = {}
    for i, (image, *_rest) in enumerate(items):
        by_image.setdefault(image, []).append(i)
    keys = np.zeros((len(items), extractor.dim), np.float32)
    ev = np.zeros((len(items), 2, 10), np.float16)
    with torch.no_grad():
        for image, idx in by_image.items():
            cached = cache.get(image)
            boxes = np.asarray([items[i][1] for i in idx], np.float64)
            keys[idx] = cached_keys(extractor, cached, boxes)
            maps = {lvl: torch.from_numpy(cached.maps[lvl].astype(np.float32))[None] for lvl in ("c5",)}
            ev[idx] = evidence.evidence(maps, [cached.size], [boxes])[0]
    return keys, ev


def recall(scores: np.ndarray, query_stamps: list[str], gallery_stamps: np.ndarray) -> dict[str, float]:
    """R@1 / R@10 / median rank of each query row of ``scores [q, n]`` (a hit: an object of its stamp)."""
    ranks = []
    for row, stamp in zip(scores, query_stamps):
        order = np.argsort(-row, kind="stable")
        ranks.append(int(np.nonzero(gallery_stamps[order] == stamp)[0][0]) + 1)
    r = np.asarray(ranks)
    return {"R@1": float((r <= 1).mean()), "R@10": float((r <= 10).mean()), "median_rank": float(np.median(r)), "queries": len(r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/text-projection-probe.json")
    args = ap.parse_args()
    from engine.models.concepts import ConceptTable, conse_scores
    from engine.models.minilm import MiniLMEncoder
    from indexer.backbone import create_backbone
    from indexer.concept_evidence import ConceptEvidence
    from indexer.region_features import RegionFeatureConfig, RegionFeatureExtractor

    started = time.perf_counter()
    torch.manual_seed(0)
    backbone = create_backbone()
    extractor = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig())
    evidence = ConceptEvidence(backbone=backbone)
    encoder = MiniLMEncoder()
    train, val = objects(args.data, "train"), objects(args.data, "val")
    train_keys, _ = features(args.data, train, extractor, evidence)
    val_keys, val_ev = features(args.data, val, extractor, evidence)
    texts = sorted({t for _, _, t, _ in train + val})
    vec = dict(zip(texts, encoder.encode(texts)))
    x = torch.from_numpy(np.stack([vec[t] for _, _, t, _ in train]))
    y = torch.nn.functional.normalize(torch.from_numpy(train_keys), dim=1)
    proj = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(proj.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(args.epochs):
        for batch in torch.randperm(len(x)).split(256):
            logits = torch.nn.functional.normalize(proj(x[batch]), dim=1) @ y[batch].T / 0.05
            loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    queries = sorted({(t, s) for _, _, t, s in val})
    q = np.stack([vec[t] for t, _ in queries])
    gallery = val_keys / np.maximum(np.linalg.norm(val_keys, axis=1, keepdims=True), 1e-12)
    with torch.no_grad():
        projected = torch.nn.functional.normalize(proj(torch.from_numpy(q)), dim=1).numpy()
    table = ConceptTable.load()
    conse = np.stack([conse_scores(val_ev, table.relevance(v)) for v in q])
    stamps = np.asarray([s for *_, s in val])
    qs = [s for _, s in queries]
    result = {
        "what": "text -> val objects of unseen stamps (benchmarks/text_projection_probe.py docstring)",
        "train_objects": len(train),
        "val_objects": len(val),
        "projection": recall(projected @ gallery.T, qs, stamps),
        "conse": recall(conse, qs, stamps),
        "random_R@10": float(np.mean([min(1.0, 10 * (stamps == s).sum() / len(stamps)) for s in qs])),
        "sum": {str(w): recall(projected @ gallery.T + w * conse, qs, stamps) for w in (0.5, 1.0, 2.0)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
