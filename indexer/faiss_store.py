"""The FAISS vector index of an index directory: ids are SQLite region ids, saved atomically.

Vectors are L2-normalised float32 and compared by inner product (cosine similarity). The index
type is chosen by size (:func:`choose_factory`):

* fewer than ``flat_threshold`` vectors (default 50 000): ``"Flat"`` — exact search, an
  ``IndexIDMap2`` around ``IndexFlatIP``;
* from there on: ``"IVF{nlist},SQ8"`` with ``nlist = round(4 * sqrt(n))`` (at most ``n // 39``, so
  k-means has its recommended 39 points per centroid), trained on a seeded sample of at most
  ``64 * nlist`` vectors; 8-bit scalar quantisation makes it 4x smaller than float32.
  ``nprobe`` is *calibrated* at build time, once per result count k in ``CALIBRATION_KS`` (10,
  100, 1000): the smallest power of two whose recall@k against exact search, measured on up to
  256 seeded sample vectors used as queries (each query's own id left out), reaches
  ``target_recall`` — 0.97, a margin over the 0.95 the engine promises, since fresh queries do
  slightly worse than indexed points. A search for k results probes the lists calibrated for k
  (interpolated log-log between the calibrated counts, proportional to k beyond 1000): a
  1000-candidate shortlist for stage 2 needs many more lists than a top 10 (at 100K regions 128
  vs 32), and probing only the top-10 count would cap the shortlist at the few thousand vectors
  those lists hold. The shortlist's count (k = 1000) is calibrated to recall 0.94
  (``SHORTLIST_RECALL``), not 0.97: stage 2 reranks those candidates, and the final top 10 is the
  same from there on — at 1M regions of the whitened 432-d key, 0.97 of the exact top 1000 needed
  2,048 of 4,000 lists (30 ms a search), 0.94 needs 256 (4 ms), with the same final recall@10
  against exhaustive stage-2 scoring (0.915 on 20 queries; docs/sharding.md). Where doubling
  ``nprobe`` gains less than 0.0025 recall short of the target
  (8-bit quantisation, not the lists probed, limits it), the calibration keeps the smaller
  value. Where the codes, not the lists probed, cap a count's recall below its target, the calibration
  tries *exact re-scoring*: a search for k fetches ``REFINE`` × k candidates from the codes and ranks
  them by their exact cosine, read from the vectors the caller stores anyway (the feature store's
  float16 rows: :meth:`VectorIndex.search`'s ``exact``); ``refine_at`` records the factor per
  calibrated k. At 10M regions of the 432-d visual key SQ8 alone levels off at recall@10 0.940;
  re-scored, the index keeps SQ8's 4.3 GB instead of SQfp16's 8.6 GB or IVF-Flat's 17 GB (both ran
  out of memory there beside the builder). If SQ8 still cannot reach recall@10 of 0.95
  (``PROMISED_RECALL``) however many lists it probes, the index tries ``"IVF{nlist},SQfp16"``, then
  ``"IVF{nlist},Flat"`` (logged), over the same lists (k-means runs once). Files written before the per-k calibration carry one
  ``nprobe``; a writer calibrates them on open (:meth:`VectorIndex.calibrate`), a reader uses
  the one value for every k.

The file ``vectors.faiss`` is one blob: ``b"RRFAISS1"``, a little-endian uint32 header length, a
UTF-8 JSON header (format, factory, dim, count, max_region_id, max_tombstone_seq, trained_on,
nprobe, payload size and crc32) and the bytes of ``faiss.serialize_index``. It is written with
:func:`indexer.index_dir.atomic_write` (temp file, fsync, rename, fsync dir), always from the CPU
index. Catching up with the database is the caller's job (:class:`indexer.store.IndexStore`): the
header says up to which region id and tombstone ``seq`` the file is complete.

GPU: with ``device="auto"`` and ``faiss.get_num_gpus() > 0`` (or ``device="cuda"``) searches run
on a copy made by ``faiss.index_cpu_to_all_gpus``, re-made lazily after the CPU index changes.
Every GPU move is guarded by ``faiss.get_num_gpus() > 0``: without a GPU that call returns a
broken index instead of raising.
"""
from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from collections.abc import Callable
from typing import BinaryIO
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from engine.errors import EngineError, InvalidInputError
from indexer.index_dir import FileDigest, atomic_write

