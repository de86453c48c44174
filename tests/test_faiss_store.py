"""FAISS vector index: id mapping vs brute force, IVF recall, atomic file format."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from engine.errors import EngineError, InvalidInputError
from indexer.faiss_store import (
    REFINE,
    VectorFileError,
    VectorIndex,
    choose_factory,
    ivf_nlist,
    num_faiss_gpus,
    read_header,
)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(db: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = _unit(queries) @ _unit(db).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def _clustered(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float) -> np.ndarray:
    picks = centres[rng.integers(0, len(centres), n)]
    return (picks + noise * rng.standard_normal(picks.shape)).astype(np.float32)


def _recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_flat_matches_brute_force_with_sparse_ids() -> None:
    rng = np.random.default_rng(0)
    db = rng.standard_normal((300, 16))
    ids = np.sort(rng.choice(10**12, size=300, replace=False)).astype(np.int64)  # 64-bit ids
    queries = rng.standard_normal((7, 16))
    index = VectorIndex(16, device="cpu")
    index.add(ids[:200], db[:200])
    index.add(ids[200:], db[200:].astype(np.float16).astype(np.float64))
    db[200:] = db[200:].astype(np.float16)
    scores, found = index.search(queries, k=10)
    want_scores, want_ids = _brute_force(db, ids, queries, 10)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert index.index_type == "Flat" and index.device == "cpu" and index.ntotal == 300


def test_remove_and_padding() -> None:
    rng = np.random.default_rng(1)
    db = rng.standard_normal((5, 8))
    index = VectorIndex(8, device="cpu")
    index.add(np.arange(10, 15), db)
    assert index.remove(np.array([11, 13, 999])) == 2
    scores, found = index.search(db[1:2], k=6)
    assert 11 not in found and 13 not in found
    assert sorted(found[0, :3].tolist()) == [10, 12, 14]
    assert (found[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    empty = VectorIndex(8, device="cpu")
    scores, found = empty.search(db[:2], k=3)
    assert found.shape == (2, 3) and (found == -1).all()


def test_bad_arguments() -> None:
    index = VectorIndex(8, device="cpu")
    with pytest.raises(InvalidInputError, match="k=0 is not allowed"):
        index.search(np.ones((1, 8)), k=0)
    with pytest.raises(InvalidInputError, match=r"shape \(1, 4\); this index holds 8-d"):
        index.search(np.ones((1, 4)), k=1)
    with pytest.raises(InvalidInputError, match="NaN"):
        index.add(np.array([1]), np.full((1, 8), np.nan))
    with pytest.raises(InvalidInputError, match="one id per vector"):
        index.add(np.array([1, 2]), np.ones((1, 8)))
    with pytest.raises(InvalidInputError, match="'auto', 'cpu' or 'cuda'"):
        VectorIndex(8, device="tpu")


@pytest.mark.skipif(num_faiss_gpus() > 0, reason="checks the no-GPU error")
def test_cuda_without_gpu_is_an_error() -> None:
    with pytest.raises(EngineError, match="no GPU"):
        VectorIndex(8, device="cuda")
    assert VectorIndex(8, device="auto").device == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(num_faiss_gpus() == 0, reason="needs a CUDA device")
def test_gpu_search_matches_cpu() -> None:  # pragma: no cover - needs a GPU
    rng = np.random.default_rng(2)
    db, queries = rng.standard_normal((500, 32)), rng.standard_normal((5, 32))
    gpu, cpu = VectorIndex(32, device="cuda"), VectorIndex(32, device="cpu")
    for index in (gpu, cpu):
        index.add(np.arange(500), db)
    assert gpu.device.startswith("cuda:")
    np.testing.assert_array_equal(gpu.search(queries, 10)[1], cpu.search(queries, 10)[1])
    gpu.remove(np.arange(100))
    assert (gpu.search(queries, 10)[1] >= 100).all()


def test_factory_choice() -> None:
    assert choose_factory(49_999, 50_000) == "Flat"
    assert choose_factory(50_000, 50_000) == f"IVF{ivf_nlist(50_000)},SQ8" == "IVF894,SQ8"
    assert ivf_nlist(1_000_000) == 4000
    assert ivf_nlist(100) == 2  # at least 39 training points per list
    index = VectorIndex(4, flat_threshold=100, device="cpu")
    assert index.wanted_factory(99) is None
    assert index.wanted_factory(100) == "IVF2,SQ8"
    index.factory, index.trained_on = "IVF2,SQ8", 100
    assert index.wanted_factory(60) is None  # hysteresis: back to Flat only below half
    assert index.wanted_factory(49) == "Flat"
    assert index.wanted_factory(399) is None
    assert index.wanted_factory(400) == f"IVF{ivf_nlist(400)},SQ8" == "IVF10,SQ8"


def test_ivf_recall_vs_flat_on_clustered_data() -> None:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 32))
    db = _clustered(rng, centres, 3000, noise=0.6)
    queries = _clustered(rng, centres, 100, noise=0.6)  # fresh points, same distribution
    ids = np.arange(1, 3001, dtype=np.int64) * 7
    rows = np.arange(3000)
    index = VectorIndex(32, flat_threshold=500, device="cpu", seed=0)
    index.rebuild(ids, rows, lambda r: db[r])
    assert index.index_type == f"IVF{ivf_nlist(3000)},SQ8" and index.nprobe is not None
    flat = VectorIndex(32, device="cpu")
    flat.add(ids, db)
    _, truth = flat.search(queries, 10)
    _, found = index.search(queries, 10)
    assert _recall_at(found, truth) >= 0.95
    _, brute = _brute_force(db, ids, queries, 10)
    np.testing.assert_array_equal(truth, brute)
    # ids map back to the right vectors after removal too
    index.remove(ids[:1500])
    _, found = index.search(db[2000:2001], 1)
    assert found[0, 0] == ids[2000]


def test_large_shortlists_probe_the_lists_calibrated_for_their_size(tmp_path: Path) -> None:
    """A 1000-candidate stage-1 shortlist must not be capped by the lists a top 10 needs."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, 32))
    db = _clustered(rng, centres, 3000, noise=0.6)
    queries = _clustered(rng, centres, 60, noise=0.6)
    ids = np.arange(3000, dtype=np.int64) + 1
    index = VectorIndex(32, flat_threshold=500, device="cpu", seed=0)
    index.rebuild(ids, np.arange(3000), lambda r: db[r])
    assert sorted(index.nprobe_at) == [10, 100, 1000]
    assert index.nprobe_at[10] == index.nprobe and index.nprobe_at[10] <= index.nprobe_at[100] <= index.nprobe_at[1000]
    assert index.nprobe_for(10) == index.nprobe_at[10] and index.nprobe_for(1000) == index.nprobe_at[1000]
    assert index.nprobe_at[100] <= index.nprobe_for(300) <= index.nprobe_at[1000]
    _, truth = _brute_force(db, ids, queries, 300)
    _, found = index.search(queries, 300)
    assert _recall_at(found, truth) >= 0.95
    # what probing only the top-10 lists would have returned: far fewer of the true 300
    ivf = faiss.extract_index_ivf(index._cpu)
    _, capped = index._cpu.search(_unit(queries), 300, params=faiss.SearchParametersIVF(nprobe=index.nprobe_at[10]))
    assert index.nprobe_at[1000] > index.nprobe_at[10] and _recall_at(capped, truth) < _recall_at(found, truth)
    assert ivf.nlist >= index.nprobe_at[1000]
    # the table survives a save and load; a file without one is calibrated again, same result
    path = tmp_path / "vectors.faiss"
    index.save(path)
    assert read_header(path)["nprobe_at"] == {str(k): p for k, p in index.nprobe_at.items()}
    loaded = VectorIndex.load(path, 32, flat_threshold=500, device="cpu")
    assert loaded.nprobe_at == index.nprobe_at and not loaded.needs_calibration()
    loaded.nprobe_at = {}  # as written by an engine before the per-k calibration
    assert loaded.needs_calibration() and loaded.nprobe_for(1000) == loaded.nprobe
    loaded.calibrate(ids, np.arange(3000), lambda r: db[r])
    assert loaded.nprobe_at == index.nprobe_at


