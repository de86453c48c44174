"""Warm query latency of ``engine serve`` with 1, 4 and 16 concurrent clients at 100K regions (issue 17).

The same queries are also timed through ``Engine.search`` in-process (no HTTP).

The table of docs/benchmarks.md ("`engine serve`: concurrent clients") was made by::

    python benchmarks/serve_latency.py --regions 100000 --seed-images 1000 \\
        --cache /work/runs/serve-bench --out benchmarks/results/serve-latency.json

1. The indexes are ``engine bench``'s (``engine.benchmarking.query_bench.prepare_index``, cached under
   ``--cache``; 12 minutes here): the seed corpus (``engine synth`` scenes, 320 px) indexed by
   ``engine index`` (RPN, 100 regions per image), and the benchmark index of ``--regions`` regions written
   from it through ``IndexStore.commit_images`` (with a smaller seed, the rest synthetic variants).
   ``--index-source seed`` (the default) serves the seed's own index — a real ``engine index`` index,
   every stored array; it needs ``--regions`` = 100 × ``--seed-images`` — and ``--index-source bench``
   the benchmark index, which leaves out the Ref-NMS features (stage 3 then computes them per grounded
   image, which makes combined queries ~3× slower). ``--build-only`` builds both and stops.
2. The queries are the seed corpus's ``queries.jsonl`` lines whose image is in the index, in a seeded
   order: each becomes the indexed region of its image that overlaps its box best (``region_id``) and its
   description (``text``). *region*: ``{"region_id", "k": 10}``; *combined*: ``{"region_id", "text",
   "k": 10}`` — what the page sends for "more like this hit" with and without a description.
3. A real server: ``engine serve --index DIR --port P --device cpu`` in its own process, with
   ``OMP_NUM_THREADS`` = ``--server-threads`` (1). After a warm-up (the first query loads the models), for
   each kind and each client count ``c`` of ``--clients``, ``c`` threads (one keep-alive
   ``http.client`` connection each) start together and each sends ``--region-queries / c`` (or
   ``--combined-queries / c``) queries back to back. Every request's wall time is kept: p50 / p95 /
   mean / max, throughput (queries over the cell's wall time) and the server process's CPU time per
   query (``/proc``). The server answers searches one at a time (a lock around its one ``Engine``), so
   with ``c`` clients a request waits for up to ``c - 1`` others: latency grows about ``c``-fold while
   throughput stays that of one query stream.
4. The server is stopped; the same queries then run in this process through ``Engine.search`` (same
   ``EngineConfig`` as ``engine serve``: device cpu, every default; torch and FAISS on
   ``--server-threads`` threads): p50 / p95, so the HTTP overhead is the difference.
5. ``--profile N``: N warm region queries under cProfile (in-process); the top functions by cumulative
   and by own time go into the JSON, the raw profile next to the index (``serve-latency-region.prof``).

The client threads run on the same (here: 2-core) machine as the server and take some of its CPU.
"""
from __future__ import annotations

import argparse
import cProfile
import http.client
import json
import math
import os
import pstats
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
ENGINE_BIN = Path(sys.executable).with_name("engine")

KINDS = ("region", "combined")


@dataclass(frozen=True)
class Query:
    region_id: int
    text: str

    def body(self, kind: str, k: int) -> dict[str, Any]:
        out: dict[str, Any] = {"region_id": self.region_id, "k": k}
        if kind == "combined":
            out["text"] = self.text
        return out


# ------------------------------------------------------------------------------------------ index + queries
def prepare(args: argparse.Namespace) -> tuple[Any, Any]:
    """The seed and the benchmark index (``engine bench``'s, cached under ``--cache``)."""
    from engine.benchmarking.query_bench import QueryBenchConfig, prepare_index
    from engine.benchmarking.seed import SeedConfig

    config = QueryBenchConfig(regions=args.regions, seed=SeedConfig(images=args.seed_images), cache=args.cache, device="cpu", memory=False, breakdown=0)
    return prepare_index(config, progress=not args.quiet)


def make_queries(seed: Any, index_dir: Path, *, limit: int, rng_seed: int) -> list[Query]:
    """The seed corpus's queries as (the best-overlapping indexed region of the query image, its text)."""
    from engine.benchmarking.seed import load_queries
    from engine.benchmarking.synthetic import real_images
    from indexer.store import IndexStore

    queries = load_queries(seed.corpus, images=real_images(index_dir), seed=rng_seed)
    out: list[Query] = []
    with IndexStore.open(index_dir) as store:
        for q in queries:
            regions = store.regions_of_image(str(q.image))
            if not regions:
                continue
            best = max(regions, key=lambda r: _iou(r.box, q.box))
            out.append(Query(region_id=int(best.id), text=q.text))
            if len(out) >= limit:
                break
    if not out:
        raise SystemExit(f"no query of {seed.corpus}/queries.jsonl has its image in {index_dir}")
    return out


