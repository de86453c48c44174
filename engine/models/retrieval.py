"""The loadable inference face of the GRN family: text in, query-gated region embeddings and scores out.

:class:`RegionRetrievalModel` wraps a trained :class:`~engine.models.grn.RetrievalNet` with its
text encoding (MiniLM's word features, or the vocabulary it was trained with:
:mod:`engine.models.word_features`) and manifest. Query stage 2 and ``engine eval retrieval`` use it::

    model = RegionRetrievalModel.from_checkpoint()            # the shipped engine/checkpoints/grn.pt
    scores = model.score(query_map, "a red circle left of a blue square", candidate_maps)   # [N] cosine

Region maps are the indexed RoIAlign maps ``[N, 112, 7, 7]`` (float16 from the feature store is fine).
``RegionRetrievalModel.visual()`` is the text-blind "Visual Feature" baseline (the FAISS vector), so
that callers can treat every method alike.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from engine.device import resolve_device
from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import Manifest, checkpoint_path, load_checkpoint
from engine.models.grn import GRNConfig, RetrievalNet, create_retrieval_net, method_config
from engine.models.text_encoders import require_words
from engine.models.word_features import TextWords, words_from_payload

__all__ = ["MODEL_NAME", "FORMAT_VERSION", "RegionRetrievalModel"]

log = logging.getLogger(__name__)

MODEL_NAME = "grn-family"
"""The ``model`` of every GRN-family checkpoint manifest; the method is ``manifest.config["method"]``."""

FORMAT_VERSION = "1"
"""The ``version`` of the checkpoints this module writes and reads."""


class RegionRetrievalModel:
    """A GRN-family method ready for inference.

    Args:
        net: the network (its weights are used as they are; it is put in eval mode).
        vocab: its text encoding: MiniLM, or the vocabulary it was trained with (``None`` only for the
            text-blind ``visual`` method).
        manifest: the checkpoint's manifest (``None``: an in-memory model, e.g. during training).
        device: where to run (a ``--device`` string or a :class:`torch.device`).
        batch_size: candidates scored per step (7×7 maps; 49 times as many pooled ``[N, C, 1, 1]`` inputs).
    """

    def __init__(self, *, net: RetrievalNet, vocab: TextWords | None, manifest: Manifest | None = None, device: str | torch.device = "cpu", batch_size: int = 512) -> None:
        if net.config.uses_text and vocab is None:
            raise InvalidInputError(f"method {net.config.method!r} reads text and needs its text encoding (MiniLM or its vocabulary)")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.net = net.to(self.device).eval()
        self.vocab = vocab
        self.batch_size = batch_size
        self.manifest = manifest or Manifest(model=MODEL_NAME, version=FORMAT_VERSION, config=net.config.to_dict(), command="", data="", seed=0, metrics={})

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, path: Path | str | None = None, *, device: str | torch.device = "cpu") -> "RegionRetrievalModel":
        """Load a GRN-family checkpoint (``None``: the shipped ``grn``); :class:`CheckpointError` when it
        is missing, corrupt or not a GRN-family model."""
        path = checkpoint_path(path, default="grn")
        manifest, payload = load_checkpoint(path, expected_model=MODEL_NAME)
        device = resolve_device(device) if isinstance(device, str) else device  # MiniLM runs there too
        if manifest.version != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has GRN-family format version {manifest.version!r}, this engine reads {FORMAT_VERSION!r}; retrain it")
        try:
            config = GRNConfig.from_dict(payload["config"])
            vocab = words_from_payload(payload["vocab"], device=device) if payload.get("vocab") is not None else None
            net = create_retrieval_net(config, vocab_size=len(vocab) if vocab is not None else 3)
            net.load_state_dict(payload["state_dict"])
        except (KeyError, TypeError, RuntimeError, InvalidInputError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit the GRN family ({type(exc).__name__}: {exc}); retrain it") from None
        net = net.to(memory_format=torch.channels_last)  # the 3x3 convolutions run ~20 % faster on CPU (measured)
        model = cls(net=net, vocab=vocab, manifest=manifest, device=device)
        log.info("loaded %s (%s) from %s", model.method, model.version, path)
        return model

    @classmethod
    def visual(cls, *, device: str | torch.device = "cpu") -> "RegionRetrievalModel":
        """The Visual Feature baseline: the pooled, L2-normalised region vector; the text is ignored."""
        return cls(net=create_retrieval_net(method_config("visual"), vocab_size=3), vocab=None, device=device)

    # ------------------------------------------------------------------ identity

    @property
    def method(self) -> str:
        return self.net.config.method

    @property
    def version(self) -> str:
        """``method:format[:sha256 prefix]``: what produced the scores (record it with results)."""
        tail = f":{self.manifest.sha256[:12]}" if self.manifest.sha256 else ""
        return f"{self.method}:{self.manifest.version}{tail}"

    @property
    def uses_text(self) -> bool:
        return self.net.config.uses_text

    @property
    def spatial(self) -> bool:
        """Whether the model reads the 7×7 map itself; ``False``: only its spatial mean (``grn-fc``, the
        baselines), so ``[N, C, 1, 1]`` means score exactly as the maps do."""
        config = self.net.config
        return config.fusion == "grn" and config.variant == "conv"

    @property
    def embed_dim(self) -> int:
        return self.net.embed_dim

    def __repr__(self) -> str:
        return f"RegionRetrievalModel({self.version!r}, device={self.device})"

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def encode_text(self, text: str | None) -> Tensor:
        """The query text's representation: ``[D]`` (``vl-lstm``: its word indices ``[T]``, or with MiniLM its
        word features ``[T, 384]``; ``visual``: ``[0]``).

        A vocabulary reads unknown words as ``<unk>``, MiniLM reads every word; a text without any word
        raises :class:`InvalidInputError` either way.
        """
        if not self.uses_text:
            return torch.zeros(0, device=self.device)
        assert self.vocab is not None
        if text is None:
            raise InvalidInputError(f"method {self.method!r} scores a region together with its description; give the query text")
        ids, lengths = self.vocab.encode_batch([require_words(text)])
        unknown = self.vocab.unknown_words(text)
        if unknown:
            log.debug("words unknown to %s, read as <unk>: %s", self.method, unknown)
        return self.net.text_features(ids.to(self.device), lengths.to(self.device))[0]

    @torch.no_grad()
    def embed(self, maps: np.ndarray | Tensor, text_vec: Tensor) -> np.ndarray:
        """Embeddings float32 ``[N, E]`` (L2-normalised) of region maps ``[N, C, 7, 7]`` gated by ``text_vec``
        (from :meth:`encode_text`); computed ``batch_size`` regions at a time."""
        x = self._maps(maps)
        text = text_vec.to(self.device)[None]
        out = [self.net.embed(x[i : i + self.batch_size].to(self.device), text).cpu() for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.embed_dim), np.float32)

    @torch.no_grad()
    def score(self, query_map: np.ndarray | Tensor, text: str | None, cand_maps: np.ndarray | Tensor) -> np.ndarray:
        """Cosine similarity float32 ``[N]`` of the query region and each candidate, both gated by ``text``.

        ``query_map``: ``[C, 7, 7]`` or ``[1, C, 7, 7]``; ``cand_maps``: ``[N, C, 7, 7]``.
        """
        q = self._maps(query_map if torch.as_tensor(query_map).ndim == 4 else torch.as_tensor(query_map)[None])
        if q.shape[0] != 1:
            raise InvalidInputError(f"score takes one query region map, got {q.shape[0]}; use score_matrix for many")
        return self.score_matrix(q, [text], cand_maps)[0]

    @torch.no_grad()
    def score_matrix(self, query_maps: np.ndarray | Tensor, texts: Sequence[str | None], cand_maps: np.ndarray | Tensor, *, progress: bool = False) -> np.ndarray:
        """Cosine similarities float32 ``[Q, N]``: query ``q`` (its map gated by ``texts[q]``) against every
        candidate gated by the same text — the paper's exhaustive scoring.

        The text-independent part of each candidate batch is computed once and reused for all queries.
        """
        qx = self._maps(query_maps)
        cx = self._maps(cand_maps)
        if len(texts) != len(qx):
            raise InvalidInputError(f"got {len(qx)} query maps but {len(texts)} texts; give one text per query")
        text_vecs = [self.encode_text(t) for t in texts]
        queries = torch.stack([self.net.embed(qx[i : i + 1].to(self.device), t.to(self.device)[None])[0] for i, t in enumerate(text_vecs)]) if len(qx) else torch.zeros(0, self.embed_dim)
        out = np.zeros((len(qx), len(cx)), np.float32)
        step = self.batch_size * max(1, 49 // (cx.shape[2] * cx.shape[3]))  # pooled [N, C, 1, 1] inputs: 49x the regions per step
        starts = range(0, len(cx), step)
        for start in tqdm(starts, desc=f"score {self.method}", unit="batch", disable=not progress, dynamic_ncols=True):
            chunk = cx[start : start + step].to(self.device)
            if not self.uses_text:
                emb = self.net.embed(chunk, torch.zeros(1, 0, device=self.device))
                out[:, start : start + len(chunk)] = (queries @ emb.T).cpu().numpy()
                continue
            prepared = self.net.prepare(chunk)
            for q, t in enumerate(text_vecs):
                emb = self.net.embed_prepared(prepared, t.to(self.device)[None])
                out[q, start : start + len(chunk)] = (emb @ queries[q]).cpu().numpy()
        return out

    def _maps(self, maps: np.ndarray | Tensor) -> Tensor:
        t = torch.as_tensor(maps)
        c = self.net.config.visual_dim
        if t.ndim != 4 or t.shape[1] != c:
            raise InvalidInputError(f"region maps must have shape [N, {c}, 7, 7] (the indexed RoIAlign maps), got {tuple(t.shape)}")
        return t.float()