def test_save_load_roundtrip_and_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    db = _clustered(rng, rng.standard_normal((10, 16)), 800, noise=0.5)
    index = VectorIndex(16, flat_threshold=200, device="cpu")
    index.rebuild(np.arange(800) + 5, np.arange(800), lambda r: db[r])
    index.max_region_id, index.max_tombstone_seq = 804, 17
    path = tmp_path / "vectors.faiss"
    index.save(path)
    assert not list(tmp_path.glob(".vectors.faiss.tmp-*"))
    header = read_header(path)
    assert header["factory"] == index.index_type and header["count"] == 800
    assert (header["max_region_id"], header["max_tombstone_seq"], header["dim"]) == (804, 17, 16)
    with monkeypatch.context() as m:  # streamed: the file is never read whole into memory beside the index
        m.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole"))
        loaded = VectorIndex.load(path, 16, flat_threshold=200, device="cpu")
        assert read_header(path)["count"] == 800
    assert (loaded.max_region_id, loaded.max_tombstone_seq, loaded.nprobe) == (804, 17, index.nprobe)
    queries = db[:5] + 0.01
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])

    with pytest.raises(VectorFileError, match="16-d vectors, the index 8-d"):
        VectorIndex.load(path, 8, device="cpu")
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # a payload cut short is caught by the size check, before faiss reads it
    with pytest.raises(VectorFileError, match="damaged"):
        VectorIndex.load(path, 16, device="cpu")
    path.write_bytes(whole)
    data = bytearray(whole)
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VectorFileError, match="damaged"):
        VectorIndex.load(path, 16, device="cpu")
    path.write_bytes(b"junk")
    with pytest.raises(VectorFileError, match="truncated|not a vectors file"):
        VectorIndex.load(path, 16, device="cpu")


