"""SAN's image↔sentence matching protocol (SAN §4.1) and its region↔sentence twin, on cached maps.

The items are every image (its full box, with its captions) and every region (with its
description) of a split; a sentence matches an item when the item carries it (for regions with
structured meanings, when it describes the same meaning). R@K is the percentage of queries whose
match is within the top K; ``mR`` the mean of the six recalls of a direction pair.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from engine.datasets.types import ImageAnn
from engine.errors import InvalidInputError

__all__ = ["DIRECTIONS", "KS", "MatchingItems", "MatchingResult", "build_matching_items", "evaluate_items", "score_items"]


KS = (1, 5, 10)


DIRECTIONS = ("image->text", "text->image", "region->text", "text->region")


@dataclass
class MatchingResult:
    """Recalls (percent) per direction: ``recalls[direction][K]``."""

    recalls: dict[str, dict[int, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def m_r(self, direction: str) -> float:
        """The paper's mR of the pair ``direction`` belongs to."""
        kind = "image" if "image" in direction else "region"
        pair = [d for d in DIRECTIONS if kind in d and d in self.recalls]
        values = [self.recalls[d][k] for d in pair for k in KS]
        return float(np.mean(values)) if values else float("nan")

    def rows(self, method: str = "") -> list[dict[str, Any]]:
        out = []
        for d in DIRECTIONS:
            if d in self.recalls:
                row: dict[str, Any] = {"method": method, "direction": d}
                row.update({f"R@{k}": round(self.recalls[d][k], 2) for k in KS})
                row["mR"] = round(self.m_r(d), 2)
                row["queries"] = self.counts.get(d, 0)
                out.append(row)
        return out

    def summary(self) -> dict[str, float]:
        """Flat metrics for training logs: ``mR`` (both pairs averaged) and each direction's R@K."""
        out = {f"{d}_R@{k}": v for d, rec in self.recalls.items() for k, v in rec.items()}
        pairs = [self.m_r(d) for d in ("image->text", "region->text") if d in self.recalls]
        out["mR"] = float(np.mean(pairs)) if pairs else 0.0
        return out


def _first_match_ranks(scores: np.ndarray, positives: list[np.ndarray]) -> np.ndarray:
    """1-based rank of each row's best-scored positive column (ties count against it)."""
    ranks = np.empty(len(scores), np.int64)
    for i, pos in enumerate(positives):
        best = scores[i, pos].max()
        ranks[i] = int((scores[i] > best).sum()) + 1
    return ranks


def _recalls(ranks: np.ndarray) -> dict[int, float]:
    return {k: 100.0 * float((ranks <= k).mean()) for k in KS}


@torch.no_grad()
def score_items(net: Any, vocab: Any, maps: torch.Tensor, saliency: torch.Tensor, texts: Sequence[str], *, chunk: int = 128) -> np.ndarray:
    """SAN cosine similarities ``[V, T]`` of the visual items and the texts (chunks of ``chunk`` items)."""
    device = net.input_scale.device
    ids, lengths = vocab.encode_batch(list(texts))
    ids, lengths = ids.to(device), lengths.to(device)
    out = []
    for start in range(0, len(maps), chunk):
        v = net.visual(maps[start : start + chunk].to(device), saliency[start : start + chunk].to(device))
        out.append(net.score_matrix(v, ids, lengths).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(texts)), np.float32)


@torch.no_grad()
def evaluate_items(net: Any, vocab: Any, items: Any) -> MatchingResult:
    """Both pairs of directions over :class:`MatchingItems` (see the module doc)."""
    was_training = net.training
    net.eval()
    result = MatchingResult()
    for kind, (v2t, t2v) in (("image", DIRECTIONS[:2]), ("region", DIRECTIONS[2:])):
        rows = items.rows(kind)
        if len(rows) == 0:
            continue
        gallery: dict[str, int] = {}
        text_key: list[str] = []
        for r in rows:
            for t, key in zip(items.texts[r], items.keys[r]):
                if t not in gallery:
                    gallery[t] = len(gallery)
                    text_key.append(key)
        texts = list(gallery)
        key_arr = np.asarray(text_key, dtype=object)
        scores = score_items(net, vocab, items.maps[torch.as_tensor(rows)], items.saliency[torch.as_tensor(rows)], texts)
        pos_v = [np.flatnonzero(np.isin(key_arr, list(set(items.keys[r])))) for r in rows]
        item_keys = [set(items.keys[r]) for r in rows]
        pos_t = [np.asarray([i for i, ks in enumerate(item_keys) if k in ks], np.int64) for k in text_key]
        result.recalls[v2t] = _recalls(_first_match_ranks(scores, pos_v))
        result.recalls[t2v] = _recalls(_first_match_ranks(scores.T, pos_t))
        result.counts[v2t], result.counts[t2v] = len(rows), len(texts)
    net.train(was_training)
    return result


@dataclass
class MatchingItems:
    """Visual items (images and regions) of one split with their texts.

    ``maps`` float16 ``[N, C, 7, 7]``, ``saliency`` float32 ``[N, 7, 7]`` (logits); ``kind[i]`` is
    ``"image"`` or ``"region"``; ``texts[i]`` the item's sentences (captions, or the description);
    ``keys[i][j]`` the identity of sentence ``j`` (the sentence itself, or the region's meaning), two
    sentences with one key describe each other's items.
    """

    images: list[str]
    kind: list[str]
    maps: torch.Tensor
    saliency: torch.Tensor
    texts: list[list[str]]
    keys: list[list[str]]

    def rows(self, kind: str) -> np.ndarray:
        return np.asarray([i for i, k in enumerate(self.kind) if k == kind and self.texts[i]], np.int64)


def build_matching_items(images: Sequence[ImageAnn], cache: Any, pooler: Any, *, progress: bool = False) -> MatchingItems:
    """Maps and saliency grids of every image (full box) and region of ``images``, from the feature cache."""
    names, kinds, texts, keys = [], [], [], []
    maps: list[torch.Tensor] = []
    sal: list[torch.Tensor] = []
    device = next(pooler.network.parameters()).device
    for ann in tqdm(images, desc="SAN items", unit="img", disable=not progress, dynamic_ncols=True):
        cached = cache.get(ann.image)
        w, h = cached.size
        boxes = np.asarray([[0.0, 0.0, float(w), float(h)], *[r.box for r in ann.regions]], np.float64)
        maps.append(torch.from_numpy(cache.region_maps(ann.image, boxes)).half())
        level_maps = {lvl: torch.from_numpy(cached.maps[lvl].astype(np.float32))[None].to(device) for lvl in ("c3", "c4", "c5")}
        sal.append(torch.from_numpy(pooler.grids(level_maps, [cached.size], [boxes])[0]))
        names.append(ann.image)
        kinds.append("image")
        texts.append([c for c in ann.captions if c.strip()])
        keys.append([c.strip().lower() for c in texts[-1]])
        for r in ann.regions:
            names.append(ann.image)
            kinds.append("region")
            texts.append([r.description] if r.description.strip() else [])
            key = json.dumps(r.meaning, sort_keys=True) if r.meaning is not None else r.description.strip().lower()
            keys.append([key] if texts[-1] else [])
    if not maps:
        raise InvalidInputError("no images to build SAN training items from")
    return MatchingItems(images=names, kind=kinds, maps=torch.cat(maps), saliency=torch.cat(sal), texts=texts, keys=keys)
