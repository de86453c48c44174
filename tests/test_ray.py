"""Indexing and sharded search on a local Ray cluster of 2 worker processes (engine/distributed/)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.api import Engine
from engine.cli import main
from engine.config import EngineConfig, IndexConfig
from engine.errors import EngineError, InvalidInputError
from indexer.store import IndexStore

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 CPUs for the module (the engine joins it instead of starting its own)."""
    from engine.distributed.ray_cluster import RAY_NAMESPACE

    ray.init(num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE, log_to_driver=False)
    yield
    ray.shutdown()


def _rows(index_dir: Path) -> tuple[list[tuple[str, tuple[float, ...]]], np.ndarray, np.ndarray]:
    """Each live region's (image path, box) in id order, its key vector and SAN vector."""
    with IndexStore.open(index_dir) as store:
        regions = store.all_regions()
        rows = store.regions(regions.ids)
        return [(r.image_path, tuple(round(float(v), 2) for v in r.box)) for r in rows], store.read_arrays("visual", regions.rows), store.read_arrays("san", regions.rows)


def _hits(engine: Engine, corpus: Path) -> list[list[tuple[str, tuple[float, ...]]]]:
    images = sorted((corpus / "images").iterdir())[:3]
    return [[(h.image, tuple(round(float(v), 1) for v in h.box)) for h in engine.search(image=str(p), k=5, exclude_self=True)] for p in images]


def test_ray_indexing_commits_what_one_process_does(cluster, tiny_corpus: Path, tiny_engine: Engine, tmp_path: Path) -> None:
    engine = Engine(tmp_path / "idx", config=EngineConfig(device="cpu"))
    summary = engine.index(tiny_corpus, config=IndexConfig(proposals="gt", ray="local", batch_size=2))
    assert (summary.processed, summary.errors) == (16, 0)
    names, vectors, san = _rows(engine.index_dir)
    one_names, one_vectors, one_san = _rows(tiny_engine.index_dir)
    assert names == one_names  # same images, regions, boxes and ids (committed in submission order)
    # within float tolerance: the workers run one torch thread, this process more; rows are stored as float16
    assert np.allclose(vectors.astype(np.float32), one_vectors.astype(np.float32), rtol=2e-3, atol=1e-3)
    assert np.allclose(san.astype(np.float32), one_san.astype(np.float32), rtol=2e-3, atol=1e-3)
    assert _hits(engine, tiny_corpus) == _hits(tiny_engine, tiny_corpus)
    assert not [n for n in ray.util.list_named_actors() if n.startswith("engine-index-")]  # the workers are stopped
    engine.close()


def test_a_killed_worker_loses_nothing_committed_and_a_rerun_completes(cluster, tiny_corpus: Path, tiny_engine: Engine, tmp_path: Path) -> None:
    engine = Engine(tmp_path / "idx", config=EngineConfig(device="cpu"))
    killed: list[str] = []

    def kill_after_first_commit(done: int, total: int) -> None:
        if done and not killed:
            name = sorted(n for n in ray.util.list_named_actors() if n.startswith("engine-index-"))[0]
            ray.kill(ray.get_actor(name))
            killed.append(name)

    with pytest.raises(EngineError) as failure:
        engine.index(tiny_corpus, config=IndexConfig(proposals="gt", ray="local", batch_size=1), on_progress=kill_after_first_commit)
    message = str(failure.value)
    assert "\n" not in message and "a Ray worker failed" in message and "run the same `engine index` again" in message
    committed = engine.info().images
    assert 1 <= committed < 16
    rerun = engine.index(tiny_corpus, config=IndexConfig(proposals="gt", ray="local", batch_size=4))
    assert rerun.unchanged == committed and rerun.processed == 16 - committed
    names, vectors, _ = _rows(engine.index_dir)
    one_names, one_vectors, _ = _rows(tiny_engine.index_dir)
    assert sorted(names) == sorted(one_names)
    assert _hits(engine, tiny_corpus) == _hits(tiny_engine, tiny_corpus)
    engine.close()


def test_a_sharded_index_searched_by_ray_actors_matches_in_process(cluster, tiny_corpus: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "sharded"
    local = Engine(index_dir, config=EngineConfig(device="cpu"))
    local.index(tiny_corpus, config=IndexConfig(proposals="gt", shards=2, ray="local"))
    remote = Engine(index_dir, config=EngineConfig(device="cpu", ray="local"))
    image = str(sorted((tiny_corpus / "images").iterdir())[3])
    for request in ({"image": image}, {"image": image, "text": "a red circle"}, {"text": "a red fruit"}, {"image": image, "text": "a brown dog"}):
        a = [(h.image, h.box, round(h.score, 5), h.region_id) for h in local.search(k=6, **request)]
        b = [(h.image, h.box, round(h.score, 5), h.region_id) for h in remote.search(k=6, **request)]
        assert a == b and a, request
    with pytest.raises(InvalidInputError, match="is not in index"):
        remote.search(region_id=10**9)
    remote.close()
    local.close()


def test_cli_ray_options(cluster, tiny_corpus: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["index", str(tiny_corpus), "--index", str(tmp_path / "i"), "--device", "cpu", "--proposals", "gt", "--ray", "local", "--ray-workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["processed"] == 16
    lone = runner.invoke(main, ["index", str(tiny_corpus), "--index", str(tmp_path / "j"), "--ray-workers", "2"])
    assert lone.exit_code != 0 and "--ray-workers goes with --ray" in lone.output


def test_bad_cluster_specs_are_one_line(cluster) -> None:
    from engine.distributed.ray_cluster import RayCluster

    with pytest.raises(InvalidInputError, match="not understood"):
        RayCluster.connect("local:x")
    with pytest.raises(InvalidInputError, match="needs a cluster"):
        RayCluster.connect(" ")