__all__ = [
    "DEFAULT_FLAT_THRESHOLD",
    "ExactVectors",
    "GPU_MAX_K",
    "REFINE",
    "VectorFileError",
    "VectorIndex",
    "choose_factory",
    "read_header",
    "ivf_nlist",
    "num_faiss_gpus",
    "resolve_faiss_gpus",
]

logger = logging.getLogger(__name__)

DEFAULT_FLAT_THRESHOLD = 50_000
GPU_MAX_K = 2048  # faiss GPU indexes return at most this many neighbours per query
_MAGIC = b"RRFAISS1"
_PREFIX = struct.Struct("<8sI")
_READ_CHUNK = 1 << 24  # bytes per read while checking and streaming a vectors file
_FORMAT = 1
_TRAIN_POINTS_PER_LIST = 64
_CALIBRATION_QUERIES = 256
_CALIBRATION_K = 10
CALIBRATION_KS = (10, 100, 1000)
PROMISED_RECALL = 0.95  # recall@10 against exact search below which SQ8 gives way to SQfp16, then IVF-Flat
SHORTLIST_K = 1000
SHORTLIST_RECALL = 0.94  # the target at k = 1000, stage 2's shortlist (module docstring)
_PLATEAU = 0.0025  # a doubling of nprobe that gains less recall than this stops the calibration
_ADD_CHUNK = 65_536

REFINE = 4  # candidates per result re-scored exactly where the codes cap recall (module docstring)

ReadVectors = Callable[[np.ndarray], np.ndarray]
"""Given feature-store rows ``[m]``, return their vectors ``[m, dim]`` (any float dtype)."""
ExactVectors = Callable[[np.ndarray], np.ndarray]
"""Given indexed ids ``[m]``, return their stored vectors ``[m, dim]`` (any float dtype; an all-zero row
for an id that has gone, which is then never ranked)."""


@dataclass(frozen=True)
class _Probe:
    """A calibrated search for k results: lists probed, candidates per result re-scored exactly, recall."""

    nprobe: int
    factor: int
    recall: float


class VectorFileError(EngineError):
    """``vectors.faiss`` is unreadable; the caller rebuilds it from the feature store."""


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: ``round(4 sqrt(n))``, at most ``n // 39``, >= 1."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def choose_factory(n: int, flat_threshold: int) -> str:
    """``"Flat"`` below ``flat_threshold`` vectors, else ``"IVF{nlist},SQ8"``."""
    if n < flat_threshold:
        return "Flat"
    return f"IVF{ivf_nlist(n)},SQ8"


def num_faiss_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def resolve_faiss_gpus(device: str) -> int:
    """How many GPUs to search on for ``device`` in ``auto | cpu | cuda``; logs the choice."""
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInputError(
            f"faiss device {device!r} is not allowed; use 'auto', 'cpu' or 'cuda'"
        )
    available = num_faiss_gpus()
    if device == "cpu":
        return 0
    if device == "cuda" and available == 0:
        raise EngineError(
            "faiss device 'cuda' was asked for but faiss sees no GPU (faiss.get_num_gpus() == 0); "
            "use 'auto' or 'cpu', or run on a machine with a CUDA device and faiss-gpu"
        )
    if device == "auto":
        logger.info(
            "faiss device auto -> %s", f"cuda ({available} GPUs)" if available else "cpu (no GPU)"
        )
    return available


