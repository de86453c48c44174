"""Saliency grids of regions: the saliency network's ``S1`` map, pooled over each box (SAN §3.2.2).

SVA weights a region's ``7×7`` RoIAlign cells by its saliency, so each region needs the saliency map
pooled over the same box onto the same ``7×7`` grid. The map lives on the ``c3`` grid (stride 8),
so the pooling is :meth:`RegionFeatureExtractor.pool` with the ``c3`` level's stride and cell offsets
(average pooling within each bin, as the paper's ``S1 → S2`` down-sampling).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from indexer.backbone import Backbone
from indexer.region_features import RegionFeatureConfig, RegionFeatureExtractor

__all__ = ["SALIENCY_LEVELS", "SaliencyPooler"]

SALIENCY_LEVELS = ("c3", "c4", "c5")


class SaliencyPooler:
    """Runs a :class:`~engine.models.saliency.SaliencyNet` on backbone maps and pools its logits per box.

    Args:
        backbone: the backbone whose ``c3`` / ``c4`` / ``c5`` maps feed the network.
        network: the saliency network (eval mode).
        output_size: side of the pooled grid (the region maps' side, 7).
    """

    def __init__(self, *, backbone: Backbone, network: torch.nn.Module, output_size: int = 7) -> None:
        self.network = network
        self.pooler = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(level="c3", output_size=output_size, key_whitening=None))

    @torch.no_grad()
    def saliency_maps(self, maps: Mapping[str, Tensor]) -> Tensor:
        """``S1`` logits ``[B, 1, H3, W3]`` of a batch of backbone maps."""
        _, s1 = self.network({lvl: maps[lvl] for lvl in SALIENCY_LEVELS})
        return s1

    @torch.no_grad()
    def grids(self, maps: Mapping[str, Tensor], sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image, the saliency logits float32 ``[n_i, S, S]`` of its boxes (xyxy original pixels)."""
        counts = [len(b) for b in boxes]
        s = self.pooler.config.output_size
        if sum(counts) == 0:
            return [np.zeros((0, s, s), np.float32) for _ in counts]
        s1 = self.saliency_maps(maps)
        keep = [np.asarray(b, np.float64).reshape(-1, 4) for b in boxes]
        pooled = self.pooler.pool(s1, sizes, keep)[:, 0].cpu().numpy()
        out, start = [], 0
        for n in counts:
            out.append(pooled[start : start + n])
            start += n
        return out


class SanRegionEncoder:
    """SAN's text-independent visual vector of each indexed region (what the ``san`` array and FAISS file hold).

    Args:
        backbone: the indexing backbone.
        saliency: the saliency network (:class:`~engine.models.saliency.SaliencyNet`).
        model: the SAN model (:class:`~engine.models.san.SANModel`) trained with that saliency network.
    """

    def __init__(self, *, backbone: Backbone, saliency: torch.nn.Module, model: object) -> None:
        self.pooler = SaliencyPooler(backbone=backbone, network=saliency)
        self.model = model

    @property
    def dim(self) -> int:
        return int(self.model.dim)  # type: ignore[attr-defined]

    @property
    def version(self) -> str:
        return str(self.model.version)  # type: ignore[attr-defined]

    def encode(self, maps: Mapping[str, Tensor], sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray], region_maps: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image, float32 ``[n_i, k]`` SAN vectors from the batch's backbone ``maps`` (``c3``/``c4``/``c5``),
        the boxes and the regions' already pooled ``c4`` maps ``[n_i, C, 7, 7]``."""
        grids = self.pooler.grids(maps, sizes, boxes)
        return [self.model.visual(m, g) for m, g in zip(region_maps, grids)]  # type: ignore[attr-defined]
