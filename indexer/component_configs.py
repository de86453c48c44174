"""Configuration of the indexer's model components, importable without torch.

``engine.config`` builds every command's configuration from these; keeping them apart from the
modules that build the models lets commands that load no model (``engine info``, ``remove``,
``compact``, ``models``) start without importing torch (1–3 s here).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["BackboneConfig", "RegionFeatureConfig"]


@dataclass(frozen=True)
class BackboneConfig:
    """How to build a backbone (:func:`indexer.backbone.create_backbone`).

    ``max_size`` is the longest image side fed to the network: larger images are downscaled (aspect
    kept) so that their longest side equals ``max_size``; smaller images are never upsampled.
    ``weights`` overrides the weight file (default: the packaged / cached one).
    """

    name: str = "efficientnet_lite0"
    max_size: int = 640
    weights: Path | None = None


@dataclass(frozen=True)
class RegionFeatureConfig:
    """Which backbone level to pool regions from, and how (:class:`indexer.region_features.RegionFeatureExtractor`).

    ``output_size`` is the side of the pooled map; ``sampling_ratio`` the bilinear samples per bin
    and axis (:func:`torchvision.ops.roi_align`).
    """

    level: str = "c4"
    output_size: int = 7
    sampling_ratio: int = 2
