"""The compute half of indexing: a batch of image files in, each image's record and region arrays out.

:class:`BatchExtraction` reads the files, proposes regions, runs the backbone once per same-size group
and pools every array the index stores (visual key, maps, pooled means, SAN, Ref-NMS features, class
evidence, instance-head embeddings). It touches no index: :class:`indexer.pipeline.IndexingPipeline` commits what it returns, in
the process that holds the writer lock, while the extraction may run there or in Ray workers
(``engine/distributed/ray_indexing.py``) — the same code either way, so both give the same rows.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from engine.errors import ImageReadError
from engine.models.instance_head import InstanceHead
from engine.models.ref_nms import RefNMSModel
from indexer.concept_evidence import CONCEPT_LEVEL, ConceptEvidence
from indexer.images import load_image
from indexer.proposal_sources import ProposalProvider
from indexer.region_features import RegionFeatureExtractor, image_vectors, mean_maps
from indexer.san_features import SanRegionEncoder
from indexer.scan import FileEntry, content_hash
from indexer.store import CONCEPT_ARRAY, INSTANCE_ARRAY, MAPS_ARRAY, POOLED_ARRAY, REFNMS_ARRAY, SAN_ARRAY, ImageRecord, RegionBatch

__all__ = ["BatchExtraction", "ExtractedBatch", "Failure"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """An image file that could not be read: its record (``None`` when not even its bytes could be hashed),
    path and the one-line reason the index records."""

    record: ImageRecord | None
    path: str
    reason: str


@dataclass
class ExtractedBatch:
    """What one batch of files gave: each readable image's record (with its image vector) and regions, in
    path order, and the files that failed."""

    items: list[tuple[ImageRecord, RegionBatch]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def regions(self) -> int:
        return sum(len(b.boxes) for _, b in self.items)


@dataclass
class _Loaded:
    entry: FileEntry
    record: ImageRecord
    image: Image.Image
    boxes: np.ndarray
    objectness: np.ndarray


@dataclass
class BatchExtraction:
    """Everything a batch of images needs computed before its commit.

    ``maps`` / ``pooled``: whether the index stores the 7×7 maps / their means; ``san``, ``ref_nms``,
    ``concepts`` and ``instance`` compute the arrays of those names when given (``None``: the index has no
    such array).
    """

    extractor: RegionFeatureExtractor
    proposals: ProposalProvider
    maps: bool = True
    pooled: bool = True
    san: SanRegionEncoder | None = None
    ref_nms: RefNMSModel | None = None  # computes the stored Ref-NMS visual features (array ``refnms``)
    concepts: ConceptEvidence | None = None  # each region's ImageNet class evidence (array ``concepts``)
    instance: InstanceHead | None = None  # each region's instance embedding (array ``instance``)

    def versions(self) -> dict[str, str]:
        """The version of every model this extraction runs (a Ray worker's must equal the driver's)."""
        parts = {"backbone": self.extractor.backbone.version, "region_features": self.extractor.version, "proposals": getattr(self.proposals, "version", self.proposals.source)}
        parts.update({name: m.version for name, m in (("san", self.san), ("ref_nms", self.ref_nms), ("concepts", self.concepts), ("instance_head", self.instance)) if m is not None})
        return parts

    def __call__(self, batch: list[FileEntry]) -> ExtractedBatch:
        out = ExtractedBatch()
        loaded: list[_Loaded] = []
        for entry in batch:
            try:
                loaded.append(self._load(entry))
            except ImageReadError as exc:
                log.warning("skipping %s", exc)
                out.failures.append(Failure(record=_record_or_none(entry), path=str(entry.path), reason=str(exc)))
        for group in _same_size_groups(loaded):
            for it, (maps, vectors, san, image_vector, concepts) in zip(group, self._features(group)):
                arrays = {"visual": vectors}
                if concepts is not None:
                    arrays[CONCEPT_ARRAY] = concepts
                if self.maps:
                    arrays[MAPS_ARRAY] = maps
                if self.pooled:
                    arrays[POOLED_ARRAY] = mean_maps(maps)
                if self.ref_nms is not None:
                    arrays[REFNMS_ARRAY] = self.ref_nms.visual_features(maps)
                if san is not None:
                    arrays[SAN_ARRAY] = san
                if self.instance is not None:  # from the float16 values the index stores: what a query would compute
                    arrays[INSTANCE_ARRAY] = self.instance.embed(maps.astype(np.float16), vectors.astype(np.float16))
                out.items.append((replace(it.record, vector=image_vector), RegionBatch(boxes=it.boxes, objectness=it.objectness, source=self.proposals.source, arrays=arrays)))
        out.items.sort(key=lambda pair: pair[0].path)
        return out

    def _features(self, group: list[_Loaded]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]]:
        """Region maps, vectors (the visual key), SAN vectors (``None`` without SAN), the image vector
        (mean backbone feature of the maps' level ``c4``, CM-Att's ``e_0``) and the class evidence (``None``
        without the ``concepts`` array) of one same-size group. A batch
        proposal network (the RPN) runs the backbone once (``c3``..``c5``) and proposes from its maps;
        everything else, the key's levels included, is pooled from the same maps."""
        images = [it.image for it in group]
        propose_batch = getattr(self.proposals, "propose_batch", None)
        if propose_batch is not None:
            maps, proposals = propose_batch(images)
            for it, (boxes, objectness) in zip(group, proposals):
                it.boxes, it.objectness = np.asarray(boxes, np.float32), np.asarray(objectness, np.float32)
            missing = {*self.extractor.levels, *((CONCEPT_LEVEL,) if self.concepts is not None else ())} - set(maps)
            if missing:  # a proposal network on fewer levels than the key reads (not the shipped RPN)
                maps = {**maps, **self._backbone_maps(images, levels=missing)}
        else:
            maps = self._backbone_maps(images)
        sizes = [im.size for im in images]
        boxes = [it.boxes for it in group]
        level = self.extractor.config.level
        vectors = image_vectors(maps[level])
        features = self.extractor.from_feature_map(maps, sizes, boxes)
        san = self.san.encode(maps, sizes, boxes, [m for m, _ in features]) if self.san is not None else [None] * len(features)
        concepts = self.concepts.evidence(maps, sizes, boxes) if self.concepts is not None else [None] * len(features)
        return [(m, v, s, e, c) for (m, v), s, e, c in zip(features, san, vectors, concepts)]

    def _backbone_maps(self, images: list[Image.Image], levels: set[str] | None = None) -> dict:
        """The backbone levels the region features and key (and SAN's saliency network, when indexing SAN)
        need, in one pass (``levels``: only those)."""
        import torch

        from indexer.backbone import preprocess
        from indexer.san_features import SALIENCY_LEVELS

        backbone = self.extractor.backbone
        batch, _ = preprocess(images, max_size=backbone.max_size)
        if levels is None:
            levels = {*self.extractor.levels, *(SALIENCY_LEVELS if self.san is not None else ()), *((CONCEPT_LEVEL,) if self.concepts is not None else ())}
        with torch.no_grad():
            return backbone(batch.to(backbone.device), levels=sorted(levels))

    def _load(self, entry: FileEntry) -> _Loaded:
        try:
            digest = content_hash(entry.path)
        except OSError as exc:
            raise ImageReadError(f"cannot read image {entry.path}: {exc.strerror or exc}") from None
        image = load_image(entry.path)
        w, h = image.size
        record = ImageRecord(path=str(entry.path), content_hash=digest, size_bytes=entry.size_bytes, mtime_ns=entry.mtime_ns, width=w, height=h)
        if hasattr(self.proposals, "propose_batch"):  # proposed per batch, from the backbone's maps
            boxes, objectness = np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        else:
            boxes, objectness = self.proposals(entry.path, image)
        return _Loaded(entry=entry, record=record, image=image, boxes=np.asarray(boxes, np.float32), objectness=np.asarray(objectness, np.float32))


def _record_or_none(entry: FileEntry) -> ImageRecord | None:
    """A record for an unreadable file, so that an unchanged broken file is not retried on every run."""
    try:
        digest = content_hash(entry.path)
    except OSError:
        return None
    return ImageRecord(path=str(entry.path), content_hash=digest, size_bytes=entry.size_bytes, mtime_ns=entry.mtime_ns, width=0, height=0)


def _same_size_groups(items: list[_Loaded]) -> Iterator[list[_Loaded]]:
    """Batch only images of the same size: padding to a common size would change features near the borders,
    and a query image (processed alone) must get the same features as at index time."""
    groups: dict[tuple[int, int], list[_Loaded]] = defaultdict(list)
    for it in items:
        groups[it.image.size].append(it)
    yield from groups.values()
