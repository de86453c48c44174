"""Weakly supervised phrase grounding with multimodal compact bilinear pooling (MCB).

After "Weakly Supervised Attention Learning for Textual Phrases Grounding" (``../shared/papers/
weakly-supervised-attention-phrase-grounding.txt``), on the engine's frozen backbone:

* visual map ``f``: the cached ``c4`` map with the ``c3`` map average-pooled to the same grid
  (``[C, H, W]``, stride 16), a learned 1x1 projection, L2-normalised per cell (§2.1);
* phrase vector ``t``: the GRN self-attention sentence encoder (:mod:`engine.models.text_encoders`) over
  the phrase's word features (the frozen MiniLM's, or with ``word_features="vocab"`` a learned word
  table: :mod:`engine.models.word_features`), expanded (tiled) over the map (§2.2);
* MCB (§2.2): ``f' = Ψ(f) * Ψ(t) = FFT⁻¹(FFT(Ψ(f)) ⊙ FFT(Ψ(t)))`` per cell, ``Ψ`` a count sketch
  (Charikar et al.): ``Ψ(x)[k] = Σ_{i: h(i)=k} s(i)·x_i`` with fixed random ``h``, ``s ∈ {±1}``;
* two 1x1 convolutions to a one-channel attentive map ``r = σ(conv(relu(conv(f'))))`` (§3);
* classifier ``C(f' ⊗ r)``: ``f'`` pooled with the map's logits normalised over the map (spatial
  softmax; the "attentive high-lightened feature") scored by a linear layer: does the phrase
  describe something in the image?

:func:`map_to_box` turns an attentive map into one box (threshold + connected component).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import Manifest, checkpoint_path, load_checkpoint
from engine.models.text_encoders import SelfAttentionEncoder, require_words
from engine.models.word_features import TextWords, check_kind, words_from_payload

__all__ = [
    "MODEL_NAME",
    "MODEL_VERSION",
    "MCBConfig",
    "CountSketch",
    "compact_bilinear",
    "MCBGrounder",
    "GroundingModel",
    "visual_map",
    "attention_to_image",
    "map_to_box",
]

MODEL_NAME = "mcb-attention"
MODEL_VERSION = "1"


@dataclass(frozen=True)
class MCBConfig:
    """Sizes of the grounding network and the geometry of its input map.

    ``levels``: backbone levels concatenated on the grid of the last one (finer ones average-pooled);
    ``stride`` / ``offset``: input pixels per grid cell and the centre of cell 0 (of the last level);
    ``threshold``: fraction of the map's maximum kept by :func:`map_to_box`; ``word_features``: where the
    phrase's word features come from, ``minilm`` or ``vocab`` (the ablation; ``vocab_size`` counts its
    words with ``<pad>`` and ``<unk>``, unused with MiniLM).
    """

    vocab_size: int
    visual_channels: int = 152
    visual_dim: int = 128
    text_dim: int = 128
    mcb_dim: int = 512
    hidden: int = 32
    sketch_seed: int = 0
    levels: tuple[str, ...] = ("c3", "c4")
    stride: int = 16
    offset: float = 15.5
    max_size: int = 640
    backbone: str = ""
    threshold: float = 0.5
    word_features: str = "minilm"

    def __post_init__(self) -> None:
        check_kind(self.word_features)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["levels"] = list(self.levels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MCBConfig":
        """A stored config; one written before MiniLM (no ``word_features``) reads its vocabulary."""
        from engine.models.checkpoint import with_word_features

        data = with_word_features(cls, dict(data))
        data["levels"] = tuple(data.get("levels", ("c3", "c4")))
        return cls(**data)


class CountSketch(nn.Module):
    """Count sketch projection ``Ψ: R^d → R^D`` (MCB §2.2, Charikar et al. 2002).

    ``h(i)`` uniform in ``[0, D)`` and ``s(i)`` uniform in ``{-1, +1}`` are drawn once from ``seed``
    and stored with the weights; ``Ψ(x) = x @ P`` with the sparse ``P[i, h(i)] = s(i)``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        h = torch.randint(out_dim, (in_dim,), generator=gen)
        s = torch.randint(2, (in_dim,), generator=gen).float() * 2 - 1
        self.register_buffer("h", h)
        self.register_buffer("s", s)
        self.out_dim = out_dim

    def matrix(self) -> Tensor:
        """The dense ``[d, D]`` projection matrix."""
        p = torch.zeros(len(self.h), self.out_dim, device=self.s.device)
        p[torch.arange(len(self.h), device=self.s.device), self.h] = self.s
        return p

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.matrix().to(x.dtype)


