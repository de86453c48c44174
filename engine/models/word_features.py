"""Where a text model's word features come from: the frozen English encoder (``minilm``) or a vocabulary (``vocab``).

Every text-consuming model (SAN, MCB, Ref-NMS, CM-Att, the GRN family) reads a text as a sequence of
word features ``[B, L, ·]`` with ``lengths`` ``[B]`` and starts with an embedding layer:

* ``vocab`` (the first wave's, kept as the ablation ``--text-encoder vocab``): words are looked up in a
  :class:`~engine.models.vocab.Vocabulary` learned from the training text (``ids`` long ``[B, L]``) and
  embedded by a learned ``nn.Embedding``; a word outside the training text is ``<unk>``.
* ``minilm`` (the default): the text's word pieces are run through all-MiniLM-L6-v2 (frozen,
  :mod:`engine.models.minilm`); its per-token features (float ``[B, L, 384]``, [CLS] and [SEP] left out)
  take the place of the ids, and a learned linear layer maps them to the model's word size. Every English
  word is read (word pieces), and words with one meaning get near features ("kitten", "cat").

:class:`MiniLMWords` stands where a model keeps its :class:`Vocabulary`: the same ``encode_batch`` (floats
instead of ids), ``__contains__`` and ``unknown_words`` (it knows every word), ``to_dict`` for the
checkpoint. :func:`word_embedding` builds the matching first layer, :func:`words_from_payload` reads
either back from a checkpoint.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from engine.errors import CheckpointError, InvalidInputError
from engine.models.vocab import Vocabulary

if TYPE_CHECKING:
    from engine.models.minilm import MiniLMEncoder

__all__ = ["WORD_FEATURES", "MiniLMWords", "TextWords", "MiniLMAdapter", "word_embedding", "build_words", "words_from_payload", "words_payload", "erase_words"]

WORD_FEATURES = ("minilm", "vocab")
MINILM_DIM = 384


class MiniLMWords:
    """Texts → all-MiniLM-L6-v2 per-token features, in place of a vocabulary's word ids.

    Args:
        encoder: the MiniLM encoder (default: built on first use from the installed package).
        cache_size: texts whose features are kept (``None``: all, as a trainer that reads its texts each epoch wants).
        device: where the encoder runs when it is built here.
    """

    kind = "minilm"
    dim = MINILM_DIM
    pad_index = 0  # ``erase_words`` zeroes an erased token's features (there is no <unk> feature)

    def __init__(self, encoder: "MiniLMEncoder | None" = None, *, cache_size: int | None = 64, device: torch.device | str = "cpu") -> None:
        self._encoder = encoder
        self._device = device
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def version(self) -> str:
        from engine.models.minilm import MINILM_VERSION

        return MINILM_VERSION

    @property
    def encoder(self) -> "MiniLMEncoder":
        if self._encoder is None:
            from engine.models.minilm import MiniLMEncoder

            self._encoder = MiniLMEncoder(device=self._device)
        return self._encoder

    def __len__(self) -> int:
        return 1  # a model's ``vocab_size``: no word table (the adapter ignores it)

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and bool(word)

    def unknown_words(self, text: str) -> list[str]:
        """None: word pieces read every word."""
        return []

    def features(self, texts: Sequence[str]) -> list[Tensor]:
        """Each text's word-piece features float32 ``[L, 384]`` (L >= 1, on the CPU); cached per text."""
        return [tokens[1:-1] for tokens in self._tokens(texts)]  # [CLS] and [SEP] left out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence vectors float32 ``[len(texts), 384]``, L2-normalised: sentence-transformers' head (the mean
        of every token, [CLS] and [SEP] included) over the same cached pass as :meth:`features`, so a query's
        text runs MiniLM once for its word features and its sentence vector alike."""
        if len(texts) == 0:
            return np.zeros((0, MINILM_DIM), np.float32)
        means = torch.stack([tokens.mean(0) for tokens in self._tokens([str(t) for t in texts])])
        return nn.functional.normalize(means, dim=-1).numpy().astype(np.float32)

    def _tokens(self, texts: Sequence[str]) -> list[Tensor]:
        """Each text's MiniLM token features float32 ``[n, 384]`` ([CLS] and [SEP] included, n >= 3), cached."""
        for text in texts:
            if not any(ch.isalnum() for ch in text):  # punctuation alone would still give word pieces
                raise InvalidInputError(f"text {text!r:.60} holds no words; describe the region in English words, e.g. 'a brown horse'")
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for start in range(0, len(missing), self.encoder.batch_size):
            batch = missing[start : start + self.encoder.batch_size]
            out = self.encoder.token_features(batch)
            for i, text in enumerate(batch):
                n = int(out.mask[i].sum())
                if n <= 2:
                    raise InvalidInputError(f"text {text!r:.60} holds no words; describe the region in English words, e.g. 'a brown horse'")
                self._cache[text] = out.tokens[i, :n].float().cpu()
        found = []
        for text in texts:
            found.append(self._cache[text])
            self._cache.move_to_end(text)
        if self.cache_size is not None:
            while len(self._cache) > max(self.cache_size, len(set(texts))):
                self._cache.popitem(last=False)
        return found

    def encode_batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``features`` float ``[B, L, 384]`` right-padded with zeros and ``lengths`` long ``[B]`` (each >= 1)."""
        if len(texts) == 0:
            raise InvalidInputError("no texts to encode; give at least one")
        for text in texts:
            if text is None or not str(text).strip():
                raise InvalidInputError("the text is empty; describe the region in English words, e.g. 'a brown horse'")
        found = self.features([str(t) for t in texts])
        lengths = torch.tensor([len(f) for f in found], dtype=torch.long)
        out = torch.zeros(len(found), int(lengths.max()), MINILM_DIM)
        for i, f in enumerate(found):
            out[i, : len(f)] = f
        return out, lengths

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MiniLMWords)

    def __repr__(self) -> str:
        return f"MiniLMWords({self.version})"


TextWords = Union[Vocabulary, MiniLMWords]
"""What a text model encodes its texts with."""


class MiniLMAdapter(nn.Module):
    """The first layer of a model reading MiniLM word features: a learned linear map ``[.., 384] → [.., dim]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(MINILM_DIM, dim)

    def forward(self, features: Tensor) -> Tensor:
        if not features.is_floating_point() or features.shape[-1] != MINILM_DIM:
            raise InvalidInputError(f"MiniLM word features must be float [B, L, {MINILM_DIM}], got {features.dtype} {tuple(features.shape)}; was the model given word ids?")
        return self.project(features)


