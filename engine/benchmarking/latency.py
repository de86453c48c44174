"""Query latency: combined queries (image + region + text) through :meth:`engine.api.Engine.search`, and
where the time goes, stage by stage.

:func:`measure_latency` times whole searches (p50 / p95 after a warm-up), every region a possible hit
(``HitFilter(max_per_image=0)``, where a user's search shows one hit per image by default: the
two-stage top ids are compared with exhaustive scoring, which ranks regions). :func:`measure_breakdown`
runs the same queries through the engine's query pipeline step by step (query encoding, the SAN text vector and
its candidates, the region count that the search asks for, the FAISS shortlist, the candidates' rows in
the in-memory region table, the feature-store reads, the GRN and SAN scores, the per-image suppression
and the hits' image rows) and times each; it also
times what stage 2 would cost if the GRN's text-independent work were done at index time
(``grn_query_part``) and the reads that a vector-only stage 2 would need (``read_vectors``).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from engine.benchmarking.seed import BenchQuery
from engine.benchmarking.timing import StageTimes, TimedProxy, percentile_ms
from query.filters import HitFilter

__all__ = ["LatencyResult", "measure_latency", "measure_breakdown", "PER_REGION"]

PER_REGION = HitFilter(max_per_image=0)
"""The benchmark's filter: any number of hits per image, as the exhaustive ranking it is compared with."""


@dataclass(frozen=True)
class LatencyResult:
    """Latency of ``queries`` searches in milliseconds (wall clock, and the CPU time of this process, which
    other work on the machine does not inflate), torch's thread count, and each search's hit ids."""

    p50_ms: float
    p95_ms: float
    mean_ms: float
    queries: int
    threads: int
    p50_cpu_ms: float = float("nan")
    p95_cpu_ms: float = float("nan")
    top_ids: list[list[int]] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {
            "p50_ms": round(self.p50_ms, 2),
            "p95_ms": round(self.p95_ms, 2),
            "mean_ms": round(self.mean_ms, 2),
            "p50_cpu_ms": round(self.p50_cpu_ms, 2),
            "p95_cpu_ms": round(self.p95_cpu_ms, 2),
            "queries": self.queries,
            "threads": self.threads,
        }


def measure_latency(engine: Any, queries: Sequence[BenchQuery], *, count: int, warmup: int = 5, k: int = 10, progress: bool = False, filters: HitFilter = PER_REGION) -> LatencyResult:
    """Time ``count`` combined searches (``queries`` cycled) after ``warmup`` untimed ones (other queries
    where there are enough). Hits exclude the query image itself, as a user searching a collection
    that holds the query image would ask; ``filters``: per region (the default, as exhaustive scoring
    ranks), or e.g. ``HitFilter()``, a user's default of one hit per image."""
    for i in range(warmup):
        q = queries[(len(queries) - 1 - i) % len(queries)]
        engine.search(image=q.image, region=q.box, text=q.text, k=k, exclude_self=True, filters=filters)
    seconds: list[float] = []
    cpu: list[float] = []
    top: list[list[int]] = []
    for i in tqdm(range(count), desc="latency", unit="query", disable=not progress, dynamic_ncols=True):
        q = queries[i % len(queries)]
        start, start_cpu = time.perf_counter(), time.process_time()
        hits = engine.search(image=q.image, region=q.box, text=q.text, k=k, exclude_self=True, filters=filters)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        top.append([h.region_id for h in hits])
    return LatencyResult(
        p50_ms=percentile_ms(seconds, 50),
        p95_ms=percentile_ms(seconds, 95),
        mean_ms=float(np.mean(seconds) * 1000),
        queries=count,
        threads=torch.get_num_threads(),
        p50_cpu_ms=percentile_ms(cpu, 50),
        p95_cpu_ms=percentile_ms(cpu, 95),
        top_ids=top,
    )


