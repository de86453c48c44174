"""Ref-NMS (``papers/ref-nms-expression-aware-proposals.txt``): expression-aware proposal suppression.

The relatedness module scores how related each proposal is to a referring expression (Eq. 1–2);
its score ``r_i`` times the proposal's objectness ``c_i`` is the suppression criterion of NMS
(score fusion ``s_i = r_i × c_i``). Proposals come from the engine's RPN (the "pre-trained
detector"); boxes with objectness below ``δ`` are dropped before the module (the paper's filter).

Inputs of the module are the RoIAlign maps ``[C, 7, 7]`` of the proposals on the frozen backbone
(the same maps the GRN reads), so ``e_v`` is a small convolutional head on them. The expression's words
enter ``e_q`` as the frozen MiniLM's word-piece features through a learned linear layer, or with
``word_features="vocab"`` (the ablation) through a learned word table (:mod:`engine.models.word_features`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from engine.errors import InvalidInputError
from engine.models.checkpoint import Manifest, load_text_model, text_model_payload
from engine.models.word_features import TextWords, check_kind, word_embedding

__all__ = ["MODEL_NAME", "REF_NMS_NAMES", "RefNMSConfig", "RelatednessModule", "RefNMSModel", "fused_nms"]

MODEL_NAME = "ref-nms"
FORMAT_VERSION = 1
REF_NMS_NAMES = ("ref-nms-b", "ref-nms-r")
"""Ref-NMS trained with the binary XE loss (Eq. 3, "B") or the ranking loss (Eq. 4, "R")."""


@dataclass(frozen=True)
class RefNMSConfig:
    """The relatedness module's sizes and the proposal settings it was trained with.

    ``visual_dim``: channels of the RoI maps; ``dim``: ``q``, the size of word and fused features
    (the BiGRU has ``dim / 2`` units per direction); ``delta``: objectness filter ``δ``;
    ``nms_iou``: IoU threshold of the (fused) NMS; ``loss``: ``"bce"`` (Eq. 3) or ``"rank"`` (Eq. 4);
    ``word_features``: ``minilm`` or ``vocab`` (the ablation; a stored config without it predates MiniLM
    and reads its vocabulary).
    """

    visual_dim: int = 112
    dim: int = 128
    word_dim: int = 128
    delta: float = 0.05
    nms_iou: float = 0.5
    loss: str = "bce"
    word_features: str = "minilm"

    def __post_init__(self) -> None:
        check_kind(self.word_features)
        if self.loss not in ("bce", "rank"):
            raise InvalidInputError(f"Ref-NMS loss must be 'bce' or 'rank', got {self.loss!r}")
        if self.dim % 2:
            raise InvalidInputError(f"Ref-NMS dim must be even (two GRU directions), got {self.dim}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mlp(inp: int, out: int) -> nn.Sequential:
    """The paper's two-layer MLPs (MLP_a, MLP_b)."""
    return nn.Sequential(nn.Linear(inp, out), nn.ReLU(inplace=True), nn.Linear(out, out))


