"""``engine index CORPUS --ray local[:N]|ADDRESS``: the images' regions extracted on Ray workers.

The driver (the ``engine index`` process) scans the corpus, plans the run and holds the writer lock; it
hands batches of image files to a pool of :class:`IndexWorker` actors (each loads the models once and
runs :class:`indexer.extraction.BatchExtraction`, the same code as a one-process run) and commits their
results IN SUBMISSION ORDER, so that ids, rows and vectors come out as a one-process run's. A worker that
dies is restarted once and its batch retried; if it dies again the run stops with one line, keeping
every batch committed before it, and re-running the command completes the rest (an interrupted run).
What moves per image: its path to the worker, and back its arrays (~1.1 MB for 100 regions with 7×7
maps, ~0.2 MB with ``--no-maps``); the workers read the images from the same paths, so a real cluster
needs the corpus on a shared file system.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.config import EngineConfig
from engine.distributed.ray_cluster import RayCluster, import_ray, unwrap_ray_error
from engine.errors import EngineError, IndexVersionError
from indexer.extraction import BatchExtraction, ExtractedBatch
from indexer.scan import FileEntry

__all__ = ["WorkerSpec", "IndexWorker", "RayExecutor"]

log = logging.getLogger(__name__)

RESUME_ADVICE = "everything committed before it is kept: run the same `engine index` again to finish"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build the driver's extraction: the engine's configuration, the proposal source,
    the corpus (``--proposals gt`` reads its annotations) and the arrays the index stores."""

    engine_config: EngineConfig
    proposals: str
    corpus: Path
    arrays: tuple[str, ...]
    threads: int = 1


class IndexWorker:
    """A Ray actor: the models loaded once, then :meth:`extract` for each batch it is handed."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        from engine.api import Engine
        from indexer.proposal_sources import create_proposal_provider

        torch.set_num_threads(spec.threads)
        engine = Engine(config=spec.engine_config)
        proposals = create_proposal_provider(spec.proposals, spec.corpus, backbone=engine.extractor.backbone)
        self.extraction = engine.batch_extraction(spec.arrays, proposals)

    def versions(self) -> dict[str, str]:
        return self.extraction.versions()

    def pid(self) -> int:
        return os.getpid()

    def extract(self, batch: list[FileEntry]) -> ExtractedBatch:
        return self.extraction(batch)


class RayExecutor:
    """A :data:`indexer.pipeline.BatchExecutor` over a pool of :class:`IndexWorker` actors (module doc).

    The actors are named ``engine-index-<run>-<i>`` in the ``engine`` namespace (:attr:`names`)."""

    def __init__(self, cluster: RayCluster, actors: list, names: list[str]) -> None:
        self.cluster = cluster
        self.actors = actors
        self.names = names

    @classmethod
    def start(cls, spec: str, *, engine_config: EngineConfig, proposals: str, corpus: Path, arrays: tuple[str, ...], workers: int | None = None) -> "RayExecutor":
        ray = import_ray()
        cluster = RayCluster.connect(spec)
        try:
            count = workers or cluster.cpus()
            if count < 1:
                raise EngineError(f"--ray-workers must be at least 1, got {count}")
            run = uuid.uuid4().hex[:8]
            worker = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=1)(IndexWorker)
            spec_ = WorkerSpec(engine_config=engine_config, proposals=proposals, corpus=corpus, arrays=arrays)
            names = [f"engine-index-{run}-{i}" for i in range(count)]
            actors = [worker.options(name=name).remote(spec_) for name in names]
            log.info("indexing on Ray (%s): %d workers", spec, count)
            return cls(cluster, actors, names)
        except BaseException:
            cluster.close()
            raise

    def __call__(self, extraction: BatchExtraction, batches: Iterable[list[FileEntry]]) -> Iterator[ExtractedBatch]:
        ray = import_ray()
        from ray.util import ActorPool

        try:
            wanted = extraction.versions()
            for got in ray.get([a.versions.remote() for a in self.actors]):
                if got != wanted:
                    differ = sorted(k for k in set(got) | set(wanted) if got.get(k) != wanted.get(k))
                    raise IndexVersionError(f"a Ray worker loads other models than this process ({', '.join(f'{k}: {got.get(k)} vs {wanted.get(k)}' for k in differ)}); install the same engine and checkpoints on every node")
            pool = ActorPool(self.actors)
            yield from pool.map(lambda actor, batch: actor.extract.remote(batch), list(batches))
        except ray.exceptions.RayError as exc:
            raise unwrap_ray_error(exc, doing="indexing", advice=RESUME_ADVICE) from None

    def close(self) -> None:
        ray = import_ray()
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception as exc:  # already dead
                log.debug("could not stop a Ray worker: %s", exc)
        self.actors = []
        self.cluster.close()
