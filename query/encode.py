"""Turning a query (image, optional region) into the visual vector that stage 1 searches with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.boxes import Box, validate_box
from indexer.images import load_image
from indexer.region_features import RegionFeatureExtractor
from indexer.scan import content_hash

__all__ = ["QueryRegion", "load_query_region", "VisualQueryEncoder"]


@dataclass(frozen=True)
class QueryRegion:
    """A loaded query: the image, its content hash, and the region box (the whole image when none was given)."""

    path: Path
    image: Image.Image
    content_hash: str
    box: Box


def load_query_region(path: Path | str, region: Box | list[float] | None) -> QueryRegion:
    """Load the query image and check the region against its size (``None`` means the whole image)."""
    path = Path(path)
    image = load_image(path)
    w, h = image.size
    box = (0.0, 0.0, float(w), float(h)) if region is None else validate_box(region, w, h, what="--region")
    return QueryRegion(path=path, image=image, content_hash=content_hash(path), box=box)


class VisualQueryEncoder:
    """Encodes query regions exactly as the indexer encodes indexed regions (same extractor, image alone)."""

    def __init__(self, extractor: RegionFeatureExtractor) -> None:
        self.extractor = extractor

    def encode(self, query: QueryRegion) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(map [C, 7, 7] float16, vector [C] float32, L2-normalised)``."""
        [(maps, vectors)] = self.extractor([query.image], [np.asarray([query.box], np.float32)])
        return maps[0], vectors[0]
