"""A learned instance embedding of a region: "is this the same object?" for stage 2 of region-only queries.

The visual key (a pooled, whitened vector) is built for recall over millions of regions; the 7×7 map
every default index also stores holds more. This head reads both::

    e(m, k) = normalize(W₂ · ReLU(W₁ [m / ‖m‖ ; k] + b₁) + b₂)        m: the flattened 7×7 map, k: the key

trained with the supervised contrastive loss (Khosla et al., "Supervised contrastive learning",
NeurIPS 2020, Eq. 2) over boxes labelled by what they show::

    L = Σ_i −1/|P(i)| Σ_{p ∈ P(i)} log  exp(e_i · e_p / τ) / Σ_{a ≠ i} exp(e_i · e_a / τ)

with ``P(i)`` the other boxes of ``i``'s label in the batch. Labels come from the train splits'
queries: a query's box and its positives show one thing; queries sharing a box are merged (in the
stamps world that gives one label per stamp). Probe on the stamps world's val split (stamps never seen
in training): R@1 0.867 with the shipped key → 0.96 with this head (``benchmarks/instance_head_probe.py``).

A head belongs to one visual key (backbone, key recipe, whitening: ``key_version``) and one map shape:
:meth:`InstanceHead.check_key` refuses another key. ``engine train instance-head --data A --data B``
trains it (:mod:`engine.training.instance_head`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import Manifest, load_checkpoint, save_checkpoint

__all__ = ["MODEL_NAME", "MODEL_VERSION", "InstanceHeadConfig", "InstanceHead", "supervised_contrastive"]

MODEL_NAME = "instance-head"
MODEL_VERSION = "1"


@dataclass(frozen=True)
class InstanceHeadConfig:
    """``key_version``: the visual key it reads (``backbone name:key recipe+whitening``); ``map_shape``: the
    stored RoI map ``[C, S, S]``; ``key_dim``: the key's length; ``hidden`` / ``out_dim``: the MLP's
    widths; ``dropout``: in training; ``temperature``: the loss's τ."""

    key_version: str
    map_shape: tuple[int, int, int]
    key_dim: int
    hidden: int = 512
    out_dim: int = 256
    dropout: float = 0.1
    temperature: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "map_shape", tuple(int(v) for v in self.map_shape))
        if len(self.map_shape) != 3 or min(self.map_shape) <= 0 or self.key_dim <= 0 or self.hidden <= 0 or self.out_dim <= 0:
            raise InvalidInputError(f"instance head sizes must be positive (map_shape [C, S, S]), got {self.map_shape}, {self.key_dim}, {self.hidden}, {self.out_dim}")
        if not self.temperature > 0 or not 0 <= self.dropout < 1:
            raise InvalidInputError(f"temperature must be > 0 and dropout in [0, 1), got {self.temperature} and {self.dropout}")

    @property
    def in_dim(self) -> int:
        c, s, t = self.map_shape
        return c * s * t + self.key_dim

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "map_shape": list(self.map_shape)}


class InstanceHead(nn.Module):
    """``e(m, k)`` of the module docstring."""

    def __init__(self, config: InstanceHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.digest: str | None = None  # the checkpoint's sha256 (first 12), set when loaded from one
        self.net = nn.Sequential(nn.Linear(config.in_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(config.hidden, config.out_dim))

    def forward(self, maps: Tensor, keys: Tensor) -> Tensor:
        """Unit embeddings ``[N, out_dim]`` of RoI maps ``[N, C, S, S]`` and their keys ``[N, key_dim]``."""
        if tuple(maps.shape[1:]) != self.config.map_shape or keys.ndim != 2 or keys.shape[1] != self.config.key_dim or len(maps) != len(keys):
            raise InvalidInputError(f"the instance head takes maps [N, {', '.join(map(str, self.config.map_shape))}] and keys [N, {self.config.key_dim}], got {tuple(maps.shape)} and {tuple(keys.shape)}")
        device = self.net[0].weight.device
        flat = maps.reshape(len(maps), -1).to(device, torch.float32)
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return nn.functional.normalize(self.net(torch.cat([flat, keys.to(device, torch.float32)], dim=1)), dim=1)

    @property
    def version(self) -> str:
        """Names this head's weights (the checkpoint's sha256): embeddings an index stores (array
        ``instance``) are used only with the head that computed them."""
        return f"{MODEL_NAME}:{self.digest or 'unsaved'}"

    @torch.no_grad()
    def embed(self, maps: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """:meth:`forward` in eval mode on numpy arrays (float16 or float32); float32 ``[N, out_dim]``."""
        if len(maps) == 0:
            return np.zeros((0, self.config.out_dim), np.float32)
        return self(torch.from_numpy(np.asarray(maps, np.float32)), torch.from_numpy(np.asarray(keys, np.float32))).cpu().numpy()

    def check_key(self, key_version: str, *, source: str = "the instance head") -> None:
        """A :class:`CheckpointError` when this head was trained for another visual key than ``key_version``."""
        if key_version != self.config.key_version:
            raise CheckpointError(
                f"{source} was trained for visual key {self.config.key_version!r}, but the key here is {key_version!r}; "
                f"train one for it with `engine train instance-head --data DIR`, or turn it off (instance_head=None)"
            )

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: Path, manifest: Manifest) -> Manifest:
        """Write the checkpoint (weights and config) and its manifest."""
        return save_checkpoint(path, manifest, {"config": self.config.to_dict(), "state": {k: v.cpu() for k, v in self.state_dict().items()}})

    @classmethod
    def from_checkpoint(cls, path: Path, *, device: str | torch.device = "cpu") -> "InstanceHead":
        manifest, payload = load_checkpoint(path, expected_model=MODEL_NAME)
        try:
            model = cls(InstanceHeadConfig(**payload["config"]))
            model.load_state_dict(payload["state"])
            model.digest = manifest.sha256[:12] if manifest.sha256 else None
        except (KeyError, TypeError, RuntimeError, InvalidInputError) as exc:
            raise CheckpointError(f"checkpoint {path} is not an instance head of this engine ({exc}); retrain it with `engine train instance-head`") from exc
        return model.to(device).eval()


def supervised_contrastive(embeddings: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """The supervised contrastive loss (module docstring) of unit embeddings ``[N, D]`` with ``labels`` ``[N]``;
    anchors without another box of their label in the batch are left out."""
    logits = embeddings @ embeddings.T / temperature
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    logits = logits.masked_fill(eye, float("-inf"))
    positive = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    counts = positive.sum(1)
    anchors = counts > 0
    if not anchors.any():
        raise InvalidInputError("a batch needs at least two boxes of one label")
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(1)[anchors] / counts[anchors]
    return per_anchor.mean()
