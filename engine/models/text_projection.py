"""A learned map from English into the visual key space: text-only search in the stage-1 FAISS file itself.

ConSE (:mod:`engine.models.concepts`) reads a text through ImageNet's 1,000 classes, which rarely tell
one real object from another ("a round tower" and "a lighthouse" share their classes). This model
maps the text's all-MiniLM-L6-v2 sentence vector ``s`` straight into the visual key space::

    v(s) = normalize(W s + b)          W: [key_dim, 384]

trained on the train splits' region descriptions and the keys of their boxes with the InfoNCE loss
(Oord et al., "Representation learning with contrastive predictive coding", 2018, Eq. 4; the
text-to-image direction of CLIP, Radford et al., ICML 2021, Fig. 3)::

    L = − 1/N Σ_i log  exp(v(s_i) · k_i / τ) / Σ_j exp(v(s_i) · k_j / τ)

over a batch of N (text, key) pairs, ``k`` the unit visual keys. A text-only query then scores a region
by ``v(s) · k`` — the same cosine as a region query, from the same FAISS file. Probe on the stamps
world's val split (objects never seen in training): description → object R@10 0.33 with ConSE, 0.45
with this map, 0.60 with their sum (``benchmarks/results/text-projection-probe.json``).

A :class:`TextProjection` belongs to one visual key (backbone, key recipe and whitening: ``key_version``)
and one sentence encoder: :meth:`TextProjection.check_key` refuses another key.
``engine train text-projection --data A --data B`` trains it (:mod:`engine.training.text_projection`).
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

__all__ = ["MODEL_NAME", "MODEL_VERSION", "ProjectionConfig", "TextProjection", "info_nce"]

MODEL_NAME = "text-projection"
MODEL_VERSION = "1"


@dataclass(frozen=True)
class ProjectionConfig:
    """``key_version``: the visual key it maps into (``backbone name:key recipe+whitening``, e.g.
    ``efficientnet_lite0:c4+c5:mean:roi7:s2+pcaw:ee1c728fd73d``); ``text_encoder``: the sentence encoder
    whose vectors it reads; ``text_dim`` / ``key_dim``: their lengths; ``temperature``: InfoNCE's τ."""

    key_version: str
    text_encoder: str
    text_dim: int
    key_dim: int
    temperature: float = 0.05

    def __post_init__(self) -> None:
        if self.text_dim <= 0 or self.key_dim <= 0:
            raise InvalidInputError(f"text_dim and key_dim must be positive, got {self.text_dim} and {self.key_dim}")
        if not self.temperature > 0:
            raise InvalidInputError(f"the temperature must be positive, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TextProjection(nn.Module):
    """``s ↦ normalize(W s + b)`` (the module docstring's map) from sentence vectors ``[N, text_dim]``."""

    def __init__(self, config: ProjectionConfig) -> None:
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.text_dim, config.key_dim)

    def forward(self, sentences: Tensor) -> Tensor:
        """Unit vectors ``[N, key_dim]`` in the visual key space."""
        if sentences.ndim != 2 or sentences.shape[1] != self.config.text_dim:
            raise InvalidInputError(f"the text projection takes sentence vectors of shape [N, {self.config.text_dim}], got {tuple(sentences.shape)}")
        return nn.functional.normalize(self.linear(sentences.to(self.linear.weight.device, torch.float32)), dim=1)

    @torch.no_grad()
    def apply(self, sentences: np.ndarray) -> np.ndarray:
        """:meth:`forward` on float32 numpy sentence vectors (one ``[text_dim]`` or ``[N, text_dim]``)."""
        x = np.asarray(sentences, np.float32)
        out = self(torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1])))).cpu().numpy()
        return out[0] if x.ndim == 1 else out

    def check_key(self, key_version: str, *, source: str = "the text projection") -> None:
        """A :class:`CheckpointError` when this projection was trained for another visual key than ``key_version``."""
        if key_version != self.config.key_version:
            raise CheckpointError(
                f"{source} was trained for visual key {self.config.key_version!r}, but the key here is {key_version!r}; "
                f"train one for it with `engine train text-projection --data DIR`, or turn it off (text_projection=None)"
            )

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: Path, manifest: Manifest) -> Manifest:
        """Write the checkpoint (weights and config) and its manifest."""
        return save_checkpoint(path, manifest, {"config": self.config.to_dict(), "state": {k: v.cpu() for k, v in self.state_dict().items()}})

    @classmethod
    def from_checkpoint(cls, path: Path, *, device: str | torch.device = "cpu") -> "TextProjection":
        _, payload = load_checkpoint(path, expected_model=MODEL_NAME)
        try:
            model = cls(ProjectionConfig(**payload["config"]))
            model.load_state_dict(payload["state"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a text projection of this engine ({exc}); retrain it with `engine train text-projection`") from exc
        return model.to(device).eval()


def info_nce(projected: Tensor, keys: Tensor, groups: Tensor, temperature: float, background: Tensor | None = None) -> Tensor:
    """InfoNCE (module docstring) of unit text vectors ``[N, D]`` against their unit keys ``[N, D]``: the
    other keys of the batch are the negatives, except those of the same text (``groups[i] == groups[j]``,
    e.g. one description of two boxes), which are left out rather than pushed apart; ``background``
    ``[M, D]``: more negatives for every text (keys of boxes that show no described region)."""
    logits = projected @ keys.T / temperature
    same = (groups[:, None] == groups[None, :]) & ~torch.eye(len(keys), dtype=torch.bool, device=keys.device)
    logits = logits.masked_fill(same, float("-inf"))
    if background is not None and len(background):
        logits = torch.cat([logits, projected @ background.T / temperature], dim=1)
    return nn.functional.cross_entropy(logits, torch.arange(len(keys), device=keys.device))
