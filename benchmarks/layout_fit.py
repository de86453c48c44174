"""Fit the layout stage of region-only queries (``engine.config.LAYOUT_SHORTLIST`` / ``LAYOUT_WEIGHT`` /
``INSTANCE_WEIGHT``) on the val splits of the stamps and the shapes worlds.

A region-only query reranks its first ``n`` stage-1 candidates by ``visual + w · layout + v · instance``
(``query.rerank.LayoutRescorer``; ``instance``: the shipped instance head's cosine). For every val query
this script takes the stage-1 candidates of the engine's default val index (built by ``engine eval
search --split val --index DIR``, reused when there), their visual cosine, their layout similarity to
the query map, their instance cosine and their IoU with the query's positives, then scores every
``(n, w, v)`` of the grid with the protocol of ``engine eval search`` (one hit per image, k = 10; a
hit is right in a positive's image with IoU > 0.5).

Rule: the ``(n, w, v)`` with the best query-weighted mean of box@1 and box@10 over both val splits,
among those where neither world's box@1 nor box@10 falls below its ``w = v = 0`` figure (stage 1
alone); a longer shortlist costs query time (reading and scoring each candidate's map), so it is
taken only when it gains more than ``--min-gain`` over the best of every shorter one.
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
SHORTLISTS = (100, 300, 500, 1000, 2000)
WEIGHTS = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0)
INSTANCE_WEIGHTS = (0.0, 1.0, 2.0, 3.0, 5.0)


@dataclass(frozen=True)
class Candidates:
    """One query's stage-1 candidates (its own image left out), best first."""

    visual: np.ndarray
    layout: np.ndarray
    instance: np.ndarray
    iou: np.ndarray  # best IoU with a positive in the same image; -1 in an image without positives
    images: np.ndarray


def collect(data: Path, index_dir: Path, depth: int) -> list[Candidates]:
    """Every val query's candidates from the default val index of ``data`` (built when missing)."""
    from engine.api import Engine
    from engine.boxes import box_iou
    from engine.config import EngineConfig
    from engine.evaluation.search import LINKS_FOLDER, SearchEvalConfig, corpus_path, evaluate_search, split_queries
    from query.request import SearchRequest
    from indexer.arrays import VECTOR_ARRAY
    from query.rerank import layout_similarity, read_region_maps

    config = SearchEvalConfig(data=data, split="val", index_dir=index_dir, limit=1, progress=True)
    evaluate_search(config)  # builds (or reuses) the val index with the engine's defaults
    _, queries, _ = split_queries(SearchEvalConfig(data=data, split="val"))
    links = (index_dir / LINKS_FOLDER).resolve()
    out = []
    with Engine(index_dir, config=EngineConfig()) as engine:
        pipe = engine.pipeline
        store = pipe.store
        head = engine.instance_head
        for query, targets in queries:
            encoded = pipe.encode(SearchRequest(image=links / query.image, region=query.region))
            scores, ids = store.search(encoded.vector[None].astype(np.float32), depth)
            found = store.lookup_regions(ids[0])
            by_id = dict(zip(ids[0].tolist(), scores[0].tolist()))
            rows = {r.id: r for r in store.regions(found.ids)}
            images = np.asarray([corpus_path(rows[int(i)].image_path, links) for i in found.ids])
            keep = images != query.image
            maps = read_region_maps(store, found.rows)
            layout = layout_similarity(encoded.query_map, maps)
            query_embedding = head.embed(np.asarray(encoded.query_map, np.float32)[None], encoded.vector[None].astype(np.float32))[0]
            instance = head.embed(maps, store.read_arrays(VECTOR_ARRAY, found.rows).astype(np.float32)) @ query_embedding
            iou = np.full(len(images), -1.0)
            for j, image in enumerate(images):
                boxes = [t.box for t in targets if t.image == image]
                if boxes:
                    iou[j] = box_iou(found.boxes[j : j + 1].astype(np.float64), np.asarray(boxes, np.float64)).max()
            visual = np.asarray([by_id[int(i)] for i in found.ids], np.float32)
            out.append(Candidates(visual=visual[keep], layout=layout[keep], instance=instance[keep].astype(np.float32), iou=iou[keep], images=images[keep]))
    return out


def measure(queries: list[Candidates], weight: float, shortlist: int, instance_weight: float = 0.0, k: int = 10) -> dict[str, float]:
    """box@1, box@k, img@1 of ranking each query's first ``shortlist`` candidates by
    ``visual + weight · layout + instance_weight · instance``."""
    outcomes = []
    for c in queries:
        m = min(shortlist, len(c.visual))
        if m:
            final = c.visual[:m] + weight * c.layout[:m] + instance_weight * c.instance[:m]
            outcomes.append(first_hits(final, c.iou[:m], c.images[:m], k))
    return rates(outcomes, len(queries), k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, action="append", required=True, help="a dataset folder with a val split (repeat)")
    ap.add_argument("--index-root", type=Path, required=True, help="where the val indexes are built / reused (one folder per dataset)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/layout-fit.json")
    ap.add_argument("--min-gain", type=float, default=0.005, help="objective a longer shortlist must add over every shorter one's best")
    args = ap.parse_args()
    started = time.perf_counter()
    worlds = {d.resolve().name: collect(d, args.index_root / d.resolve().name, max(SHORTLISTS)) for d in args.data}
    grid = []
    for n in SHORTLISTS:
        for w in WEIGHTS:
            for v in INSTANCE_WEIGHTS:
                per = {name: measure(q, w, n, v) for name, q in worlds.items()}
                total = sum(p["queries"] for p in per.values())
                objective = sum((p["box@1"] + p["box@10"]) * p["queries"] for p in per.values()) / (2 * total)
                grid.append({"shortlist": n, "weight": w, "instance_weight": v, "objective": objective, "worlds": per})
                print(f"n={n} w={w:<4} v={v:<4} objective {objective:.4f}  " + "  ".join(f"{k}: box@1 {p['box@1']:.3f} box@10 {p['box@10']:.3f} img@1 {p['img@1']:.3f}" for k, p in per.items()), flush=True)
    base = {name: measure(q, 0.0, max(SHORTLISTS)) for name, q in worlds.items()}
    allowed = [g for g in grid if all(g["worlds"][n]["box@1"] >= base[n]["box@1"] and g["worlds"][n]["box@10"] >= base[n]["box@10"] for n in worlds)]
    best_of = {n: max((g for g in allowed if g["shortlist"] == n), key=lambda g: (g["objective"], -g["weight"], -g["instance_weight"]), default=None) for n in SHORTLISTS}
    best = None
    for n in SHORTLISTS:  # a longer shortlist only for a gain worth its query time
        if best_of[n] is not None and (best is None or best_of[n]["objective"] > best["objective"] + args.min_gain):
            best = best_of[n]
    assert best is not None, "no grid point keeps both worlds at or above stage 1 alone"
    print(f"chosen: shortlist {best['shortlist']}, weight {best['weight']}, instance weight {best['instance_weight']}")
    result = {
        "what": "layout stage of region-only queries fitted on val splits (benchmarks/layout_fit.py docstring)",
        "data": {name: str(d) for name, d in zip(worlds, args.data)},
        "rule": f"max query-weighted mean of box@1 and box@10 over the val splits; no world's box@1 or box@10 below stage 1 alone; a longer shortlist only when it gains more than {args.min_gain} over every shorter one",
        "stage1_alone": base,
        "best_per_shortlist": {str(n): g for n, g in best_of.items()},
        "chosen": {"shortlist": best["shortlist"], "weight": best["weight"], "instance_weight": best["instance_weight"]},
        "grid": grid,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
