"""Learned PCA-whitening of the visual key (the stage-1 FAISS key), fitted on regions of training images.

The key (:func:`indexer.region_features.visual_key`: per-level L2-normalised RoI means of ``c4`` and
``c5``, concatenated) has correlated, unequally scaled dimensions: a few bursty channels dominate the
inner product, whatever the object. Learned whitening (Jégou & Chum, "Negative evidences and
co-occurrences in image retrieval", ECCV 2012, Sec. 2; Radenović et al., "Fine-tuning CNN image
retrieval with no human annotation", TPAMI 2018, Eq. 4–5) decorrelates and rescales them::

    Σ_s = (1 − s) Σ + s · tr(Σ) / d · I          (shrinkage s: keeps tiny eigenvalues from amplifying noise)
    Σ_s = U Λ Uᵀ,   x̂ = Λ^{-1/2} Uᵀ (x − μ),   key = x̂ / ‖x̂‖

with ``μ``, ``Σ`` the mean and covariance of the training keys. Real cut-outs pasted on real photos,
true boxes, val split: R@1 0.674 → 0.810 (``benchmarks/results/visual-key.json``).

The supervised half of Radenović et al.'s learned whitening (Eq. 4–5: project by ``C_S^{-1/2}``, ``C_S``
the covariance of the differences of *matching* pairs) follows when the training data say which boxes
show the same thing (:func:`fit_matching`)::

    C_S = Σ_groups Σ_i (x̂_i − x̄_g)(x̂_i − x̄_g)ᵀ / Σ_groups (n_g − 1)     (x̂: PCA-whitened keys of one group)
    C_λ = d · C_S / tr(C_S) + λ I,   key = normalize(C_λ^{-1/2} x̂)

so directions along which one object varies from photo to photo (lighting, scale, background bleeding
into the box) weigh less than those along which objects differ. ``λ`` (``pairs_shrink``) keeps the
projection from trusting directions the training objects never varied in; ``None``: PCA-whitening only.

A :class:`KeyWhitening` belongs to one un-whitened key recipe (backbone and key levels, pooling, RoI
size, e.g. ``efficientnet_lite0:c4+c5:mean:roi7:s2``): :meth:`KeyWhitening.check_recipe` refuses another.
``engine train key-whitening --data A --data B`` fits it (:mod:`engine.training.key_whitening`).
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

__all__ = ["MODEL_NAME", "MODEL_VERSION", "WhiteningConfig", "KeyWhitening", "CovarianceAccumulator", "fit_whitening", "matching_scatter", "fit_matching"]

MODEL_NAME = "key-whitening"
MODEL_VERSION = "1"
_EPS = 1e-12


@dataclass(frozen=True)
class WhiteningConfig:
    """``recipe``: the un-whitened key it applies to (backbone name and key recipe, no input size);
    ``in_dim`` / ``out_dim``: key length before / after; ``shrink``: the covariance shrinkage ``s``;
    ``pairs_shrink`` / ``pairs``: the matching-pairs step's ``λ`` and its box count (module docstring)."""

    recipe: str
    in_dim: int
    out_dim: int
    shrink: float
    pairs_shrink: float | None = None  # λ of the matching-pairs step (fit_matching); None: PCA-whitening only
    pairs: int = 0  # boxes in matching groups that C_S was estimated from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KeyWhitening(nn.Module):
    """``x ↦ normalize(Λ^{-1/2} Uᵀ (x − μ))`` (the module docstring's equation); ``mean`` ``[in_dim]``,
    ``projection`` ``[in_dim, out_dim]`` = ``U Λ^{-1/2}`` (eigenvectors by decreasing eigenvalue)."""

    def __init__(self, config: WhiteningConfig, mean: Tensor, projection: Tensor) -> None:
        super().__init__()
        if tuple(mean.shape) != (config.in_dim,) or tuple(projection.shape) != (config.in_dim, config.out_dim):
            raise CheckpointError(f"whitening tensors {tuple(mean.shape)} / {tuple(projection.shape)} do not match in_dim {config.in_dim}, out_dim {config.out_dim}")
        self.config = config
        self.register_buffer("mean", mean.float())
        self.register_buffer("projection", projection.float())

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    @torch.no_grad()
    def forward(self, keys: Tensor) -> Tensor:
        """Whitened, L2-normalised keys ``[N, out_dim]`` of keys ``[N, in_dim]``."""
        if keys.ndim != 2 or keys.shape[1] != self.config.in_dim:
            raise InvalidInputError(f"the whitening takes keys of shape [N, {self.config.in_dim}], got {tuple(keys.shape)}")
        x = (keys.to(self.mean.device, torch.float32) - self.mean) @ self.projection
        return x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)

    def apply(self, keys: np.ndarray) -> np.ndarray:
        """:meth:`forward` on a float32 numpy array (the extractor's keys)."""
        return self(torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))).cpu().numpy()

    def check_recipe(self, recipe: str, *, source: str = "the key whitening") -> None:
        """A :class:`CheckpointError` when this whitening was fitted on another key than ``recipe``."""
        if recipe != self.config.recipe:
            raise CheckpointError(
                f"{source} was fitted on visual key {self.config.recipe!r}, but the key here is {recipe!r}; "
                f"fit one for it with `engine train key-whitening --data DIR`, or turn whitening off (key_whitening=None)"
            )

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: Path, manifest: Manifest) -> Manifest:
        """Write the checkpoint (tensors and config) and its manifest."""
        payload = {"config": self.config.to_dict(), "mean": self.mean.cpu(), "projection": self.projection.cpu()}
        return save_checkpoint(path, manifest, payload)

    @classmethod
    def from_checkpoint(cls, path: Path, *, device: str | torch.device = "cpu") -> "KeyWhitening":
        _, payload = load_checkpoint(path, expected_model=MODEL_NAME)
        try:
            config = WhiteningConfig(**payload["config"])
            model = cls(config, payload["mean"], payload["projection"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a key whitening of this engine ({exc}); refit it with `engine train key-whitening`") from exc
        return model.to(device).eval()


class CovarianceAccumulator:
    """Streaming mean and covariance (float64 sums), so that any number of keys can be fitted."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)

    def add(self, keys: np.ndarray) -> None:
        x = np.asarray(keys, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InvalidInputError(f"keys of shape [N, {self.dim}] are needed, got {x.shape}")
        self.count += len(x)
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    def mean(self) -> np.ndarray:
        return self._sum / max(self.count, 1)

    def covariance(self) -> np.ndarray:
        """The sample covariance (``count − 1`` in the denominator)."""
        if self.count < 2:
            raise InvalidInputError(f"a covariance needs at least 2 keys, got {self.count}")
        mu = self.mean()
        return (self._outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def fit_whitening(stats: CovarianceAccumulator, *, recipe: str, shrink: float, out_dim: int | None = None) -> KeyWhitening:
    """The PCA-whitening of the accumulated keys (module docstring): shrunk covariance, eigenvectors
    by decreasing eigenvalue, the first ``out_dim`` (default all) kept."""
    if not 0.0 <= shrink <= 1.0:
        raise InvalidInputError(f"shrink must lie in [0, 1], got {shrink}")
    dim = stats.dim
    out_dim = dim if out_dim is None else out_dim
    if not 1 <= out_dim <= dim:
        raise InvalidInputError(f"out_dim must lie in [1, {dim}], got {out_dim}")
    cov = stats.covariance()
    cov = (1.0 - shrink) * cov + shrink * np.trace(cov) / dim * np.eye(dim)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:out_dim]
    projection = vectors[:, order] / np.sqrt(np.maximum(values[order], _EPS))
    config = WhiteningConfig(recipe=recipe, in_dim=dim, out_dim=out_dim, shrink=float(shrink))
    return KeyWhitening(config, torch.from_numpy(stats.mean()).float(), torch.from_numpy(projection).float())


def matching_scatter(whitening: KeyWhitening, groups: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """``C_S`` (module docstring) of ``groups``: each ``[n_g, in_dim]`` un-whitened keys of boxes that show one
    thing in different photos (groups of one box are skipped), in ``whitening``'s space; and the box count."""
    dim = whitening.out_dim
    scatter = np.zeros((dim, dim))
    boxes = dof = 0
    for keys in groups:
        if len(keys) < 2:
            continue
        x = whitening.apply(keys).astype(np.float64)
        x -= x.mean(0)
        scatter += x.T @ x
        boxes += len(keys)
        dof += len(keys) - 1
    if dof == 0:
        raise InvalidInputError("the matching-pairs whitening needs at least one group of two or more boxes showing the same thing")
    return scatter / dof, boxes


def fit_matching(whitening: KeyWhitening, scatter: np.ndarray, *, pairs_shrink: float, boxes: int) -> KeyWhitening:
    """``whitening`` followed by ``C_λ^{-1/2}`` (module docstring, Radenović et al. Eq. 4) of the matching
    scatter ``C_S`` (:func:`matching_scatter`); one linear map, so a key costs what it cost before."""
    if pairs_shrink <= 0:
        raise InvalidInputError(f"pairs_shrink must be > 0, got {pairs_shrink}")
    dim = whitening.out_dim
    if scatter.shape != (dim, dim):
        raise InvalidInputError(f"the matching scatter must be {dim}×{dim}, got {scatter.shape}")
    shrunk = scatter * dim / max(np.trace(scatter), _EPS) + pairs_shrink * np.eye(dim)
    values, vectors = np.linalg.eigh(shrunk)
    inv_sqrt = (vectors / np.sqrt(np.maximum(values, _EPS))) @ vectors.T
    projection = whitening.projection.double().numpy() @ inv_sqrt
    config = WhiteningConfig(recipe=whitening.config.recipe, in_dim=whitening.config.in_dim, out_dim=dim, shrink=whitening.config.shrink, pairs_shrink=float(pairs_shrink), pairs=int(boxes))
    return KeyWhitening(config, whitening.mean.clone(), torch.from_numpy(projection).float())
