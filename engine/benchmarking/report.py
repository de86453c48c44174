"""The markdown tables of a benchmark results folder (``benchmarks/results/table.md``).

Reads the JSON files that ``benchmarks/run_all.py`` writes — ``query-*.json`` (one index size and GRN
variant each), ``indexing.json``, ``faiss-*.json``, ``compression.json``, ``environment.json`` — and renders one table per
part plus the issue's targets, each marked met or missed from the measured numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "load_results", "render_tables", "target_rows"]

TARGETS = {"p50_ms_at_1m": 100.0, "speedup_at_1m": 100.0, "disk_bytes_at_1m": 4e9, "recall_at_10": 0.95}
"""The issue's CPU targets: p50 of a combined query at 1M regions, speed-up over exhaustive scoring at
1M, disk of a 1M-region index, recall@10 (two-stage vs exhaustive, and the chosen FAISS index vs Flat)."""


def load_results(folder: Path) -> dict[str, Any]:
    """The parsed JSON files of ``folder`` by kind: ``query`` (list), ``faiss`` ({regions: rows}),
    ``indexing`` (list), ``environment`` (dict)."""
    folder = Path(folder)
    queries = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("query-*.json"))]
    queries.sort(key=lambda r: (r["regions"], r.get("grn_method", ""), r.get("shortlist", 0)))
    faiss = {}
    for path in sorted(folder.glob("faiss-*.json")):
        payload = json.loads(path.read_text(encoding="utf-8"))
        faiss[int(payload["regions"])] = payload["rows"]
    compression = json.loads((folder / "compression.json").read_text(encoding="utf-8")) if (folder / "compression.json").is_file() else {}
    indexing = json.loads((folder / "indexing.json").read_text(encoding="utf-8")) if (folder / "indexing.json").is_file() else []
    environment = json.loads((folder / "environment.json").read_text(encoding="utf-8")) if (folder / "environment.json").is_file() else {}
    return {"query": queries, "faiss": faiss, "indexing": indexing, "environment": environment, "compression": compression}


def render_tables(results: dict[str, Any]) -> str:
    """All tables as one markdown document."""
    parts = []
    env = results.get("environment") or {}
    if env:
        parts.append(
            f"Measured on {env.get('cpu', '?')} ({env.get('cores', '?')} cores, torch {env.get('torch', '?')}, "
            f"{env.get('torch_threads', '?')} torch threads by default); load average {env.get('load_avg_1m', '?')} when the run started.\n"
        )
    if results["query"]:
        parts.append("### Combined queries (image + region + text): two-stage search vs exhaustive stage-2 scoring\n")
        parts.append(_query_table(results["query"]))
        parts.append("\n### Where a query's time goes (median ms per stage)\n")
        parts.append(_breakdown_table(results["query"]))
        parts.append("\n### Disk and memory per region\n")
        parts.append(_disk_table(results["query"]))
    if results["faiss"]:
        parts.append("\n### Stage 1: FAISS Flat vs IVF (recall against Flat on the real query vectors)\n")
        parts.append(_faiss_table(results["faiss"]))
    if results.get("compression"):
        parts.append(f"\n### Smaller region maps: exhaustive GRN ranking vs the float16 7x7 maps ({results['compression']['regions']:,} real regions)\n")
        parts.append(_compression_table(results["compression"]["rows"]))
    if results["indexing"]:
        parts.append("\n### Indexing throughput\n")
        parts.append(_indexing_table(results["indexing"]))
    rows = target_rows(results)
    if rows:
        parts.append("\n### Targets\n")
        parts.append(_table(["target", "measured", "met"], rows))
    return "\n".join(parts)


def target_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per issue target and GRN variant: what it asks, what was measured, met or not."""
    rows: list[list[str]] = []
    largest = max((r["regions"] for r in results["query"]), default=0)
    for r in results["query"]:
        if r["regions"] != largest:
            continue
        name = f"{r.get('grn_method', '?')}, shortlist {r.get('shortlist', '?')}"
        rows.append([f"p50 < {TARGETS['p50_ms_at_1m']:.0f} ms at {largest:,} regions ({name})", f"{r['p50_ms']:.1f} ms", _yes(r["p50_ms"] < TARGETS["p50_ms_at_1m"])])
        speedup = r.get("speedup_vs_exhaustive_1_thread", r.get("speedup_vs_exhaustive", float("nan")))
        rows.append([f">= {TARGETS['speedup_at_1m']:.0f}x faster than exhaustive at {largest:,} ({name}; both on {r['exhaustive'].get('threads', '?')} thread(s))", f"{speedup:.0f}x", _yes(speedup >= TARGETS["speedup_at_1m"])])
        one = r.get("latency_1_thread", {}).get("p50_ms")
        if one is not None:
            rows.append([f"p50 < {TARGETS['p50_ms_at_1m']:.0f} ms at {largest:,} regions on one thread ({name})", f"{one:.1f} ms", _yes(one < TARGETS["p50_ms_at_1m"])])
    for r in results["query"]:
        name = f"{r['regions']:,} regions, {r.get('grn_method', '?')}, shortlist {r.get('shortlist', '?')}"
        rows.append([f"recall@10 vs exhaustive >= {TARGETS['recall_at_10']} ({name})", f"{r['recall_at_10_vs_exhaustive']:.3f}", _yes(r["recall_at_10_vs_exhaustive"] >= TARGETS["recall_at_10"])])
        if "recall_at_10_vs_exhaustive_grn_only" in r:
            alone = r["recall_at_10_vs_exhaustive_grn_only"]
            rows.append([f"... ranked by the GRN alone, the paper's procedure ({name})", f"{alone:.3f}", _yes(alone >= TARGETS["recall_at_10"])])
    seen: set[bool] = set()
    for r in results["query"]:
        maps = r.get("maps", True)
        if r["regions"] != largest or maps in seen:
            continue
        seen.add(maps)
        disk = r["bytes_per_region"] * 1_000_000
        label = "as built with the 7x7 maps" if maps else "built with --no-maps"
        rows.append([f"1M-region index within 4 GB of disk ({label}, measured at {largest:,})", f"{disk / 1e9:.2f} GB", _yes(disk <= TARGETS["disk_bytes_at_1m"])])
    for regions, faiss_rows in sorted(results["faiss"].items()):
        chosen = [f for f in faiss_rows if f["chosen_by_store"]]
        for f in chosen:
            rows.append([f"index chosen by size keeps recall@10 >= 0.95 vs Flat ({regions:,}: {f['index']}, nprobe {f['nprobe']})", f"{f['recall_at_10']:.3f}", _yes(f["recall_at_10"] >= TARGETS["recall_at_10"])])
    return rows