@torch.no_grad()
def measure_breakdown(engine: Any, index_dir: Path, queries: Sequence[BenchQuery], *, count: int, progress: bool = False) -> dict[str, float]:
    """Median milliseconds per stage of a combined query, over ``count`` queries (see the module doc).

    The steps are the engine's own (:class:`query.pipeline.QueryPipeline` and the functions it calls),
    taken apart to time each: the stage-1 search, the region table, the feature reads and the GRN and
    SAN scores separately."""
    from indexer.store import IndexStore
    from query.pipeline import QueryPipeline
    from query.request import SearchRequest
    from query.rerank import StageScores, fuse_scores, read_grn_inputs
    from query.search import SearchOptions, ranked_hits, stage1_candidates

    config = engine.config
    model = engine.retrieval_model
    per_query: list[dict[str, float]] = []
    with IndexStore.open(index_dir, config=config.store) as store:
        pipeline = QueryPipeline(store=store, models=engine, config=config)
        for i in tqdm(range(count), desc="stage breakdown", unit="query", disable=not progress, dynamic_ncols=True):
            q = queries[i % len(queries)]
            times = StageTimes()
            with times.stage("encode"):
                query = pipeline.encode(SearchRequest(image=q.image, region=q.box, text=q.text))
            with times.stage("text"):
                model.encode_text(q.text)
                san_vector = pipeline.san_text_vector(q.text)
            extra: tuple[int, ...] = ()
            if san_vector is not None and config.san_candidates > 0:
                with times.stage("san_candidates"):
                    extra = pipeline.san_candidates(san_vector)
            with times.stage("count"):
                total = store.vector_count()
            # FAISS ("stage1"), then the candidates' feature rows, images and boxes from the region table ("metadata")
            timed = TimedProxy(TimedProxy(store, times, "metadata", ["lookup_regions"]), times, "stage1", ["search"])
            found = stage1_candidates(timed, np.asarray(query.vector, np.float32)[None], min(config.shortlist, total), array=query.array, stage1=query.stage1, extra_ids=extra)
            row_ids = found.regions.rows
            with times.stage("read_maps"):  # what GrnRescorer reads: the pooled rows for a non-spatial GRN
                maps = read_grn_inputs(store, model, row_ids)
            with times.stage("grn"):
                grn = np.asarray(model.score(query.query_map, q.text, maps), np.float32)
            scores = StageScores(final=grn, grn=grn)
            if san_vector is not None and config.text_weight > 0:
                with times.stage("san"):
                    vectors = store.read_arrays("san", row_ids).astype(np.float32)
                    san = np.asarray(engine.san_encoder.model.score(q.text, vectors), np.float32)
                    scores = StageScores(final=fuse_scores(grn, san, image_weight=config.image_weight, text_weight=config.text_weight), grn=grn, san=san)
            with times.stage("filter"):  # per-image suppression, the hits' image rows read (the search's own code)
                ranked_hits(store, found, scores, SearchOptions(k=10, filters=PER_REGION))
            per_query.append({**times.as_dict(), **_precompute_projection(store, model, query.query_map, q.text, maps, row_ids)})
    names = sorted({name for row in per_query for name in row})
    return {name: round(float(np.median([row.get(name, 0.0) for row in per_query]) * 1000), 3) for name in names}


def _precompute_projection(store: Any, model: Any, query_map: np.ndarray, text: str, maps: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """Seconds of the GRN's query-dependent part alone (its text-independent part done beforehand, as an
    index could store it) and of reading one 112-d float16 vector per candidate instead of its map."""
    net = model.net
    prepared = net.prepare(torch.from_numpy(maps).to(model.device).float())
    start = time.perf_counter()
    text_vec = model.encode_text(text)[None]
    anchor = net.embed(torch.as_tensor(np.asarray(query_map))[None].float().to(model.device), text_vec)[0]
    (net.embed_prepared(prepared, text_vec) @ anchor).cpu().numpy()
    query_part = time.perf_counter() - start
    start = time.perf_counter()
    store.read_arrays("visual", rows)
    return {"grn_query_part": query_part, "read_vectors": time.perf_counter() - start}
