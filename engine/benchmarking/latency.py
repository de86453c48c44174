"""Query latency: combined queries (image + region + text) through :meth:`engine.api.Engine.search`, and
where the time goes, stage by stage.

:func:`measure_latency` times whole searches (p50 / p95 after a warm-up). :func:`measure_breakdown`
runs the same queries through the same components one by one (query encoding, the SAN text vector and
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
from engine.benchmarking.timing import StageTimes, percentile_ms

__all__ = ["LatencyResult", "measure_latency", "measure_breakdown"]


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


def measure_latency(engine: Any, queries: Sequence[BenchQuery], *, count: int, warmup: int = 5, k: int = 10, progress: bool = False) -> LatencyResult:
    """Time ``count`` combined searches (``queries`` cycled) after ``warmup`` untimed ones (other queries
    where there are enough). Hits exclude the query image itself, as a user searching a collection
    that holds the query image would ask."""
    for i in range(warmup):
        q = queries[(len(queries) - 1 - i) % len(queries)]
        engine.search(image=q.image, region=q.box, text=q.text, k=k, exclude_self=True)
    seconds: list[float] = []
    cpu: list[float] = []
    top: list[list[int]] = []
    for i in tqdm(range(count), desc="latency", unit="query", disable=not progress, dynamic_ncols=True):
        q = queries[i % len(queries)]
        start, start_cpu = time.perf_counter(), time.process_time()
        hits = engine.search(image=q.image, region=q.box, text=q.text, k=k, exclude_self=True)
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
    """Median milliseconds per stage of a combined query, over ``count`` queries (see the module doc)."""
    from indexer.store import IndexStore
    from query.encode import VisualQueryEncoder, load_query_region
    from query.search import SearchOptions, ranked_hits
    from query.rerank import read_grn_inputs

    config = engine.config
    model = engine.retrieval_model
    encoder = VisualQueryEncoder(engine.extractor)
    per_query: list[dict[str, float]] = []
    with IndexStore.open(index_dir, config=config.store) as store:
        use_san = bool(config.san) and store.has_array("san")
        san_model = engine.san_encoder.model if use_san else None
        for i in tqdm(range(count), desc="stage breakdown", unit="query", disable=not progress, dynamic_ncols=True):
            q = queries[i % len(queries)]
            times = StageTimes()
            with times.stage("encode"):
                region = load_query_region(q.image, q.box)
                query_map, vector = encoder.encode(region)
            with times.stage("text"):
                model.encode_text(q.text)
                san_vector = san_model.text_vector(q.text) if san_model is not None else None
            extra: list[int] = []
            if san_vector is not None and config.san_candidates > 0:
                with times.stage("san_candidates"):
                    _, found = store.search(san_vector[None], config.san_candidates, array="san")
                extra = [int(x) for x in found[0] if x >= 0]
            with times.stage("count"):
                total = store.vector_count()
            with times.stage("stage1"):
                scores, ids = store.search(vector[None], min(config.shortlist, total))
            with times.stage("metadata"):  # the candidates' feature rows, images and boxes (the region table)
                found = store.lookup_regions(list(dict.fromkeys([int(x) for x in ids[0] if x >= 0] + extra)))
            row_ids = found.rows
            with times.stage("read_maps"):  # what GrnRescorer reads: the pooled rows for a non-spatial GRN
                maps = read_grn_inputs(store, model, row_ids)
            with times.stage("grn"):
                grn = model.score(query_map, q.text, maps)
            final = grn
            if san_model is not None and config.text_weight > 0:
                with times.stage("san"):
                    vectors = store.read_arrays("san", row_ids).astype(np.float32)
                    final = grn + config.text_weight * san_model.score(q.text, vectors)
            with times.stage("filter"):  # per-image suppression, the hits' image rows read (the search's own code)
                ranked_hits(store, found, {"visual": np.zeros(len(found), np.float32), "final": np.asarray(final, np.float32)}, SearchOptions(k=10), "visual")
            per_query.append({**times.as_dict(), **_precompute_projection(store, model, query_map, q.text, maps, row_ids)})
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