class RelatednessModule(nn.Module):
    """Eq. 1–2: per-box soft attention over BiGRU word features, fused with the box feature, sigmoid score.

    ``vocab_size`` counts ``<pad>`` = 0 and ``<unk>`` (unused with MiniLM word features)."""

    def __init__(self, config: RefNMSConfig, *, vocab_size: int) -> None:
        super().__init__()
        c = config
        self.config = config
        # e_v: the convolutional head over the RoI map, then spatial mean -> v_i
        # (1x1 reduction, then a 3x3 stride-2 conv: 7x7 -> 4x4; light enough to score 100 boxes per text on a CPU)
        self.head = nn.Sequential(nn.Conv2d(c.visual_dim, c.dim, 1), nn.ReLU(inplace=True), nn.Conv2d(c.dim, c.dim, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        # e_q: word embeddings (MiniLM features through a linear layer, or a word table) and a Bi-GRU -> w_j
        self.embed = word_embedding(c.word_features, vocab_size=vocab_size, dim=c.word_dim)
        self.gru = nn.GRU(c.word_dim, c.dim // 2, batch_first=True, bidirectional=True)
        self.mlp_a = _mlp(c.dim, c.dim)
        self.fc_s = nn.Linear(2 * c.dim, 1)
        self.mlp_b = _mlp(c.dim, c.dim)
        self.fc_r = nn.Linear(c.dim, 1)
        self.register_buffer("input_scale", torch.ones(()))

    def visual(self, maps: Tensor) -> Tensor:
        """``v_i`` ``[N, q]`` of RoI maps ``[N, C, 7, 7]``."""
        return self.head(maps.float() * self.input_scale).mean((2, 3))

    def words(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``w_j`` ``[B, L, q]`` (zero past each text's length) of word ids long ``[B, L]``, or with MiniLM
        of word features float ``[B, L, 384]``."""
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return out

    def forward(self, maps: Tensor, text_index: Tensor, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Relatedness logits ``r̂`` ``[N]`` and word attention ``α`` ``[N, L]`` of boxes ``maps[i]`` with text ``text_index[i]``
        (``ids``: ``[B, L]`` word ids or ``[B, L, 384]`` MiniLM features, as :meth:`words`)."""
        return self.relate(self.visual(maps), text_index, ids, lengths)

    def relate(self, v: Tensor, text_index: Tensor, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`forward` from the boxes' visual features ``v_i`` ``[N, q]`` (:meth:`visual`, text-independent:
        an index can store them)."""
        w = self.words(ids, lengths)[text_index]  # [N, L, q]
        mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[text_index][:, None]
        # Eq. 1: va_i = MLP_a(v_i), a_ij = FC_s([va_i; w_j]), α_ij = softmax_j(a_ij), q_i = Σ_j α_ij w_j
        va = self.mlp_a(v)
        a = self.fc_s(torch.cat([va[:, None].expand(-1, w.shape[1], -1), w], dim=2)).squeeze(2)
        alpha = torch.softmax(a.masked_fill(~mask, float("-inf")), dim=1)
        q = (alpha[:, :, None] * w).sum(1)
        # Eq. 2: vb_i = MLP_b(v_i), m_i = L2Norm(vb_i ⊙ q_i), r̂_i = FC_r(m_i)
        m = F.normalize(self.mlp_b(v) * q, dim=1)
        return self.fc_r(m).squeeze(1), alpha


def fused_nms(boxes: np.ndarray, objectness: np.ndarray, relatedness: np.ndarray | None, *, iou: float) -> np.ndarray:
    """Indices kept by NMS over ``s_i = r_i × c_i`` (plain NMS over ``c_i`` when ``relatedness`` is None),
    in decreasing order of that score (torchvision's ``nms``)."""
    scores = np.asarray(objectness, np.float32) if relatedness is None else np.asarray(relatedness, np.float32) * np.asarray(objectness, np.float32)
    if len(scores) == 0:
        return np.zeros(0, np.int64)
    keep = nms(torch.as_tensor(np.asarray(boxes, np.float32)), torch.as_tensor(scores), iou)
    return keep.numpy().astype(np.int64)


class RefNMSModel:
    """A trained relatedness module with its text encoding (MiniLM or a vocabulary): scores and expression-aware NMS for one image."""

    def __init__(self, net: RelatednessModule, vocab: TextWords, *, manifest: Manifest | None = None, name: str = "ref-nms-b") -> None:
        self.net = net.eval()
        self.vocab = vocab
        self.manifest = manifest
        self.name = name

    @property
    def config(self) -> RefNMSConfig:
        return self.net.config

    @classmethod
    def from_checkpoint(cls, spec: Path | str | None = None, *, device: str | torch.device = "cpu") -> "RefNMSModel":
        """Load a checkpoint file or installed name (``None``: the shipped ``ref-nms-r``, the better of the
        two on the synthetic test split); a clear :class:`CheckpointError` when it is missing or does not fit."""
        manifest, vocab, net, path = load_text_model(
            spec, default="ref-nms-r", expected_model=MODEL_NAME, config_cls=RefNMSConfig, net_cls=RelatednessModule, retrain="engine train ref-nms-r", device=device
        )
        return cls(net.to(device), vocab, manifest=manifest, name=str(manifest.metrics.get("name", path.stem)))

    def payload(self) -> dict[str, Any]:
        return text_model_payload(self.config, self.vocab, self.net)

    @property
    def version(self) -> str:
        """Names this model's weights (the checkpoint's sha256): visual features stored by an index are
        used only with the model that computed them."""
        digest = self.manifest.sha256[:12] if self.manifest is not None and self.manifest.sha256 else "unsaved"
        return f"{MODEL_NAME}:{self.name}:{digest}"

    @torch.no_grad()
    def visual_features(self, maps: np.ndarray) -> np.ndarray:
        """``v_i`` float32 ``[N, q]`` of RoI maps ``[N, C, 7, 7]``: the text-independent half of the module,
        which an index stores (array ``refnms``) so that query stage 3 skips it."""
        device = next(self.net.parameters()).device
        maps_t = torch.as_tensor(np.asarray(maps, np.float32), device=device)
        if maps_t.ndim != 4 or maps_t.shape[1] != self.config.visual_dim:
            raise InvalidInputError(f"Ref-NMS needs RoI maps of shape [N, {self.config.visual_dim}, 7, 7], got {tuple(maps_t.shape)}")
        if len(maps_t) == 0:
            return np.zeros((0, self.config.dim), np.float32)
        return self.net.visual(maps_t).cpu().numpy().astype(np.float32)

    def relatedness(self, maps: np.ndarray, text: str) -> np.ndarray:
        """``r_i`` ``[N]`` in (0, 1) of RoI maps ``[N, C, 7, 7]`` for ``text`` (MiniLM reads any word; a
        vocabulary reads a word outside it as ``<unk>``)."""
        return self.relatedness_from_features(self.visual_features(maps), text)

    @torch.no_grad()
    def relatedness_from_features(self, visual: np.ndarray, text: str) -> np.ndarray:
        """:meth:`relatedness` from the regions' visual features ``[N, q]`` (:meth:`visual_features`, e.g. stored)."""
        ids, lengths = self.vocab.encode_batch([text])
        device = next(self.net.parameters()).device
        v = torch.as_tensor(np.asarray(visual, np.float32), device=device)
        if v.ndim != 2 or v.shape[1] != self.config.dim:
            raise InvalidInputError(f"Ref-NMS visual features must have shape [N, {self.config.dim}], got {tuple(v.shape)}")
        if len(v) == 0:
            return np.zeros(0, np.float32)
        logits, _ = self.net.relate(v, torch.zeros(len(v), dtype=torch.long, device=device), ids.to(device), lengths.to(device))
        return torch.sigmoid(logits).cpu().numpy().astype(np.float32)

    def suppress(self, boxes: np.ndarray, objectness: np.ndarray, maps: np.ndarray, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Ref-NMS on one image: drop boxes with ``c_i < δ``, NMS over ``r_i × c_i``.

        Returns the kept indices into ``boxes`` (best first) and their fused scores.
        """
        objectness = np.asarray(objectness, np.float32)
        idx = np.flatnonzero(objectness >= self.config.delta)
        if len(idx) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        r = self.relatedness(np.asarray(maps)[idx], text)
        keep = fused_nms(np.asarray(boxes)[idx], objectness[idx], r, iou=self.config.nms_iou)
        return idx[keep], (r * objectness[idx])[keep]
