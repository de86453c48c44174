"""Each region's ImageNet-1k class evidence, from the backbone pass already made (the open vocabulary's visual side).

The backbone's own classifier head reads a region: its head features (EfficientNet-Lite0: the 1×1
``conv_head`` + BatchNorm + ReLU6 over the ``c5`` map, computed once per image) are RoIAlign-averaged
over the box (2×2 bins, the mean of the bins — the classifier's global average pool restricted to the
region), and the classifier gives the region's class probabilities. The index stores the top
:data:`TOP_CLASSES` classes and their probabilities per region (array ``concepts``, float16 ``[2, T]``:
row 0 the class indices — exact in float16 below 2048 — row 1 the probabilities), what ConSE needs
(Norouzi et al., ICLR 2014, Eq. 1: the top T classes of the classifier and their probabilities).
Cost: one 1×1 convolution over the ``c5`` map per image and a 1280 × 1000 product per region.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from indexer.backbone import Backbone
from indexer.component_configs import RegionFeatureConfig
from indexer.region_features import RegionFeatureExtractor

__all__ = ["TOP_CLASSES", "CONCEPT_LEVEL", "ConceptEvidence", "CONCEPT_SHAPE"]

TOP_CLASSES = 10  # ConSE's T (the paper's best setting on ImageNet 2011 21K)
CONCEPT_LEVEL = "c5"
CONCEPT_SHAPE = (2, TOP_CLASSES)
_BINS = 2


class ConceptEvidence:
    """Top-:data:`TOP_CLASSES` ImageNet classes of regions, from a batch's backbone ``c5`` map.

    Args:
        backbone: the indexing backbone (its classifier head is used as trained).
        top: classes kept per region.
    """

    def __init__(self, *, backbone: Backbone, top: int = TOP_CLASSES) -> None:
        self.backbone = backbone
        self.top = top
        self.pooler = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(level=CONCEPT_LEVEL, output_size=_BINS, key_whitening=None))

    @property
    def version(self) -> str:
        """What an index records as its concept evidence: the backbone's classifier, the pooling, T."""
        return f"{self.backbone.version}+head:{CONCEPT_LEVEL}:roi{_BINS}:top{self.top}"

    @property
    def shape(self) -> tuple[int, int]:
        return (2, self.top)

    @torch.no_grad()
    def probabilities(self, maps: Mapping[str, Tensor], sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray]) -> Tensor:
        """Class probabilities ``[K, 1000]`` of all boxes of the batch (in order), from the backbone ``maps``."""
        head = self.backbone.head_map(maps[CONCEPT_LEVEL])
        pooled = self.pooler.pool(head, sizes, [np.asarray(b, np.float64).reshape(-1, 4) for b in boxes], level=CONCEPT_LEVEL).mean(dim=(2, 3))
        return torch.softmax(self.backbone.head_logits(pooled.to(head.dtype)).float(), dim=1)

    def evidence(self, maps: Mapping[str, Tensor], sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image, float16 ``[n_i, 2, T]``: each box's top classes (row 0) and their probabilities (row 1)."""
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            return [np.zeros((0, 2, self.top), np.float16) for _ in counts]
        probs, classes = self.probabilities(maps, sizes, boxes).topk(self.top, dim=1)
        rows = torch.stack([classes.float(), probs], dim=1).numpy().astype(np.float16)
        out, start = [], 0
        for n in counts:
            out.append(rows[start : start + n])
            start += n
        return out
