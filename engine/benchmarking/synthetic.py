"""Benchmark indexes of any size, written through the real :meth:`IndexStore.commit_images` path.

An index of ``N`` regions holds the seed's real images first (their records, boxes and arrays as the
pipeline indexed them); past the seed's size it adds *synthetic images*. A synthetic image copies the
layout of a random seed image (its size and its proposal boxes) and gets, for each box, a new RoI map:

    map = a · M[dominant] + (1 − a) · M[partner] + noise · rms · ε,    a ~ U(mix_min, 1),  ε ~ N(0, 1)

where ``M[dominant]`` is the seed region of that box, ``M[partner]`` a random seed region and ``rms`` the
seed maps' root mean square. Everything else is derived from the map as at index time (the ``pooled``
mean, the SAN vector: SAN's visual encoder over it and the same mixture of the two regions' saliency
grids), except the ``visual`` key, which reads levels the 7×7 ``c4`` map does not hold (``c4`` + ``c5``):
it is the same mixture of the two seed regions' keys, with noise of the same relative size
(``noise / sqrt(dim)`` per component of a unit vector), L2-normalised. So FAISS, SQLite, the feature store
and the rerankers see data with the statistics of real regions, through the code that serves queries.

Built indexes are cached: ``built.json`` in the index folder marks a finished build.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.benchmarking.seed import SeedData, SeedImage
from engine.errors import InvalidInputError

__all__ = ["GENERATOR_VERSION", "SyntheticConfig", "BuiltIndex", "RegionMixer", "build_index", "cached_index", "find_index", "real_images", "SYNTHETIC_ROOT"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3  # 2: the pooled array; 3: Ref-NMS features (stage 3 reads them as on a real index)
"""Bumped whenever the synthetic regions change, so that cached indexes are rebuilt."""

_MARKER = "built.json"
SYNTHETIC_ROOT = "/synthetic-benchmark/"
"""Synthetic images get (non-existent) paths under this folder."""
SanVisual = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""SAN's visual encoder: (maps ``[n, C, 7, 7]``, saliency grids ``[n, 7, 7]``) → vectors ``[n, k]``."""


@dataclass(frozen=True)
class SyntheticConfig:
    """An index of ``regions`` regions: the seed's real ones first, then synthetic images (module doc).

    ``mix_min``: lowest weight of a synthetic region's dominant seed region; ``noise``: standard deviation
    of the added noise relative to the seed maps' RMS; ``images_per_commit``: synthetic images per
    :meth:`IndexStore.commit_images` call; ``flat_threshold``: the store's Flat → IVF switch (its default);
    ``maps``: keep the 7×7 maps (False: an index as ``engine index --no-maps`` builds it).
    """

    regions: int
    mix_min: float = 0.5
    noise: float = 0.1
    images_per_commit: int = 50
    seed: int = 0
    flat_threshold: int | None = None
    maps: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.regions, bool) or not isinstance(self.regions, int) or self.regions < 1:
            raise InvalidInputError(f"--regions must be a positive number of regions, got {self.regions!r}; e.g. --regions 10000")
        if not 0.0 <= self.mix_min <= 1.0:
            raise InvalidInputError(f"mix_min must lie in [0, 1], got {self.mix_min}")
        if self.noise < 0:
            raise InvalidInputError(f"noise must be >= 0, got {self.noise}")
        if self.images_per_commit < 1:
            raise InvalidInputError(f"images_per_commit must be >= 1, got {self.images_per_commit}")

    def key(self, seed_key: str) -> str:
        """The cache folder name of this index built from seed ``seed_key``."""
        tail = f"m{self.mix_min:g}-n{self.noise:g}-s{self.seed}-t{self.flat_threshold or 'default'}-g{GENERATOR_VERSION}"
        return f"index-{self.regions}-{seed_key}-{tail}" + ("" if self.maps else "-nomaps")


@dataclass(frozen=True)
class BuiltIndex:
    """A benchmark index: where, how many regions (real and synthetic), images, build time, FAISS type."""

    path: Path
    regions: int
    real_regions: int
    synthetic_regions: int
    images: int
    build_seconds: float
    index_type: str
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


