"""The open visual vocabulary: any English text scored against a region's ImageNet-1k class evidence (ConSE).

ConSE (Norouzi et al., ICLR 2014, Eq. 1) embeds an image as the probability-weighted combination of
its top T classes' label embeddings, ``f(x) = 1/Z Σ_t p(ŷ_t | x) s(ŷ_t)``, ``Z = Σ_t p(ŷ_t | x)``, and
compares it with a text's embedding. Here the label embeddings are all-MiniLM-L6-v2 vectors of each
class's WordNet name, its gloss, and its hypernyms' names (``scripts/build_concepts.py`` builds the
shipped table ``engine/checkpoints/concepts.npz``), and the comparison is taken class by class: a
text's relevance to class ``c`` is ``r_c = max(cos(q, name_c), cos(q, gloss_c), max_a cos(q, name_a))``
over the ancestors ``a`` of ``c`` (so "an animal" reaches the tiger through "animal, animate being,
beast, ..."), and a region's score is ``Σ_t p_t r_{ŷ_t} / Z`` — ConSE's combination applied to the
relevances (its dot product with the text, without the norm of ``f(x)``, which a max over label
vectors does not have). Every word is understood: nothing is out of vocabulary.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import CheckpointError, InvalidInputError

__all__ = ["ConceptTable", "ConceptVocabulary", "conse_scores", "default_table_path"]


def default_table_path() -> Path:
    """The shipped table (built by ``scripts/build_concepts.py``)."""
    return Path(__file__).resolve().parents[1] / "checkpoints" / "concepts.npz"


@dataclass(frozen=True)
class ConceptTable:
    """The vocabulary's label side: names and vectors of the 1000 classes and their WordNet ancestors."""

    names: np.ndarray  # str [C]
    name_vectors: np.ndarray  # float32 [C, D], L2-normalised
    gloss_vectors: np.ndarray  # float32 [C, D]
    ancestor_names: np.ndarray  # str [A]
    ancestor_vectors: np.ndarray  # float32 [A, D]
    ancestor_offsets: np.ndarray  # int [C + 1]: class c's ancestors are ancestor_index[offsets[c]:offsets[c + 1]]
    ancestor_index: np.ndarray  # int [sum of ancestors]
    version: str

    @classmethod
    def load(cls, path: Path | None = None) -> "ConceptTable":
        path = Path(path) if path is not None else default_table_path()
        if not path.is_file():
            raise CheckpointError(f"the concept table {path} is missing; rebuild it: python scripts/build_concepts.py --out {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                table = cls(
                    names=data["names"],
                    name_vectors=data["name_vectors"].astype(np.float32),
                    gloss_vectors=data["gloss_vectors"].astype(np.float32),
                    ancestor_names=data["ancestor_names"],
                    ancestor_vectors=data["ancestor_vectors"].astype(np.float32),
                    ancestor_offsets=data["ancestor_offsets"].astype(np.int64),
                    ancestor_index=data["ancestor_index"].astype(np.int64),
                    version=f"{str(data['text_encoder'])}:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}",
                )
        except (KeyError, ValueError, OSError) as exc:
            raise CheckpointError(f"the concept table {path} is unreadable ({exc}); rebuild it: python scripts/build_concepts.py --out {path}") from None
        if table.ancestor_offsets.shape[0] != table.name_vectors.shape[0] + 1:
            raise CheckpointError(f"the concept table {path} is inconsistent; rebuild it: python scripts/build_concepts.py --out {path}")
        return table

    @property
    def classes(self) -> int:
        return int(self.name_vectors.shape[0])

    def relevance(self, query: np.ndarray) -> np.ndarray:
        """``r_c`` (module doc) of a unit text vector ``query [D]``: float32 ``[C]``."""
        own = np.maximum(self.name_vectors @ query, self.gloss_vectors @ query)
        up = self.ancestor_vectors @ query
        best_up = np.full(self.classes, -1.0, np.float32)
        counts = np.diff(self.ancestor_offsets)
        has = counts > 0
        best_up[has] = np.maximum.reduceat(up[self.ancestor_index], self.ancestor_offsets[:-1][has])
        return np.maximum(own, best_up).astype(np.float32)


def conse_scores(evidence: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """ConSE scores float32 ``[N]`` of regions' evidence ``[N, 2, T]`` (classes, probabilities) for class relevances ``[C]``."""
    evidence = np.asarray(evidence, np.float32)
    if evidence.ndim != 3 or evidence.shape[1] != 2:
        raise InvalidInputError(f"concept evidence must be [N, 2, T], got {evidence.shape}")
    classes = evidence[:, 0].astype(np.int64)
    probs = evidence[:, 1]
    z = np.maximum(probs.sum(axis=1), 1e-6)
    return ((probs * relevance[classes]).sum(axis=1) / z).astype(np.float32)


class ConceptVocabulary:
    """Text to class relevances with the MiniLM encoder and the concept table (module doc).

    Args:
        encoder: an :class:`engine.models.minilm.MiniLMEncoder` (or anything with ``encode(texts)``).
        table: the concept table (default: the shipped one).
    """

    def __init__(self, *, encoder: object, table: ConceptTable | None = None) -> None:
        self.encoder = encoder
        self.table = table if table is not None else ConceptTable.load()

    @property
    def version(self) -> str:
        return self.table.version

    def text_vector(self, text: str) -> np.ndarray:
        """The text's unit MiniLM vector ``[D]``; a text without any letter or digit is an error."""
        if not any(ch.isalnum() for ch in str(text)):
            raise InvalidInputError(f"text {text!r:.60} holds no words; describe the region in words, e.g. 'a brown horse'")
        return self.encoder.encode([str(text)])[0]  # type: ignore[attr-defined]

    def relevance(self, text: str) -> np.ndarray:
        """Class relevances ``[C]`` of ``text``."""
        return self.table.relevance(self.text_vector(text))

    def top_classes(self, text: str, n: int = 5) -> list[tuple[str, float]]:
        """The ``n`` classes ``text`` is most relevant to, with their relevance (for ``--explain`` and docs)."""
        r = self.relevance(text)
        order = np.argsort(-r)[:n]
        return [(str(self.table.names[i]), float(r[i])) for i in order]
