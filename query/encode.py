"""Turning a query (image, optional region) into the visual vector that stage 1 searches with, and the
other backbone passes a query makes over image files (an image's mean feature, indexed regions' maps)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from engine.boxes import Box, validate_box
from engine.errors import EngineError, ImageReadError
from indexer.images import load_image
from indexer.region_features import RegionFeatureExtractor, image_vectors
from indexer.scan import content_hash
from indexer.arrays import VECTOR_ARRAY
from indexer.concept_evidence import CONCEPT_LEVEL
from indexer.san_features import SALIENCY_LEVELS

if TYPE_CHECKING:
    from indexer.concept_evidence import ConceptEvidence
    from indexer.san_features import SanRegionEncoder
    from indexer.store import RegionRow

__all__ = ["QueryRegion", "EncodedQuery", "load_query_region", "VisualQueryEncoder"]


@dataclass(frozen=True)
class QueryRegion:
    """A loaded query: the image, its content hash, and the region box (the whole image when none was given)."""

    path: Path
    image: Image.Image
    content_hash: str
    box: Box


@dataclass(frozen=True)
class EncodedQuery:
    """A request after encoding: stage 1's query ``vector``, searched in the FAISS file of feature array
    ``array`` (its score named ``stage1`` in the hits); the query region's 7×7 ``query_map`` and its
    image's ``content_hash`` for a visual query (``None`` for a text-only one)."""

    vector: np.ndarray
    array: str = VECTOR_ARRAY
    stage1: str = "visual"
    query_map: np.ndarray | None = None
    content_hash: str | None = None
    concepts: np.ndarray | None = None  # the query region's class evidence [2, T] (indexer/concept_evidence.py)
    san_vector: np.ndarray | None = None  # the query region's SAN visual vector (indexer/san_features.py)

    @property
    def visual(self) -> bool:
        return self.array == VECTOR_ARRAY

    @classmethod
    def of_region(cls, query: QueryRegion, query_map: np.ndarray, vector: np.ndarray) -> EncodedQuery:
        """A query region encoded by the backbone (its map and L2-normalised vector)."""
        return cls(vector=vector, query_map=query_map, content_hash=query.content_hash)


def load_query_region(path: Path | str, region: Box | list[float] | None) -> QueryRegion:
    """Load the query image and check the region against its size (``None`` means the whole image)."""
    image = load_image(path)
    path = Path(path)
    w, h = image.size
    box = (0.0, 0.0, float(w), float(h)) if region is None else validate_box(region, w, h, what="--region")
    try:
        digest = content_hash(path)
    except OSError as exc:  # removed or replaced since it was decoded
        raise ImageReadError(f"cannot read image {str(path)!r}: {exc.strerror or exc}; check the path") from None
    return QueryRegion(path=path, image=image, content_hash=digest, box=box)


class VisualQueryEncoder:
    """Encodes query regions exactly as the indexer encodes indexed regions (same extractor, image alone)."""

    def __init__(self, extractor: RegionFeatureExtractor, concepts: ConceptEvidence | None = None, san: SanRegionEncoder | None = None) -> None:
        self.extractor = extractor
        self.concepts = concepts
        self.san = san

    def encode(self, query: QueryRegion) -> EncodedQuery:
        """The region's map ``[C, 7, 7]`` float16 and vector ``[C]`` float32 (L2-normalised), and, from the same
        backbone pass, its class evidence when the encoder has a ``concepts`` model and its SAN vector when
        it has a ``san`` encoder."""
        [encoded] = self.encode_batch([query.image], [[query]])
        return encoded

    def encode_batch(self, images: Sequence[Image.Image], queries: Sequence[Sequence[QueryRegion]]) -> list[EncodedQuery]:
        """:meth:`encode` of the regions ``queries[i]`` of each image ``images[i]`` (one backbone pass), flattened."""
        # float64: a thin region (x2 - x1 below float32 resolution) must not collapse to an empty box
        boxes = [np.asarray([q.box for q in qs], np.float64) for qs in queries]
        sizes = [im.size for im in images]
        extra = (*((CONCEPT_LEVEL,) if self.concepts is not None else ()), *(SALIENCY_LEVELS if self.san is not None else ()))
        with torch.no_grad():
            fmaps = self.extractor.feature_maps(images, extra_levels=extra)
        features = self.extractor.from_feature_map(fmaps, sizes, boxes)
        evidence = self.concepts.evidence(fmaps, sizes, boxes) if self.concepts is not None else [None] * len(images)
        san = self.san.encode(fmaps, sizes, boxes, [m for m, _ in features]) if self.san is not None else [None] * len(images)
        out = []
        for qs, (maps, vectors), ev, sv in zip(queries, features, evidence, san):
            for j, q in enumerate(qs):
                extras = {"concepts": None if ev is None else ev[j], "san_vector": None if sv is None else np.asarray(sv[j], np.float32)}
                out.append(replace(EncodedQuery.of_region(q, maps[j], vectors[j]), **extras))
        return out

    def image_vector(self, path: Path | str) -> np.ndarray:
        """The mean backbone feature ``e_0`` ``[C]`` of an image file (stage 3, for images indexed before
        indexing stored it)."""
        with torch.no_grad():
            fmap = self.extractor.feature_map([load_image(Path(path))])
        return image_vectors(fmap)[0]

    def region_maps(self, path: Path | str, rows: Sequence[RegionRow]) -> np.ndarray | None:
        """The 7×7 maps float16 ``[n, C, 7, 7]`` of indexed regions ``rows`` (``RegionRow``) of the image at
        ``path``, computed again from the file exactly as indexing computed them (an index built without
        maps); ``None`` when the file is gone or no longer the one indexed (another content hash)."""
        try:
            if content_hash(Path(path)) != rows[0].content_hash:
                return None
            image = load_image(Path(path))
        except (OSError, EngineError):
            return None
        [(maps, _)] = self.extractor([image], [np.asarray([r.box for r in rows], np.float64)])  # no_grad inside
        return maps
