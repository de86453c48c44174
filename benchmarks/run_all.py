"""Run every benchmark of docs/benchmarks.md in one go and write benchmarks/results/.

    .venv/bin/python benchmarks/run_all.py                 # everything (hours on a 2-core CPU)
    .venv/bin/python benchmarks/run_all.py --sizes 10000 --steps query,table   # a quick look

Steps (each writes its JSON; one already written is kept unless --force, so an interrupted run resumes):

* ``indexing``  — indexing throughput and stage shares: batch 8, batch 8 on one core, batch 1 → indexing.json
* ``query``     — per index size and stage-2 GRN variant: latency p50/p95 (and on one thread), stage
                  breakdown, recall@10 against exhaustive scoring, exhaustive latency, disk and memory
                  → query-SIZE-GRN.json, and bench-SIZE.json (the ``engine bench --json`` object, default GRN)
* ``sweep``     — the stage-1 shortlist against recall and latency → query-SIZE-GRN-shortlistK.json
* ``faiss``     — FAISS Flat vs the store's IVF vs IVF-PQ at every size from 100,000 → faiss-SIZE.json
* ``compression`` — smaller region maps (int8, 3x3, the mean vector): recall@10 of each GRN variant's
                  exhaustive ranking against the float16 7x7 maps, on the smallest (real) index → compression.json
* ``realism``   — the synthetic regions checked against real ones: the 100,000-region index rebuilt from
                  a 100-image seed (10,000 real regions, 90,000 synthetic) → query-100000-GRN-seed100.json
* ``table``     — benchmarks/results/table.md from all of the above
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.benchmarking.faiss_tradeoff import FaissTradeoffConfig, measure_faiss
from engine.benchmarking.indexing import IndexingBenchConfig, measure_indexing
from engine.benchmarking.query_bench import DEFAULT_CACHE, QueryBenchConfig, prepare_index, run_query_benchmark, write_json
from engine.benchmarking.report import load_results, render_tables
from engine.benchmarking.seed import SeedConfig, load_queries
from engine.benchmarking.timing import machine_facts

STEPS = ("indexing", "query", "sweep", "faiss", "compression", "realism", "table")
RESULTS = Path(__file__).resolve().parent / "results"
def default_variant(regions: int) -> str:
    """The engine's default stage-2 checkpoint on the CPU at this size (``query.rerank.default_grn_name``):
    its runs are also written as bench-SIZE.json."""
    from engine.config import EngineConfig
    from query.rerank import default_grn_name

    return default_grn_name(regions, has_maps=True, on_gpu=False, fc_from_regions=EngineConfig().fc_from_regions)

log = logging.getLogger("benchmarks")


@dataclass(frozen=True)
class Plan:
    """What to run: index sizes, stage-2 variants, the seed, how many queries, which steps."""

    sizes: tuple[int, ...]
    variants: tuple[str, ...]
    seed_images: int
    queries: int
    exhaustive_queries: int
    exhaustive_queries_large: int
    exhaustive_threads: int | None
    sweep_sizes: tuple[int, ...]
    shortlists: tuple[int, ...]
    steps: tuple[str, ...]
    maps: bool
    results: Path
    cache: Path
    force: bool

    def exhaustive_for(self, regions: int, variant: str) -> int:
        """Exhaustive queries of one run: fewer for the conv GRN from 1M regions (minutes per query there)."""
        return self.exhaustive_queries_large if regions >= 1_000_000 and not variant.endswith("-fc") else self.exhaustive_queries

    def query_config(self, regions: int, variant: str, **overrides: object) -> QueryBenchConfig:
        values: dict[str, object] = dict(
            regions=regions,
            queries=self.queries,
            exhaustive_queries=self.exhaustive_for(regions, variant),
            grn=variant,
            single_thread=True,
            exhaustive_threads=self.exhaustive_threads,
            breakdown_threads=self.exhaustive_threads,
            breakdown=20,
            seed=SeedConfig(images=self.seed_images),
            cache=self.cache,
            maps=self.maps,
        )
        values.update(overrides)
        return QueryBenchConfig(**values)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    plan = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan.results.mkdir(parents=True, exist_ok=True)
    if set(plan.steps) - {"table"}:  # the machine the measurements ran on (a table-only run measures nothing)
        write_json(plan.results / "environment.json", machine_facts())
    runners = {"indexing": _indexing, "query": _queries, "sweep": _sweep, "faiss": _faiss, "compression": _compression, "realism": _realism, "table": _table}
    for step in STEPS:  # in this order, whatever order --steps names them
        if step in plan.steps:
            runners[step](plan)
    return 0


def _table(plan: Plan) -> None:
    table = render_tables(load_results(plan.results))
    (plan.results / "table.md").write_text(table, encoding="utf-8")
    print(table)


def _indexing(plan: Plan) -> None:
    out = plan.results / "indexing.json"
    if out.is_file() and not plan.force:
        return
    settings = [IndexingBenchConfig(batch_size=8), IndexingBenchConfig(batch_size=8, one_core=True), IndexingBenchConfig(batch_size=1)]
    reports = []
    for config in settings:
        log.info("indexing throughput: %s", config)
        reports.append(measure_indexing(config, plan.cache, progress=True).to_dict())
        write_json(out, reports)


def _queries(plan: Plan) -> None:
    for regions in plan.sizes:
        for variant in plan.variants:
            out = plan.results / f"query-{regions}-{variant}{'' if plan.maps else '-nomaps'}.json"
            if out.is_file() and not plan.force:
                continue
            log.info("query benchmark: %d regions, %s%s", regions, variant, "" if plan.maps else ", index without maps")
            report = run_query_benchmark(plan.query_config(regions, variant), progress=True)
            write_json(out, report.details())
            if variant == default_variant(regions) and plan.maps:
                write_json(plan.results / f"bench-{regions}.json", report.to_dict())


def _sweep(plan: Plan) -> None:
    for regions in plan.sweep_sizes:
        for variant in plan.variants:
            for shortlist in plan.shortlists:
                out = plan.results / f"query-{regions}-{variant}-shortlist{shortlist}.json"
                if out.is_file() and not plan.force:
                    continue
                log.info("shortlist sweep: %d regions, %s, shortlist %d", regions, variant, shortlist)
                config = plan.query_config(regions, variant, shortlist=shortlist, queries=max(20, plan.exhaustive_for(regions, variant)), single_thread=False, breakdown=10, memory=False)
                write_json(out, run_query_benchmark(config, progress=True).details())


def _realism(plan: Plan, regions: int = 100_000, seed_images: int = 100) -> None:
    for variant in plan.variants:
        out = plan.results / f"query-{regions}-{variant}-seed{seed_images}.json"
        if out.is_file() and not plan.force:
            continue
        log.info("realism check: %d regions from a %d-image seed, %s", regions, seed_images, variant)
        config = plan.query_config(regions, variant, seed=SeedConfig(images=seed_images), single_thread=False, breakdown=0, memory=False)
        write_json(out, run_query_benchmark(config, progress=True).details())


def _faiss(plan: Plan) -> None:
    import numpy as np

    from engine.api import Engine
    from engine.config import EngineConfig
    from query.encode import VisualQueryEncoder, load_query_region

    for regions in plan.sizes:
        out = plan.results / f"faiss-{regions}.json"
        if regions < 100_000 or (out.is_file() and not plan.force):
            continue
        seed, built = prepare_index(plan.query_config(regions, plan.variants[0]), progress=True)
        queries = load_queries(seed.corpus, limit=200)
        with Engine(seed.index, config=EngineConfig(device="cpu")) as engine:
            encoder = VisualQueryEncoder(engine.extractor)
            vectors = np.stack([encoder.encode(load_query_region(q.image, q.box))[1] for q in queries])
        log.info("faiss trade-off: %d vectors, %d queries", regions, len(vectors))
        rows = measure_faiss(built.path, vectors, FaissTradeoffConfig())
        write_json(out, {"regions": regions, "queries": len(vectors), "rows": [r.to_dict() for r in rows]})


def _compression(plan: Plan) -> None:
    from engine.api import Engine
    from engine.benchmarking.compression import compare_map_storage, map_variants
    from engine.benchmarking.exhaustive import ExhaustiveQuery
    from engine.benchmarking.synthetic import real_images
    from engine.config import EngineConfig
    from engine.models.checkpoint import checkpoint_path
    from indexer.store import IndexStore
    from query.encode import VisualQueryEncoder, load_query_region

    out = plan.results / "compression.json"
    if out.is_file() and not plan.force:
        return
    regions = min(plan.sizes)
    seed, built = prepare_index(plan.query_config(regions, plan.variants[0]), progress=True)
    chosen = load_queries(seed.corpus, images=real_images(built.path), limit=plan.exhaustive_queries)
    rows = []
    for variant in plan.variants:
        with Engine(built.path, config=EngineConfig(device="cpu", grn_checkpoint=checkpoint_path(variant, default="grn"))) as engine:
            encoder = VisualQueryEncoder(engine.extractor)
            queries = []
            for q in chosen:
                region = load_query_region(q.image, q.box)
                queries.append(ExhaustiveQuery(query_map=encoder.encode(region).query_map, text=q.text, exclude_hash=region.content_hash))
            with IndexStore.open(built.path) as store:
                log.info("map storage variants: %d regions, %s", regions, variant)
                rows.extend(compare_map_storage(store, engine.retrieval_model, queries, map_variants(), progress=True))
        write_json(out, {"regions": regions, "rows": rows})


def _parse(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: tuple(int(v) for v in text.split(",") if v.strip())  # noqa: E731
    names = lambda text: tuple(v.strip() for v in text.split(",") if v.strip())  # noqa: E731
    parser.add_argument("--sizes", type=ints, default=(10_000, 100_000, 1_000_000), help="index sizes in regions (default 10000,100000,1000000)")
    parser.add_argument("--variants", type=names, default=("grn", "grn-fc"), help="stage-2 GRN checkpoints (default grn,grn-fc)")
    parser.add_argument("--seed-images", type=int, default=1000, help="images of the real seed corpus (100 RPN regions each; default 1000)")
    parser.add_argument("--queries", type=int, default=50, help="timed combined queries per run (default 50)")
    parser.add_argument("--exhaustive-queries", type=int, default=20, help="of them scored exhaustively (default 20)")
    parser.add_argument("--exhaustive-queries-large", type=int, default=10, help="the same for the conv GRN from 1M regions (default 10)")
    parser.add_argument("--exhaustive-threads", type=int, default=1, help="torch threads of the exhaustive scoring and the stage breakdown (default 1: on a loaded 2-core machine one thread is the fastest; the speed-up is also given against the one-thread search)")
    parser.add_argument("--sweep-sizes", type=ints, default=(100_000,), help="sizes of the shortlist sweep (default 100000)")
    parser.add_argument("--shortlists", type=ints, default=(100, 300, 3000, 10000), help="shortlists of the sweep (default 100,300,3000,10000; 1000 is the main run)")
    parser.add_argument("--steps", type=names, default=STEPS, help=f"steps to run (default {','.join(STEPS)})")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="seeds and built indexes (default benchmarks/.cache)")
    parser.add_argument("--force", action="store_true", help="re-run steps whose JSON already exists")
    parser.add_argument("--no-maps", dest="maps", action="store_false", help="query step on indexes built without the 7x7 maps (engine index --no-maps; stage 2 grn-fc): query-SIZE-VARIANT-nomaps.json")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    return Plan(
        sizes=args.sizes,
        variants=args.variants,
        seed_images=args.seed_images,
        queries=args.queries,
        exhaustive_queries=args.exhaustive_queries,
        exhaustive_queries_large=args.exhaustive_queries_large,
        exhaustive_threads=args.exhaustive_threads,
        sweep_sizes=args.sweep_sizes,
        shortlists=args.shortlists,
        steps=args.steps,
        maps=args.maps,
        results=args.results,
        cache=args.cache,
        force=args.force,
    )


if __name__ == "__main__":
    sys.exit(main())
