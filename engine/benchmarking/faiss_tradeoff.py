"""Stage 1's FAISS index: exact Flat search against the IVF index the store chose by size (its saved
file, with its calibrated ``nprobe``) and IVF-PQ alternatives on the same coarse lists.

For every variant and ``nprobe``: recall@10 and recall@shortlist against Flat on real query vectors,
the p50 latency of one query asking for the shortlist (what stage 1 does) and bytes per vector.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from engine.benchmarking.timing import percentile_ms
from engine.errors import InvalidInputError

__all__ = ["FaissTradeoffConfig", "FaissRow", "measure_faiss"]


@dataclass(frozen=True)
class FaissTradeoffConfig:
    """``shortlist``: the k stage 1 asks for; ``pq_m``: PQ sub-quantizers (one code byte per dim / m dims; each is lowered to the nearest divisor of the key's dim);
    ``nprobes``: probes swept on the IVF variants."""

    shortlist: int = 1000
    pq_m: tuple[int, ...] = (28, 56)
    nprobes: tuple[int, ...] = (8, 16, 32, 64, 128)

    def __post_init__(self) -> None:
        if self.shortlist < 10:
            raise InvalidInputError(f"shortlist must be >= 10, got {self.shortlist}")


@dataclass(frozen=True)
class FaissRow:
    """One index variant at one ``nprobe``."""

    index: str
    nprobe: int | None
    recall_at_10: float
    recall_at_shortlist: float
    p50_ms: float
    bytes_per_vector: float
    build_seconds: float
    chosen_by_store: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_faiss(index_dir: Path, queries: np.ndarray, config: FaissTradeoffConfig = FaissTradeoffConfig()) -> list[FaissRow]:
    """Compare the index variants over the ``visual`` vectors of the index at ``index_dir`` for ``queries`` ``[Q, D]``.

    Rows: ``Flat`` (exact); the store's saved ``vectors.faiss`` searched through :class:`VectorIndex` at its
    calibrated ``nprobe`` (``chosen_by_store``); then, on one freshly trained coarse quantizer with the
    store's number of lists, ``IVF{nlist},SQ8`` (the store's factory) and ``IVF{nlist},PQ{m}`` over ``nprobes``.
    """
    from indexer.faiss_store import VectorIndex, ivf_nlist
    from indexer.store import IndexStore

    with IndexStore.open(index_dir) as store:
        table = store.all_regions()
        ids = table.ids
        vectors = _unit(store.read_arrays("visual", table.rows).astype(np.float32))
        dim = vectors.shape[1]
    q = _unit(np.asarray(queries, np.float32))
    k = min(config.shortlist, len(ids))
    start = time.perf_counter()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    flat.add_with_ids(vectors, ids)
    flat_build = time.perf_counter() - start
    truth, flat_ms = _search(lambda x: flat.search(x, k)[1], q, k)
    chosen = VectorIndex.load(Path(index_dir) / "vectors.faiss", dim, device="cpu")
    out = [FaissRow("Flat", None, 1.0, 1.0, flat_ms, _bytes(flat, len(ids)), round(flat_build, 2), chosen_by_store=chosen.factory == "Flat")]
    if chosen.factory == "Flat":
        return out
    stored = lambda wanted: vectors[np.searchsorted(ids, wanted)]  # noqa: E731 - the store's exact re-scoring reads these
    found, ms = _search(lambda x: chosen.search(x, k, exact=stored)[1], q, k)
    file_bytes = (Path(index_dir) / "vectors.faiss").stat().st_size / max(len(ids), 1)
    name = chosen.factory + (f" + {chosen.refine_for(k)}x re-scored" if chosen.refine_for(k) > 1 else "")
    out.append(FaissRow(name, chosen.nprobe_for(k), _recall(found, truth, 10), _recall(found, truth, k), ms, round(file_bytes, 1), float("nan"), chosen_by_store=True))
    nlist = ivf_nlist(len(ids))
    start = time.perf_counter()
    sq8 = faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    sq8.train(_sample(vectors, nlist))
    sq8.add_with_ids(vectors, ids)
    out.extend(_sweep(sq8, f"IVF{nlist},SQ8", q, truth, k, config.nprobes, len(ids), build=time.perf_counter() - start))
    quantizer = faiss.extract_index_ivf(sq8).quantizer
    for wanted in config.pq_m:
        m = max(d for d in range(1, min(wanted, dim) + 1) if dim % d == 0)  # PQ needs m | dim (432-d key: 28 -> 27, 56 -> 54)
        start = time.perf_counter()
        pq = _ivf_pq(quantizer, dim, m, vectors, ids)
        out.extend(_sweep(pq, f"IVF{nlist},PQ{m}", q, truth, k, config.nprobes, len(ids), build=time.perf_counter() - start))
    return out


def _sweep(index: Any, name: str, q: np.ndarray, truth: np.ndarray, k: int, nprobes: tuple[int, ...], n: int, *, build: float) -> list[FaissRow]:
    ivf = faiss.extract_index_ivf(index)
    rows = []
    for nprobe in sorted(nprobes):
        if nprobe > ivf.nlist:
            continue
        ivf.nprobe = nprobe
        found, ms = _search(lambda x: index.search(x, k)[1], q, k)
        rows.append(
            FaissRow(
                index=name,
                nprobe=nprobe,
                recall_at_10=_recall(found, truth, 10),
                recall_at_shortlist=_recall(found, truth, k),
                p50_ms=ms,
                bytes_per_vector=_bytes(index, n),
                build_seconds=round(build, 2),
            )
        )
    return rows


def _ivf_pq(quantizer: Any, dim: int, m: int, vectors: np.ndarray, ids: np.ndarray, seed: int = 0) -> Any:
    """An IVF-PQ index on the coarse lists of ``quantizer`` (a copy of its centroids); only PQ is trained."""
    nlist = quantizer.ntotal
    coarse = faiss.IndexFlatIP(dim)
    coarse.add(quantizer.reconstruct_n(0, nlist))
    index = faiss.IndexIVFPQ(coarse, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    coarse.this.disown()
    index.train(_sample(vectors, nlist, seed))
    index.add_with_ids(vectors, ids)
    return index


def _sample(vectors: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """A seeded training sample of at most ``64 · nlist`` vectors (the store's rule)."""
    rng = np.random.default_rng(seed)
    return vectors[np.sort(rng.choice(len(vectors), size=min(len(vectors), 64 * nlist), replace=False))]


def _search(search: Callable[[np.ndarray], np.ndarray], q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Top-``k`` ids per query, searched one query at a time (as stage 1 does), and the p50 latency in ms."""
    found = np.zeros((len(q), k), np.int64)
    seconds = []
    search(q[:1])  # warm-up
    for i in range(len(q)):
        start = time.perf_counter()
        ids = search(q[i : i + 1])
        seconds.append(time.perf_counter() - start)
        found[i] = ids[0]
    return found, round(percentile_ms(seconds, 50), 3)


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]
    return round(float(np.mean(hits)), 4)


def _bytes(index: Any, n: int) -> float:
    return round(faiss.serialize_index(index).nbytes / max(n, 1), 1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    faiss.normalize_L2(x)
    return x