def test_codes_too_coarse_for_the_promised_recall_give_way_to_finer_ones_over_the_same_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQ8 short of the promised recall (forced: its calibration reports 0.5) → IVF-SQfp16 over the same
    k-means lists (trained once), searched as well as IVF-Flat; both short → IVF-Flat."""
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((40, 32))
    db, queries = _clustered(rng, centres, 3000, noise=0.6), _clustered(rng, centres, 50, noise=0.6)
    ids, rows = np.arange(3000, dtype=np.int64) + 5, np.arange(3000)
    calibrate = VectorIndex._calibrate
    nlist = ivf_nlist(3000)
    for too_coarse, expected in (({"SQ8"}, f"IVF{nlist},SQfp16"), ({"SQ8", "SQfp16"}, f"IVF{nlist},Flat")):
        tried: list[str] = []
        centroids: list[np.ndarray] = []

        def fake(self, index, *args, _coarse=too_coarse, _tried=tried, _centroids=centroids):  # noqa: ANN001, ANN202
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            kind = "Flat" if isinstance(ivf, faiss.IndexIVFFlat) else ("SQfp16" if ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16 else "SQ8")
            _tried.append(kind)
            _centroids.append(ivf.quantizer.reconstruct_n(0, ivf.nlist))
            out = calibrate(self, index, *args)
            return {k: replace(p, recall=0.5) for k, p in out.items()} if kind in _coarse else out

        monkeypatch.setattr(VectorIndex, "_calibrate", fake)
        index = VectorIndex(32, flat_threshold=500, device="cpu", seed=0)
        index.rebuild(ids, rows, lambda r: db[r])
        assert index.index_type == expected and tried == ["SQ8", "SQfp16", "Flat"][: len(tried)] and len(tried) == len(too_coarse) + 1
        for other in centroids[1:]:
            np.testing.assert_array_equal(other, centroids[0])  # k-means once
        flat = VectorIndex(32, device="cpu")
        flat.add(ids, db)
        _, truth = flat.search(queries, 10)
        _, found = index.search(queries, 10)
        assert _recall_at(found, truth) >= 0.95


def test_codes_that_cap_recall_are_rescored_exactly_from_the_stored_vectors(tmp_path: Path) -> None:
    """Near-duplicates closer than SQ8's step: the codes alone cannot order a cluster (recall@10 levels
    off far below 0.97), so the calibration re-scores REFINE x k candidates exactly and the index stays
    SQ8 (no fallback to finer codes); searched with the stored vectors, the top 10 is brute force's."""
    rng = np.random.default_rng(11)
    centres = _unit(rng.standard_normal((100, 32)))
    db = _unit(np.repeat(centres, 30, axis=0) + 0.002 * rng.standard_normal((3000, 32)))
    ids, rows = np.arange(3000, dtype=np.int64) * 3 + 1, np.arange(3000)
    index = VectorIndex(32, flat_threshold=500, device="cpu", seed=0)
    index.rebuild(ids, rows, lambda r: db[r])
    assert index.index_type == f"IVF{ivf_nlist(3000)},SQ8" and index.refine_at.get(10) == REFINE
    assert index.refine_for(10) == REFINE and index.refine_for(5) == REFINE
    by_id = dict(zip(ids.tolist(), db))

    def exact(wanted: np.ndarray) -> np.ndarray:
        return np.stack([by_id[int(i)] for i in wanted])

    queries = db[rng.choice(3000, 100, replace=False)] + 0.0005 * rng.standard_normal((100, 32)).astype(np.float32)
    _, truth = _brute_force(db, ids, queries, 10)
    scores, found = index.search(queries, 10, exact=exact)
    _, coarse = index.search(queries, 10)  # no stored vectors: the codes' own order
    assert _recall_at(found, truth) >= 0.95 and _recall_at(coarse, truth) < 0.6
    filled = found >= 0  # (a probed list can hold fewer than 10)
    exact_scores = np.einsum("nd,nd->n", exact(found[filled]), _unit(queries)[np.nonzero(filled)[0]])
    np.testing.assert_allclose(scores[filled], exact_scores, atol=1e-6)  # the scores are the exact cosines, in order
    assert (np.diff(scores, axis=1)[filled[:, 1:]] <= 0).all() and np.isneginf(scores[~filled]).all()
    # a region that has gone (its stored vector reads as zeros) is never returned
    gone = int(truth[0, 0])
    scores, found = index.search(queries[:1], 10, exact=lambda w: np.where((w == gone)[:, None], 0.0, exact(w)))
    assert gone not in found[0].tolist() and np.isfinite(scores).all()
    path = tmp_path / "vectors.faiss"
    index.save(path)
    assert read_header(path)["refine_at"] == {str(k): f for k, f in index.refine_at.items()}
    loaded = VectorIndex.load(path, 32, flat_threshold=500, device="cpu")
    assert loaded.refine_at == index.refine_at
    np.testing.assert_array_equal(loaded.search(queries, 10, exact=exact)[1], index.search(queries, 10, exact=exact)[1])


def test_codes_fine_enough_are_not_rescored() -> None:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 32))
    db = _clustered(rng, centres, 3000, noise=0.6)
    index = VectorIndex(32, flat_threshold=500, device="cpu", seed=0)
    index.rebuild(np.arange(3000, dtype=np.int64), np.arange(3000), lambda r: db[r])
    assert index.refine_at == {} and index.refine_for(10) == 1
    calls: list[int] = []
    index.search(db[:3], 10, exact=lambda w: calls.append(len(w)) or db[w])
    assert calls == []  # the stored vectors are not even read
