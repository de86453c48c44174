"""Smaller region maps for stage 2: what storing them differently does to the GRN's exhaustive ranking.

Each variant turns the stored float16 ``[C, 7, 7]`` maps into what a smaller store would give back, the
GRN scores every region from it (:func:`~engine.benchmarking.exhaustive.exhaustive_search` with a
``transform``), and the top 10 is compared with the top 10 from the maps as stored (recall@10). Bytes
per region are what the variant would store instead of the 10,976 bytes of the float16 7×7 map.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from engine.benchmarking.exhaustive import ExhaustiveQuery, exhaustive_search, mean_recall_at_k

__all__ = ["MapVariant", "map_variants", "compare_map_storage"]


@dataclass(frozen=True)
class MapVariant:
    """A storage format: its name, bytes per region (112 channels), and stored maps → what a reader gets."""

    name: str
    bytes_per_region: int
    transform: Callable[[np.ndarray], np.ndarray]


def _int8_per_region(maps: np.ndarray) -> np.ndarray:
    x = maps.astype(np.float32)
    scale = np.abs(x).reshape(len(x), -1).max(1).clip(1e-8)[:, None, None, None] / 127.0
    return (np.round(x / scale).clip(-127, 127) * scale).astype(np.float16)


def _pooled(size: int) -> Callable[[np.ndarray], np.ndarray]:
    def pool(maps: np.ndarray) -> np.ndarray:
        t = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(maps).float(), size)
        return t.numpy().astype(np.float16)

    return pool


def _mean_vector(maps: np.ndarray) -> np.ndarray:
    return torch.from_numpy(maps).float().mean((2, 3), keepdim=True).numpy().astype(np.float16)


def map_variants(channels: int = 112, side: int = 7) -> list[MapVariant]:
    """float16 7×7 as stored; int8 7×7 with one scale per region; float16 3×3 (average pooled); the
    float16 mean vector (1×1: all the fc variant reads)."""
    cells = side * side
    return [
        MapVariant("float16 7x7 (as stored)", channels * cells * 2, lambda m: m),
        MapVariant("int8 7x7, one scale per region", channels * cells + 4, _int8_per_region),
        MapVariant("float16 3x3 (average pooled)", channels * 9 * 2, _pooled(3)),
        MapVariant("float16 mean vector (1x1)", channels * 2, _mean_vector),
    ]


def compare_map_storage(store: Any, model: Any, queries: Sequence[ExhaustiveQuery], variants: Sequence[MapVariant], *, k: int = 10, progress: bool = False) -> list[dict[str, Any]]:
    """Recall@k of each variant's exhaustive GRN ranking against the first variant's (the maps as stored)."""
    table = store.all_regions()
    baseline: list[list[int]] | None = None
    rows = []
    for variant in variants:
        results = exhaustive_search(store, model, queries, k=k, table=table, transform=variant.transform, progress=progress)
        top = [r.top_ids for r in results]
        baseline = top if baseline is None else baseline
        rows.append({**{key: value for key, value in asdict(variant).items() if key != "transform"}, "grn": model.method, "recall_at_10_vs_stored": round(mean_recall_at_k(top, baseline, k=k), 4), "queries": len(queries)})
    return rows
