"""``engine bench`` and the benchmark package (engine/benchmarking): small, fast checks on the tiny corpus."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.benchmarking.exhaustive import ExhaustiveQuery, exhaustive_search, mean_recall_at_k, recall_at_k
from engine.benchmarking.query_bench import REQUIRED_KEYS
from engine.benchmarking.seed import SeedConfig, load_seed_data, prepare_seed
from engine.benchmarking.synthetic import SyntheticConfig, cached_index
from engine.cli import main
from engine.errors import InvalidInputError


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One benchmark cache for the module: the seed's saliency grids and built indexes are reused."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def seed_data(tiny_engine, tiny_corpus: Path, bench_cache: Path):
    """The tiny corpus and its index as a benchmark seed (the same seed ``engine bench --seed-index`` makes)."""
    seed = prepare_seed(SeedConfig(corpus=tiny_corpus, index=tiny_engine.index_dir), bench_cache, progress=False)
    return seed, load_seed_data(seed, tiny_engine, progress=False)


# ------------------------------------------------------------------------------------------- recall


def test_recall_at_k_on_a_constructed_example() -> None:
    exact = [5, 4, 3, 2, 1, 10, 11, 12, 13, 14]
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(list(reversed(exact)), exact) == 1.0  # order within the top 10 does not matter
    assert recall_at_k([5, 4, 3, 99, 98, 97, 96, 95, 94, 93], exact) == pytest.approx(0.3)
    assert recall_at_k([5, 4, 3, 2, 1, 10, 11, 12, 13, 14, 99], [*exact, 100], k=10) == 1.0  # only the top k counts
    assert recall_at_k([1, 2], [2, 3], k=10) == pytest.approx(0.5)  # fewer than k exact hits: divide by those
    assert recall_at_k([], [], k=10) == 1.0
    assert recall_at_k([7], [8], k=1) == 0.0
    assert mean_recall_at_k([exact, [5, 99]], [exact, [5, 4]], k=2) == pytest.approx(0.75)
    with pytest.raises(InvalidInputError):
        mean_recall_at_k([exact], [], k=10)


def test_exhaustive_search_ranks_like_the_model_scores(tiny_engine) -> None:
    from indexer.store import IndexStore

    model = tiny_engine.retrieval_model
    with IndexStore.open(tiny_engine.index_dir) as store:
        table = store.all_regions()
        maps = store.read_arrays("maps", table.rows)
        query = ExhaustiveQuery(query_map=maps[3], text="a red circle left of a blue square")
        [result] = exhaustive_search(store, model, [query], k=5, nms_iou=1.0, table=table, chunk=7)
    scores = model.score(maps[3], query.text, maps)
    expected = table.ids[np.argsort(-scores, kind="stable")[:5]].tolist()
    assert result.top_ids == expected
    assert result.seconds > 0 and result.scored == len(table.ids)


def test_exhaustive_fused_score_uses_both_weights(tiny_engine) -> None:
    """The exhaustive benchmark ranks by the engine's formula ``image_weight · grn + text_weight · san``
    (an earlier copy dropped ``image_weight``): its top ids equal a brute-force ranking by it."""
    from indexer.store import IndexStore

    model, san = tiny_engine.retrieval_model, tiny_engine.san_encoder.model
    text = "a red circle left of a blue square"
    with IndexStore.open(tiny_engine.index_dir) as store:
        table = store.all_regions()
        maps = store.read_arrays("maps", table.rows)
        grn = np.asarray(model.score(maps[3], text, maps), np.float64)
        san_scores = np.asarray(san.score(text, store.read_arrays("san", table.rows).astype(np.float32)), np.float64)
        query = ExhaustiveQuery(query_map=maps[3], text=text)
        for image_weight in (1.0, 0.25):
            [result] = exhaustive_search(store, model, [query], san_model=san, text_weight=2.0, image_weight=image_weight, k=8, nms_iou=1.0, table=table, chunk=7)
            expected = table.ids[np.argsort(-(image_weight * grn + 2.0 * san_scores), kind="stable")[:8]].tolist()
            assert result.top_ids == expected


def test_bench_compares_the_two_stage_search_with_exhaustive_scoring_of_the_same_weights(tiny_engine, tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine bench``: the exhaustive pass gets the engine's image weight, and on an index smaller than
    the shortlist the two-stage top 10 (every region a possible hit) equals the exhaustive top 10."""
    from dataclasses import replace
    from types import SimpleNamespace

    import engine.benchmarking.exhaustive as exhaustive
    from engine.api import Engine
    from engine.benchmarking.latency import measure_latency
    from engine.benchmarking.query_bench import _exhaustive
    from engine.benchmarking.seed import load_queries

    queries = load_queries(tiny_corpus, limit=2)
    seen: list[float] = []
    original = exhaustive.exhaustive_search

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs["image_weight"])
        return original(*args, **kwargs)

    monkeypatch.setattr(exhaustive, "exhaustive_search", spy)
    with Engine(tiny_engine.index_dir, config=replace(tiny_engine.config, image_weight=0.5, text_weight=1.5, stage3=False)) as engine:
        latency = measure_latency(engine, queries, count=len(queries), warmup=0)
        results, reused = _exhaustive(engine, SimpleNamespace(path=engine.index_dir), queries, SimpleNamespace(cache=tmp_path, k=10), progress=False)
    assert seen == [0.5] and not reused
    assert mean_recall_at_k(latency.top_ids, [r.top_ids for r in results], k=10) == 1.0


