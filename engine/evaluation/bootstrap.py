"""Percentile bootstrap intervals over queries (or any per-item values): :func:`bootstrap_interval`.

Every reported figure gets a 95 % interval by resampling the per-query values with replacement
(``resamples`` times, a seeded generator, so a run is reproducible) and taking the
``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the statistic over the resamples
(the *percentile* interval). The quantiles are taken without interpolation (the lower bound rounds
down, the upper bound up, among the sorted resampled statistics), so a statistic that may be
infinite (a median rank where some queries find nothing) still gets a defined interval.

Example::

    from engine.evaluation.bootstrap import bootstrap_interval
    hits = np.array([1, 0, 1, 1, 0], float)       # per query: right at rank 1?
    interval = bootstrap_interval(hits)            # mean, 95 %, 10,000 resamples, seed 0
    interval.low, interval.value, interval.high
    bootstrap_interval(ranks, statistic=np.median) # any statistic taking an ``axis`` argument
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_interval", "RESAMPLES", "SEED", "CONFIDENCE"]

RESAMPLES = 10_000
"""Bootstrap resamples of a reported interval."""

SEED = 0
"""Seed of the resampling generator (``numpy.random.default_rng``)."""

CONFIDENCE = 0.95
"""Coverage of a reported interval."""

_CHUNK_CELLS = 4_000_000  # resampled indices held at once (32 MB of int64)

Statistic = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A statistic of the values (``value``) and its bootstrap interval ``[low, high]`` over ``n`` values."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Statistic = np.mean,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> Interval:
    """``statistic`` of ``values`` and its percentile bootstrap interval.

    ``statistic(array, axis=-1)`` must reduce the last axis (``np.mean``, ``np.median``, …).
    ``values`` must be non-empty; infinite values are allowed when the statistic handles them.
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    if data.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"resamples must be >= 1 and confidence in (0, 1), got {resamples}, {confidence}")
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples, dtype=np.float64)
    rows = max(1, _CHUNK_CELLS // data.size)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, data.size, size=(stop - start, data.size))
        stats[start:stop] = statistic(data[idx], axis=-1)
    alpha = (1.0 - confidence) / 2.0
    low = float(np.quantile(stats, alpha, method="lower"))
    high = float(np.quantile(stats, 1.0 - alpha, method="higher"))
    return Interval(value=float(statistic(data, axis=-1)), low=low, high=high, n=int(data.size))
