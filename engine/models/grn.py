"""The GRN family: text-conditioned region embeddings for expressional region retrieval (GRN paper §3–4).

One module, :class:`RetrievalNet`, covers the Gated Residual Network and the paper's baselines and
ablations; :data:`METHODS` names each configuration and :func:`create_retrieval_net` builds it:

=======================  ==========================================================================
``visual``               GRN Table 2 (a): the pooled visual vector alone (the FAISS vector); no text
``vl-lstm``              Table 2 (b): an LSTM reads the region's visual feature, then the words
``vl-concat``            Table 2 (c): [visual vector, sentence vector] → one fully connected layer
``grn-no-residual``      Table 2/4: the language gating layer alone (Eq. 1)
``grn``                  the full GRN: self-attention text, gating + compose residual (Eq. 1–5), conv
``grn-lstm``             Table 3: ``grn`` with the LSTM text encoder
``grn-visual-residual``  Table 4: ``grn`` with the visual transformation shortcut (f = X)
``grn-fc``               Table 5: ``grn`` on the pooled vector (W = H = 1, linear layers)
=======================  ==========================================================================

Every method maps region maps ``X`` float ``[N, C, 7, 7]`` (the indexed RoIAlign maps) and the
query's text (its words: the frozen MiniLM's per-token features ``[B, T, 384]``, or with
``word_features="vocab"`` word ids ``[B, T]`` of a learned vocabulary, :mod:`engine.models.word_features`)
to L2-normalised embeddings; the similarity is their cosine (§3.3). The query text
gates the query region and every candidate alike (§3.4), so candidate embeddings depend on the query.

The GRN embedding is the spatial mean of ``Y = w_g Y_g + w_r Y_r`` (Eq. 5), L2-normalised.
Two exact rewrites keep scoring cheap without changing the maths (tests compare them with the
literal forms): a convolution over ``[X, tile(L)]`` is split into a convolution over ``X`` (once
per region) plus one over ``tile(L)`` (once per text), and the spatial mean of the compose branch's
last convolution is taken through its 9 taps instead of on the full output map.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import CheckpointError, InvalidInputError
from engine.models.text_encoders import LSTMEncoder, create_text_encoder, padding_mask, word_count
from engine.models.word_features import check_kind

__all__ = [
    "METHODS",
    "GRNConfig",
    "method_config",
    "LanguageGating",
    "GatedResidualNetwork",
    "ConcatFusion",
    "VisualLanguageLSTM",
    "RetrievalNet",
    "create_retrieval_net",
    "grn_loss",
    "conv_mean",
]

_EPS = 1e-12


@dataclass(frozen=True)
class GRNConfig:
    """What a :class:`RetrievalNet` is.

    Attributes:
        method: the method name (one of :data:`METHODS` for the shipped ones).
        fusion: ``visual`` (no text), ``grn``, ``concat`` or ``lstm`` (the Visual-Language LSTM).
        text_encoder: ``attention`` (GRN Fig. 4) or ``lstm``; ``vl-lstm`` has its own LSTM.
        residual: ``compose`` (Eq. 4), ``visual`` (f = X) or ``none`` (gating only).
        variant: ``conv`` (on the 7×7 map, 3×3 convolutions) or ``fc`` (on the pooled vector, linear layers).
        visual_dim: channels ``C`` of the region maps (112 for EfficientNet-Lite0 ``c4``).
        text_dim: sentence vector size ``D`` (and word embedding size).
        hidden: channels after ``W_g1`` / ``W_r1``.
        embed_dim: output size of the ``concat`` and ``lstm`` fusions (GRN keeps ``C``).
        temperature: τ of the loss, ``softmax(cos / τ)`` (Eq. 6).
        word_features: where the words' features come from (not ``text_encoder``, the sentence encoder):
            ``minilm`` (the frozen English encoder) or ``vocab`` (a vocabulary of the training text, the ablation).
    """

    method: str = "grn"
    fusion: str = "grn"
    text_encoder: str = "attention"
    residual: str = "compose"
    variant: str = "conv"
    visual_dim: int = 112
    text_dim: int = 128
    hidden: int = 64
    embed_dim: int = 128
    temperature: float = 0.1
    word_features: str = "minilm"

    def __post_init__(self) -> None:
        check_kind(self.word_features)
        allowed = {"fusion": ("visual", "grn", "concat", "lstm"), "text_encoder": ("attention", "lstm"), "residual": ("compose", "visual", "none"), "variant": ("conv", "fc")}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise InvalidInputError(f"GRNConfig.{key}={getattr(self, key)!r} is not allowed; choose one of {', '.join(values)}")
        for key in ("visual_dim", "text_dim", "hidden", "embed_dim"):
            if int(getattr(self, key)) < 1:
                raise InvalidInputError(f"GRNConfig.{key} must be >= 1, got {getattr(self, key)}")
        if not self.temperature > 0:
            raise InvalidInputError(f"GRNConfig.temperature must be > 0, got {self.temperature}")

    @property
    def uses_text(self) -> bool:
        return self.fusion != "visual"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GRNConfig":
        """A stored config; one written before MiniLM (no ``word_features``) reads its vocabulary."""
        from engine.models.checkpoint import with_word_features

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"the checkpoint's GRN config has unknown keys {unknown}; it was written by a newer engine — upgrade or retrain")
        return cls(**with_word_features(cls, dict(data)))


METHODS: dict[str, GRNConfig] = {
    "visual": GRNConfig(method="visual", fusion="visual"),
    "vl-lstm": GRNConfig(method="vl-lstm", fusion="lstm", text_encoder="lstm"),
    "vl-concat": GRNConfig(method="vl-concat", fusion="concat"),
    "grn-no-residual": GRNConfig(method="grn-no-residual", residual="none"),
    "grn": GRNConfig(method="grn"),
    "grn-lstm": GRNConfig(method="grn-lstm", text_encoder="lstm"),
    "grn-visual-residual": GRNConfig(method="grn-visual-residual", residual="visual"),
    "grn-fc": GRNConfig(method="grn-fc", variant="fc"),
}
"""Every method of GRN Table 2 and the ablations of Tables 3–5, by name."""


def method_config(method: str, **overrides: Any) -> GRNConfig:
    """The configuration of ``method`` (a key of :data:`METHODS`), with ``overrides`` applied."""
    if method not in METHODS:
        raise InvalidInputError(f"method {method!r} is not known; choose one of {', '.join(METHODS)}")
    return GRNConfig(**{**METHODS[method].to_dict(), **overrides})


# --------------------------------------------------------------------------- helpers


def conv_mean(z: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(z).mean((2, 3))`` for a 3×3, stride-1, padding-1 convolution, without the full output map.

    Each tap ``(ky, kx)`` sees the sum of ``z`` over the input rows and columns it reaches (all but the
    last or first row/column at the border taps), so the mean is 9 small matrix products. ``[P, C_out]``.
    """
    h, w = z.shape[-2:]
    rows = torch.stack([z[:, :, :-1].sum(2), z.sum(2), z[:, :, 1:].sum(2)], dim=2)  # [P, C, 3, W]
    taps = torch.stack([rows[..., :-1].sum(-1), rows.sum(-1), rows[..., 1:].sum(-1)], dim=3)  # [P, C, 3, 3]
    out = torch.einsum("pcij,ocij->po", taps, conv.weight) / (h * w)
    return out + conv.bias if conv.bias is not None else out


