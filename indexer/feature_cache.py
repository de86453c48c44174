"""Frozen-backbone feature maps of images: computed in memory for one image, or once per dataset and cached on disk.

Heads (RPN, GRN, …) train and are evaluated on these maps, so that training on 2 CPU cores never
reruns the backbone; grounding one image (``engine ground``) computes its maps in memory
(:class:`ImageMaps`) and writes nothing. The disk cache lives in ``DATA/.engine-cache/<backbone version>-max<size>/`` (or a given folder), one
``.npz`` per image holding each level's map (float16, the padded map exactly as indexing computes it,
so region features from the cache equal the indexed ones) and the image's original size.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from engine.datasets.types import ImageAnn
from indexer.backbone import preprocess
from indexer.images import load_image
from indexer.region_features import RegionFeatureExtractor

__all__ = ["CachedImage", "FeatureCache", "ImageMaps", "compute_maps", "pool_region_maps", "cached_keys"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedImage:
    """One image's backbone maps: ``maps[level]`` float16 ``[C, H, W]`` (padded frame), original ``size`` (w, h)."""

    image: str
    size: tuple[int, int]
    maps: dict[str, np.ndarray]


@torch.no_grad()
def compute_maps(extractor: RegionFeatureExtractor, pil: Image.Image, image: str, levels: Sequence[str]) -> CachedImage:
    """The backbone maps of ``pil`` at ``levels`` (float16, padded frame, exactly as indexing computes them)."""
    backbone = extractor.backbone
    batch, _ = preprocess([pil], max_size=backbone.max_size)
    out = backbone(batch.to(backbone.device), levels=list(levels))
    maps = {lvl: out[lvl][0].float().cpu().numpy().astype(np.float16) for lvl in levels}
    return CachedImage(image=image, size=pil.size, maps=maps)


def cached_keys(extractor: RegionFeatureExtractor, cached: CachedImage, boxes: np.ndarray) -> np.ndarray:
    """The visual keys float32 ``[n, dim]`` of ``boxes`` (xyxy original pixels) from ``cached``'s maps: the same
    key (levels, pooling, whitening) as indexing stores for them."""
    maps = {lvl: torch.from_numpy(cached.maps[lvl].astype(np.float32))[None] for lvl in extractor.config.key_levels}
    return extractor.key(maps, [cached.size], [np.asarray(boxes, np.float64).reshape(-1, 4)])