def test_an_interrupted_exhaustive_pass_resumes_from_its_checkpoint(tiny_engine, tmp_path: Path) -> None:
    from indexer.store import IndexStore

    model = tiny_engine.retrieval_model
    checkpoint = tmp_path / "partial.npz"
    calls = {"n": 0}

    def failing(maps: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return maps

    with IndexStore.open(tiny_engine.index_dir) as store:
        table = store.all_regions()
        query = ExhaustiveQuery(query_map=store.read_arrays("maps", table.rows[:1])[0], text="a red circle")
        clean = exhaustive_search(store, model, [query], k=5, table=table, chunk=7)
        with pytest.raises(KeyboardInterrupt):
            exhaustive_search(store, model, [query], k=5, table=table, chunk=7, transform=failing, checkpoint=checkpoint)
        assert checkpoint.is_file()
        resumed = exhaustive_search(store, model, [query], k=5, table=table, chunk=7, transform=failing, checkpoint=checkpoint)
    assert resumed[0].top_ids == clean[0].top_ids
    assert calls["n"] < 20 + len(table.ids) // 7  # the chunks before the checkpoint were not scored again
    assert not checkpoint.exists()


# ------------------------------------------------------------------------------------------- synthetic index


def test_synthetic_index_keeps_the_real_regions_and_derives_the_rest(seed_data, tmp_path: Path) -> None:
    from indexer.region_features import pool_vectors
    from indexer.store import IndexStore

    seed, data = seed_data
    built = cached_index(data, SyntheticConfig(regions=data.regions + 150), tmp_path, seed.key, san_visual=None, progress=False)
    assert (built.regions, built.real_regions, built.synthetic_regions) == (data.regions + 150, data.regions, 150)
    with IndexStore.open(built.path) as store:
        assert store.info().regions == built.regions
        table = store.all_regions()
        real = store.read_arrays("maps", table.rows[: data.regions])
        np.testing.assert_array_equal(real, data.arrays["maps"])
        synthetic = store.read_arrays("maps", table.rows[data.regions :]).astype(np.float32)
        vectors = store.read_arrays("visual", table.rows[data.regions :]).astype(np.float32)
        assert store.visual_key == data.visual_key is not None  # recorded like the seed's: Engine.search opens it
    # the visual key (c4 + c5, whitened) is the seed keys' mixture (dominant weight >= 0.5): unit vectors
    # close to their dominant seed key, and as close as their maps' means are to the dominant seed map's
    seed_keys = data.arrays["visual"].astype(np.float32)
    assert vectors.shape == (150, seed_keys.shape[1]) == (150, 432)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    similarity = vectors @ seed_keys.T
    nearest = similarity.argmax(axis=1)
    assert float(similarity.max(axis=1).mean()) > 0.85 and float(similarity.max(axis=1).min()) > 0.6
    seed_means = pool_vectors(data.arrays["maps"].astype(np.float32))
    assert float(np.mean(np.sum(pool_vectors(synthetic) * seed_means[nearest], axis=1))) > 0.8
    assert not np.allclose(synthetic[:10], real[:10].astype(np.float32))
    again = cached_index(data, SyntheticConfig(regions=data.regions + 150), tmp_path, seed.key, san_visual=None, progress=False)
    assert again.reused and again.path == built.path
    lean = cached_index(data, SyntheticConfig(regions=data.regions + 150, maps=False), tmp_path, seed.key, san_visual=None, progress=False)
    assert lean.path != built.path and not lean.reused  # an index as `engine index --no-maps` builds it
    with IndexStore.open(lean.path) as store:
        assert "maps" not in store.array_specs and store.info().regions == built.regions
        np.testing.assert_array_equal(store.read_arrays("visual", store.all_regions().rows[: data.regions]), data.arrays["visual"])


def test_synthetic_config_refuses_zero_regions() -> None:
    with pytest.raises(InvalidInputError, match="--regions must be a positive number"):
        SyntheticConfig(regions=0)


# ------------------------------------------------------------------------------------------- the command


def test_engine_bench_writes_the_required_keys(tiny_engine, tiny_corpus: Path, seed_data, bench_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    details = tmp_path / "details.json"
    args = [
        "bench", "--regions", "2000", "--grn", "grn-fc", "--queries", "3", "--warmup", "1", "--exhaustive-queries", "2",
        "--breakdown", "1", "--no-memory", "--seed-corpus", str(tiny_corpus), "--seed-index", str(tiny_engine.index_dir),
        "--cache", str(bench_cache), "--json", str(out), "--details", str(details), "-q",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert tuple(payload) == REQUIRED_KEYS
    assert payload["regions"] == 2000
    assert 0 < payload["p50_ms"] <= payload["p95_ms"]
    assert payload["exhaustive_p50_ms"] > 0
    assert 0.0 <= payload["recall_at_10_vs_exhaustive"] <= 1.0
    assert payload["index_type"] == "Flat"
    assert payload["bytes_per_region"] > 112 * 7 * 7 * 2  # at least the float16 7x7 map
    full = json.loads(details.read_text())
    assert full["grn_method"] == "grn-fc" and full["index"]["synthetic_regions"] > 0
    assert "stage1" in full["breakdown_ms"] and "grn" in full["breakdown_ms"]

    from engine.benchmarking.report import load_results, render_tables

    results = tmp_path / "results"
    results.mkdir()
    (results / "query-2000-grn-fc.json").write_text(details.read_text())
    table = render_tables(load_results(results))
    assert "| 2,000 (" in table and "recall@10 vs exhaustive" in table


@pytest.mark.parametrize("option", [["--regions", "0"], ["--regions", "-5"], ["--regions", "10", "--queries", "0"]])
def test_engine_bench_refuses_bad_numbers_in_one_line(option: list[str]) -> None:
    result = CliRunner().invoke(main, ["bench", *option])
    assert result.exit_code != 0
    assert "must be" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- other parts


def test_faiss_tradeoff_compares_flat_ivf_and_pq(seed_data, tmp_path: Path) -> None:
    from engine.benchmarking.faiss_tradeoff import FaissTradeoffConfig, measure_faiss

    seed, data = seed_data
    built = cached_index(data, SyntheticConfig(regions=1000, flat_threshold=500), tmp_path, seed.key, san_visual=None, progress=False)
    queries = data.arrays["visual"][:8].astype(np.float32)
    rows = measure_faiss(built.path, queries, FaissTradeoffConfig(shortlist=50, pq_m=(28,), nprobes=(4, 64)))  # 432-d key: PQ27
    names = [r.index for r in rows]
    assert names[0] == "Flat" and rows[0].recall_at_10 == 1.0
    assert any(r.chosen_by_store and r.index.startswith("IVF") for r in rows)
    assert any(",PQ27" in n for n in names)
    assert all(0.0 <= r.recall_at_10 <= 1.0 and r.p50_ms >= 0 for r in rows)


def test_indexing_benchmark_times_every_stage(tmp_path: Path) -> None:
    from engine.benchmarking.indexing import IndexingBenchConfig, measure_indexing

    report = measure_indexing(IndexingBenchConfig(images=2, size=160, proposals="gt", batch_size=2), tmp_path)
    assert report.images == 2 and report.regions > 0 and report.images_per_second > 0
    assert set(report.stage_shares) == {"decode", "preprocess", "backbone", "proposals", "embedding", "writes", "other"}
    assert report.stage_seconds["backbone"] > 0 and report.stage_seconds["embedding"] > 0 and report.stage_seconds["writes"] > 0
    assert sum(report.stage_shares.values()) == pytest.approx(1.0, abs=0.05)
