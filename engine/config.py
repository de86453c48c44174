"""Typed configuration of the engine. Each part configures one component family."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from indexer.backbone import BackboneConfig
from indexer.region_features import RegionFeatureConfig
from indexer.store import StoreConfig

__all__ = ["DEFAULT_INDEX_DIR", "INDEX_ENV_VAR", "EngineConfig", "IndexConfig", "default_index_dir"]

DEFAULT_INDEX_DIR = Path(".engine")
INDEX_ENV_VAR = "ENGINE_INDEX"
TEXT_WEIGHT = 1.0
"""Default weight of SAN's text–region score in a combined query's stage 2 (``engine eval fusion`` fits it)."""


def default_index_dir() -> Path:
    """``$ENGINE_INDEX`` when set, else ``.engine/`` in the working directory."""
    return Path(os.environ.get(INDEX_ENV_VAR) or DEFAULT_INDEX_DIR)


@dataclass(frozen=True)
class EngineConfig:
    """Models and storage of an engine.

    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. ``grn_checkpoint`` is the text-gated
    reranker (``None``: the shipped ``grn.pt``); ``shortlist`` the stage-1 candidates it rescores.
    ``san``: index SAN region embeddings (text-only search) with ``san_checkpoint`` and
    ``saliency_checkpoint`` (``None``: the shipped ``san.pt`` / ``saliency.pt``); ``san_candidates``:
    how many SAN candidates of the text join stage 1's shortlist of a combined query;
    ``text_weight``: stage 2 of a combined query ranks by ``grn + text_weight · san`` (SAN's
    text–region score; 0 ranks by the GRN alone), fitted on the validation split by
    ``engine eval fusion`` (docs/grn.md).
    """

    device: str = "auto"
    grn_checkpoint: Path | None = None
    shortlist: int = 1000
    san: bool = True
    san_checkpoint: Path | None = None
    saliency_checkpoint: Path | None = None
    san_candidates: int = 100
    text_weight: float = TEXT_WEIGHT
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: RegionFeatureConfig = field(default_factory=RegionFeatureConfig)
    store: StoreConfig = field(default_factory=StoreConfig)


@dataclass(frozen=True)
class IndexConfig:
    """One indexing run: where proposals come from, how many images per batch, how often FAISS is saved."""

    proposals: str = "auto"
    batch_size: int = 8
    save_every: int = 2000
