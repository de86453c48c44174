"""Indexing throughput: images per second of the real pipeline and the shares of its stages.

The pipeline (:class:`indexer.pipeline.IndexingPipeline`) receives its components — backbone, proposal
network, region feature extractor, SAN encoder, store — by injection, so each one is handed over in a
:class:`~engine.benchmarking.timing.TimedProxy` that adds the time of its calls to one stage; the
pipeline itself is unchanged. Stages:

* ``decode`` — hashing and decoding the image files (the pipeline's own functions, timed on the same
  files before the run, since the pipeline calls them directly);
* ``preprocess`` — resizing and normalising a batch (inside the RPN's ``propose_batch``);
* ``backbone`` — EfficientNet-Lite0 forward passes;
* ``proposals`` — the RPN head, box decoding and NMS;
* ``embedding`` — RoIAlign maps and vectors, SAN's saliency network and vectors;
* ``writes`` — ``commit_images`` (feature rows, fsync, SQLite) and the FAISS saves;
* ``other`` — the rest of the run's wall time (scan, grouping, bookkeeping).
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from engine.benchmarking.timing import StageTimes, TimedProxy, torch_threads
from engine.errors import InvalidInputError

__all__ = ["IndexingBenchConfig", "IndexingReport", "measure_indexing"]

_STAGES = ("decode", "preprocess", "backbone", "proposals", "embedding", "writes", "other")


@dataclass(frozen=True)
class IndexingBenchConfig:
    """``images`` synthetic scenes of ``size`` pixels (seed ``seed``), indexed in batches of ``batch_size``
    with ``proposals`` (``auto``: the shipped RPN). ``threads``: torch threads (``None``: torch's default);
    ``one_core``: pin the process to one CPU core (and one torch thread) for the run."""

    images: int = 60
    size: int = 320
    seed: int = 1
    batch_size: int = 8
    threads: int | None = None
    one_core: bool = False
    proposals: str = "auto"

    def __post_init__(self) -> None:
        if self.images < 1 or self.batch_size < 1:
            raise InvalidInputError(f"images and batch_size must be >= 1, got {self.images} and {self.batch_size}")


@dataclass(frozen=True)
class IndexingReport:
    """Images and regions indexed, wall seconds, images per second, the process's CPU seconds (which other
    work on the machine does not inflate), seconds and share per stage."""

    images: int
    regions: int
    seconds: float
    images_per_second: float
    cpu_seconds: float
    stage_seconds: dict[str, float]
    stage_shares: dict[str, float]
    threads: int
    batch_size: int
    one_core: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_indexing(config: IndexingBenchConfig, work_dir: Path, *, progress: bool = False) -> IndexingReport:
    """Index a fresh synthetic corpus into a fresh index under ``work_dir`` and time the stages."""
    from engine.api import Engine
    from engine.config import EngineConfig

    corpus = _corpus(config, Path(work_dir))
    index_dir = Path(work_dir) / f"indexing-run-{os.getpid()}"
    if index_dir.exists():
        shutil.rmtree(index_dir)
    try:
        with Engine(index_dir, config=EngineConfig(device="cpu")) as engine, _pinned(config.one_core), torch_threads(1 if config.one_core else config.threads) as threads:
            _ = (engine.extractor, engine.san_encoder)  # load the models before the clock starts
            times = StageTimes()
            decode = _decode_seconds(corpus)
            pipeline, store = _timed_pipeline(engine, corpus, index_dir, config, times)
            try:
                start, start_cpu = time.perf_counter(), time.process_time()
                summary = pipeline.run(corpus, progress=progress)
                wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            finally:
                store.close()
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)
    seconds = _stage_seconds(times, decode, wall)
    return IndexingReport(
        images=summary.processed,
        regions=summary.regions_added,
        seconds=round(wall, 3),
        images_per_second=round(summary.processed / wall, 3) if wall > 0 else float("nan"),
        cpu_seconds=round(cpu, 3),
        stage_seconds={k: round(v, 3) for k, v in seconds.items()},
        stage_shares={k: round(v / wall, 4) for k, v in seconds.items()},
        threads=threads,
        batch_size=config.batch_size,
        one_core=config.one_core,
    )


def _timed_pipeline(engine: Any, corpus: Path, index_dir: Path, config: IndexingBenchConfig, times: StageTimes) -> tuple[Any, Any]:
    """The pipeline as :meth:`Engine.index` builds it, with every component in a timing proxy."""
    from engine.config import IndexConfig
    from indexer.extraction import BatchExtraction
    from indexer.pipeline import IndexingPipeline
    from indexer.proposal_sources import RpnProposals, create_proposal_provider
    from indexer.region_features import RegionFeatureExtractor
    from indexer.store import INSTANCE_ARRAY, MAPS_ARRAY, POOLED_ARRAY, IndexStore

    backbone = TimedProxy(engine.extractor.backbone, times, "backbone", ["__call__"])
    extractor = TimedProxy(RegionFeatureExtractor(backbone=backbone, config=engine.extractor.config), times, "embedding", ["from_feature_map", "__call__"])
    provider = create_proposal_provider(config.proposals, corpus.resolve(), backbone=engine.extractor.backbone)
    if isinstance(provider, RpnProposals):
        provider = replace(provider, network=TimedProxy(provider.network, times, "proposals", ["propose"]), backbone=backbone)
        proposals = TimedProxy(provider, times, "propose_batch", ["propose_batch"])
    else:
        proposals = TimedProxy(provider, times, "proposals", ["__call__"])
    san = TimedProxy(engine.san_encoder, times, "embedding", ["encode"])
    ref_nms = TimedProxy(engine.ref_nms_model, times, "embedding", ["visual_features"])
    concepts = TimedProxy(engine.concept_evidence, times, "embedding", ["evidence"]) if engine.config.concepts else None
    shapes = engine._array_shapes(san=True)  # what `engine index` creates
    instance = TimedProxy(engine.instance_head, times, "embedding", ["embed"]) if INSTANCE_ARRAY in shapes else None
    store = IndexStore.open(index_dir, create=True, writable=True, config=engine.config.store, array_shapes=shapes, visual_key=engine.visual_key)
    models = {"backbone": engine.extractor.backbone.version, "region_features": engine.extractor.version, "proposals": getattr(provider, "version", provider.source), "san": engine.san_encoder.version, "ref_nms": engine.ref_nms_model.version}
    if concepts is not None:
        models["concepts"] = engine.concept_evidence.version
    if instance is not None:
        models["instance_head"] = engine.instance_head.version
    extraction = BatchExtraction(
        extractor=extractor,
        proposals=proposals,
        maps=MAPS_ARRAY in shapes,
        pooled=POOLED_ARRAY in shapes,
        san=san,
        ref_nms=ref_nms,
        concepts=concepts,
        instance=instance,
    )
    pipeline = IndexingPipeline(
        store=TimedProxy(store, times, "writes", ["commit_images", "save_vectors"]),
        extraction=extraction,
        batch_size=config.batch_size,
        save_every=IndexConfig().save_every,
        models=models,
    )
    return pipeline, store


def _stage_seconds(times: StageTimes, decode: float, wall: float) -> dict[str, float]:
    measured = dict(times.seconds)
    batch = measured.pop("propose_batch", 0.0)
    seconds = {"decode": decode, **measured}
    if batch:
        seconds["preprocess"] = max(batch - measured.get("backbone", 0.0) - measured.get("proposals", 0.0), 0.0)
    seconds["other"] = max(wall - sum(seconds.values()), 0.0)
    return {name: seconds.get(name, 0.0) for name in _STAGES}


def _decode_seconds(corpus: Path) -> float:
    """Seconds to hash and decode every image of ``corpus`` with the pipeline's functions."""
    from indexer.images import load_image
    from indexer.scan import content_hash, list_image_files

    start = time.perf_counter()
    for entry in list_image_files(corpus.resolve()):
        content_hash(entry.path)
        load_image(entry.path)
    return time.perf_counter() - start


def _corpus(config: IndexingBenchConfig, work_dir: Path) -> Path:
    """The synthetic corpus of ``config`` under ``work_dir`` (generated once)."""
    from engine.synth import SynthConfig, generate_corpus

    corpus = work_dir / f"indexing-corpus-{config.images}img-{config.size}px-s{config.seed}"
    if not (corpus / "queries.jsonl").is_file():
        generate_corpus(corpus, SynthConfig(images=config.images, seed=config.seed, size=config.size), progress=False)
    return corpus


@contextmanager
def _pinned(one_core: bool) -> Iterator[None]:
    """Restrict this process to its first allowed CPU core for the block (Linux; a no-op elsewhere)."""
    if not one_core or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