def compact_bilinear(sketch_x: Tensor, sketch_y: Tensor, dim: int) -> Tensor:
    """``FFT⁻¹(FFT(Ψ(x)) ⊙ FFT(Ψ(y)))`` (MCB §2.2): the count sketch of the outer product ``x ⊗ y``
    (circular convolution of the two sketches). Inputs broadcast over leading dimensions."""
    fx = torch.fft.rfft(sketch_x, n=dim, dim=-1)
    fy = torch.fft.rfft(sketch_y, n=dim, dim=-1)
    return torch.fft.irfft(fx * fy, n=dim, dim=-1)


class MCBGrounder(nn.Module):
    """Attentive module ``A(f, t)`` and classifier ``C(f' ⊗ r)`` of MCB Fig. 2 on precomputed maps."""

    def __init__(self, config: MCBConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("input_scale", torch.ones(()))
        self.visual = nn.Conv2d(config.visual_channels, config.visual_dim, 1)
        self.text = SelfAttentionEncoder(vocab_size=config.vocab_size, dim=config.text_dim, word_features=config.word_features)
        self.sketch_v = CountSketch(config.visual_dim, config.mcb_dim, seed=config.sketch_seed)
        self.sketch_t = CountSketch(config.text_dim, config.mcb_dim, seed=config.sketch_seed + 1)
        self.att1 = nn.Linear(config.mcb_dim, config.hidden)  # 1x1 convolutions on the [.., H, W, D] map
        self.att2 = nn.Linear(config.hidden, 1)
        self.classifier = nn.Linear(config.mcb_dim, 1)
        # the map starts uniform (r = 0.5 everywhere): the classifier first learns from every cell, and the
        # attention moves only where that evidence points (a random initial map locks onto arbitrary cells)
        nn.init.zeros_(self.att2.weight)
        nn.init.zeros_(self.att2.bias)

    def fused(self, maps: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """``f'``: MCB of every cell's visual vector with the tiled phrase vector, float ``[B, H, W, D]``
        (scaled to about unit RMS). ``maps`` ``[B, C, H, W]``; ``ids``: the phrases' word ids long ``[B, L]``,
        or with MiniLM their word features float ``[B, L, 384]``; ``lengths`` ``[B]``."""
        v = F.normalize(self.visual(maps.float() * self.input_scale), dim=1).permute(0, 2, 3, 1)  # [B, H, W, dv]
        t = F.normalize(self.text(ids, lengths), dim=-1)  # [B, dt]
        d = self.config.mcb_dim
        # Ψ(t) is the same for every cell: the expanded phrase is sketched once and broadcast
        fused = compact_bilinear(self.sketch_v(v), self.sketch_t(t)[:, None, None, :], d)
        # ‖Ψ(v) * Ψ(t)‖ ≈ ‖v‖·‖t‖ = 1 (the sketch preserves inner products of outer products): scaling by
        # √D gives entries of unit RMS without a per-cell normalisation pass
        return fused * math.sqrt(d)

    def forward(self, maps: Tensor, ids: Tensor, lengths: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(r, z, logit)``: the attentive map ``r = σ(a)`` in (0, 1) ``[B, H, W]`` (0 outside ``valid``), the
        attended feature ``z = Σ softmax(a)·f'`` ``[B, D]`` and the image-level match logit ``[B]``."""
        fused = self.fused(maps, ids, lengths)
        a = self.att2(F.relu(self.att1(fused))).squeeze(-1)  # two 1x1 convs → one channel
        r = torch.sigmoid(a)
        if valid is not None:
            r = r * valid.to(r.dtype)
            a = a.masked_fill(~valid.bool(), float("-inf"))
        # f' ⊗ r: the cells are pooled with the attention normalised over the map (a spatial softmax of
        # its logits), so that the classifier's evidence comes from where the map points
        weights = torch.softmax(a.flatten(1), dim=1).view_as(a)
        z = torch.einsum("bhw,bhwd->bd", weights, fused)
        return r, z, self.classifier(z).squeeze(-1)


def visual_map(levels: dict[str, np.ndarray | Tensor], names: tuple[str, ...]) -> Tensor:
    """Concatenate backbone maps ``{level: [C, H, W]}`` on the grid of the last level in ``names``
    (finer levels average-pooled by their stride ratio), float32 ``[ΣC, H, W]``."""
    grid = tuple(levels[names[-1]].shape[-2:])
    parts = []
    for name in names:
        m = levels[name]
        m = m.float() if isinstance(m, Tensor) else torch.from_numpy(np.asarray(m, np.float32))
        if tuple(m.shape[-2:]) != grid:
            m = F.adaptive_avg_pool2d(m[None], grid)[0]
        parts.append(m)
    return torch.cat(parts, dim=0)


def valid_cells(size: tuple[int, int], grid: tuple[int, int], *, stride: int, max_size: int) -> Tensor:
    """Bool ``[H, W]``: the cells of a padded ``grid`` that lie on the (resized) image of ``size`` (w, h)."""
    from engine.imaging import resized_size

    nw, nh = resized_size(size[0], size[1], max_size)
    out = torch.zeros(grid, dtype=torch.bool)
    out[: math.ceil(nh / stride), : math.ceil(nw / stride)] = True
    return out


def attention_to_image(grid: np.ndarray | Tensor, size: tuple[int, int], *, stride: int, offset: float, max_size: int) -> np.ndarray:
    """A map on the backbone grid ``[H, W]`` as float32 ``[h, w]`` over the original image of ``size``
    (``(w, h)``): bilinear upsampling with cell ``i`` centred at ``offset + stride·i`` in the resized frame."""
    from engine.imaging import resized_size

    w, h = size
    nw, nh = resized_size(w, h, max_size)
    g = torch.as_tensor(grid).detach().cpu().float()
    # pixel centre x + 0.5 sits at cell coordinate (x + 0.5 - offset) / stride; sample with grid_sample
    xs = (torch.arange(nw, dtype=torch.float32) + 0.5 - offset) / stride
    ys = (torch.arange(nh, dtype=torch.float32) + 0.5 - offset) / stride
    gx = (2 * xs + 1) / g.shape[1] - 1
    gy = (2 * ys + 1) / g.shape[0] - 1
    sample = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    up = F.grid_sample(g[None, None], sample, mode="bilinear", padding_mode="border", align_corners=False)
    if (nw, nh) != (w, h):
        up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
    return up[0, 0].cpu().numpy().astype(np.float32)


def map_to_box(heat: np.ndarray, *, threshold: float = 0.5) -> tuple[float, float, float, float]:
    """One box (xyxy pixels) from an attention map ``[h, w]`` over the image.

    The rule: keep the pixels with ``heat >= threshold · max(heat)``, split them into 8-connected
    components (``scipy.ndimage.label``), take the component with the largest attention mass
    (sum of ``heat`` over it; on a single peak this is the component holding the maximum), and return
    its bounding box ``(x1, y1, x2 + 1, y2 + 1)``. A map with no positive value gives the whole image.
    """
    from scipy import ndimage

    if not 0.0 < threshold <= 1.0:
        raise InvalidInputError(f"threshold must be in (0, 1], got {threshold}")
    heat = np.asarray(heat, np.float32)
    h, w = heat.shape
    peak = float(heat.max()) if heat.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return (0.0, 0.0, float(w), float(h))
    labels, count = ndimage.label(heat >= threshold * peak, structure=np.ones((3, 3), bool))
    mass = ndimage.sum_labels(heat, labels, index=np.arange(1, count + 1))
    ys, xs = np.nonzero(labels == int(np.argmax(mass)) + 1)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


class GroundingModel:
    """A trained :class:`MCBGrounder` with its text encoding (``vocab``: MiniLM, or the vocabulary it was trained
    with): phrase → attention map → box on cached or fresh maps."""

    def __init__(self, net: MCBGrounder, vocab: TextWords, *, manifest: Manifest | None = None, name: str = "mcb") -> None:
        self.net = net.eval()
        self.vocab = vocab
        self.manifest = manifest
        self.name = name

    @property
    def config(self) -> MCBConfig:
        return self.net.config

    @classmethod
    def from_checkpoint(cls, path: Path | str | None = None, *, device: str | torch.device = "cpu") -> "GroundingModel":
        """Load a checkpoint (``None`` or ``"mcb"``/``"mcb-no-sparsity"``: the shipped one); :class:`CheckpointError`
        when it is missing, corrupt or not an MCB grounding model."""
        from engine.device import resolve_device

        path = checkpoint_path(path, default="mcb")
        manifest, payload = load_checkpoint(path, expected_model=MODEL_NAME)
        device = resolve_device(device) if isinstance(device, str) else device  # MiniLM runs there too
        if manifest.version != MODEL_VERSION:
            raise CheckpointError(f"checkpoint {path} is {MODEL_NAME} version {manifest.version!r}, this engine reads {MODEL_VERSION!r}; retrain it with `engine train mcb`")
        try:
            net = MCBGrounder(MCBConfig.from_dict(payload["config"]))
            net.load_state_dict(payload["state_dict"])
            vocab = words_from_payload(payload["vocab"], device=device)
        except (KeyError, TypeError, RuntimeError, InvalidInputError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit the MCB grounding network ({type(exc).__name__}: {exc}); retrain it") from None
        return cls(net.to(device), vocab, manifest=manifest, name=str(manifest.metrics.get("method", path.stem)))

    @torch.no_grad()
    def attention(self, levels: dict[str, Any], size: tuple[int, int], texts: list[str]) -> np.ndarray:
        """Attention grids float32 ``[P, H, W]`` of ``texts`` over one image's backbone maps ``levels``; a text
        without a word is an :class:`InvalidInputError` (unknown words are ``<unk>`` for a vocabulary)."""
        fmap = visual_map(levels, self.config.levels)
        valid = valid_cells(size, tuple(fmap.shape[-2:]), stride=self.config.stride, max_size=self.config.max_size)
        ids, lengths = self.vocab.encode_batch([require_words(t) for t in texts])
        device = self.net.input_scale.device
        p = len(texts)
        r, _, _ = self.net(fmap[None].expand(p, -1, -1, -1).to(device), ids.to(device), lengths.to(device), valid[None].expand(p, -1, -1).to(device))
        return r.cpu().numpy()

    def heat(self, grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """One attention grid as a map over the original image (see :func:`attention_to_image`)."""
        c = self.config
        return attention_to_image(grid, size, stride=c.stride, offset=c.offset, max_size=c.max_size)

    def boxes(self, levels: dict[str, Any], size: tuple[int, int], texts: list[str], *, threshold: float | None = None) -> list[tuple[float, float, float, float]]:
        """One box per text (xyxy original pixels) by :func:`map_to_box` on its upsampled attention map."""
        grids = self.attention(levels, size, texts)
        thr = self.config.threshold if threshold is None else threshold
        return [map_to_box(self.heat(g, size), threshold=thr) for g in grids]
