"""Small timing helpers shared by the benchmarks: percentiles, stage timers, timing proxies, machine facts."""
from __future__ import annotations

import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["StageTimes", "TimedProxy", "percentile_ms", "machine_facts", "rss_bytes", "torch_threads"]


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of durations in seconds, in milliseconds (``nan`` for none)."""
    if len(seconds) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(seconds, np.float64), q) * 1000.0)


class StageTimes:
    """Accumulated wall-clock seconds per named stage (and how many calls each had)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1

    def as_dict(self) -> dict[str, float]:
        return {name: round(value, 6) for name, value in self.seconds.items()}


class TimedProxy:
    """Wraps an object so that calls of the named methods (``"__call__"`` for the object itself) add their
    wall-clock time to ``times`` under ``stage``; every other attribute is the wrapped object's.

    Lets a benchmark time the stages of a pipeline that receives its components by injection, without
    changing the pipeline.
    """

    def __init__(self, target: Any, times: StageTimes, stage: str, methods: Sequence[str]) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_times", times)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_methods", frozenset(methods))

    def _timed(self, func: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._times.stage(self._stage):
                return func(*args, **kwargs)

        return call

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        return self._timed(value) if name in self._methods and callable(value) else value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "__call__" in self._methods:
            return self._timed(self._target)(*args, **kwargs)
        return self._target(*args, **kwargs)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run a block with ``torch.set_num_threads(threads)`` (``None``: leave torch's default); yields the count."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def rss_bytes() -> dict[str, int]:
    """Resident memory of this process now (``rss``) and at its peak (``peak_rss``), from /proc (0 elsewhere)."""
    out = {"rss": 0, "peak_rss": 0}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss" if key == "VmRSS" else "peak_rss"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def machine_facts() -> dict[str, Any]:
    """What a benchmark result depends on: CPU, cores, torch threads, the load while it ran."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_1m": round(load[0], 2),
        "python": platform.python_version(),
    }
