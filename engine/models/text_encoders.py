"""Sentence encoders of the GRN paper (§3.1): self-attention pooling (Fig. 4) and an LSTM (ablation).

Both take word indices ``ids`` long ``[B, T]`` right-padded with ``<pad>`` (index 0) and
``lengths`` long ``[B]`` (each >= 1), and return one vector per sentence, float ``[B, out_dim]``.
Padding never changes the result: a sentence encodes the same alone or in a batch of longer ones.
Word embeddings are learned from the training text (nothing pretrained is downloaded).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from engine.errors import InvalidInputError

__all__ = ["TEXT_ENCODERS", "SelfAttentionEncoder", "LSTMEncoder", "create_text_encoder", "padding_mask"]


def padding_mask(ids: Tensor, lengths: Tensor) -> Tensor:
    """Bool ``[B, T]``: True at real words, False at padding."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return positions[None, :] < lengths.to(ids.device)[:, None]


class SelfAttentionEncoder(nn.Module):
    """GRN Fig. 4: a context-weighted sum of word embeddings.

    The context is the mean of the sentence's word embeddings; it is concatenated to every word
    embedding, a fully connected layer scores each word, a softmax over the words turns the scores
    into weights, and the sentence vector is the weighted sum of the word embeddings.

    Args:
        vocab_size: number of vocabulary entries (``<pad>`` = 0 included).
        dim: word embedding size, which is also the sentence vector size ``out_dim``.
    """

    def __init__(self, *, vocab_size: int, dim: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.score = nn.Linear(2 * dim, 1)
        self.out_dim = dim

    def word_weights(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Attention weight of each word, float ``[B, T]`` (0 at padding, each row sums to 1)."""
        return self._weights(self.embedding(ids), padding_mask(ids, lengths))

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        emb = self.embedding(ids)  # [B, T, d]
        weights = self._weights(emb, padding_mask(ids, lengths))
        return torch.einsum("bt,btd->bd", weights, emb)

    def _weights(self, emb: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(emb.dtype)
        context = (emb * m).sum(1) / m.sum(1).clamp_min(1.0)  # mean pooling of the words: [B, d]
        scores = self.score(torch.cat([emb, context[:, None, :].expand_as(emb)], dim=-1)).squeeze(-1)
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)


class LSTMEncoder(nn.Module):
    """A one-layer LSTM over the word embeddings; the sentence vector is the hidden state after the last word.

    ``prefix`` (optional, float ``[B, word_dim]``) is fed before the first word: the
    Visual-Language LSTM baseline feeds the region's visual feature there (GRN §4.2 (b)).

    Args:
        vocab_size: number of vocabulary entries (``<pad>`` = 0 included).
        word_dim: word embedding size.
        dim: hidden size, the sentence vector size ``out_dim``.
    """

    def __init__(self, *, vocab_size: int, word_dim: int = 128, dim: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.lstm = nn.LSTM(word_dim, dim, batch_first=True)
        self.word_dim = word_dim
        self.out_dim = dim

    def forward(self, ids: Tensor, lengths: Tensor, prefix: Tensor | None = None) -> Tensor:
        emb = self.embedding(ids)
        lengths = lengths.cpu()
        if prefix is not None:
            if prefix.shape != (ids.shape[0], self.word_dim):
                raise InvalidInputError(f"prefix must have shape [{ids.shape[0]}, {self.word_dim}], got {tuple(prefix.shape)}")
            emb = torch.cat([prefix[:, None, :].to(emb.dtype), emb], dim=1)
            lengths = lengths + 1
        packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return h_n[-1]


TEXT_ENCODERS = ("attention", "lstm")


def create_text_encoder(kind: str, *, vocab_size: int, dim: int = 128) -> SelfAttentionEncoder | LSTMEncoder:
    """``"attention"`` (GRN Fig. 4, the default) or ``"lstm"`` (the ablation of GRN Table 3)."""
    if kind == "attention":
        return SelfAttentionEncoder(vocab_size=vocab_size, dim=dim)
    if kind == "lstm":
        return LSTMEncoder(vocab_size=vocab_size, word_dim=dim, dim=dim)
    raise InvalidInputError(f"text encoder {kind!r} is not known; choose one of {', '.join(TEXT_ENCODERS)}")
