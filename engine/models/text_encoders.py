"""Sentence encoders of the GRN paper (§3.1): self-attention pooling (Fig. 4) and an LSTM (ablation).

Both read a sentence as its words and return one vector per sentence, float ``[B, out_dim]``. The words
are either all-MiniLM-L6-v2's per-token features float ``[B, T, 384]`` (``word_features="minilm"``, the
default) or word indices long ``[B, T]`` of a vocabulary learned from the training text
(``word_features="vocab"``, the ablation), right-padded with zeros (``<pad>`` = index 0); ``lengths`` long
``[B]`` (each >= 1) count the real words. The first layer maps either to word embeddings ``[B, T, d]``
(:func:`engine.models.word_features.word_embedding`: a learned linear layer on the frozen MiniLM
features, or a learned ``nn.Embedding``). Padding never changes the result: a sentence encodes the same
alone or in a batch of longer ones.

:func:`word_tensors` and :func:`pad_words` turn texts into those inputs for the trainers (either encoding).
"""
from __future__ import annotations

from collections.abc import Sequence
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from engine.errors import InvalidInputError
from engine.models.word_features import MiniLMWords, TextWords, word_embedding

__all__ = ["TEXT_ENCODERS", "SelfAttentionEncoder", "LSTMEncoder", "create_text_encoder", "padding_mask", "word_count", "word_tensors", "pad_words", "require_words"]


def padding_mask(ids: Tensor, lengths: Tensor) -> Tensor:
    """Bool ``[B, T]``: True at real words, False at padding (``ids``: long ``[B, T]`` or features ``[B, T, F]``)."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return positions[None, :] < lengths.to(ids.device)[:, None]


def word_count(words: Tensor) -> Tensor:
    """Long ``[B]``: the real words of zero-padded ``words`` (ids ``[B, T]``: the non-zero ids; features
    ``[B, T, F]``: the positions whose feature vector is not all zero)."""
    real = words != 0 if words.ndim == 2 else (words != 0).any(-1)
    return real.sum(1)


def require_words(text: str | None) -> str:
    """``text`` when it holds a word (a letter or a digit, in any script), else :class:`InvalidInputError`.

    A vocabulary refuses such texts itself; MiniLM would read punctuation as word pieces, so a model
    reading MiniLM features checks first (the same error for either encoding).
    """
    if text is None or not any(ch.isalnum() for ch in str(text)):
        raise InvalidInputError(f"text {text!r:.60} holds no words; describe the region in English words, e.g. 'a red circle left of a blue square'")
    return str(text)


def word_tensors(words: TextWords, texts: Sequence[str]) -> list[Tensor]:
    """Each text's words, unpadded: ids long ``[L]`` (a :class:`~engine.models.vocab.Vocabulary`) or MiniLM
    features float ``[L, 384]`` (:class:`~engine.models.word_features.MiniLMWords`), on the CPU."""
    if isinstance(words, MiniLMWords):
        return list(words.features([require_words(t) for t in texts]))
    return [torch.tensor(words.encode(t), dtype=torch.long) for t in texts]


def pad_words(seqs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(words, lengths)``: ``seqs`` (from :func:`word_tensors`) right-padded with zeros, ``[B, T]`` or
    ``[B, T, F]``, and long ``[B]``; what :meth:`Vocabulary.encode_batch` / :meth:`MiniLMWords.encode_batch` give."""
    if not seqs:
        raise InvalidInputError("no texts to encode; give at least one")
    return pad_sequence(list(seqs), batch_first=True), torch.tensor([len(s) for s in seqs], dtype=torch.long)


class SelfAttentionEncoder(nn.Module):
    """GRN Fig. 4: a context-weighted sum of word embeddings.

    The context is the mean of the sentence's word embeddings; it is concatenated to every word
    embedding, a fully connected layer scores each word, a softmax over the words turns the scores
    into weights, and the sentence vector is the weighted sum of the word embeddings.

    Args:
        vocab_size: number of vocabulary entries (``<pad>`` = 0 included; unused with MiniLM).
        dim: word embedding size, which is also the sentence vector size ``out_dim``.
        word_features: ``minilm`` (input: features ``[B, T, 384]``) or ``vocab`` (input: ids ``[B, T]``).
    """

    def __init__(self, *, vocab_size: int, dim: int = 128, word_features: str = "minilm") -> None:
        super().__init__()
        self.embedding = word_embedding(word_features, vocab_size=vocab_size, dim=dim)
        self.score = nn.Linear(2 * dim, 1)
        self.out_dim = dim

    def word_weights(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Attention weight of each word, float ``[B, T]`` (0 at padding, each row sums to 1)."""
        return self._weights(self.embedding(ids), padding_mask(ids, lengths))

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Sentence vectors ``[B, dim]`` of words ``ids`` (``[B, T]`` or ``[B, T, 384]``) with ``lengths`` ``[B]``."""
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
        vocab_size: number of vocabulary entries (``<pad>`` = 0 included; unused with MiniLM).
        word_dim: word embedding size.
        dim: hidden size, the sentence vector size ``out_dim``.
        word_features: ``minilm`` (input: features ``[B, T, 384]``) or ``vocab`` (input: ids ``[B, T]``).
    """

    def __init__(self, *, vocab_size: int, word_dim: int = 128, dim: int = 128, word_features: str = "minilm") -> None:
        super().__init__()
        self.embedding = word_embedding(word_features, vocab_size=vocab_size, dim=word_dim)
        self.lstm = nn.LSTM(word_dim, dim, batch_first=True)
        self.word_dim = word_dim
        self.out_dim = dim

    def forward(self, ids: Tensor, lengths: Tensor, prefix: Tensor | None = None) -> Tensor:
        """The last hidden state ``[B, dim]`` after ``prefix`` (if given) and the words ``ids`` (``[B, T]`` or ``[B, T, 384]``)."""
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


def create_text_encoder(kind: str, *, vocab_size: int, dim: int = 128, word_features: str = "minilm") -> SelfAttentionEncoder | LSTMEncoder:
    """``"attention"`` (GRN Fig. 4, the default) or ``"lstm"`` (the ablation of GRN Table 3), reading
    ``word_features`` (``minilm`` or ``vocab``)."""
    if kind == "attention":
        return SelfAttentionEncoder(vocab_size=vocab_size, dim=dim, word_features=word_features)
    if kind == "lstm":
        return LSTMEncoder(vocab_size=vocab_size, word_dim=dim, dim=dim, word_features=word_features)
    raise InvalidInputError(f"text encoder {kind!r} is not known; choose one of {', '.join(TEXT_ENCODERS)}")