# --------------------------------------------------------------------------------------------------- tables


def _query_table(rows: list[dict[str, Any]]) -> str:
    head = [
        "regions (real)", "index", "stage 2", "shortlist", "p50 / p95 ms", "p50 ms, 1 thread (CPU)",
        "exhaustive p50 ms (CPU)", "speed-up (1 thread; CPU)", "recall@10 vs exhaustive", "recall@10, GRN alone", "queries (exh.)",
    ]
    body = []
    for r in rows:
        one = r.get("latency_1_thread")
        exh = r["exhaustive"]
        speed = f"{r['speedup_vs_exhaustive']:.0f}x"
        if "speedup_vs_exhaustive_1_thread" in r:
            speed = f"{r['speedup_vs_exhaustive_1_thread']:.0f}x" + (f"; {r['speedup_vs_exhaustive_1_thread_cpu']:.0f}x" if "speedup_vs_exhaustive_1_thread_cpu" in r else "")
        body.append(
            [
                f"{r['regions']:,} ({r['index']['real_regions']:,})",
                _index_name(r),
                r.get("grn_method", "?") + ("" if r.get("text_weight", 0) == 0 else f" + {r['text_weight']:g}·SAN"),
                str(r.get("shortlist", "?")),
                f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f} ({r['latency']['threads']} thr.)",
                f"{one['p50_ms']:.0f} ({one['p50_cpu_ms']:.0f})" if one and "p50_cpu_ms" in one else (f"{one['p50_ms']:.0f}" if one else "—"),
                f"{r['exhaustive_p50_ms']:,.0f}" + (f" ({exh['p50_cpu_ms']:,.0f})" if exh.get("p50_cpu_ms") == exh.get("p50_cpu_ms") and "p50_cpu_ms" in exh else "") + f" [{exh.get('threads', '?')} thr.]",
                speed,
                f"{r['recall_at_10_vs_exhaustive']:.3f}",
                f"{r['recall_at_10_vs_exhaustive_grn_only']:.3f}" if "recall_at_10_vs_exhaustive_grn_only" in r else "—",
                f"{r['latency']['queries']} ({exh['queries']})",
            ]
        )
    return _table(head, body)


