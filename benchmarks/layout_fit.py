"""Fit the layout stage of region-only queries (``engine.config.LAYOUT_WEIGHT`` / ``LAYOUT_SHORTLIST``) on
the val splits of the stamps and the shapes worlds.

A region-only query reranks its first ``n`` stage-1 candidates by ``visual + w · layout``
(``query.rerank.LayoutRescorer``). For every val query this script takes the stage-1 candidates of
the engine's default val index (built by ``engine eval search --split val --index DIR``, reused when
there), their visual cosine, their layout similarity to the query map and their IoU with the
query's positives, then scores every ``(n, w)`` of the grid with the protocol of ``engine eval
search`` (one hit per image, k = 10; a hit is right in a positive's image with IoU > 0.5).

Rule: the ``(n, w)`` with the best query-weighted mean of box@1 and box@10 over both val splits,
among those where neither world's box@1 nor box@10 falls below its ``w = 0`` figure (stage 1 alone).
Test splits are never read. Writes ``benchmarks/results/layout-fit.json``.

    python benchmarks/layout_fit.py --data data/stamps --data data/synth --index-root /tmp/layout-val
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fit_common import first_hits, rates, write_result

ROOT = Path(__file__).resolve().parents[1]
SHORTLISTS = (100, 200, 300)
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)


@dataclass(frozen=True)
class Candidates:
    """One query's stage-1 candidates (its own image left out), best first."""

    visual: np.ndarray
    layout: np.ndarray
    iou: np.ndarray  # best IoU with a positive in the same image; -1 in an image without positives
    images: np.ndarray


def collect(data: Path, index_dir: Path, depth: int) -> list[Candidates]:
    """Every val query's candidates from the default val index of ``data`` (built when missing)."""
    from engine.api import Engine
    from engine.boxes import box_iou
    from engine.config import EngineConfig
    from engine.evaluation.search import LINKS_FOLDER, SearchEvalConfig, corpus_path, evaluate_search, split_queries
    from query.request import SearchRequest
    from query.rerank import layout_similarity, read_region_maps

    config = SearchEvalConfig(data=data, split="val", index_dir=index_dir, limit=1, progress=True)
    evaluate_search(config)  # builds (or reuses) the val index with the engine's defaults
    _, queries, _ = split_queries(SearchEvalConfig(data=data, split="val"))
    links = (index_dir / LINKS_FOLDER).resolve()
    out = []
    with Engine(index_dir, config=EngineConfig()) as engine:
        pipe = engine.pipeline
        store = pipe.store
        for query, targets in queries:
            encoded = pipe.encode(SearchRequest(image=links / query.image, region=query.region))
            scores, ids = store.search(encoded.vector[None].astype(np.float32), depth)
            found = store.lookup_regions(ids[0])
            by_id = dict(zip(ids[0].tolist(), scores[0].tolist()))
            rows = {r.id: r for r in store.regions(found.ids)}
            images = np.asarray([corpus_path(rows[int(i)].image_path, links) for i in found.ids])
            keep = images != query.image
            layout = layout_similarity(encoded.query_map, read_region_maps(store, found.rows))
            iou = np.full(len(images), -1.0)
            for j, image in enumerate(images):
                boxes = [t.box for t in targets if t.image == image]
                if boxes:
                    iou[j] = box_iou(found.boxes[j : j + 1].astype(np.float64), np.asarray(boxes, np.float64)).max()
            visual = np.asarray([by_id[int(i)] for i in found.ids], np.float32)
            out.append(Candidates(visual=visual[keep], layout=layout[keep], iou=iou[keep], images=images[keep]))
    return out


def measure(queries: list[Candidates], weight: float, shortlist: int, k: int = 10) -> dict[str, float]:
    """box@1, box@k, img@1 of ranking each query's first ``shortlist`` candidates by ``visual + weight · layout``."""
    outcomes = []
    for c in queries:
        m = min(shortlist, len(c.visual))
        if m:
            outcomes.append(first_hits(c.visual[:m] + weight * c.layout[:m], c.iou[:m], c.images[:m], k))
    return rates(outcomes, len(queries), k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, action="append", required=True, help="a dataset folder with a val split (repeat)")
    ap.add_argument("--index-root", type=Path, required=True, help="where the val indexes are built / reused (one folder per dataset)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/layout-fit.json")
    args = ap.parse_args()
    started = time.perf_counter()
    worlds = {d.resolve().name: collect(d, args.index_root / d.resolve().name, max(SHORTLISTS)) for d in args.data}
    grid = []
    for n in SHORTLISTS:
        for w in WEIGHTS:
            per = {name: measure(q, w, n) for name, q in worlds.items()}
            total = sum(p["queries"] for p in per.values())
            objective = sum((p["box@1"] + p["box@10"]) * p["queries"] for p in per.values()) / (2 * total)
            grid.append({"shortlist": n, "weight": w, "objective": objective, "worlds": per})
            print(f"n={n} w={w:<4} objective {objective:.4f}  " + "  ".join(f"{k}: box@1 {p['box@1']:.3f} box@10 {p['box@10']:.3f} img@1 {p['img@1']:.3f}" for k, p in per.items()), flush=True)
    base = {name: measure(q, 0.0, max(SHORTLISTS)) for name, q in worlds.items()}
    allowed = [g for g in grid if all(g["worlds"][n]["box@1"] >= base[n]["box@1"] and g["worlds"][n]["box@10"] >= base[n]["box@10"] for n in worlds)]
    best = max(allowed, key=lambda g: (g["objective"], -g["shortlist"], -g["weight"]))
    print(f"chosen: shortlist {best['shortlist']}, weight {best['weight']}")
    result = {
        "what": "layout stage of region-only queries fitted on val splits (benchmarks/layout_fit.py docstring)",
        "data": {name: str(d) for name, d in zip(worlds, args.data)},
        "rule": "max query-weighted mean of box@1 and box@10 over the val splits; no world's box@1 or box@10 below stage 1 alone",
        "stage1_alone": base,
        "chosen": {"shortlist": best["shortlist"], "weight": best["weight"]},
        "grid": grid,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