class RegionMixer:
    """Makes synthetic regions from seed regions (module doc). Seeded; no global state."""

    def __init__(self, data: SeedData, *, mix_min: float, noise: float, rng: np.random.Generator, san_visual: SanVisual | None) -> None:
        self.data = data
        self.mix_min = mix_min
        self.noise = noise
        self.rng = rng
        self.san_visual = san_visual
        maps = data.arrays["maps"]
        sample = maps[rng.choice(len(maps), size=min(len(maps), 2048), replace=False)].astype(np.float32)
        self.rms = float(np.sqrt(np.mean(sample**2)))

    def arrays(self, dominant: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of one synthetic region per seed row in ``dominant`` (``maps``, ``visual``, ``san``, …)."""
        from indexer.region_features import mean_maps

        n = len(dominant)
        partner = self.rng.integers(0, self.data.regions, size=n)
        a = self.rng.uniform(self.mix_min, 1.0, size=n).astype(np.float32)
        source = self.data.arrays["maps"]
        maps = _mix(source[dominant], source[partner], a)
        maps += (self.noise * self.rms) * self.rng.standard_normal(maps.shape, dtype=np.float32)
        out: dict[str, np.ndarray] = {"maps": maps.astype(np.float16), "visual": self._key(dominant, partner, a), "pooled": mean_maps(maps)}
        for name, array in self.data.arrays.items():
            if name in out:
                continue
            if name == "san" and self.san_visual is not None:
                grids = _mix(self.data.grids[dominant], self.data.grids[partner], a)
                out[name] = np.asarray(self.san_visual(maps, grids), np.float32)
            else:
                out[name] = _mix(array[dominant], array[partner], a)
        return out


    def _key(self, dominant: np.ndarray, partner: np.ndarray, a: np.ndarray) -> np.ndarray:
        """The synthetic regions' visual keys: the seed keys mixed as the maps, plus noise, L2-normalised."""
        keys = self.data.arrays["visual"]
        mixed = _mix(keys[dominant], keys[partner], a)
        mixed += (self.noise / np.sqrt(mixed.shape[1])) * self.rng.standard_normal(mixed.shape, dtype=np.float32)
        return (mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def build_index(data: SeedData, config: SyntheticConfig, index_dir: Path, *, san_visual: SanVisual | None, progress: bool = True) -> BuiltIndex:
    """Write a fresh index of ``config.regions`` regions into ``index_dir`` (replacing what is there)."""
    from indexer.store import IndexStore, StoreConfig

    index_dir = Path(index_dir)
    if index_dir.exists():
        shutil.rmtree(index_dir)
    start = time.perf_counter()
    store_config = StoreConfig() if config.flat_threshold is None else StoreConfig(flat_threshold=config.flat_threshold)
    rng = np.random.default_rng(config.seed)
    # the mixed regions' Ref-NMS features are mixed as their other arrays are, so that stage 3 reads stored
    # features as on a real index (an approximation of the features of the mixed maps: for timing stage 3)
    shapes = {name: shape for name, shape in data.shapes.items() if config.maps or name != "maps"}
    with IndexStore.open(index_dir, create=True, writable=True, config=store_config, array_shapes=shapes, visual_key=data.visual_key) as store:
        run_id = store.begin_run("synthetic-benchmark", data.models)
        bar = tqdm(total=config.regions, unit="region", desc=f"building {config.regions:,}-region index", disable=not progress, dynamic_ncols=True)
        real = images = 0
        for items in _real_batches(data, config.regions, set(shapes)):
            store.commit_images(run_id, items)
            added = sum(len(b.boxes) for _, b in items)
            real += added
            images += len(items)
            bar.update(added)
        mixer = RegionMixer(data, mix_min=config.mix_min, noise=config.noise, rng=rng, san_visual=san_visual)
        tag = hashlib.sha256(str(index_dir.resolve()).encode()).hexdigest()[:8]
        synthetic = 0
        for items in _synthetic_batches(data, mixer, config.regions - real, config.images_per_commit, tag, set(shapes), first=images):
            store.commit_images(run_id, items)
            added = sum(len(b.boxes) for _, b in items)
            synthetic += added
            images += len(items)
            bar.update(added)
        bar.set_description("saving the FAISS files")
        store.save_vectors(release=True)  # one FAISS index in memory at a time: at 10M regions two do not fit
        seconds = time.perf_counter() - start
        store.finish_run(run_id, status="completed", processed=images, unchanged=0, removed=0, regions_added=real + synthetic, errors=0, seconds=seconds)
        index_type = store.info().index_type
        bar.close()
    return BuiltIndex(path=index_dir, regions=real + synthetic, real_regions=real, synthetic_regions=synthetic, images=images, build_seconds=round(seconds, 2), index_type=index_type)


def find_index(config: SyntheticConfig, cache: Path, seed_key: str) -> BuiltIndex | None:
    """The finished index of ``config`` in the cache, ``None`` when it is not there."""
    index_dir = Path(cache) / config.key(seed_key)
    marker = index_dir / _MARKER
    if not marker.is_file():
        return None
    saved = json.loads(marker.read_text(encoding="utf-8"))
    saved.update(path=index_dir, reused=True)
    return BuiltIndex(**saved)


def cached_index(data: SeedData, config: SyntheticConfig, cache: Path, seed_key: str, *, san_visual: SanVisual | None, progress: bool = True) -> BuiltIndex:
    """The index of ``config`` from the cache, built first when it is not there (or not finished)."""
    found = find_index(config, cache, seed_key)
    if found is not None:
        return found
    index_dir = Path(cache) / config.key(seed_key)
    built = build_index(data, config, index_dir, san_visual=san_visual, progress=progress)
    (index_dir / _MARKER).write_text(json.dumps(built.to_dict(), indent=2) + "\n", encoding="utf-8")
    return built


def real_images(index_dir: Path) -> set[str]:
    """Paths of the real (seed) images of a benchmark index."""
    from indexer.store import IndexStore

    with IndexStore.open(index_dir) as store:
        return {path for path in store.known_images("/") if not path.startswith(SYNTHETIC_ROOT)}


# ----------------------------------------------------------------------------------------------------- helpers


def _mix(x: np.ndarray, y: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``a · x + (1 − a) · y`` row-wise, float32."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    w = a.reshape(shape)
    return w * x.astype(np.float32) + (1.0 - w) * y.astype(np.float32)


def _real_batches(data: SeedData, limit: int, names: set[str], per_commit: int = 64) -> Iterator[list[tuple[Any, Any]]]:
    """The seed's own images (their first regions when ``limit`` cuts one), ``per_commit`` per batch, with
    the arrays ``names``."""
    batch: list[tuple[Any, Any]] = []
    left = limit
    for image in data.images:
        if left <= 0:
            break
        take = min(image.count, left)
        rows = np.arange(image.start, image.start + take)
        batch.append((_record(image), _regions(image, take, {name: array[rows] for name, array in data.arrays.items() if name in names})))
        left -= take
        if len(batch) == per_commit:
            yield batch
            batch = []
    if batch:
        yield batch


def _synthetic_batches(data: SeedData, mixer: RegionMixer, count: int, per_commit: int, tag: str, names: set[str], *, first: int) -> Iterator[list[tuple[Any, Any]]]:
    """Synthetic images until ``count`` regions are made, ``per_commit`` images per batch, with the arrays ``names``."""
    left = count
    number = first
    while left > 0:
        layouts: list[tuple[SeedImage, int]] = []
        while left > 0 and len(layouts) < per_commit:
            image = data.images[int(mixer.rng.integers(0, len(data.images)))]
            take = min(image.count, left)
            layouts.append((image, take))
            left -= take
        dominant = np.concatenate([np.arange(im.start, im.start + take) for im, take in layouts])
        arrays = mixer.arrays(dominant)
        items = []
        at = 0
        for image, take in layouts:
            path = f"{SYNTHETIC_ROOT}{tag}/{number:08d}.jpg"
            record = _record(image, path=path, digest=hashlib.sha256(path.encode()).hexdigest())
            items.append((record, _regions(image, take, {name: array[at : at + take] for name, array in arrays.items() if name in names})))
            at += take
            number += 1
        yield items


def _record(image: SeedImage, *, path: str | None = None, digest: str | None = None) -> Any:
    """The seed image's record, or (with ``path``) a synthetic image's with the seed image's size and image
    vector (stage 3 reads it instead of decoding the image)."""
    from dataclasses import fields

    from indexer.store import ImageRecord

    extra = {"vector": image.vector} if image.vector is not None and "vector" in {f.name for f in fields(ImageRecord)} else {}
    return ImageRecord(
        path=path or image.path,
        content_hash=digest or image.content_hash,
        size_bytes=image.size_bytes if path is None else 0,
        mtime_ns=image.mtime_ns if path is None else 0,
        width=image.width,
        height=image.height,
        **extra,
    )


def _regions(image: SeedImage, take: int, arrays: dict[str, np.ndarray]) -> Any:
    from indexer.store import RegionBatch

    return RegionBatch(boxes=image.boxes[:take], objectness=image.objectness[:take], source=image.source, arrays=arrays)