def check_kind(kind: str) -> str:
    if kind not in WORD_FEATURES:
        raise InvalidInputError(f"text encoder {kind!r} is not known; choose one of {', '.join(WORD_FEATURES)}")
    return kind


def word_embedding(kind: str, *, vocab_size: int, dim: int) -> nn.Module:
    """A model's first text layer: ``nn.Embedding`` over word ids (``vocab``) or :class:`MiniLMAdapter` (``minilm``)."""
    if check_kind(kind) == "vocab":
        return nn.Embedding(vocab_size, dim, padding_idx=0)
    return MiniLMAdapter(dim)


def build_words(kind: str, texts: Iterable[str], *, min_count: int = 2, device: torch.device | str = "cpu") -> TextWords:
    """A trainer's text encoding: the vocabulary of ``texts`` (``vocab``) or MiniLM, caching every text (``minilm``)."""
    if check_kind(kind) == "vocab":
        return Vocabulary.build(texts, min_count=min_count)
    return MiniLMWords(cache_size=None, device=device)


def words_payload(words: TextWords) -> Any:
    """What a checkpoint stores for ``words``: the vocabulary's words (as before), or MiniLM's name and version."""
    return words.itos[2:] if isinstance(words, Vocabulary) else words.to_dict()


def words_from_payload(data: Any, *, device: torch.device | str = "cpu") -> TextWords:
    """Inverse of :func:`words_payload` (also reads ``Vocabulary.to_dict()``); a checkpoint of another MiniLM
    is a :class:`CheckpointError`."""
    if isinstance(data, Mapping) and data.get("kind") == "minilm":
        from engine.models.minilm import MINILM_VERSION

        if data.get("version") != MINILM_VERSION:
            raise CheckpointError(f"the checkpoint reads texts with {data.get('version')!r}, this engine ships {MINILM_VERSION!r}; retrain the model")
        return MiniLMWords(device=device)
    if isinstance(data, Mapping):
        return Vocabulary.from_dict(data)
    if isinstance(data, list) and all(isinstance(w, str) for w in data):
        return Vocabulary(data)
    raise CheckpointError("the checkpoint's text encoding is malformed (neither a word list nor MiniLM); retrain the model")


def erase_words(tokens: Tensor, rows: Tensor, positions: Tensor, unk: int) -> Tensor:
    """A copy of ``tokens`` with the word at ``positions[i]`` of row ``rows[i]`` erased: ids become ``unk``,
    MiniLM features become zeros (CM-Att-Erase's query erasing for either encoding)."""
    out = tokens.clone()
    if out.is_floating_point():
        out[rows, positions] = 0.0
    else:
        out[rows, positions] = unk
    return out
