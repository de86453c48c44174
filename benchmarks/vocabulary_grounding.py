"""Grounding real phrases in real photographs through the open vocabulary (``engine ground --method
vocabulary``), measured on the stamps world: each object's own description ("a round tower") is grounded
among its image's RPN proposals; right when the chosen box has IoU > 0.5 with the object's box.

Variants, all from one scoring pass per image: ConSE alone, the text projection alone, and the shipped
``concept + w · projection`` for a few ``w``, ``shipped`` (the grounder's own score: the shipped ``w`` and
the proposal prior) and that score ``+ a · objectness``; ``mcb attention`` is MCB's box (``--mcb`` another checkpoint); ``oracle`` is the share of objects some proposal covers
(IoU > 0.5), the ceiling of any choice among them. ``--split val`` fits, ``--split test`` reports; 95 %
bootstrap intervals over phrases. Writes ``benchmarks/results/vocabulary-grounding-<split>.json``.

    python benchmarks/vocabulary_grounding.py --data data/stamps --split val --images 150
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from fit_common import write_result

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0)
PRIORS = (0.05, 0.1, 0.2, 0.4)  # + a · objectness, with the shipped w


def bootstrap(hits: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), (resamples, len(hits)))].mean(axis=1)
    return {"value": float(hits.mean()), "low": float(np.percentile(means, 2.5)), "high": float(np.percentile(means, 97.5)), "n": int(len(hits))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--images", type=int, default=150, help="the split's first N images")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--mcb", type=Path, help="an MCB checkpoint to compare instead of the shipped one")
    args = ap.parse_args()
    from engine.api import Engine
    from engine.boxes import box_iou
    from engine.datasets.annotations import read_dataset
    from indexer.images import load_image

    started = time.perf_counter()
    images = read_dataset(args.data).split(args.split).images[: args.images]
    grounder = Engine(Path("unused-index")).vocabulary_grounder()
    rows: dict[str, list[bool]] = {"concept": [], "projection": [], "oracle": [], **{f"w={w}": [] for w in WEIGHTS}, "shipped": [], **{f"+{a}*objectness": [] for a in PRIORS}, "mcb attention": []}
    from query.explain import AttentionGrounder

    mcb = AttentionGrounder(args.mcb)
    for ann in images:
        objects = [r for r in ann.regions if r.description and len(r.objects) == 1]
        if not objects:
            continue
        pil = load_image(args.data / ann.image)
        for region, scored in zip(objects, grounder.score(pil, [r.description for r in objects])):
            iou = box_iou(scored.boxes, np.asarray([region.box], np.float64))[:, 0]
            right = iou > 0.5
            rows["oracle"].append(bool(right.any()))
            rows["concept"].append(bool(right[int(np.argmax(scored.concept))]))
            rows["projection"].append(bool(right[int(np.argmax(scored.projection))]))
            for w in WEIGHTS:
                rows[f"w={w}"].append(bool(right[int(np.argmax(scored.concept + w * scored.projection))]))
            rows["shipped"].append(bool(right[int(np.argmax(scored.scores))]))
            for a in PRIORS:
                rows[f"+{a}*objectness"].append(bool(right[int(np.argmax(scored.scores + a * scored.objectness))]))
        for region, grounding in zip(objects, mcb.ground(pil, [r.description for r in objects])):
            rows["mcb attention"].append(bool(box_iou(np.asarray([grounding.box], np.float64), np.asarray([region.box], np.float64))[0, 0] > 0.5))
    result = {
        "what": "object descriptions grounded among their image's RPN proposals (benchmarks/vocabulary_grounding.py docstring)",
        "split": args.split,
        "images": len(images),
        "accuracy": {name: bootstrap(np.asarray(v, np.float64)) for name, v in rows.items()},
        "shipped_weight": grounder.projection_weight,
        "mcb": mcb.model.version if hasattr(mcb.model, "version") else str(args.mcb or "mcb"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for name, r in result["accuracy"].items():
        print(f"{name:12s} {r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}] n={r['n']}")
    write_result(args.out or ROOT / f"benchmarks/results/vocabulary-grounding-{args.split}.json", result)


if __name__ == "__main__":
    main()