def pool_region_maps(extractor: RegionFeatureExtractor, cached: CachedImage, boxes: np.ndarray) -> np.ndarray:
    """RoIAlign maps float32 ``[n, C, S, S]`` of ``boxes`` (xyxy original pixels) from ``cached``'s map at the extractor's level.

    Identical to what :class:`RegionFeatureExtractor` computes at index time for the same image and boxes.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        c, s, _ = extractor.map_shape
        return np.zeros((0, c, s, s), np.float32)
    fmap = torch.from_numpy(cached.maps[extractor.config.level].astype(np.float32))[None]
    return extractor.pool(fmap, [cached.size], [boxes]).numpy()


class ImageMaps:
    """The backbone maps of one decoded image, held in memory: the same ``get`` / ``region_maps`` as
    :class:`FeatureCache`, for code that serves a single image (nothing is written to disk).

    Args:
        pil: the decoded image.
        image: the name it is known by (``get(image)`` answers only that name).
        extractor: the region feature extractor whose backbone (and pooling) computes the maps.
        levels: backbone levels to keep.
    """

    def __init__(self, pil: Image.Image, image: str, extractor: RegionFeatureExtractor, *, levels: Sequence[str] = ("c3", "c4", "c5")) -> None:
        self.image = image
        self.extractor = extractor
        self.levels = tuple(levels)
        self._cached = compute_maps(extractor, pil, image, self.levels)

    def get(self, image: str) -> CachedImage:
        """The maps of ``image``; a ``KeyError`` for any other name."""
        if image != self.image:
            raise KeyError(f"{image!r} is not the image these maps were computed for ({self.image!r})")
        return self._cached

    def region_maps(self, image: str, boxes: np.ndarray) -> np.ndarray:
        """RoIAlign maps float32 ``[n, C, S, S]`` of ``boxes`` (xyxy original pixels)."""
        return pool_region_maps(self.extractor, self.get(image), boxes)


def _entry_name(image: str) -> str:
    """The cache file name of an image path relative to its dataset root."""
    return hashlib.sha1(image.encode()).hexdigest()[:20] + ".npz"


class FeatureCache:
    """Backbone maps of the images under ``root``, cached on disk.

    Args:
        root: dataset root (image paths of the annotations are relative to it).
        extractor: the region feature extractor whose backbone (and pooling) the cache serves.
        levels: backbone levels to keep.
        cache_dir: where to keep the ``.npz`` files; default ``root/.engine-cache/<backbone>-max<size>``.
    """

    def __init__(self, root: Path, extractor: RegionFeatureExtractor, *, levels: Sequence[str] = ("c3", "c4", "c5"), cache_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.extractor = extractor
        self.levels = tuple(levels)
        backbone = extractor.backbone
        self.tag = f"{backbone.version}-max{backbone.max_size}".replace("/", "_").replace("@", "_")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / ".engine-cache" / self.tag

    def build(self, images: Sequence[ImageAnn], *, progress: bool = True) -> None:
        """Compute and store the maps of every image not cached yet (progress bar with counts and rate);
        entries that a linked dataset folder's own cache holds are linked, not computed (:meth:`_borrow`)."""
        missing = [im for im in images if not self._path(im.image).is_file() and not self._borrow(im.image)]
        if not missing:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for ann in tqdm(missing, desc="backbone features", unit="img", disable=not progress, dynamic_ncols=True):
            self._compute(ann.image)

    def get(self, image: str) -> CachedImage:
        """The cached maps of ``image`` (relative path), computing them first when needed.

        An entry written for other levels (another head's cache over the same folder) is recomputed
        with the union of its levels and ours, so that neither head recomputes it again.
        """
        path = self._path(image)
        stored: tuple[str, ...] = ()
        if path.is_file() or self._borrow(image):
            with np.load(path) as data:
                stored = tuple(k for k in data.files if k != "size")
                if all(lvl in stored for lvl in self.levels):
                    maps = {lvl: data[lvl] for lvl in self.levels}
                    size = (int(data["size"][0]), int(data["size"][1]))
                    return CachedImage(image=image, size=size, maps=maps)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cached = self._compute(image, extra=stored)
        return CachedImage(image=image, size=cached.size, maps={lvl: cached.maps[lvl] for lvl in self.levels})

    def region_maps(self, image: str, boxes: np.ndarray) -> np.ndarray:
        """RoIAlign maps float32 ``[n, C, S, S]`` of ``boxes`` (xyxy original pixels) from the cached level map.

        Identical to what :class:`RegionFeatureExtractor` computes at index time for the same image and boxes.
        """
        return pool_region_maps(self.extractor, self.get(image), boxes)

    def _compute(self, image: str, extra: Sequence[str] = ()) -> CachedImage:
        levels = tuple(dict.fromkeys((*self.levels, *extra)))
        cached = compute_maps(self.extractor, load_image(self.root / image), image, levels)
        self._write(self._path(image), cached)
        return cached

    def _path(self, image: str) -> Path:
        return self.cache_dir / _entry_name(image)

    def _borrow(self, image: str) -> bool:
        """Link ``image``'s entry from the cache of the dataset folder its first path part names, when that
        cache holds it (same backbone): a union of datasets (``engine train --data A --data B``) names A's
        ``images/1.jpg`` ``A/images/1.jpg`` under a link to A, whose own cache was built before."""
        head, sep, rest = image.partition("/")
        if not sep or not rest:
            return False
        source = self.root / head / ".engine-cache" / self.tag / _entry_name(rest)
        if not source.is_file():
            return False
        target = self._path(image)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except FileExistsError:
            pass
        except OSError:  # another file system: a copy, written whole before it is named
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npz.tmp")
            os.close(fd)
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        return True

    @staticmethod
    def _write(path: Path, cached: CachedImage) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, size=np.asarray(cached.size), **cached.maps)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