def _breakdown_table(rows: list[dict[str, Any]]) -> str:
    stages = ["encode", "text", "san_candidates", "count", "stage1", "metadata", "read_maps", "grn", "san", "filter", "grn_query_part", "read_vectors"]
    head = ["regions", "stage 2", "shortlist", "threads", *stages]
    body = []
    for r in rows:
        b = r.get("breakdown_ms")
        if not b:
            continue
        body.append([f"{r['regions']:,}", r.get("grn_method", "?"), str(r.get("shortlist", "?")), str(r.get("breakdown_threads", r.get("threads", "?"))), *[f"{b[s]:.1f}" if s in b else "—" for s in stages]])
    return _table(head, body)


def _disk_table(rows: list[dict[str, Any]]) -> str:
    head = ["regions", "maps", "bytes/region", "SQLite", "FAISS (visual + san)", "maps.f16", "visual.f16", "san.f16", "without maps", "1M regions as built", "reader RSS", "RSS per added region"]
    body = []
    seen: set[tuple[int, bool]] = set()
    rows = [r for r in rows if "memory" in r and "disk" in r]
    if not rows:
        return ""
    base = min(rows, key=lambda r: r["regions"])
    for r in rows:
        key = (r["regions"], r.get("maps", True))
        if key in seen:
            continue
        seen.add(key)
        d = r["disk"]
        f = d["feature_bytes_per_region"]
        body.append(
            [
                f"{r['regions']:,}",
                "yes" if key[1] else "no",
                f"{d['bytes_per_region']:,.0f}",
                f"{d['database_bytes_per_region']:,.0f}",
                f"{sum(d['faiss_bytes_per_region'].values()):,.0f}",
                f"{f.get('maps', 0):,.0f}",
                f"{f.get('visual', 0):,.0f}",
                f"{f.get('san', 0):,.0f}",
                f"{d['bytes_per_region_without_maps']:,.0f}",
                f"{d['bytes_per_region'] * 1e6 / 1e9:.2f} GB",
                f"{r['memory']['rss'] / 2**20:,.0f} MiB",
                f"{(r['memory']['rss'] - base['memory']['rss']) / (r['regions'] - base['regions']):,.0f} B" if r["regions"] > base["regions"] else "—",
            ]
        )
    return _table(head, body)


def _faiss_table(results: dict[int, list[dict[str, Any]]]) -> str:
    head = ["vectors", "index", "nprobe", "recall@10", "recall@1000", "p50 ms (k = 1000)", "bytes/vector", "build s"]
    body = []
    for regions, rows in sorted(results.items()):
        for f in rows:
            build = f["build_seconds"]
            body.append(
                [
                    f"{regions:,}",
                    f["index"] + (" **(store's choice)**" if f["chosen_by_store"] else ""),
                    "—" if f["nprobe"] is None else str(f["nprobe"]),
                    f"{f['recall_at_10']:.3f}",
                    f"{f['recall_at_shortlist']:.3f}",
                    f"{f['p50_ms']:.2f}",
                    f"{f['bytes_per_vector']:.0f}",
                    "—" if build != build else f"{build:.1f}",
                ]
            )
    return _table(head, body)


def _compression_table(rows: list[dict[str, Any]]) -> str:
    head = ["stage 2", "maps stored as", "bytes/region", "recall@10 vs float16 7x7", "queries"]
    body = [[r["grn"], r["name"], f"{r['bytes_per_region']:,}", f"{r['recall_at_10_vs_stored']:.3f}", str(r["queries"])] for r in rows]
    return _table(head, body)


def _indexing_table(rows: list[dict[str, Any]]) -> str:
    stages = ["decode", "preprocess", "backbone", "proposals", "embedding", "writes", "other"]
    head = ["setting", "images/s", "images per CPU-second", "regions", "seconds", *[f"{s} %" for s in stages]]
    body = []
    for r in rows:
        setting = f"batch {r['batch_size']}, " + ("one core" if r["one_core"] else f"{r['threads']} threads")
        shares = r["stage_shares"]
        per_cpu = f"{r['images'] / r['cpu_seconds']:.2f}" if r.get("cpu_seconds") else "—"
        body.append([setting, f"{r['images_per_second']:.2f}", per_cpu, f"{r['regions']:,}", f"{r['seconds']:.1f}", *[f"{100 * shares.get(s, 0):.0f}" for s in stages]])
    return _table(head, body)


def _index_name(r: dict[str, Any]) -> str:
    return r["index_type"] + (f" (nprobe {r['nprobe']})" if r.get("nprobe") else "") + (", no maps" if r.get("maps") is False else "")


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"
