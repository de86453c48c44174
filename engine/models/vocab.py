"""Word vocabulary of the text encoders, learned from the training text and stored with the checkpoint.

GRN §4.2: "We use the words that appear more than once as the vocabulary and replace other words
with an <UNK> tag." Index 0 is ``<pad>``, index 1 is ``<unk>``; the other words follow in order of
decreasing count (ties alphabetical), so the same texts always give the same vocabulary.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from engine.errors import CheckpointError, InvalidInputError

__all__ = ["PAD", "UNK", "Vocabulary", "tokenize"]

PAD = "<pad>"
UNK = "<unk>"

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (runs of ``a-z0-9``); punctuation and hyphens separate words.

    >>> tokenize("A big, polka-dot Star!")
    ['a', 'big', 'polka', 'dot', 'star']
    """
    return _WORD.findall(str(text).lower())


class Vocabulary:
    """Word → index map with ``<pad>`` = 0 and ``<unk>`` = 1.

    Args:
        words: the known words, in index order from 2 (no duplicates, no special tokens).
    """

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        bad = [w for w in words if w in (PAD, UNK) or not w]
        if bad or len(set(words)) != len(words):
            raise InvalidInputError(f"vocabulary words must be distinct, non-empty and not {PAD}/{UNK}; got {bad[:3] or 'duplicates'}")
        self.itos: list[str] = [PAD, UNK, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    kind = "vocab"  # a model's word encoding (engine.models.word_features: "minilm" or "vocab")
    pad_index = 0
    unk_index = 1

    @classmethod
    def build(cls, texts: Iterable[str], *, min_count: int = 2) -> "Vocabulary":
        """The words that occur at least ``min_count`` times in ``texts`` (default 2: "more than once")."""
        if min_count < 1:
            raise InvalidInputError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(w for t in texts for w in tokenize(t))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, text: str) -> list[int]:
        """Word indices of ``text``; unknown words become ``<unk>``. Raises :class:`InvalidInputError` when
        ``text`` holds no word at all (empty, or only punctuation)."""
        words = tokenize(text)
        if not words:
            raise InvalidInputError(f"text {text!r:.60} holds no words the models read (runs of ASCII letters a-z or digits); describe the region in English words, e.g. 'a red circle left of a blue square'")
        return [self.stoi.get(w, self.unk_index) for w in words]

    def encode_batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``ids`` long ``[B, T]`` right-padded with ``<pad>`` and ``lengths`` long ``[B]`` (each >= 1)."""
        if len(texts) == 0:
            raise InvalidInputError("no texts to encode; give at least one")
        encoded = [self.encode(t) for t in texts]
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        ids = torch.full((len(encoded), int(lengths.max())), self.pad_index, dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        return ids, lengths

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` that the vocabulary does not know (they encode as ``<unk>``)."""
        return [w for w in tokenize(text) if w not in self.stoi]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint payload."""
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Vocabulary":
        """Inverse of :meth:`to_dict`; a malformed entry raises :class:`CheckpointError`."""
        itos = data.get("itos") if isinstance(data, Mapping) else None
        if not isinstance(itos, list) or itos[:2] != [PAD, UNK] or not all(isinstance(w, str) for w in itos):
            raise CheckpointError(f"the checkpoint's vocabulary is malformed (expected a list starting with {PAD!r}, {UNK!r}); retrain the model")
        return cls(itos[2:])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} entries)"