def _iou(a: Any, b: Any) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ------------------------------------------------------------------------------------------------- server
class Server:
    """``engine serve`` in its own process, its output in ``log``."""

    def __init__(self, index_dir: Path, port: int, threads: int, log: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        self.command = [str(ENGINE_BIN), "serve", "--index", str(index_dir), "--port", str(port), "--device", "cpu"]
        self.env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.port = port
        self.log = log
        self._out = open(log, "wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, env=env, stdout=self._out, stderr=subprocess.STDOUT, cwd=REPO)
        self._wait_healthy(timeout=180)
        self.startup_s = time.perf_counter() - started

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"engine serve exited with {self.process.returncode}; see {self.log}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/api/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"engine serve did not answer /api/health within {timeout:.0f} s; see {self.log}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._out.close()


def post_search(conn: http.client.HTTPConnection, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """One ``POST /api/search``: (wall seconds from sending to the parsed answer, the answer)."""
    payload = json.dumps(body).encode()
    start = time.perf_counter()
    conn.request("POST", "/api/search", body=payload, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    seconds = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"POST /api/search {body} -> {response.status}: {data[:300]!r}")
    return seconds, json.loads(data)


def route_of(answer: dict[str, Any]) -> str:
    """Which path answered (from the first hit's score parts): stage 3 grounding, the open vocabulary
    (``concept``), the first-wave text models (``san``), region-only stage 2 (``layout``: visual + layout)."""
    hits = answer.get("hits") or []
    parts = set((hits[0].get("scores") or {}) if hits else {})
    if "grounding" in parts:
        return "stage3"
    if "concept" in parts:
        return "vocabulary"
    if "san" in parts:
        return "san"
    if "layout" in parts:
        return "layout"
    return "visual" if hits else "no hits"


def run_cell(port: int, kind: str, clients: int, per_client: int, queries: list[Query], k: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``per_client`` queries back to back; every request's latency."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    routes: dict[str, int] = {}
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.connect()
        mine = [queries[(i * per_client + j) % len(queries)] for j in range(per_client)]
        barrier.wait()
        for q in mine:
            try:
                seconds, answer = post_search(conn, q.body(kind, k))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                continue
            latencies[i].append(seconds)
            route = route_of(answer)
            with lock:
                routes[route] = routes.get(route, 0) + 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    flat = [s for per in latencies for s in per]
    return {"wall_s": wall, "latencies": flat, "routes": routes, "errors": errors}


def summarize(seconds: list[float]) -> dict[str, float]:
    from engine.benchmarking.timing import percentile_ms

    if not seconds:
        return {"p50_ms": math.nan, "p95_ms": math.nan, "mean_ms": math.nan, "max_ms": math.nan}
    return {
        "p50_ms": round(percentile_ms(seconds, 50), 1),
        "p95_ms": round(percentile_ms(seconds, 95), 1),
        "mean_ms": round(statistics.fmean(seconds) * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1),
    }


def measure_http(args: argparse.Namespace, index_dir: Path, queries: list[Query]) -> dict[str, Any]:
    from engine.server.background import free_port

    port = args.port or free_port()
    server = Server(index_dir, port, args.server_threads, args.cache / "serve-latency-server.log")
    out: dict[str, Any] = {"command": server.command, "env": server.env, "startup_s": round(server.startup_s, 2), "cells": []}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        first, _ = post_search(conn, queries[0].body("region", args.k))
        out["first_region_query_ms"] = round(first * 1000, 1)  # loads the backbone, GRN, ...
        first, _ = post_search(conn, queries[0].body("combined", args.k))
        out["first_combined_query_ms"] = round(first * 1000, 1)  # text models, stage 3
        for i in range(args.warmup):
            for kind in args.kinds:
                post_search(conn, queries[(i + 1) % len(queries)].body(kind, args.k))
        conn.close()
        for kind in args.kinds:
            total = args.region_queries if kind == "region" else args.combined_queries
            for clients in args.clients:
                per_client = max(1, total // clients)
                cpu0, client0 = server.cpu_seconds(), time.process_time()
                load0 = os.getloadavg()[0]
                cell = run_cell(port, kind, clients, per_client, queries, args.k)
                cpu, client_cpu = server.cpu_seconds() - cpu0, time.process_time() - client0
                n = len(cell["latencies"])
                row = {
                    "kind": kind,
                    "clients": clients,
                    "queries": n,
                    "per_client": per_client,
                    **summarize(cell["latencies"]),
                    "throughput_qps": round(n / cell["wall_s"], 2) if cell["wall_s"] > 0 else math.nan,
                    "wall_s": round(cell["wall_s"], 2),
                    "server_cpu_ms_per_query": round(cpu * 1000 / max(n, 1), 1),
                    "client_cpu_ms_per_query": round(client_cpu * 1000 / max(n, 1), 1),
                    "routes": cell["routes"],
                    "errors": len(cell["errors"]),
                    "load_avg_1m_before": round(load0, 2),
                }
                if cell["errors"]:
                    row["first_error"] = cell["errors"][0][:300]
                out["cells"].append(row)
                _say(f"  http {kind:8s} {clients:2d} clients  p50 {row['p50_ms']:8.1f}  p95 {row['p95_ms']:8.1f} ms  {row['throughput_qps']:6.2f} q/s  server CPU {row['server_cpu_ms_per_query']:.0f} ms/q  {row['routes']}")
    finally:
        server.stop()
    return out


# ------------------------------------------------------------------------------------------- in-process
def measure_in_process(args: argparse.Namespace, index_dir: Path, queries: list[Query]) -> dict[str, Any]:
    import faiss
    import torch

    from engine.api import Engine
    from engine.config import EngineConfig

    torch.set_num_threads(args.server_threads)
    faiss.omp_set_num_threads(args.server_threads)
    out: dict[str, Any] = {"threads": args.server_threads, "config": "EngineConfig(device='cpu'), as engine serve builds it"}
    with Engine(index_dir, config=EngineConfig(device="cpu")) as engine:
        for i in range(1 + args.warmup):
            for kind in args.kinds:
                engine.search(**_kwargs(queries[i % len(queries)], kind, args.k))
        for kind in args.kinds:
            count = args.in_process_queries if kind == "region" else args.in_process_combined_queries
            wall: list[float] = []
            cpu: list[float] = []
            for j in range(count):
                q = queries[j % len(queries)]
                w0, c0 = time.perf_counter(), time.process_time()
                engine.search(**_kwargs(q, kind, args.k))
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
            out[kind] = {"queries": count, **summarize(wall), "p50_cpu_ms": round(statistics.median(cpu) * 1000, 1)}
            _say(f"  in-process {kind:8s} p50 {out[kind]['p50_ms']:8.1f}  p95 {out[kind]['p95_ms']:8.1f} ms  (CPU p50 {out[kind]['p50_cpu_ms']:.1f} ms)")
        if args.profile:
            out["profile"] = profile_region(engine, queries, args)
    return out


def _kwargs(q: Query, kind: str, k: int) -> dict[str, Any]:
    return {"region_id": q.region_id, "text": q.text if kind == "combined" else None, "k": k}


def profile_region(engine: Any, queries: list[Query], args: argparse.Namespace) -> dict[str, Any]:
    """cProfile of ``args.profile`` warm region queries: top functions by cumulative and by own time."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for j in range(args.profile):
        engine.search(**_kwargs(queries[j % len(queries)], "region", args.k))
    profiler.disable()
    wall = time.perf_counter() - start
    path = args.cache / "serve-latency-region.prof"
    profiler.dump_stats(str(path))
    stats = pstats.Stats(profiler)

    def top(key: int, n: int) -> list[dict[str, Any]]:
        rows = sorted(stats.stats.items(), key=lambda item: item[1][key], reverse=True)[:n]  # type: ignore[attr-defined]
        return [
            {"function": f"{_short(file)}:{line}({name})", "calls": nc, "own_ms_per_query": round(tt * 1000 / args.profile, 2), "cum_ms_per_query": round(ct * 1000 / args.profile, 2)}
            for (file, line, name), (cc, nc, tt, ct, _callers) in rows
        ]

    return {"queries": args.profile, "wall_ms_per_query_under_profile": round(wall * 1000 / args.profile, 1), "file": str(path), "by_cumulative": top(3, 30), "by_own_time": top(2, 20)}


def _short(file: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


# ------------------------------------------------------------------------------------------------- main
def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _git_state() -> dict[str, Any]:
    """The commit measured, and the files changed in the working tree then."""
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "changed": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def table(result: dict[str, Any]) -> str:
    inproc = result.get("in_process", {})
    lines = [
        "| query | clients | p50 ms | p95 ms | throughput q/s | server CPU ms/query | queries |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["http"]["cells"]:
        lines.append(f"| {row['kind']} | {row['clients']} | {row['p50_ms']:,.0f} | {row['p95_ms']:,.0f} | {row['throughput_qps']:.1f} | {row['server_cpu_ms_per_query']:,.0f} | {row['queries']} |")
    for kind in KINDS:
        if kind in inproc:
            row = inproc[kind]
            lines.append(f"| {kind}, `Engine.search` in-process | – | {row['p50_ms']:,.0f} | {row['p95_ms']:,.0f} | – | {row['p50_cpu_ms']:,.0f} (p50) | {row['queries']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, default=100_000, help="index size in regions (default 100000)")
    parser.add_argument("--seed-images", type=int, default=1000, help="images of the real seed corpus, 100 RPN regions each (default 1000: a 100K index of real regions only)")
    parser.add_argument("--index-source", choices=("seed", "bench"), default="seed", help="seed (default): the seed corpus's own `engine index` index (needs --regions = 100 x --seed-images); bench: engine bench's commit-path index, which leaves out the Ref-NMS features")
    parser.add_argument("--cache", type=Path, default=Path("/work/runs/serve-bench"), help="where the seed, the index, the server log and the profile are kept")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serve-latency.json", help="results JSON")
    parser.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16], help="concurrent client counts (default 1,4,16)")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS), help="region,combined")
    parser.add_argument("--region-queries", type=int, default=320, help="region queries per (client count), split evenly among the clients (default 320)")
    parser.add_argument("--combined-queries", type=int, default=96, help="combined queries per (client count), split evenly (default 96)")
    parser.add_argument("--in-process-queries", type=int, default=100, help="region queries timed through Engine.search (default 100)")
    parser.add_argument("--in-process-combined-queries", type=int, default=20, help="combined queries timed through Engine.search (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed queries of each kind after the first (default 5)")
    parser.add_argument("--profile", type=int, default=30, help="warm region queries under cProfile (0: none)")
    parser.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server (and torch/FAISS threads in-process); default 1")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--seed", type=int, default=0, help="order of the queries")
    parser.add_argument("--skip-in-process", action="store_true", help="no in-process Engine.search timing")
    parser.add_argument("--build-only", action="store_true", help="build (or find) the index and stop")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if any(k not in KINDS for k in args.kinds):
        parser.error(f"--kinds: {args.kinds}; use region and/or combined")
    args.cache = args.cache.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)

    from engine.benchmarking.timing import machine_facts
    from indexer.store import IndexStore

    started = time.perf_counter()
    seed, built = prepare(args)
    if args.build_only:
        _say(f"index ready: {built.path} ({built.regions:,} regions, built in {built.build_seconds:.0f} s); seed index {seed.index}")
        return 0
    if args.index_source == "seed":
        index_dir = seed.index
        index_facts: dict[str, Any] = {"path": str(seed.index), "source": "seed: the seed corpus indexed by `engine index` (every stored array, Ref-NMS features included)"}
    else:
        index_dir = built.path
        index_facts = {**built.to_dict(), "source": "bench: engine bench's index, written through IndexStore.commit_images without the Ref-NMS features (stage 3 computes them per grounded image)"}
    with IndexStore.open(index_dir) as store:
        info = store.info()
        arrays = sorted(store.array_specs)
    if args.index_source == "seed" and info.regions != args.regions:
        parser.error(f"--index-source seed: the seed index holds {info.regions:,} regions, not --regions {args.regions:,}; pick --seed-images so that they match (100 regions per image)")
    queries = make_queries(seed, index_dir, limit=max(args.region_queries, args.combined_queries, args.in_process_queries) + args.warmup + 1, rng_seed=args.seed)
    _say(f"{info.regions:,} regions in {index_dir}, {info.index_type}, arrays {arrays}; {len(queries)} queries")
    result: dict[str, Any] = {
        "command": "python benchmarks/serve_latency.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**machine_facts(), "gpu": None},
        "index": {**index_facts, "index_type": info.index_type, "regions": int(info.regions), "images": int(info.images), "arrays": arrays},
        "queries": {"distinct": len(queries), "k": args.k, "exclude_self": False, "source": "seed corpus queries.jsonl: best-overlapping indexed region of the query image, its description"},
        "server_serialises_searches": True,
        "git": _git_state(),
    }
    result["http"] = measure_http(args, index_dir, queries)
    if not args.skip_in_process:
        result["in_process"] = measure_in_process(args, index_dir, queries)
    one = next((r for r in result["http"]["cells"] if r["kind"] == "region" and r["clients"] == 1), None)
    if one is not None:
        result["target"] = {"warm_region_p50_ms_1_client": one["p50_ms"], "target_ms": 60, "met": bool(one["p50_ms"] < 60)}
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result))
    _say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
