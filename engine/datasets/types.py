"""In-memory annotation types shared by the synthetic generator and every dataset reader.

All boxes are pixel ``(x1, y1, x2, y2)``. Ids are unique within a dataset (corpus-unique for
synthetic corpora). Readers of public formats fill what their format has and leave the rest empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.boxes import Box

__all__ = [
    "ObjectAnn",
    "RegionAnn",
    "RefAnn",
    "ImageAnn",
    "RetrievalQuery",
    "Dataset",
]


@dataclass(frozen=True)
class ObjectAnn:
    """One object. ``attributes`` maps attribute name (``shape``, ``color``, ``size``, ``pattern``, …) to value.

    ``mask`` is COCO-style uncompressed RLE ``{"size": [h, w], "counts": [...]}`` or ``None``.
    """

    id: int
    box: Box
    category: str
    attributes: dict[str, str] = field(default_factory=dict)
    mask: dict[str, Any] | None = None


@dataclass(frozen=True)
class RegionAnn:
    """A region with a description (Visual Genome style); ``objects`` are the ids it shows and names."""

    id: int
    box: Box
    description: str
    objects: tuple[int, ...] = ()
    relation: str | None = None
    meaning: dict[str, Any] | None = None


@dataclass(frozen=True)
class RefAnn:
    """A referring expression (RefCOCO style) for one target object, with the context objects it mentions."""

    id: int
    expression: str
    object: int
    context_objects: tuple[int, ...] = ()
    split: str | None = None


@dataclass(frozen=True)
class ImageAnn:
    """One image and its annotations. ``image`` is the path relative to the dataset root."""

    image: str
    width: int
    height: int
    objects: tuple[ObjectAnn, ...] = ()
    regions: tuple[RegionAnn, ...] = ()
    refs: tuple[RefAnn, ...] = ()
    captions: tuple[str, ...] = ()
    split: str | None = None
    saliency: dict[str, Any] | None = None
    image_id: int | None = None


@dataclass(frozen=True)
class RetrievalQuery:
    """An expressional-region retrieval query: an image region with its text, and its positive region ids."""

    image: str
    region: Box
    text: str
    region_id: int
    positives: tuple[int, ...]
    split: str | None = None


@dataclass
class Dataset:
    """A dataset: a root directory (image paths are relative to it), images and retrieval queries."""

    root: Path
    images: list[ImageAnn]
    queries: list[RetrievalQuery] = field(default_factory=list)
    name: str = ""

    def split(self, name: str) -> "Dataset":
        """The images and queries whose ``split`` is ``name``."""
        images = [im for im in self.images if im.split == name]
        queries = [q for q in self.queries if q.split == name]
        return Dataset(root=self.root, images=images, queries=queries, name=f"{self.name}:{name}")