def _as_unit_float32(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InvalidInputError(
            f"{what} have shape {tuple(vectors.shape)}; this index holds {dim}-d vectors; "
            f"pass an array of shape [n, {dim}]"
        )
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        raise InvalidInputError(
            f"{what} contain NaN or infinite values; pass finite vectors"
        )
    faiss.normalize_L2(out)
    return out


def _as_ids(ids: np.ndarray | list[int]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


class VectorIndex:
    """A FAISS inner-product index over unit vectors with int64 ids, plus its save state.

    ``max_region_id`` / ``max_tombstone_seq``: the index holds every region with an id up to the
    former and has applied every tombstone up to the latter. Not thread-safe.
    """

    def __init__(
        self,
        dim: int,
        *,
        flat_threshold: int = DEFAULT_FLAT_THRESHOLD,
        device: str = "auto",
        seed: int = 0,
        target_recall: float = 0.97,
    ) -> None:
        if dim < 1:
            raise InvalidInputError(f"vector dimension {dim} is not allowed; use a positive integer")
        if flat_threshold < 1:
            raise InvalidInputError(
                f"flat_threshold {flat_threshold} is not allowed; use a positive number of vectors"
            )
        self.dim = int(dim)
        self.flat_threshold = int(flat_threshold)
        self.seed = int(seed)
        self.target_recall = float(target_recall)
        self._requested_device = device
        self._gpus = resolve_faiss_gpus(device)
        self._gpu_index: faiss.Index | None = None
        self._cpu = self._new_index("Flat")
        self.factory = "Flat"
        self.nprobe: int | None = None
        self.nprobe_at: dict[int, int] = {}  # result count k -> calibrated nprobe (module docstring)
        self.refine_at: dict[int, int] = {}  # result count k -> candidates per result re-scored exactly (absent: 1)
        self.trained_on = 0
        self.max_region_id = 0
        self.max_tombstone_seq = 0

    # -- facts ---------------------------------------------------------------------------------
    @property
    def index_type(self) -> str:
        """The factory string of the current index, e.g. ``"Flat"`` or ``"IVF1024,SQ8"``."""
        return self.factory

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N gpus"``."""
        return f"cuda:{self._gpus} gpus" if self._gpus else "cpu"

    @property
    def ntotal(self) -> int:
        return int(self._cpu.ntotal)

    def wanted_factory(self, n: int | None = None) -> str | None:
        """The factory to rebuild with for ``n`` vectors (default: the current count), or ``None``.

        Hysteresis keeps rebuilds rare: Flat -> IVF at ``flat_threshold``; IVF -> Flat below half
        of it; IVF -> IVF with more lists once the index has grown 4x since training.
        """
        n = self.ntotal if n is None else n
        if self.factory == "Flat":
            return choose_factory(n, self.flat_threshold) if n >= self.flat_threshold else None
        if n < self.flat_threshold // 2:
            return "Flat"
        if n >= 4 * max(self.trained_on, 1):
            return f"IVF{ivf_nlist(n)},SQ8"
        return None

    # -- changing ------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` ``[n, dim]`` (normalised here) under ``ids`` ``[n]``."""
        ids = _as_ids(ids)
        if ids.size == 0:
            return
        x = _as_unit_float32(vectors, self.dim, "vectors to add")
        if x.shape[0] != ids.size:
            raise InvalidInputError(
                f"got {ids.size} ids for {x.shape[0]} vectors; pass one id per vector"
            )
        self._cpu.add_with_ids(x, ids)
        self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (absent ones are ignored); return how many vectors went."""
        ids = _as_ids(ids)
        if ids.size == 0:
            return 0
        removed = int(self._cpu.remove_ids(faiss.IDSelectorBatch(ids)))
        if removed:
            self._gpu_index = None
        return removed

    def rebuild(
        self,
        ids: np.ndarray,
        rows: np.ndarray,
        read_vectors: ReadVectors,
        *,
        factory: str | None = None,
    ) -> None:
        """Replace the index by a fresh one over ``ids`` whose vectors are feature rows ``rows``.

        ``factory`` defaults to :func:`choose_factory` for ``len(ids)``. IVF indexes are trained on
        a seeded sample and get a calibrated ``nprobe`` (module docstring). The save state
        (``max_region_id``, ``max_tombstone_seq``) is left for the caller to set.
        """
        ids = _as_ids(ids)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = ids.size
        factory = factory or choose_factory(n, self.flat_threshold)
        if factory == "Flat" or n == 0:
            index = self._new_index("Flat")
            self._add_chunks(index, ids, rows, read_vectors)
            self._install(index, "Flat", nprobe=None, trained_on=n)
            return
        rng = np.random.default_rng(self.seed)
        nlist = faiss.extract_index_ivf(self._new_index(factory)).nlist
        sample = np.sort(rng.choice(n, size=min(n, _TRAIN_POINTS_PER_LIST * nlist), replace=False))
        train = _as_unit_float32(read_vectors(rows[sample]), self.dim, "training vectors")
        queries, query_x = self._calibration_queries(rng, rows, read_vectors)
        exact_of = _exact_reader(ids, rows, read_vectors)
        centroids: np.ndarray | None = None
        for attempt in _attempts(factory, nlist):
            index = self._new_index(attempt)
            if centroids is not None:  # the same lists: faiss skips k-means for a filled quantizer
                faiss.extract_index_ivf(index).quantizer.add(centroids)
            index.train(train)
            centroids = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, nlist)
            exact = faiss.ResultHeap(query_x.shape[0], _exact_k(n), keep_max=True)
            self._add_chunks(index, ids, rows, read_vectors, exact=(query_x, exact))
            exact.finalize()
            probes = self._calibrate(index, query_x, ids[queries], exact.I, exact_of)
            chosen = probes[_CALIBRATION_K]
            if chosen.recall >= min(self.target_recall, PROMISED_RECALL) or attempt.endswith(",Flat"):
                break
            logger.warning(
                "%s reaches recall@%d of only %.3f however many lists it probes; trying the next finer codes",
                attempt, _CALIBRATION_K, chosen.recall,
            )
        logger.info(
            "built %s over %d vectors: nprobe=%d, %dx re-scored, recall@%d=%.3f vs exact on %d sample queries",
            attempt, n, chosen.nprobe, chosen.factor, _CALIBRATION_K, chosen.recall, query_x.shape[0],
        )
        self._install(index, attempt, nprobe=chosen.nprobe, trained_on=n)
        self._set_probes(probes)

    def needs_calibration(self) -> bool:
        """An IVF index from a file written before the per-k calibration (one ``nprobe`` for every k)."""
        return self.factory != "Flat" and self.ntotal > 0 and not self.nprobe_at

    def calibrate(self, ids: np.ndarray, rows: np.ndarray, read_vectors: ReadVectors) -> None:
        """Calibrate ``nprobe`` per result count for the current IVF index without retraining it.

        ``ids`` / ``rows``: every indexed region id and its feature row (the exact search reads them
        all once, in chunks).
        """
        if self.factory == "Flat":
            return
        ids = _as_ids(ids)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        queries, query_x = self._calibration_queries(np.random.default_rng(self.seed), rows, read_vectors)
        exact = faiss.ResultHeap(query_x.shape[0], _exact_k(ids.size), keep_max=True)
        for start in range(0, ids.size, _ADD_CHUNK):
            x = _as_unit_float32(read_vectors(rows[start : start + _ADD_CHUNK]), self.dim, "vectors")
            _add_exact(exact, query_x, x, ids[start : start + _ADD_CHUNK])
        exact.finalize()
        self._set_probes(self._calibrate(self._cpu, query_x, ids[queries], exact.I, _exact_reader(ids, rows, read_vectors)))
        logger.info("calibrated nprobe per k for %s: %s (re-scored: %s)", self.factory, self.nprobe_at, self.refine_at)

    def _calibration_queries(self, rng: np.random.Generator, rows: np.ndarray, read_vectors: ReadVectors) -> tuple[np.ndarray, np.ndarray]:
        """Positions of up to ``_CALIBRATION_QUERIES`` seeded sample vectors and the vectors themselves."""
        positions = np.sort(rng.choice(rows.size, size=min(rows.size, _CALIBRATION_QUERIES), replace=False))
        return positions, _as_unit_float32(read_vectors(rows[positions]), self.dim, "calibration vectors")

    def nprobe_for(self, k: int) -> int | None:
        """The lists a search for ``k`` results probes (``None`` for Flat; module docstring)."""
        if self.nprobe is None or not self.nprobe_at:
            return self.nprobe
        nlist = faiss.extract_index_ivf(self._cpu).nlist
        ks = sorted(self.nprobe_at)
        if k <= ks[0]:
            return self.nprobe_at[ks[0]]
        if k >= ks[-1]:
            return min(nlist, math.ceil(self.nprobe_at[ks[-1]] * k / ks[-1]))
        high = next(i for i, c in enumerate(ks) if c >= k)
        k0, k1 = ks[high - 1], ks[high]
        p0, p1 = self.nprobe_at[k0], self.nprobe_at[k1]
        t = math.log(k / k0) / math.log(k1 / k0)
        return min(nlist, math.ceil(p0 * (p1 / p0) ** t))

    def _add_chunks(
        self,
        index: faiss.Index,
        ids: np.ndarray,
        rows: np.ndarray,
        read_vectors: ReadVectors,
        *,
        exact: tuple[np.ndarray, faiss.ResultHeap] | None = None,
    ) -> None:
        for start in range(0, ids.size, _ADD_CHUNK):
            chunk_ids = ids[start : start + _ADD_CHUNK]
            x = _as_unit_float32(read_vectors(rows[start : start + _ADD_CHUNK]), self.dim, "vectors")
            index.add_with_ids(x, chunk_ids)
            if exact is not None:
                queries, heap = exact
                _add_exact(heap, queries, x, chunk_ids)

    def _calibrate(
        self,
        index: faiss.Index,
        queries: np.ndarray,
        query_ids: np.ndarray,
        exact_ids: np.ndarray,
        exact: ExactVectors,
    ) -> dict[int, _Probe]:
        """Per result count k: the smallest power-of-two ``nprobe`` reaching ``target_recall`` at k (or all
        lists); where the codes cap recall below it, the same with ``REFINE`` × k candidates re-scored
        exactly by ``exact`` (module docstring). Counts beyond the exact neighbours kept are skipped."""
        out: dict[int, _Probe] = {}
        nprobe = 1
        for k in CALIBRATION_KS:
            if k > exact_ids.shape[1] - 1 and k != _CALIBRATION_K:
                break
            truth = [_top_without(row, own, k) for row, own in zip(exact_ids, query_ids)]
            target = min(self.target_recall, SHORTLIST_RECALL) if k >= SHORTLIST_K else self.target_recall
            probe = self._probe(index, queries, query_ids, truth, k, target, start=nprobe, exact=None)
            if probe.recall < target:
                refined = self._probe(index, queries, query_ids, truth, k, target, start=1, exact=exact)
                logger.info("recall@%d with %dx candidates re-scored exactly: %.3f at nprobe %d", k, REFINE, refined.recall, refined.nprobe)
                probe = refined if refined.recall > probe.recall else probe
            out[k] = probe
            if probe.factor == 1:
                nprobe = probe.nprobe
        return out

    def _probe(
        self,
        index: faiss.Index,
        queries: np.ndarray,
        query_ids: np.ndarray,
        truth: list[list[int]],
        k: int,
        target: float,
        *,
        start: int,
        exact: ExactVectors | None,
    ) -> _Probe:
        """Double ``nprobe`` from ``start`` until recall@k (``REFINE`` × k candidates re-scored by ``exact``
        when given) reaches ``target``, all lists are probed, or a doubling gains less than ``_PLATEAU``
        (then the smaller value: the codes, not the lists, limit recall)."""
        nlist = faiss.extract_index_ivf(index).nlist
        factor = 1 if exact is None else REFINE
        nprobe = start
        before: _Probe | None = None
        while True:
            _, found = index.search(queries, (k + 1) * factor, params=faiss.SearchParametersIVF(nprobe=min(nprobe, nlist)))
            if exact is not None:
                _, found = _rescored(queries, found, k + 1, exact)
            hits = [
                len(set(_top_without(row, own, k)) & set(want)) / max(len(want), 1)
                for row, own, want in zip(found, query_ids, truth)
            ]
            probe = _Probe(min(nprobe, nlist), factor, float(np.mean(hits)) if hits else 1.0)
            if before is not None and probe.recall < target and probe.recall - before.recall < _PLATEAU:
                logger.info("recall@%d levels off at %.3f from nprobe %d (target %.2f, %dx re-scored)", k, before.recall, before.nprobe, target, factor)
                return before
            if probe.recall >= target or nprobe >= nlist:
                return probe
            before = probe
            nprobe *= 2

    def _set_probes(self, probes: dict[int, _Probe]) -> None:
        self.nprobe_at = {k: p.nprobe for k, p in probes.items()}
        self.refine_at = {k: p.factor for k, p in probes.items() if p.factor > 1}

    def _new_index(self, factory: str) -> faiss.Index:
        spec = "IDMap2,Flat" if factory == "Flat" else factory
        try:
            return faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise InvalidInputError(
                f"faiss cannot build index type {factory!r} ({exc}); use 'Flat' or 'IVF<n>,SQ8'"
            ) from None

    def _install(self, index: faiss.Index, factory: str, *, nprobe: int | None, trained_on: int) -> None:
        if nprobe is not None:
            faiss.extract_index_ivf(index).nprobe = nprobe
        self._cpu = index
        self.factory = factory
        self.nprobe = nprobe
        self.trained_on = trained_on
        self._gpu_index = None

    # -- searching -----------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, exact: ExactVectors | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by cosine similarity: scores ``[q, k]`` float32, ids ``[q, k]`` int64.

        Missing results (fewer than ``k`` vectors, or IVF lists that hold too few) have id -1 and
        score ``-inf``. ``exact``: the stored vectors of indexed ids; where the calibration chose exact
        re-scoring for ``k`` (``refine_at``), the codes' ``REFINE`` × k best are ranked by it and the
        scores returned are exact (without it, the codes' ranking and scores).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k={k!r} is not allowed; ask for k >= 1 results")
        x = _as_unit_float32(queries, self.dim, "query vectors")
        k = int(k)
        if self.ntotal == 0 or x.shape[0] == 0:
            return (
                np.full((x.shape[0], k), -np.inf, dtype=np.float32),
                np.full((x.shape[0], k), -1, dtype=np.int64),
            )
        factor = self.refine_for(k) if exact is not None else 1
        scores, ids = self._search(x, k * factor, self.nprobe_for(k))
        scores = np.asarray(scores, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if factor > 1:
            scores, ids = _rescored(x, ids, k, exact)
        scores[ids < 0] = -np.inf
        return scores, ids

    def refine_for(self, k: int) -> int:
        """Candidates per result re-scored exactly in a search for ``k`` (1: none): the factor of the
        nearest calibrated counts around ``k``, the larger where they differ."""
        if not self.refine_at:
            return 1
        ks = sorted(self.nprobe_at) or [_CALIBRATION_K]
        below = [c for c in ks if c <= k] or ks[:1]
        above = [c for c in ks if c >= k] or ks[-1:]
        return max(self.refine_at.get(below[-1], 1), self.refine_at.get(above[0], 1))

    def _search(self, x: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Search the CPU or GPU index for ``k`` results, probing ``nprobe`` lists."""
        index = self._search_index(k, nprobe)
        if nprobe is None:
            return index.search(x, k)
        if index is self._cpu:
            return index.search(x, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        return index.search(x, k)

    def _search_index(self, k: int, nprobe: int | None) -> faiss.Index:
        if not self._gpus or num_faiss_gpus() == 0:
            return self._cpu
        if k > GPU_MAX_K or (nprobe or 0) > GPU_MAX_K:
            logger.info(
                "k=%d / nprobe=%s exceed the faiss GPU limit %d; searching on the CPU",
                k, nprobe, GPU_MAX_K,
            )
            return self._cpu
        if self._gpu_index is None:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._cpu)
            except RuntimeError as exc:
                if self._requested_device == "cuda":
                    raise EngineError(
                        f"faiss could not move the {self.factory} index to the GPU ({exc}); use "
                        "faiss device 'cpu' or 'auto'"
                    ) from None
                logger.warning(
                    "faiss could not move the %s index to the GPU (%s); searching on the CPU",
                    self.factory, exc,
                )
                self._gpus = 0
                return self._cpu
        return self._gpu_index

    # -- file ----------------------------------------------------------------------------------
    def header(self) -> dict:
        return {
            "format": _FORMAT,
            "factory": self.factory,
            "dim": self.dim,
            "metric": "inner_product",
            "count": self.ntotal,
            "max_region_id": int(self.max_region_id),
            "max_tombstone_seq": int(self.max_tombstone_seq),
            "trained_on": int(self.trained_on),
            "nprobe": self.nprobe,
            "nprobe_at": {str(k): p for k, p in sorted(self.nprobe_at.items())},
            "refine_at": {str(k): f for k, f in sorted(self.refine_at.items())},
        }

    def save(self, path: Path) -> FileDigest:
        """Write the CPU index and its save state to ``path`` atomically; return the file's size and crc32."""
        payload = faiss.serialize_index(self._cpu)
        header = self.header()
        header["payload_bytes"] = int(payload.nbytes)
        header["payload_crc32"] = zlib.crc32(memoryview(payload))
        blob = json.dumps(header, sort_keys=True).encode()
        digest = atomic_write(Path(path), [_PREFIX.pack(_MAGIC, len(blob)), blob, memoryview(payload)])
        logger.debug("saved %s: %s", path, header)
        return digest

    @classmethod
    def load(
        cls,
        path: Path,
        dim: int,
        *,
        flat_threshold: int = DEFAULT_FLAT_THRESHOLD,
        device: str = "auto",
        seed: int = 0,
        target_recall: float = 0.97,
    ) -> VectorIndex:
        """Read a file written by :meth:`save`; :class:`VectorFileError` if it is unusable."""
        vectors = cls(
            dim, flat_threshold=flat_threshold, device=device, seed=seed, target_recall=target_recall
        )
        path = Path(path)
        with path.open("rb") as fh:
            header = _parse(path, fh)
            if header["dim"] != dim:
                raise VectorFileError(f"{path} holds {header['dim']}-d vectors, the index {dim}-d")
            # Streamed from the file: no copy of the payload beside the index (a 10M-region file read
            # whole doubled the reader's peak memory while loading).
            fh.seek(_PREFIX.size + header["_json_bytes"])
            try:
                index = faiss.read_index(faiss.PyCallbackIOReader(fh.read, _READ_CHUNK))
            except RuntimeError as exc:
                raise VectorFileError(f"faiss cannot read {path}: {exc}") from None
        if index.d != dim or index.ntotal != header["count"]:
            raise VectorFileError(f"{path} does not match its header ({index.d}-d, {index.ntotal})")
        vectors._install(
            index, header["factory"], nprobe=header.get("nprobe"), trained_on=header["trained_on"]
        )
        vectors.nprobe_at = {int(k): int(p) for k, p in header.get("nprobe_at", {}).items()}
        vectors.refine_at = {int(k): int(f) for k, f in header.get("refine_at", {}).items()}
        vectors.max_region_id = int(header["max_region_id"])
        vectors.max_tombstone_seq = int(header["max_tombstone_seq"])
        return vectors


def read_header(path: Path) -> dict:
    """The JSON header of a ``vectors.faiss`` file (for ``engine info`` and tests), its payload checked."""
    with Path(path).open("rb") as fh:
        return _parse(Path(path), fh)


def _parse(path: Path, fh: BinaryIO) -> dict:
    """The header of the open file ``fh``, after checking the payload's size and crc32 in one streamed
    pass (before faiss reads it: damaged sizes inside the payload could make faiss allocate wildly)."""
    prefix = fh.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise VectorFileError(f"{path} is truncated ({len(prefix)} bytes)")
    magic, json_bytes = _PREFIX.unpack(prefix)
    if magic != _MAGIC:
        raise VectorFileError(f"{path} is not a vectors file (magic {magic!r})")
    try:
        header = json.loads(fh.read(json_bytes))
    except ValueError as exc:
        raise VectorFileError(f"{path} has an unreadable header: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise VectorFileError(f"{path} has format {found}, this engine reads {_FORMAT}")
    size, crc = 0, 0
    while chunk := fh.read(_READ_CHUNK):
        size += len(chunk)
        crc = zlib.crc32(chunk, crc)
    if size != header.get("payload_bytes") or crc != header.get("payload_crc32"):
        raise VectorFileError(f"{path} is damaged (payload size or crc32 mismatch)")
    header["_json_bytes"] = json_bytes
    return header


def _attempts(factory: str, nlist: int) -> list[str]:
    """The IVF index types tried in turn, coarser codes first: the chosen one, then 16-bit floats (half
    of IVF-Flat's memory, near-exact distances), then IVF-Flat, which is always accepted."""
    out = [factory]
    for finer in (f"IVF{nlist},SQfp16", f"IVF{nlist},Flat"):
        if finer not in out:
            out.append(finer)
    return out


def _top_without(row: np.ndarray, own: int, k: int = _CALIBRATION_K) -> list[int]:
    """The first ``k`` valid ids of ``row`` other than ``own`` (the query itself)."""
    return [int(i) for i in row if i >= 0 and i != own][:k]


def _exact_k(n: int) -> int:
    """Exact neighbours kept per calibration query: the largest calibrated k the index can fill, plus
    the query itself."""
    fits = [k for k in CALIBRATION_KS if k < n] or [_CALIBRATION_K]
    return max(fits) + 1


def _add_exact(heap: faiss.ResultHeap, queries: np.ndarray, x: np.ndarray, chunk_ids: np.ndarray) -> None:
    """Feed the exact inner products of ``queries`` with one chunk ``x`` into ``heap``."""
    scores = queries @ x.T
    kk = min(heap.k, x.shape[0])
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    heap.add_result(
        np.ascontiguousarray(np.take_along_axis(scores, top, axis=1)),
        np.ascontiguousarray(chunk_ids[top]),
    )


def _exact_reader(ids: np.ndarray, rows: np.ndarray, read_vectors: ReadVectors) -> ExactVectors:
    """The stored vectors of indexed ids (each one of ``ids``), given every id and its feature row."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def exact(wanted: np.ndarray) -> np.ndarray:
        return read_vectors(rows[order[np.searchsorted(sorted_ids, wanted)]])

    return exact


def _rescored(x: np.ndarray, ids: np.ndarray, k: int, exact: ExactVectors) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's candidates ``ids`` ``[q, m]`` by exact cosine with the stored vectors
    (ids -1 and ids whose vectors have gone are never ranked); scores ``-inf`` / ids -1 where too few."""
    unique = np.unique(ids[ids >= 0])
    out_scores = np.full((ids.shape[0], k), -np.inf, np.float32)
    out_ids = np.full((ids.shape[0], k), -1, np.int64)
    if unique.size == 0:
        return out_scores, out_ids
    vectors = np.asarray(exact(unique), np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    vectors = vectors / np.maximum(norms, 1e-12)[:, None]
    for q in range(ids.shape[0]):
        cand = ids[q][ids[q] >= 0]
        at = np.searchsorted(unique, cand)
        s = np.where(norms[at] > 0, vectors[at] @ x[q], -np.inf)
        top = np.argsort(-s, kind="stable")[: min(k, int(np.isfinite(s).sum()))]
        out_scores[q, : top.size] = s[top]
        out_ids[q, : top.size] = cand[top]
    return out_scores, out_ids
