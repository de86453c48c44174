"""The real seed of every benchmark index: a synthetic corpus indexed by the real pipeline, its region
arrays, the saliency grids of its regions, and its retrieval queries.

Large benchmark indexes (:mod:`engine.benchmarking.synthetic`) start from the seed's real regions and
add regions derived from them, so the seed is built once per configuration and cached::

    seed = prepare_seed(SeedConfig(images=100), cache=Path("benchmarks/.cache"))
    data = load_seed_data(seed, engine)      # records, boxes, float16 arrays, saliency grids
    queries = load_queries(seed.corpus)      # (image, region, text) of queries.jsonl
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.errors import InvalidInputError

__all__ = ["SeedConfig", "Seed", "SeedImage", "SeedData", "BenchQuery", "prepare_seed", "load_seed_data", "load_queries"]

log = logging.getLogger(__name__)

_MARKER = "seed.json"
_GRIDS = "grids.npy"


@dataclass(frozen=True)
class SeedConfig:
    """How the seed corpus is made: ``images`` synthetic scenes of ``size`` pixels from ``seed``, indexed
    with ``proposals`` (``auto`` = the shipped RPN, 100 per image, as ``engine index`` does).

    ``corpus`` and ``index``: use this already indexed corpus instead (both or neither).
    """

    images: int = 100
    size: int = 320
    seed: int = 0
    proposals: str = "auto"
    corpus: Path | None = None
    index: Path | None = None

    def __post_init__(self) -> None:
        if self.images < 1:
            raise InvalidInputError(f"--seed-images must be a positive number of images, got {self.images}; e.g. --seed-images 100")
        if (self.corpus is None) != (self.index is None):
            raise InvalidInputError("--seed-corpus and --seed-index go together: pass the corpus folder and the index built from it")

    @property
    def key(self) -> str:
        """A folder name that identifies this seed in the cache."""
        if self.index is not None:
            return "seed-" + _short_hash(str(Path(self.index).resolve()))
        return f"seed-{self.images}img-{self.size}px-s{self.seed}-{self.proposals}"


@dataclass(frozen=True)
class Seed:
    """Where a prepared seed lives: the corpus folder (images, ``queries.jsonl``) and its index."""

    key: str
    corpus: Path
    index: Path
    cache: Path

    @property
    def grids_path(self) -> Path:
        return self.cache / _GRIDS


@dataclass(frozen=True)
class SeedImage:
    """One indexed seed image: its record fields and its regions (rows ``start:start + count`` of the arrays)."""

    path: str
    content_hash: str
    size_bytes: int
    mtime_ns: int
    width: int
    height: int
    boxes: np.ndarray
    objectness: np.ndarray
    source: str
    start: int
    vector: np.ndarray | None = None  # the image's stored mean backbone feature, when the index keeps one

    @property
    def count(self) -> int:
        return int(len(self.boxes))


@dataclass(frozen=True)
class SeedData:
    """The seed's regions in memory: images, float16 arrays by name (rows in image order), the saliency
    grids ``[R, 7, 7]`` of the regions, the array shapes and the models the index was built with."""

    images: list[SeedImage]
    arrays: dict[str, np.ndarray]
    grids: np.ndarray
    shapes: dict[str, tuple[int, ...]]
    models: dict[str, str]
    visual_key: str | None = None  # the seed index's (meta.visual_key): a synthetic index built from it records it too

    @property
    def regions(self) -> int:
        return int(sum(im.count for im in self.images))


@dataclass(frozen=True)
class BenchQuery:
    """A combined query of the seed corpus: image file, region box (pixels), description."""

    image: Path
    box: tuple[float, float, float, float]
    text: str


def prepare_seed(config: SeedConfig, cache: Path, *, device: str = "cpu", progress: bool = True) -> Seed:
    """Generate (``engine synth``) and index (``engine index``, models on ``device``) the seed corpus under
    ``cache`` unless it is there already; an interrupted index run resumes. Returns where it is."""
    from engine.api import Engine
    from engine.config import EngineConfig, IndexConfig

    folder = Path(cache) / config.key
    if config.index is not None:
        assert config.corpus is not None
        folder.mkdir(parents=True, exist_ok=True)
        return Seed(key=config.key, corpus=Path(config.corpus).resolve(), index=Path(config.index).resolve(), cache=folder)
    seed = Seed(key=config.key, corpus=folder / "corpus", index=folder / "index", cache=folder)
    marker = folder / _MARKER
    if marker.is_file():
        return seed
    folder.mkdir(parents=True, exist_ok=True)
    if not (seed.corpus / "queries.jsonl").is_file():
        from engine.synth import SynthConfig, generate_corpus

        log.info("generating the %d-image seed corpus in %s", config.images, seed.corpus)
        generate_corpus(seed.corpus, SynthConfig(images=config.images, seed=config.seed, size=config.size), progress=progress)
    with Engine(seed.index, config=EngineConfig(device=device)) as engine:
        summary = engine.index(seed.corpus, config=IndexConfig(proposals=config.proposals), progress=progress)
    marker.write_text(json.dumps({"config": _jsonable(asdict(config)), "index": summary.to_dict()}, indent=2) + "\n", encoding="utf-8")
    return seed


def load_seed_data(seed: Seed, engine: Any, *, progress: bool = True) -> SeedData:
    """Read the seed index's images, regions and arrays; compute (once, cached) their saliency grids.

    ``engine``: an :class:`engine.api.Engine` with the models the seed was indexed with (its backbone
    and SAN encoder recompute the grids SAN pooled at index time).
    """
    from indexer.region_features import mean_maps
    from indexer.store import POOLED_ARRAY, IndexStore

    with IndexStore.open(seed.index) as store:
        info = store.info()
        known = store.known_images(str(seed.corpus.resolve()))
        images: list[SeedImage] = []
        rows: list[np.ndarray] = []
        start = 0
        for path in sorted(p for p, v in known.items() if v[3] == "indexed"):
            regions = store.regions_of_image(path)
            if not regions:
                continue
            size_bytes, mtime_ns, digest, _ = known[path]
            images.append(
                SeedImage(
                    path=path,
                    content_hash=str(digest),
                    size_bytes=int(size_bytes or 0),
                    mtime_ns=int(mtime_ns or 0),
                    width=int(regions[0].width or 0),
                    height=int(regions[0].height or 0),
                    boxes=np.asarray([r.box for r in regions], np.float32),
                    objectness=np.asarray([r.objectness for r in regions], np.float32),
                    source=regions[0].source,
                    start=start,
                )
            )
            rows.append(np.asarray([r.row for r in regions], np.int64))
            start += len(regions)
        if not images:
            raise InvalidInputError(f"the seed index {seed.index} holds no regions of {seed.corpus}; index the corpus first")
        images = _with_image_vectors(store, images)
        all_rows = np.concatenate(rows)
        arrays = {name: store.read_arrays(name, all_rows) for name in store.array_specs}
        shapes = {name: spec.shape for name, spec in store.array_specs.items()}
        visual_key = store.visual_key
    if POOLED_ARRAY not in arrays:  # a seed indexed before the pooled array: derive it as indexing would
        arrays[POOLED_ARRAY] = mean_maps(arrays["maps"])
        shapes[POOLED_ARRAY] = (arrays["maps"].shape[1],)
    grids = _cached_grids(seed, engine, images, arrays, progress=progress)
    return SeedData(images=images, arrays=arrays, grids=grids, shapes=shapes, models=dict(info.models), visual_key=visual_key)


def _with_image_vectors(store: Any, images: list[SeedImage]) -> list[SeedImage]:
    """The images with their stored image vectors (indexes that keep them; others are returned as they are)."""
    from dataclasses import replace

    read = getattr(store, "image_vectors", None)
    if read is None:
        return images
    vectors = read([im.path for im in images])
    return [replace(im, vector=vectors.get(im.path)) for im in images]


def load_queries(corpus: Path, *, images: set[str] | None = None, limit: int | None = None, seed: int = 0) -> list[BenchQuery]:
    """The retrieval queries of ``corpus/queries.jsonl`` (all splits), deduplicated, in a seeded order.

    ``images``: keep only queries whose image (absolute resolved path) is among these.
    """
    path = Path(corpus) / "queries.jsonl"
    if not path.is_file():
        raise InvalidInputError(f"{path} does not exist; the benchmark's seed corpus needs its retrieval queries (engine synth writes them)")
    seen: set[tuple[str, tuple[float, ...], str]] = set()
    queries: list[BenchQuery] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        image = (Path(corpus) / row["image"]).resolve()
        box = tuple(float(v) for v in row["region"])
        key = (str(image), box, str(row["text"]))
        if key in seen or (images is not None and str(image) not in images):
            continue
        seen.add(key)
        queries.append(BenchQuery(image=image, box=(box[0], box[1], box[2], box[3]), text=str(row["text"])))
    order = np.random.default_rng(seed).permutation(len(queries))
    queries = [queries[i] for i in order]
    return queries[:limit] if limit is not None else queries


def _cached_grids(seed: Seed, engine: Any, images: list[SeedImage], arrays: dict[str, np.ndarray], *, progress: bool) -> np.ndarray:
    total = sum(im.count for im in images)
    if seed.grids_path.is_file():
        grids = np.load(seed.grids_path)
        if grids.shape[0] == total:
            return grids
    grids = _saliency_grids(engine, images, progress=progress)
    if "san" in arrays:
        _check_grids(engine, arrays, grids)
    np.save(seed.grids_path, grids)
    return grids


def _saliency_grids(engine: Any, images: list[SeedImage], *, progress: bool, batch: int = 8) -> np.ndarray:
    """Saliency logits ``[R, 7, 7]`` of every seed region, pooled as SAN pools them at index time."""
    import torch

    from indexer.backbone import preprocess
    from indexer.images import load_image
    from indexer.san_features import SALIENCY_LEVELS

    backbone = engine.extractor.backbone
    pooler = engine.san_encoder.pooler
    out: list[np.ndarray] = []
    for i in tqdm(range(0, len(images), batch), desc="seed saliency grids", unit="batch", disable=not progress, dynamic_ncols=True):
        group = images[i : i + batch]
        for same in _same_size(group):
            pictures = [load_image(Path(im.path)) for im in same]
            tensor, _ = preprocess(pictures, max_size=backbone.max_size)
            with torch.no_grad():
                maps = backbone(tensor.to(backbone.device), levels=sorted(SALIENCY_LEVELS))
            out.extend(pooler.grids(maps, [p.size for p in pictures], [im.boxes.astype(np.float64) for im in same]))
    return np.concatenate(out).astype(np.float32)


def _same_size(group: list[SeedImage]) -> list[list[SeedImage]]:
    """Consecutive runs of images of one size (keeps the image order, so the grids line up with the rows)."""
    runs: list[list[SeedImage]] = []
    for im in group:
        if runs and (runs[-1][0].width, runs[-1][0].height) == (im.width, im.height):
            runs[-1].append(im)
        else:
            runs.append([im])
    return runs


def _check_grids(engine: Any, arrays: dict[str, np.ndarray], grids: np.ndarray, sample: int = 256) -> None:
    """SAN's vectors recomputed from the maps and these grids must match the indexed ones."""
    n = min(sample, len(grids))
    again = engine.san_encoder.model.visual(arrays["maps"][:n], grids[:n])
    stored = arrays["san"][:n].astype(np.float32)
    error = float(np.abs(again - stored).max() / max(float(np.abs(stored).max()), 1e-6))
    if error > 0.02:
        log.warning("saliency grids of the seed reproduce its SAN vectors only to %.3f (relative); synthetic SAN vectors may be off", error)


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
