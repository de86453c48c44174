"""CM-Att and CM-Att-Erase (``papers/cm-att-erase-referring-grounding.txt``): referring-expression grounding.

A MAttNet-style backbone scores each candidate box of an image against an expression:

* image-aware language attention (Eq. 4–7): an LSTM reads the image vector ``e_0`` and the word
  embeddings ``e_t`` (the frozen MiniLM's word-piece features through a learned linear layer, or with
  ``word_features="vocab"``, the ablation, a learned word table: :mod:`engine.models.word_features`); module weights ``w_m`` and word attention ``α^m_t`` per module m ∈ {subj, loc, rel}
  give the module queries ``q_m = Σ_t α^m_t e_t``;
* subject module (Eq. 8–9): sentence-aware spatial attention over the candidate's 7×7 RoI map;
* location and relationship modules (Eq. 10–11): sentence-aware attention over up to five context
  objects (location: the candidate's own location and the offsets of its neighbours; relationship:
  the neighbours' visual vectors with their offsets, §4.1);
* the score ``s = Σ_m w_m · cos(ṽ_m, q̃_m)``.

Attention-guided erasing (§3.3–3.5) is in :func:`erase_query`, :func:`erase_subject` and
:func:`erase_context`; training (Eq. 1–3) is in ``engine/training/cm_att.py``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.checkpoint import Manifest, load_text_model, text_model_payload
from engine.models.word_features import TextWords, check_kind, erase_words, word_embedding

__all__ = [
    "MODEL_NAME",
    "CM_ATT_NAMES",
    "REGION_GROUNDING_NAME",
    "MODULES",
    "CMAttConfig",
    "Candidates",
    "CMAttNet",
    "GroundingScorer",
    "context_features",
    "location_features",
    "erase_query",
    "erase_subject",
    "erase_context",
]

MODEL_NAME = "cm-att"
FORMAT_VERSION = 1
CM_ATT_NAMES = ("cm-att", "cm-att-erase")
REGION_GROUNDING_NAME = "cm-att-erase-region"
"""CM-Att-Erase trained on region descriptions (objects and regions as candidates): query stage 3's grounding."""
MODULES = ("subj", "loc", "rel")
LOC_DIM = 5


@dataclass(frozen=True)
class CMAttConfig:
    """Sizes. ``contexts``: context objects per candidate (the paper's five); ``erase_k``: the k×k
    window of subject region erasing (k = 3); ``word_features``: ``minilm`` or ``vocab`` (the ablation; a
    stored config without it predates MiniLM and reads its vocabulary)."""

    visual_dim: int = 112
    word_dim: int = 128
    hidden: int = 128
    dim: int = 128
    contexts: int = 5
    erase_k: int = 3
    word_features: str = "minilm"

    def __post_init__(self) -> None:
        check_kind(self.word_features)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidates:
    """The candidate boxes of one or more (image, expression) items, flattened.

    ``maps [N, C, 7, 7]``: RoI maps; ``loc_ctx [N, K+1, 6]``: own location (flag 1) then neighbour
    offsets (flag 0); ``rel_ctx [N, K, C + 5]``: neighbours' mean visual vector and offsets;
    ``loc_mask [N, K+1]`` / ``rel_mask [N, K]``: which context slots are real; ``text [N]``: the
    index of each candidate's expression; ``image [B, C]``: each expression's image vector ``e_0``.
    """

    maps: Tensor
    loc_ctx: Tensor
    rel_ctx: Tensor
    loc_mask: Tensor
    rel_mask: Tensor

    def select(self, index: Tensor) -> "Candidates":
        return Candidates(self.maps[index], self.loc_ctx[index], self.rel_ctx[index], self.loc_mask[index], self.rel_mask[index])

    def to(self, device: torch.device) -> "Candidates":
        return Candidates(self.maps.to(device), self.loc_ctx.to(device), self.rel_ctx.to(device), self.loc_mask.to(device), self.rel_mask.to(device))


def location_features(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """MAttNet's 5-d location ``[x1/W, y1/H, x2/W, y2/H, area/(W·H)]`` of each box."""
    w, h = size
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h, area / (w * h)], axis=1).astype(np.float32)


