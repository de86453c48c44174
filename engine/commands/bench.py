"""``engine bench``: query latency, recall against exhaustive scoring and disk per region for one index size."""
from __future__ import annotations

import json
from pathlib import Path

import click

from engine.commands.options import device_option

__all__ = ["bench_command"]


@click.command("bench")
@click.option("--regions", required=True, type=int, help="Index size in regions: the seed corpus's real regions, then synthetic ones derived from them.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"regions", "p50_ms", "p95_ms", "exhaustive_p50_ms", "recall_at_10_vs_exhaustive", "index_type", "bytes_per_region"} here.')
@click.option("--details", "details_path", type=click.Path(dir_okay=False, path_type=Path), help="Write everything measured (stage breakdown, memory, disk by part, index build) here as JSON.")
@click.option("--grn", default=None, help="Stage-2 GRN checkpoint: an installed name (grn, grn-fc, …) or a .pt file. Default: the engine's.")
@click.option("--queries", type=int, default=50, show_default=True, help="Combined queries timed (after a warm-up).")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed searches first (models, FAISS file, page cache).")
@click.option("--exhaustive-queries", type=int, default=10, show_default=True, help="How many of them are also scored exhaustively (every region).")
@click.option("--shortlist", type=int, default=None, help="Stage-1 candidates reranked by stage 2. Default: the engine's.")
@click.option("--text-weight", type=float, default=None, help="Weight of SAN's score in stage 2 (0: the GRN alone). Default: the engine's.")
@click.option("--threads", type=int, default=None, help="torch threads. Default: torch's.")
@click.option("--single-thread", is_flag=True, help="Also time the searches on one thread.")
@click.option("--exhaustive-threads", type=int, default=None, help="torch threads of the exhaustive scoring. Default: as --threads.")
@click.option("--breakdown", type=int, default=20, show_default=True, help="Queries timed stage by stage (0: none).")
@click.option("--stage3-queries", type=click.IntRange(min=0), default=0, show_default=True, help="Also time this many of the queries with stage 3 (grounding) on: the full default combined query (0: none).")
@click.option("--maps/--no-maps", default=True, show_default=True, help="--no-maps: an index built as `engine index --no-maps` builds it (no 7x7 maps; stage 2 grn-fc).")
@click.option("--memory/--no-memory", default=True, show_default=True, help="Measure the resident memory of a fresh reader process (loads the models once more).")
@click.option("--seed-images", type=int, default=100, show_default=True, help="Images of the generated seed corpus (100 RPN regions each).")
@click.option("--seed-corpus", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Use this indexed corpus as the seed (with --seed-index).")
@click.option("--seed-index", type=click.Path(exists=True, file_okay=False, path_type=Path), help="The index of --seed-corpus.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/.cache"), show_default=True, help="Where seeds and built indexes are kept between runs.")
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def bench_command(
    regions: int,
    json_path: Path | None,
    details_path: Path | None,
    grn: str | None,
    queries: int,
    warmup: int,
    exhaustive_queries: int,
    shortlist: int | None,
    text_weight: float | None,
    threads: int | None,
    single_thread: bool,
    exhaustive_threads: int | None,
    breakdown: int,
    stage3_queries: int,
    maps: bool,
    memory: bool,
    seed_images: int,
    seed_corpus: Path | None,
    seed_index: Path | None,
    cache: Path,
    device: str,
    quiet: bool,
) -> None:
    """Time combined queries (image + region + text) on an index of REGIONS regions and compare the
    two-stage search with exhaustive stage-2 scoring of every region.

    The index is built once through the real commit path and cached under --cache; see docs/benchmarks.md.

    \b
    Example:
      engine bench --regions 100000 --json bench.json
      engine bench --regions 10000 --grn grn-fc --single-thread
    """
    from engine.benchmarking.query_bench import QueryBenchConfig, run_query_benchmark, write_json
    from engine.benchmarking.seed import SeedConfig

    config = QueryBenchConfig(
        regions=regions,
        queries=queries,
        warmup=warmup,
        exhaustive_queries=exhaustive_queries,
        grn=grn,
        shortlist=shortlist,
        text_weight=text_weight,
        threads=threads,
        single_thread=single_thread,
        exhaustive_threads=exhaustive_threads,
        breakdown=breakdown,
        stage3_queries=stage3_queries,
        maps=maps,
        memory=memory,
        seed=SeedConfig(images=seed_images, corpus=seed_corpus, index=seed_index),
        cache=cache,
        device=device,
    )
    report = run_query_benchmark(config, progress=not quiet)
    if json_path is not None:
        write_json(json_path, report.to_dict())
    if details_path is not None:
        write_json(details_path, report.details())
    _print(report)


def _print(report) -> None:  # noqa: ANN001
    extra = report.extra
    click.echo(
        f"{report.regions:,} regions ({extra['index']['real_regions']:,} real), {report.index_type}, {extra['grn_method']}, "
        f"shortlist {extra['shortlist']}, {extra['threads']} threads"
    )
    click.echo(f"  two-stage    p50 {report.p50_ms:9.1f} ms   p95 {report.p95_ms:9.1f} ms   ({extra['latency']['queries']} queries)")
    if "latency_1_thread" in extra:
        one = extra["latency_1_thread"]
        click.echo(f"  one thread   p50 {one['p50_ms']:9.1f} ms   p95 {one['p95_ms']:9.1f} ms")
    same = f", x{extra['speedup_vs_exhaustive_1_thread']:.1f} against one thread" if "speedup_vs_exhaustive_1_thread" in extra else ""
    click.echo(f"  exhaustive   p50 {report.exhaustive_p50_ms:9.1f} ms   ({extra['exhaustive']['threads']} threads)   speed-up x{extra['speedup_vs_exhaustive']:.1f}{same}")
    click.echo(f"  recall@10 vs exhaustive {report.recall_at_10_vs_exhaustive:.3f} ({extra['exhaustive']['queries']} queries)")
    click.echo(f"  disk {report.bytes_per_region:,.0f} bytes/region ({extra['disk']['bytes_per_region_without_maps']:,.0f} without the 7x7 maps)")
    if "breakdown_ms" in extra:
        click.echo("  stage medians (ms): " + json.dumps(extra["breakdown_ms"]))
