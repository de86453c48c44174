"""SAN, the Saliency-guided Attention Network (SAN paper §3): joint image/region ↔ sentence embeddings.

Visual side, for an image or a region given as its RoIAlign map ``X`` ``[N, C, 7, 7]`` (the indexed
``c4`` maps; whole images use the full-image box) and its saliency grid ``S2`` ``[N, 7, 7]`` (the
saliency network's ``S1`` logits pooled over the same box, §3.2.2):

* ``v_g = P_g · mean_i v_i`` (Eq. 1), the global visual feature (GV);
* ``a_v = L1norm(σ(S2))``, ``v_s = P_s · Σ_i a_v,i v_i`` (Eq. 7), the SVA vector (SV);
* ``v = (v_g + v_s) / 2``, the fused visual feature (FV).

Text side, words ``w_j`` → embeddings ``e_j`` (the frozen MiniLM's word-piece features through a learned
linear layer, or with ``word_features="vocab"`` a learned word table: :mod:`engine.models.word_features`) → a bidirectional GRU, ``t_j = (h_j^f + h_j^b) / 2``
(Eq. 2), ``t_g = mean_j t_j`` (Eq. 3, GT). STA (Eq. 8–9): ``m_f = σ(U_v v + U_t t_g)`` (gated
fusion); ``h_j = tanh(W0 m_f) ⊙ tanh(W1 t_j)``, ``a_t = softmax_j(W2 h_j)``, ``t_s = Σ_j a_t,j t_j``;
the fused text ``t = (t_g + t_s) / 2`` (FT(G-S)). The ablation IT uses the same attention with the
sentence's own ``t_g`` as its guidance instead of ``m_f`` (DAN-style self attention, [28]).

The similarity is the cosine; the loss is the bidirectional triplet loss with margin γ (Eq. 10) with
the hardest in-batch negatives (VSE++). With FT the text representation depends on the image it is
compared with, so :meth:`SANet.score_matrix` computes ``t`` for every (visual, text) pair.

Text-only search: the FV vector of every indexed region is text-independent and goes to FAISS; the
query's ``t_g`` searches it (stage 1) — trained with its own triplet term (weight ``global_weight``) so
that this is a real retrieval path — and the full STA reranks the top candidates (stage 2).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from engine.errors import CheckpointError, InvalidInputError
from engine.models.text_encoders import padding_mask
from engine.models.vocab import Vocabulary, tokenize
from engine.models.word_features import check_kind, word_embedding

__all__ = ["MODEL_NAME", "MODEL_VERSION", "METHODS", "SANConfig", "SANet", "SANModel", "method_config", "triplet_loss"]

log = logging.getLogger(__name__)

MODEL_NAME = "san"
MODEL_VERSION = "san-1"
_EPS = 1e-12


@dataclass(frozen=True)
class SANConfig:
    """What a :class:`SANet` is.

    ``visual``: ``gv`` | ``sv`` | ``fv``; ``text``: ``gt`` | ``it`` | ``ft`` (SAN Table 3's columns).
    ``visual_dim``: channels of the region maps; ``word_dim``: word embedding size; ``embed_dim``: the
    BiGRU's hidden size, which is the joint space ``k``; ``attn_dim``: size of ``W0``/``W1``'s output;
    ``margin``: γ of Eq. 10; ``global_weight``: weight of the ``(v, t_g)`` triplet term that trains the
    text-only search path (0 turns it off); ``word_features``: ``minilm`` or ``vocab`` (the ablation).
    """

    method: str = "fv+ft"
    visual: str = "fv"
    text: str = "ft"
    visual_dim: int = 112
    word_dim: int = 128
    embed_dim: int = 128
    attn_dim: int = 64
    margin: float = 0.2
    global_weight: float = 0.5
    word_features: str = "minilm"

    def __post_init__(self) -> None:
        check_kind(self.word_features)
        if self.visual not in ("gv", "sv", "fv"):
            raise InvalidInputError(f"SANConfig.visual={self.visual!r} is not allowed; choose gv, sv or fv")
        if self.text not in ("gt", "it", "ft"):
            raise InvalidInputError(f"SANConfig.text={self.text!r} is not allowed; choose gt, it or ft")
        for key in ("visual_dim", "word_dim", "embed_dim", "attn_dim"):
            if int(getattr(self, key)) < 1:
                raise InvalidInputError(f"SANConfig.{key} must be >= 1, got {getattr(self, key)}")
        if not self.margin > 0:
            raise InvalidInputError(f"SANConfig.margin must be > 0, got {self.margin}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SANConfig":
        """A stored config; one written before MiniLM (no ``word_features``) reads its vocabulary."""
        from engine.models.checkpoint import with_word_features

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"the SAN checkpoint's config has unknown keys {unknown}; it was written by a newer engine — retrain with `engine train san`")
        return cls(**with_word_features(cls, dict(data)))


METHODS: dict[str, SANConfig] = {
    "gv+gt": SANConfig(method="gv+gt", visual="gv", text="gt"),
    "sv+gt": SANConfig(method="sv+gt", visual="sv", text="gt"),
    "fv+gt": SANConfig(method="fv+gt", visual="fv", text="gt"),
    "fv+it": SANConfig(method="fv+it", visual="fv", text="it"),
    "fv+ft": SANConfig(method="fv+ft", visual="fv", text="ft"),
}
"""SAN Tables 4–6's ablation rows by name; ``fv+ft`` is the full SAN (FV + FT(G-S))."""


def method_config(method: str, **overrides: Any) -> SANConfig:
    if method not in METHODS:
        raise InvalidInputError(f"SAN method {method!r} is not known; choose one of {', '.join(METHODS)}")
    return SANConfig(**{**METHODS[method].to_dict(), **overrides})


def _normalize(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(_EPS)


class SANet(nn.Module):
    """The SAN network (see the module doc). ``vocab_size`` counts ``<pad>`` = 0 and ``<unk>`` (unused with MiniLM)."""

    def __init__(self, config: SANConfig, *, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        c, k, a = config.visual_dim, config.embed_dim, config.attn_dim
        self.register_buffer("input_scale", torch.ones(()))
        self.p_global = nn.Linear(c, k)  # P^(g), Eq. 1
        self.p_salient = nn.Linear(c, k)  # P^(s), Eq. 7
        self.embedding = word_embedding(config.word_features, vocab_size=vocab_size, dim=config.word_dim)  # W_e
        self.gru = nn.GRU(config.word_dim, k, batch_first=True, bidirectional=True)  # Eq. 2
        self.u_v = nn.Linear(k, k)  # U_v, Eq. 8
        self.u_t = nn.Linear(k, k)  # U_t, Eq. 8
        self.w0 = nn.Linear(k, a)  # W_t^(0), Eq. 9
        self.w1 = nn.Linear(k, a)  # W_t^(1), Eq. 9
        self.w2 = nn.Linear(a, 1)  # W_t^(2), Eq. 9

    # ------------------------------------------------------------------ visual side

    def visual_parts(self, maps: Tensor, saliency: Tensor) -> tuple[Tensor, Tensor]:
        """``(v_g, v_s)`` ``[N, k]`` of region maps ``[N, C, h, w]`` and saliency logits ``[N, h, w]`` (Eq. 1, 7)."""
        x = maps.float().flatten(2) * self.input_scale  # [N, C, M]
        v_g = self.p_global(x.mean(2))  # Eq. 1
        a_v = torch.sigmoid(saliency.float().flatten(1))  # Eq. 7: sigmoid, then L1 normalisation
        a_v = a_v / a_v.sum(1, keepdim=True).clamp_min(_EPS)
        v_s = self.p_salient(torch.einsum("ncm,nm->nc", x, a_v))  # Eq. 7
        return v_g, v_s

    def visual(self, maps: Tensor, saliency: Tensor) -> Tensor:
        """The visual representation ``[N, k]`` of the configured kind (GV, SV, or FV = (v_g + v_s) / 2); not normalised."""
        v_g, v_s = self.visual_parts(maps, saliency)
        kind = self.config.visual
        return v_g if kind == "gv" else v_s if kind == "sv" else (v_g + v_s) / 2

    # ------------------------------------------------------------------ text side

    def words(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(t_j [B, L, k], mask [B, L], t_g [B, k])``: BiGRU word features (Eq. 2) and their mean (Eq. 3).

        ``ids``: word ids long ``[B, L]``, or with MiniLM its word features float ``[B, L, 384]``."""
        emb = self.embedding(ids)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        k = self.config.embed_dim
        t = (out[..., :k] + out[..., k:]) / 2  # Eq. 2: t_j = (h_j^f + h_j^b) / 2
        mask = padding_mask(ids, lengths)
        m = mask.unsqueeze(-1).to(t.dtype)
        t_g = (t * m).sum(1) / m.sum(1).clamp_min(1.0)  # Eq. 3
        return t, mask, t_g

    def _attend(self, guide: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        """Eq. 9 for a guidance ``[V, T, k]`` (one per visual and text) and words ``t [T, L, k]``: ``t_s [V, T, k]``."""
        g = torch.tanh(self.w0(guide)) * self.w2.weight[0]  # [V, T, a]; W2 folded in (it is linear)
        w = torch.tanh(self.w1(t))  # [T, L, a]
        scores = torch.einsum("vta,tla->vtl", g, w) + self.w2.bias
        attn = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1)  # a_t,j
        return torch.einsum("vtl,tlk->vtk", attn, t)  # t_s = Σ_j a_t,j t_j

    def word_attention(self, v: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """STA's word weights ``a_t`` ``[V, T, L]`` of every text for every visual vector ``v`` (inspection)."""
        t, mask, t_g = self.words(ids, lengths)
        guide = torch.sigmoid(self.u_v(v)[:, None] + self.u_t(t_g)[None])
        g = torch.tanh(self.w0(guide)) * self.w2.weight[0]
        scores = torch.einsum("vta,tla->vtl", g, torch.tanh(self.w1(t))) + self.w2.bias
        return torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1)

    def text_matrix(self, v: Tensor, ids: Tensor, lengths: Tensor, words: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Text representations ``[V, T, k]`` of every text as compared with every visual vector ``v [V, k]``.

        GT and IT do not depend on ``v`` (they are broadcast); FT(G-S) does, through STA's ``m_f``.
        ``words``: :meth:`words` of the texts when already computed.
        """
        t, mask, t_g = words if words is not None else self.words(ids, lengths)
        kind = self.config.text
        n_v = v.shape[0]
        if kind == "gt":
            return t_g[None].expand(n_v, -1, -1)
        if kind == "it":
            t_i = self._attend(t_g[None], t, mask)[0]  # guidance: the sentence itself (IT)
            return t_i[None].expand(n_v, -1, -1)
        m_f = torch.sigmoid(self.u_v(v)[:, None] + self.u_t(t_g)[None])  # Eq. 8: gated fusion unit
        t_s = self._attend(m_f, t, mask)  # Eq. 9
        return (t_g[None] + t_s) / 2  # FT(G-S): t = avg(t_g, t_s)

    def global_text(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``t_g`` ``[T, k]``: the text-only representation (stage 1 of text-only search)."""
        return self.words(ids, lengths)[2]

    # ------------------------------------------------------------------ scores

    def score_matrix(self, v: Tensor, ids: Tensor, lengths: Tensor, words: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Cosine similarities ``[V, T]`` of visual vectors ``v`` (from :meth:`visual`) and texts."""
        t = self.text_matrix(v, ids, lengths, words)
        return torch.einsum("vk,vtk->vt", _normalize(v), _normalize(t))

    def global_score_matrix(self, v: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """Cosine similarities ``[V, T]`` of ``v`` and ``t_g`` (the text-only path)."""
        return _normalize(v) @ _normalize(self.global_text(ids, lengths)).T

    def payload(self, vocab: Any) -> dict[str, Any]:
        return {"state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}, "config": self.config.to_dict(), "vocab": vocab.to_dict()}


def triplet_loss(scores: Tensor, positive_mask: Tensor, margin: float) -> Tensor:
    """Eq. 10 with the hardest in-batch negatives, both directions, averaged over the batch.

    ``scores`` ``[B, B]``: visual ``i`` against text ``j``, the pairs on the diagonal; ``positive_mask``
    ``[B, B]`` True where ``j`` also describes ``i`` (e.g. the same sentence): never a negative.
    """
    pos = scores.diagonal()
    masked = scores.masked_fill(positive_mask, float("-inf"))
    hard_text = masked.max(1).values  # hardest T^- per visual
    hard_visual = masked.max(0).values  # hardest I^- per text
    loss_t = F.relu(margin - pos + hard_text).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    loss_v = F.relu(margin - pos + hard_visual).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return (loss_t + loss_v).mean()


_RECENT_TEXTS = 16  # texts whose word features SANModel keeps


class SANModel:
    """A trained SAN ready for inference: the network, its vocabulary and manifest.

    * :meth:`visual` — text-independent visual vectors ``[N, k]`` of region maps and saliency grids
      (what the index stores in its ``san`` array and FAISS file);
    * :meth:`text_vector` — a query's ``t_g``, L2-normalised: the text-only stage-1 query;
    * :meth:`score` — the full model's cosine of a text and each candidate's visual vector (stage 2:
      with FT(G-S) the text attention depends on each candidate).
    """

    def __init__(self, *, net: SANet, vocab: Any, manifest: Any = None, device: str | torch.device = "cpu") -> None:
        from engine.device import resolve_device

        self.device = resolve_device(device) if isinstance(device, str) else device
        self.net = net.to(self.device).eval()
        self.vocab = vocab
        self.manifest = manifest
        self._recent: dict[str, tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]] = {}  # see _words

    @classmethod
    def from_checkpoint(cls, path: Path | str | None = None, *, device: str | torch.device = "cpu") -> "SANModel":
        """Load a SAN checkpoint (``None``: the shipped ``san.pt``); :class:`CheckpointError` when it is
        missing, corrupt or not a SAN model."""
        from engine.models.checkpoint import checkpoint_path, load_checkpoint
        from engine.models.word_features import words_from_payload

        path = checkpoint_path(path, default="san")
        manifest, payload = load_checkpoint(path, expected_model=MODEL_NAME)
        if manifest.version != MODEL_VERSION:
            raise CheckpointError(f"checkpoint {path} is SAN version {manifest.version!r}, this engine reads {MODEL_VERSION!r}; retrain it with `engine train san`")
        try:
            config = SANConfig.from_dict(payload["config"])
            vocab = words_from_payload(payload["vocab"], device=device)
            net = SANet(config, vocab_size=len(vocab))
            net.load_state_dict(payload["state_dict"])
        except (KeyError, TypeError, RuntimeError, InvalidInputError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit SAN ({type(exc).__name__}: {exc}); retrain it") from None
        return cls(net=net, vocab=vocab, manifest=manifest, device=device)

    def share_words(self, words: Any) -> None:
        """Read texts through ``words`` (an engine's one :class:`~engine.models.word_features.MiniLMWords`, whose
        cache the open vocabulary shares) when this SAN reads MiniLM features too; a vocabulary SAN keeps its own."""
        if getattr(self.vocab, "kind", "vocab") == "minilm" and getattr(words, "kind", None) == "minilm":
            self.vocab = words
            self._recent.clear()

    @property
    def method(self) -> str:
        return self.net.config.method

    @property
    def dim(self) -> int:
        return self.net.config.embed_dim

    @property
    def version(self) -> str:
        tail = f":{self.manifest.sha256[:12]}" if self.manifest is not None and self.manifest.sha256 else ""
        return f"{MODEL_VERSION}:{self.method}{tail}"

    def check_saliency(self, saliency: Any) -> None:
        """A clear error when the saliency network is not the one this SAN was trained with."""
        trained = (self.manifest.config or {}).get("saliency") if self.manifest is not None else None
        if trained and trained != saliency.version:
            raise CheckpointError(f"SAN {self.version} was trained with saliency network {trained}, but {saliency.version} is loaded; retrain SAN with `engine train san` or use the matching saliency checkpoint")

    @torch.no_grad()
    def visual(self, maps: Any, saliency: Any) -> Any:
        """Visual vectors float32 ``[N, k]`` (not normalised) of maps ``[N, C, 7, 7]`` and saliency logits ``[N, 7, 7]``."""
        import numpy as np

        maps = torch.as_tensor(maps)
        if len(maps) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.net.visual(maps.to(self.device).float(), torch.as_tensor(saliency).to(self.device).float()).cpu().numpy().astype(np.float32)

    def _encode(self, text: str) -> tuple[Tensor, Tensor]:
        if text is None or not str(text).strip():
            raise InvalidInputError("--text is empty; describe the region in words, e.g. --text \"a red circle left of a blue square\"")
        ids, lengths = self.vocab.encode_batch([text])
        if isinstance(self.vocab, Vocabulary) and all(w not in self.vocab for w in tokenize(text)):
            raise InvalidInputError(f"none of the words of {text!r:.60} is known to the SAN model; describe the region with words like 'red circle left of a blue square'")
        return ids.to(self.device), lengths.to(self.device)

    def _words(self, text: str) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """``(ids, lengths, SANet.words)`` of ``text``; the last few texts are kept, since one query asks for
        its text's words twice (the text vector, then the stage-2 scores)."""
        found = self._recent.pop(text, None)
        if found is None:
            ids, lengths = self._encode(text)
            found = (ids, lengths, self.net.words(ids, lengths))
        self._recent[text] = found  # most recent last
        while len(self._recent) > _RECENT_TEXTS:
            self._recent.pop(next(iter(self._recent)))
        return found

    @torch.no_grad()
    def text_vector(self, text: str) -> Any:
        """The query's ``t_g`` float32 ``[k]``, L2-normalised (the text-only FAISS query)."""
        return _normalize(self._words(text)[2][2])[0].cpu().numpy()

    @torch.no_grad()
    def score(self, text: str, vectors: Any) -> Any:
        """Full-model cosine float32 ``[N]`` of ``text`` and visual vectors ``[N, k]`` (from :meth:`visual`)."""
        import numpy as np

        ids, lengths, words = self._words(text)
        v = torch.as_tensor(np.asarray(vectors, np.float32), device=self.device)
        if len(v) == 0:
            return np.zeros(0, np.float32)
        return self.net.score_matrix(v, ids, lengths, words)[:, 0].cpu().numpy().astype(np.float32)