def _offsets(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """MAttNet's relative offsets of ``others`` ``[..., 4]`` to ``box`` ``[..., 4]`` (broadcast): ``[(x1-cx)/w,
    (y1-cy)/h, (x2-cx)/w, (y2-cy)/h, area ratio]``."""
    w, h = np.maximum(box[..., 2] - box[..., 0], 1.0), np.maximum(box[..., 3] - box[..., 1], 1.0)
    cx, cy = (box[..., 0] + box[..., 2]) / 2, (box[..., 1] + box[..., 3]) / 2
    area = (others[..., 2] - others[..., 0]) * (others[..., 3] - others[..., 1])
    return np.stack([(others[..., 0] - cx) / w, (others[..., 1] - cy) / h, (others[..., 2] - cx) / w, (others[..., 3] - cy) / h, area / (w * h)], axis=-1)


def context_features(boxes: np.ndarray, vectors: np.ndarray, size: tuple[int, int], *, k: int) -> tuple[np.ndarray, ...]:
    """Location and relationship context of each of an image's candidate ``boxes`` [N, 4] (visual ``vectors`` [N, C]).

    The context objects of a box are the ``k`` other boxes nearest to it (centre distance; ties in box order).
    Returns ``loc_ctx [N, k+1, 6]``, ``loc_mask [N, k+1]``, ``rel_ctx [N, k, C+5]``, ``rel_mask [N, k]``.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    n, c = len(b), vectors.shape[1]
    loc = np.zeros((n, k + 1, LOC_DIM + 1), np.float32)
    rel = np.zeros((n, k, c + LOC_DIM), np.float32)
    loc_mask = np.zeros((n, k + 1), bool)
    rel_mask = np.zeros((n, k), bool)
    loc[:, 0, :LOC_DIM], loc[:, 0, LOC_DIM], loc_mask[:, 0] = location_features(b, size), 1.0, True
    m = min(k, n - 1)  # every other box is a context object when there are at most k of them
    if m <= 0:
        return loc, loc_mask, rel, rel_mask
    centres = (b[:, :2] + b[:, 2:]) / 2
    dist = np.linalg.norm(centres[None, :, :] - centres[:, None, :], axis=2)
    np.fill_diagonal(dist, np.inf)
    near = np.argsort(dist, axis=1, kind="stable")[:, :m]  # [N, m]
    off = np.clip(_offsets(b[:, None, :], b[near]), -4, 4).astype(np.float32)
    loc[:, 1 : 1 + m, :LOC_DIM] = off
    loc_mask[:, 1 : 1 + m] = True
    rel[:, :m, :c] = np.asarray(vectors)[near]
    rel[:, :m, c:] = off
    rel_mask[:, :m] = True
    return loc, loc_mask, rel, rel_mask


class _Attend(nn.Module):
    """Eq. 8 / Eq. 10: ``s_k = w_2ᵀ tanh(W_1 [c_k, q] + b_1) + b_2``, softmax over the valid k, weighted sum (Eq. 9 / 11)."""

    def __init__(self, feat: int, query: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(feat + query, hidden)
        self.w2 = nn.Linear(hidden, 1)

    def forward(self, feats: Tensor, query: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        q = query[:, None].expand(-1, feats.shape[1], -1)
        s = self.w2(torch.tanh(self.w1(torch.cat([feats, q], dim=2)))).squeeze(2)
        alpha = torch.softmax(s.masked_fill(~mask, -1e9), dim=1) * mask
        alpha = alpha / alpha.sum(1, keepdim=True).clamp_min(1e-9)
        return (alpha[:, :, None] * feats).sum(1), alpha


class CMAttNet(nn.Module):
    """The CM-Att backbone: language attention, subject / location / relationship modules, fused score.

    ``vocab_size`` counts ``<pad>`` = 0 and ``<unk>`` (unused with MiniLM word features)."""

    def __init__(self, config: CMAttConfig, *, vocab_size: int) -> None:
        super().__init__()
        c = self.config = config
        self.embed = word_embedding(c.word_features, vocab_size=vocab_size, dim=c.word_dim)
        self.image_proj = nn.Linear(c.visual_dim, c.word_dim)
        self.lstm = nn.LSTM(c.word_dim, c.hidden // 2, batch_first=True, bidirectional=True)
        self.f = nn.Linear(c.hidden, len(MODULES))  # Eq. 5: f_m
        self.g = nn.Linear(c.hidden, len(MODULES))  # Eq. 6: g_m
        self.cell = nn.Conv2d(c.visual_dim, c.dim, 1)
        self.subj_att = _Attend(c.dim, c.word_dim, c.dim)
        self.loc_in = nn.Linear(LOC_DIM + 1, c.dim)
        self.loc_att = _Attend(c.dim, c.word_dim, c.dim)
        self.rel_in = nn.Linear(c.visual_dim + LOC_DIM, c.dim)
        self.rel_att = _Attend(c.dim, c.word_dim, c.dim)
        self.vis_out = nn.ModuleList([nn.Linear(c.dim, c.dim) for _ in MODULES])
        self.txt_out = nn.ModuleList([nn.Linear(c.word_dim, c.dim) for _ in MODULES])
        self.register_buffer("input_scale", torch.ones(()))

    def language(self, ids: Tensor, lengths: Tensor, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. 4–6: module weights ``w [B, 3]``, word attention ``α [B, 3, T]``, module queries ``q [B, 3, E]``.

        ``ids``: word ids long ``[B, T]``, or with MiniLM word features float ``[B, T, 384]``; ``image`` ``[B, C]``."""
        e = self.embed(ids)
        e0 = self.image_proj(image.float() * self.input_scale)[:, None]
        seq = torch.cat([e0, e], dim=1)  # e_0 = CNN(I_0) first, then the words
        packed = nn.utils.rnn.pack_padded_sequence(seq, (lengths + 1).cpu(), batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=seq.shape[1])
        h_t = out[:, 1:]  # hidden states of the words
        h_last = torch.cat([h[0], h[1]], dim=1)
        w = torch.softmax(self.f(h_last), dim=1)
        mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        alpha = torch.softmax(self.g(h_t).transpose(1, 2).masked_fill(~mask[:, None], float("-inf")), dim=2)
        q = torch.einsum("bmt,bte->bme", alpha, e)
        return w, alpha, q

    def module_scores(self, cand: Candidates, q: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-module cosine scores ``[N, 3]`` of candidates with their queries ``q [N, 3, E]``, and the attentions."""
        n = cand.maps.shape[0]
        cells = self.cell(cand.maps.float() * self.input_scale).flatten(2).transpose(1, 2)  # [N, 49, D]
        full = torch.ones(n, cells.shape[1], dtype=torch.bool, device=cells.device)
        v_subj, a_subj = self.subj_att(cells, q[:, 0], full)
        loc = self.loc_in(cand.loc_ctx)
        v_loc, a_loc = self.loc_att(loc, q[:, 1], cand.loc_mask)
        rel_feats = torch.cat([cand.rel_ctx[..., : self.config.visual_dim] * self.input_scale, cand.rel_ctx[..., self.config.visual_dim :]], dim=2)
        rel = self.rel_in(rel_feats)
        v_rel, a_rel = self.rel_att(rel, q[:, 2], cand.rel_mask)
        has_rel = cand.rel_mask.any(1)
        scores = []
        for m, v in enumerate((v_subj, v_loc, v_rel)):
            scores.append(F.cosine_similarity(self.vis_out[m](v), self.txt_out[m](q[:, m]), dim=1))
        s = torch.stack(scores, dim=1)
        s = torch.cat([s[:, :2], (s[:, 2] * has_rel)[:, None]], dim=1)  # no context object: no relationship evidence
        return s, {"subj": a_subj, "loc": a_loc, "rel": a_rel}

    def forward(self, cand: Candidates, text: Tensor, ids: Tensor, lengths: Tensor, image: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Scores ``[N]`` of candidates against their expressions ``text[i]``, and the attentions used for erasing
        (``ids``: ``[B, T]`` word ids or ``[B, T, 384]`` MiniLM features, as :meth:`language`)."""
        w, alpha, q = self.language(ids, lengths, image)
        s, att = self.module_scores(cand, q[text])
        att.update(w=w, words=(w[:, :, None] * alpha).sum(1))  # Eq. 7: α_t = Σ_m w_m α^m_t
        return (w[text] * s).sum(1), att


def erase_query(ids: Tensor, lengths: Tensor, word_weights: Tensor, unk: int, generator: torch.Generator | None = None) -> Tensor:
    """§3.3 (the erased query ``Q*`` of Eq. 2's second term): one word per expression, drawn from
    ``W^s ~ Multinomial(T, [α_1..α_T])`` with the overall word attention ``α_t`` of Eq. 7 (``word_weights
    [B, T]``; padding is never drawn), is erased; the sentence keeps its length and structure.

    Word ids long ``[B, T]``: the word becomes ``unk`` (the paper's "unknown" token). MiniLM word features
    float ``[B, T, 384]``: the word piece's features become zeros, the MiniLM analogue of ``<unk>`` (there is
    no unknown-word feature; the adapter maps zeros to its bias, one learned "unknown" embedding). The
    other pieces keep their contextual features, which MiniLM computed with the erased piece in view.
    Returns a copy (:func:`~engine.models.word_features.erase_words`).
    """
    mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    p = (word_weights.detach() * mask).clamp_min(0) + 1e-12 * mask
    draw_on = generator.device if generator is not None else p.device  # a generator draws on its own device
    pick = torch.multinomial((p / p.sum(1, keepdim=True)).to(draw_on), 1, generator=generator).squeeze(1).to(ids.device)
    return erase_words(ids, torch.arange(len(ids), device=ids.device), pick, unk)


def erase_subject(maps: Tensor, attention: Tensor, k: int) -> Tensor:
    """§3.4: zero the k×k window of each RoI map with the largest accumulated spatial attention (attention ``[N, S·S]``)."""
    n, _, s, _ = maps.shape
    acc = F.avg_pool2d(attention.detach().reshape(n, 1, s, s), k, stride=1) * k * k  # [N, 1, s-k+1, s-k+1]
    best = acc.flatten(1).argmax(1)
    width = s - k + 1
    out = maps.clone()
    for i, b in enumerate(best.tolist()):
        y, x = divmod(b, width)
        out[i, :, y : y + k, x : x + k] = 0
    return out


def erase_context(mask: Tensor, attention: Tensor, *, keep_first: bool = False) -> Tensor:
    """§3.5: drop the context object with the highest attention from each candidate's context ``mask``
    (``keep_first``: slot 0, the candidate's own location, is never erased)."""
    att = attention.detach().masked_fill(~mask, -1.0)
    if keep_first:
        att[:, 0] = -1.0
    out = mask.clone()
    has = (att > -1.0).any(1)
    pick = att.argmax(1)
    out[torch.arange(len(mask))[has], pick[has]] = False
    return out


@dataclass(frozen=True)
class GroundingImage:
    """One image's candidates for :meth:`GroundingScorer.score_images`: RoI ``maps [N, C, 7, 7]``, ``boxes``
    ``[N, 4]``, the image ``size`` (w, h) and its vector ``e_0``."""

    maps: np.ndarray
    boxes: np.ndarray
    size: tuple[int, int]
    image_vector: np.ndarray


class GroundingScorer:
    """A trained CM-Att(-Erase) with its text encoding (MiniLM or a vocabulary): scores an image's candidate boxes against an expression."""

    def __init__(self, net: CMAttNet, vocab: TextWords, *, manifest: Manifest | None = None, name: str = "cm-att-erase") -> None:
        self.net = net.eval()
        self.vocab = vocab
        self.manifest = manifest
        self.name = name

    @classmethod
    def from_checkpoint(cls, spec: Path | str | None = None, *, device: str | torch.device = "cpu") -> "GroundingScorer":
        """Load a checkpoint file or installed name (``None``: the shipped ``cm-att-erase``); a clear
        :class:`CheckpointError` when it is missing or does not fit."""
        manifest, vocab, net, path = load_text_model(
            spec, default="cm-att-erase", expected_model=MODEL_NAME, config_cls=CMAttConfig, net_cls=CMAttNet, retrain="engine train cm-att-erase", device=device
        )
        return cls(net.to(device), vocab, manifest=manifest, name=str(manifest.metrics.get("name", path.stem)))

    def payload(self) -> dict[str, Any]:
        return text_model_payload(self.net.config, self.vocab, self.net)

    def score(self, maps: np.ndarray, boxes: np.ndarray, size: tuple[int, int], image_vector: np.ndarray, text: str) -> np.ndarray:
        """Grounding scores ``[N]`` of an image's candidate ``boxes`` (RoI ``maps [N, C, 7, 7]``) for ``text``."""
        return self.score_images([GroundingImage(maps=maps, boxes=boxes, size=size, image_vector=image_vector)], text)[0]

    @torch.no_grad()
    def score_images(self, images: Sequence[GroundingImage], text: str) -> list[np.ndarray]:
        """:meth:`score` of several images' candidates for one ``text`` in one pass: the text is encoded once,
        the language module (which reads each image's ``e_0``) runs as one batch of the images, and the
        modules score every candidate together (each against its own image's queries)."""
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(images)
        live = [i for i, im in enumerate(images) if len(im.maps)]
        if not live:
            return out
        device = next(self.net.parameters()).device
        k = self.net.config.contexts
        parts = [build_candidates(np.asarray(images[i].maps, np.float32), images[i].boxes, images[i].size, k=k) for i in live]
        cand = Candidates(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Candidates))).to(device)
        counts = [len(images[i].maps) for i in live]
        owner = torch.repeat_interleave(torch.arange(len(live)), torch.as_tensor(counts)).to(device)
        ids, lengths = self.vocab.encode_batch([text])
        ids, lengths = ids.expand(len(live), *ids.shape[1:]).contiguous().to(device), lengths.expand(len(live)).contiguous().to(device)
        image = torch.as_tensor(np.stack([np.asarray(images[i].image_vector, np.float32) for i in live]), device=device)
        s, _ = self.net(cand, owner, ids, lengths, image)
        for i, scores in zip(live, torch.split(s, counts)):
            out[i] = scores.cpu().numpy().astype(np.float32)
        return out


def build_candidates(maps: np.ndarray, boxes: np.ndarray, size: tuple[int, int], *, k: int) -> Candidates:
    """:class:`Candidates` of one image's boxes (RoI maps ``[N, C, 7, 7]``)."""
    vectors = np.asarray(maps, np.float32).mean(axis=(2, 3))
    loc, loc_mask, rel, rel_mask = context_features(boxes, vectors, size, k=k)
    return Candidates(torch.as_tensor(np.asarray(maps, np.float32)), torch.as_tensor(loc), torch.as_tensor(rel), torch.as_tensor(loc_mask), torch.as_tensor(rel_mask))
