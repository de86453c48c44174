"""Frozen-backbone feature maps of a dataset's images, computed once and cached on disk.

Heads (RPN, GRN, …) train on these maps, so that training on 2 CPU cores never reruns the backbone.
The cache lives in ``DATA/.engine-cache/<backbone version>-max<size>/`` (or a given folder), one
``.npz`` per image holding each level's map (float16, the padded map exactly as indexing computes it,
so region features from the cache equal the indexed ones) and the image's original size.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.datasets.types import ImageAnn
from indexer.backbone import preprocess
from indexer.images import load_image
from indexer.region_features import RegionFeatureExtractor

__all__ = ["CachedImage", "FeatureCache"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedImage:
    """One image's backbone maps: ``maps[level]`` float16 ``[C, H, W]`` (padded frame), original ``size`` (w, h)."""

    image: str
    size: tuple[int, int]
    maps: dict[str, np.ndarray]


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
        tag = f"{backbone.version}-max{backbone.max_size}".replace("/", "_").replace("@", "_")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / ".engine-cache" / tag

    def build(self, images: Sequence[ImageAnn], *, progress: bool = True) -> None:
        """Compute and store the maps of every image not cached yet (progress bar with counts and rate)."""
        missing = [im for im in images if not self._path(im.image).is_file()]
        if not missing:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for ann in tqdm(missing, desc="backbone features", unit="img", disable=not progress, dynamic_ncols=True):
            self._compute(ann.image)

    def get(self, image: str) -> CachedImage:
        """The cached maps of ``image`` (relative path), computing them first when needed."""
        path = self._path(image)
        if not path.is_file():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            return self._compute(image)
        with np.load(path) as data:
            maps = {lvl: data[lvl] for lvl in self.levels}
            size = (int(data["size"][0]), int(data["size"][1]))
        return CachedImage(image=image, size=size, maps=maps)

    def region_maps(self, image: str, boxes: np.ndarray) -> np.ndarray:
        """RoIAlign maps float32 ``[n, C, S, S]`` of ``boxes`` (xyxy original pixels) from the cached level map.

        Identical to what :class:`RegionFeatureExtractor` computes at index time for the same image and boxes.
        """
        cached = self.get(image)
        level = self.extractor.config.level
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            c, s, _ = self.extractor.map_shape
            return np.zeros((0, c, s, s), np.float32)
        fmap = torch.from_numpy(cached.maps[level].astype(np.float32))[None]
        return self.extractor.pool(fmap, [cached.size], [boxes]).numpy()

    @torch.no_grad()
    def _compute(self, image: str) -> CachedImage:
        pil = load_image(self.root / image)
        backbone = self.extractor.backbone
        batch, _ = preprocess([pil], max_size=backbone.max_size)
        out = backbone(batch.to(backbone.device), levels=list(self.levels))
        maps = {lvl: out[lvl][0].float().cpu().numpy().astype(np.float16) for lvl in self.levels}
        cached = CachedImage(image=image, size=pil.size, maps=maps)
        self._write(self._path(image), cached)
        return cached

    def _path(self, image: str) -> Path:
        return self.cache_dir / (hashlib.sha1(image.encode()).hexdigest()[:20] + ".npz")

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