def _tile_conv(conv: nn.Conv2d, text: Tensor, size: tuple[int, int]) -> Tensor:
    """``conv`` (no bias) applied to the text vectors ``[Q, D]`` tiled over a ``size`` map: ``[Q, H, h, w]``."""
    tiled = text[:, :, None, None].expand(-1, -1, *size)
    return F.conv2d(tiled, conv.weight, None, padding=conv.padding)


def _normalize(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _index(n: int, index: Tensor | None, device: torch.device) -> Tensor:
    return torch.arange(n, device=device) if index is None else index.to(device)


# --------------------------------------------------------------------------- GRN


class _TextConcatLayer(nn.Module):
    """The first layer of Eq. 1 / Eq. 4, ``W * [X, L]``, split as ``W_x * X + W_l * tile(L)``.

    ``spatial=True``: 3×3 convolutions over the map (``L`` tiled over it); ``False``: linear layers.
    """

    def __init__(self, *, visual_dim: int, text_dim: int, out_dim: int, spatial: bool) -> None:
        super().__init__()
        self.spatial = spatial
        if spatial:
            self.visual = nn.Conv2d(visual_dim, out_dim, 3, padding=1)
            self.text = nn.Conv2d(text_dim, out_dim, 3, padding=1, bias=False)
        else:
            self.visual = nn.Linear(visual_dim, out_dim)
            self.text = nn.Linear(text_dim, out_dim, bias=False)

    def visual_term(self, x: Tensor) -> Tensor:
        return self.visual(x)

    def text_term(self, text: Tensor, size: tuple[int, int] | None) -> Tensor:
        return _tile_conv(self.text, text, size) if self.spatial else self.text(text)

    def concat_weight(self) -> Tensor:
        """The weight of the equivalent single layer over ``[X, L]`` (for reference checks)."""
        return torch.cat([self.visual.weight, self.text.weight], dim=1)


class LanguageGating(nn.Module):
    """Language gating layer, Eq. 1: ``Y_g = σ(W_g2 * ReLU(W_g1 * [X, L])) ⊙ X``.

    Args:
        visual_dim: ``C``; text_dim: ``D``; hidden: channels of ``W_g1``'s output.
        spatial: True for the conv variant (3×3 convolutions, ``L`` tiled over the map), False for fc.
    """

    def __init__(self, *, visual_dim: int, text_dim: int, hidden: int, spatial: bool) -> None:
        super().__init__()
        self.first = _TextConcatLayer(visual_dim=visual_dim, text_dim=text_dim, out_dim=hidden, spatial=spatial)
        self.second = nn.Conv2d(hidden, visual_dim, 3, padding=1) if spatial else nn.Linear(hidden, visual_dim)

    def gate(self, x_term: Tensor, l_term: Tensor) -> Tensor:
        """``σ(W_g2 * ReLU(W_g1 * [X, L]))`` from the two halves of the first layer (already paired)."""
        return torch.sigmoid(self.second(F.relu(x_term + l_term)))

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        size = tuple(x.shape[-2:]) if self.first.spatial else None
        # Eq. 1: Y_g = σ(W_g2 * ReLU(W_g1 * [X, L])) ⊙ X
        return self.gate(self.first.visual_term(x), self.first.text_term(text, size)) * x


class _ComposeTransformation(nn.Module):
    """Compose transformation of the residual layer, Eq. 4: ``Y_r = W_r2 * ReLU(W_r1 * [X, L])``."""

    def __init__(self, *, visual_dim: int, text_dim: int, hidden: int, spatial: bool) -> None:
        super().__init__()
        self.first = _TextConcatLayer(visual_dim=visual_dim, text_dim=text_dim, out_dim=hidden, spatial=spatial)
        self.second = nn.Conv2d(hidden, visual_dim, 3, padding=1) if spatial else nn.Linear(hidden, visual_dim)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        size = tuple(x.shape[-2:]) if self.first.spatial else None
        return self.second(F.relu(self.first.visual_term(x) + self.first.text_term(text, size)))


class GatedResidualNetwork(nn.Module):
    """GRN, §3.2: language gating (Eq. 1) plus a residual layer (Eq. 2–4), weighted by ``w_g``, ``w_r`` (Eq. 5).

    Args:
        visual_dim: channels ``C`` of ``X``; text_dim: size ``D`` of ``L``; hidden: inner channels.
        residual: ``compose`` (``f = Eq. 4``), ``visual`` (``f = X``) or ``none`` (``Y = w_g Y_g``).
        spatial: True: ``X`` is a map ``[N, C, h, w]`` and the layers are 3×3 convolutions;
            False: ``X`` is a vector ``[N, C]`` (W = H = 1) and the layers are linear.

    :meth:`forward` gives the full output ``Y`` (a map or a vector); :meth:`pooled` its spatial
    mean for given (region, text) pairs, which is what the embedding uses.
    """

    def __init__(self, *, visual_dim: int, text_dim: int, hidden: int, residual: str = "compose", spatial: bool = True) -> None:
        super().__init__()
        if residual not in ("compose", "visual", "none"):
            raise InvalidInputError(f"residual {residual!r} is not known; choose compose, visual or none")
        self.spatial = spatial
        self.residual = residual
        self.gating = LanguageGating(visual_dim=visual_dim, text_dim=text_dim, hidden=hidden, spatial=spatial)
        self.compose = _ComposeTransformation(visual_dim=visual_dim, text_dim=text_dim, hidden=hidden, spatial=spatial) if residual == "compose" else None
        # Eq. 5: learnable weights of the gated and the residual feature, both 1 at the start (§3.2)
        self.w_g = nn.Parameter(torch.ones(()))
        self.w_r = nn.Parameter(torch.ones(())) if residual != "none" else None

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        """``Y`` for aligned rows of ``x`` and ``text`` (``[N, C, h, w]`` or ``[N, C]``, and ``[N, D]``)."""
        y = self.w_g * self.gating(x, text)  # Eq. 5, first term: w_g Y_g
        if self.residual == "compose":
            y = y + self.w_r * self.compose(x, text)  # Eq. 2/3 with f = Eq. 4
        elif self.residual == "visual":
            y = y + self.w_r * x  # Eq. 3 with the visual transformation f(X, L) = X
        return y

    def visual_terms(self, x: Tensor) -> dict[str, Tensor]:
        """The text-independent parts of one set of regions (computed once, reused for every text)."""
        terms = {"x": x, "g": self.gating.first.visual_term(x)}
        if self.compose is not None:
            terms["r"] = self.compose.first.visual_term(x)
        return terms

    def text_terms(self, text: Tensor, size: tuple[int, int] | None) -> dict[str, Tensor]:
        """The region-independent parts of one set of texts ``[Q, D]``."""
        terms = {"g": self.gating.first.text_term(text, size)}
        if self.compose is not None:
            terms["r"] = self.compose.first.text_term(text, size)
        return terms

    def pooled(self, vis: Mapping[str, Tensor], txt: Mapping[str, Tensor], map_index: Tensor, text_index: Tensor) -> Tensor:
        """Spatial mean of ``Y`` for the pairs (``vis`` row ``map_index[p]``, ``txt`` row ``text_index[p]``): ``[P, C]``."""
        x = vis["x"][map_index]
        gate = self.gating.gate(vis["g"][map_index], txt["g"][text_index])
        y_g = gate * x  # Eq. 1
        mean = (lambda t: t.mean((2, 3))) if self.spatial else (lambda t: t)
        y = self.w_g * mean(y_g)  # Eq. 5 (the mean is linear, so it is taken per term)
        if self.compose is not None:
            z = F.relu(vis["r"][map_index] + txt["r"][text_index])  # Eq. 4, inner part
            y = y + self.w_r * (conv_mean(z, self.compose.second) if self.spatial else self.compose.second(z))
        elif self.residual == "visual":
            y = y + self.w_r * mean(x)
        return y


# --------------------------------------------------------------------------- baselines


class ConcatFusion(nn.Module):
    """Visual-Language Concat Feature (GRN §4.2 (c)): ``W [v, L] + b`` on the pooled visual vector ``v``."""

    def __init__(self, *, visual_dim: int, text_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.layer = _TextConcatLayer(visual_dim=visual_dim, text_dim=text_dim, out_dim=embed_dim, spatial=False)

    def forward(self, v: Tensor, text: Tensor) -> Tensor:
        return self.layer.visual_term(v) + self.layer.text_term(text, None)


class VisualLanguageLSTM(nn.Module):
    """Visual-Language LSTM Feature (GRN §4.2 (b)): an LSTM reads the region's visual vector (projected to
    the word size) at the first step, then the words; its final hidden state is the representation."""

    def __init__(self, *, vocab_size: int, visual_dim: int, word_dim: int, embed_dim: int, word_features: str = "minilm") -> None:
        super().__init__()
        self.visual = nn.Linear(visual_dim, word_dim)
        self.lstm = LSTMEncoder(vocab_size=vocab_size, word_dim=word_dim, dim=embed_dim, word_features=word_features)

    def forward(self, v: Tensor, ids: Tensor) -> Tensor:
        """``[N, embed_dim]`` of pooled regions ``v`` ``[N, C]`` and their texts' zero-padded words ``ids``
        (``[N, T]``, or MiniLM features ``[N, T, 384]``); the zero padding tells the lengths."""
        return self.lstm(ids, word_count(ids), prefix=self.visual(v))


# --------------------------------------------------------------------------- the family


class RetrievalNet(nn.Module):
    """A text encoder plus one fusion of :class:`GRNConfig`, mapping (region maps, query text) to embeddings.

    Use :func:`create_retrieval_net`. Two steps:

    * :meth:`text_features` ``(ids [B, T], lengths [B])`` (or MiniLM features ``[B, T, 384]`` for ``ids``)
      → the text's representation: sentence vectors ``[B, D]``; for ``vl-lstm`` the words ``[B, T]`` /
      ``[B, T, 384]`` themselves (0-padded), since its LSTM reads the region first; for ``visual`` an empty ``[B, 0]``.
    * :meth:`embed` ``(maps [M, C, h, w], text [Q, …], map_index [P], text_index [P])`` → L2-normalised
      embeddings ``[P, E]`` of the pairs (default: aligned rows, or every map with a single text).
    """

    def __init__(self, *, config: GRNConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        c = config
        # one scalar scale of the input maps, set from the training data (cosine ignores it for `visual`)
        self.register_buffer("input_scale", torch.ones(()))
        self.text_encoder: nn.Module | None = None
        self.fusion: nn.Module | None = None
        if c.fusion in ("grn", "concat"):
            self.text_encoder = create_text_encoder(c.text_encoder, vocab_size=vocab_size, dim=c.text_dim, word_features=c.word_features)
        if c.fusion == "grn":
            self.fusion = GatedResidualNetwork(visual_dim=c.visual_dim, text_dim=c.text_dim, hidden=c.hidden, residual=c.residual, spatial=c.variant == "conv")
        elif c.fusion == "concat":
            self.fusion = ConcatFusion(visual_dim=c.visual_dim, text_dim=c.text_dim, embed_dim=c.embed_dim)
        elif c.fusion == "lstm":
            self.fusion = VisualLanguageLSTM(vocab_size=vocab_size, visual_dim=c.visual_dim, word_dim=c.text_dim, embed_dim=c.embed_dim, word_features=c.word_features)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim if self.config.fusion in ("concat", "lstm") else self.config.visual_dim

    def text_features(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """The representation of a batch of texts (see the class doc)."""
        if self.config.fusion == "visual":
            return torch.zeros(ids.shape[0], 0, device=ids.device)
        if self.config.fusion == "lstm":
            mask = padding_mask(ids, lengths)
            return ids.masked_fill(~mask.view(*mask.shape, *([1] * (ids.ndim - 2))), 0)
        assert self.text_encoder is not None
        return self.text_encoder(ids, lengths)

    def prepare(self, maps: Tensor) -> dict[str, Tensor]:
        """Text-independent work on region maps ``[M, C, h, w]`` (scaled input, first-layer terms).

        Reuse the result for many texts with :meth:`embed_prepared`.
        """
        if maps.ndim != 4 or maps.shape[1] != self.config.visual_dim:
            raise InvalidInputError(f"region maps must have shape [N, {self.config.visual_dim}, h, w], got {tuple(maps.shape)}")
        x = maps.float() * self.input_scale
        if self.config.fusion == "grn":
            assert isinstance(self.fusion, GatedResidualNetwork)
            return self.fusion.visual_terms(x if self.fusion.spatial else x.mean((2, 3)))
        return {"v": x.mean((2, 3))}

    def embed_prepared(self, prepared: Mapping[str, Tensor], text: Tensor, map_index: Tensor | None = None, text_index: Tensor | None = None) -> Tensor:
        """Embeddings ``[P, E]`` of (prepared region ``map_index[p]``, text ``text_index[p]``) pairs."""
        first = next(iter(prepared.values()))
        m = first.shape[0]
        device = first.device
        if map_index is None and text_index is None and text.shape[0] == 1:
            text_index = torch.zeros(m, dtype=torch.long, device=device)
        mi = _index(m, map_index, device)
        ti = _index(text.shape[0], text_index, device)
        if mi.shape != ti.shape:
            raise InvalidInputError(f"map_index and text_index must pair up, got {tuple(mi.shape)} and {tuple(ti.shape)}")
        fusion = self.config.fusion
        if fusion == "visual":
            out = prepared["v"][mi]
        elif fusion == "grn":
            assert isinstance(self.fusion, GatedResidualNetwork)
            size = tuple(prepared["x"].shape[-2:]) if self.fusion.spatial else None
            out = self.fusion.pooled(prepared, self.fusion.text_terms(text, size), mi, ti)
        elif fusion == "concat":
            assert isinstance(self.fusion, ConcatFusion)
            out = self.fusion.layer.visual_term(prepared["v"])[mi] + self.fusion.layer.text_term(text, None)[ti]
        else:
            assert isinstance(self.fusion, VisualLanguageLSTM)
            out = self.fusion(prepared["v"][mi], text[ti])
        return _normalize(out)

    def embed(self, maps: Tensor, text: Tensor, map_index: Tensor | None = None, text_index: Tensor | None = None) -> Tensor:
        """L2-normalised embeddings ``[P, E]`` of region maps gated by texts (see the class doc)."""
        return self.embed_prepared(self.prepare(maps), text, map_index, text_index)


def create_retrieval_net(config: GRNConfig, *, vocab_size: int) -> RetrievalNet:
    """Build the :class:`RetrievalNet` that ``config`` describes (weights freshly initialised); ``vocab_size``
    counts a vocabulary's words with ``<pad>`` and ``<unk>`` (unused with MiniLM)."""
    if config.uses_text and config.word_features == "vocab" and vocab_size < 3:
        raise InvalidInputError(f"the vocabulary has {vocab_size} entries; a text-aware model needs words beyond <pad> and <unk>")
    return RetrievalNet(config=config, vocab_size=vocab_size)


def grn_loss(query: Tensor, candidates: Tensor, valid: Tensor, *, temperature: float, extra_negatives: Tensor | None = None) -> Tensor:
    """Eq. 6 with ``Sim = exp(cos / τ)``: ``-mean_i log(Sim(ϕ_i, φ⁺_i) / Σ_j Sim(ϕ_i, φ_j))``.

    Args:
        query: ``[B, E]`` normalised query embeddings ``ϕ_i``.
        candidates: ``[B, K, E]`` normalised candidate embeddings, column 0 the positive ``φ⁺_i``.
        valid: bool ``[B, K]``, which candidates take part (column 0 must be True).
        extra_negatives: optional ``[B]`` cosines of one more negative per query, computed
            elsewhere (the wrong-text negative of training); ``-inf`` where a query has none.

    The sum in the denominator runs over the positive and the valid negatives, so with one negative
    it is the soft triplet loss ``log(1 + exp((cos⁻ − cos⁺) / τ))`` as §3.3 says of N = 2. The
    exponential keeps every term positive (a raw cosine can be negative); ``τ`` scales it.
    """
    logits = torch.einsum("be,bke->bk", query, candidates) / temperature
    logits = logits.masked_fill(~valid, float("-inf"))
    if extra_negatives is not None:
        logits = torch.cat([logits, (extra_negatives / temperature).unsqueeze(1)], dim=1)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()
