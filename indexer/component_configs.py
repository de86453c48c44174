"""Configuration of the indexer's model components, importable without torch.

``engine.config`` builds every command's configuration from these; keeping them apart from the
modules that build the models lets commands that load no model (``engine info``, ``remove``,
``compact``, ``models``) start without importing torch (1–3 s here).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["BackboneConfig", "RegionFeatureConfig", "KEY_POOLINGS", "visual_key_version", "whitening_tag"]

KEY_POOLINGS: tuple[str, ...] = ("mean", "gem")
"""How a level's RoI map becomes its part of the visual key: spatial mean, or GeM (p=3, on the map clamped at 1e-6)."""


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

    ``level`` is the level of the stored region maps (``maps``, ``pooled``: the GRN / Ref-NMS / CM-Att
    inputs); ``output_size`` is the side of the pooled map; ``sampling_ratio`` the bilinear samples per bin
    and axis (:func:`torchvision.ops.roi_align`).

    ``key_levels`` and ``key_pooling`` make the region's visual vector, stage 1's FAISS key: per level
    a RoIAlign map (same ``output_size`` / ``sampling_ratio``) reduced by ``key_pooling`` (``mean`` or
    ``gem``) and L2-normalised; the levels concatenated and L2-normalised again (``c4`` + ``c5``: 432-d
    for EfficientNet-Lite0; ``benchmarks/results/visual-key.json`` measures the choice). ``key_whitening``:
    the learned PCA-whitening applied to that key (a shipped name or a ``.pt`` path of ``engine train
    key-whitening``; ``None``: the key is used as it is), see :mod:`engine.models.key_whitening`.
    """

    level: str = "c4"
    output_size: int = 7
    sampling_ratio: int = 2
    key_levels: tuple[str, ...] = ("c4", "c5")
    key_pooling: str = "mean"
    key_whitening: str | None = "key-whitening"

    @property
    def key_recipe(self) -> str:
        """The un-whitened key's recipe (levels, pooling, RoI size and sampling), e.g. ``c4+c5:mean:roi7:s2``."""
        s = self.output_size
        return f"{'+'.join(self.key_levels)}:{self.key_pooling}:roi{s}:s{self.sampling_ratio}"

    @property
    def key_version(self) -> str:
        """The key's recipe and its whitening, e.g. ``c4+c5:mean:roi7:s2+pcaw:0123456789ab`` (the first 12 hex
        digits of the whitening checkpoint's sha256, read from its manifest: no torch)."""
        return self.key_recipe + whitening_tag(self.key_whitening)


def whitening_tag(spec: str | None) -> str:
    """``+pcaw:<sha256[:12]>`` of the key whitening checkpoint ``spec`` (a shipped name or a path), ``""`` for none."""
    if spec is None:
        return ""
    from engine.models.checkpoint import read_manifest
    from engine.models.registry import resolve_checkpoint

    return f"+pcaw:{read_manifest(resolve_checkpoint(spec)).sha256[:12]}"


def visual_key_version(backbone: BackboneConfig, features: RegionFeatureConfig) -> str:
    """What an index records as its visual key (``meta.visual_key``): backbone, input size, the key's
    recipe and whitening, e.g. ``efficientnet_lite0/640:c4+c5:mean:roi7:s2+pcaw:0123456789ab``. Computed
    from the configuration alone, so that opening an index for search checks it without loading torch."""
    return f"{backbone.name}/{backbone.max_size}:{features.key_version}"
