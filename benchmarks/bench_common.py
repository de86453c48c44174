"""Shared helpers of the reliability benchmarks (``soak.py``, ``fuzz.py``).

* :func:`ensure_index` builds, or reuses from ``benchmarks/.cache/`` (git-ignored), a small index
  of a synthetic corpus;
* :func:`run_case` runs one query and sorts what happened into an :class:`Outcome` (answered, a
  clear :class:`~engine.errors.EngineError`, or a failure with its traceback);
* :func:`judge` says whether an outcome is what a case expects;
* :func:`rss_mb` / :func:`open_fds` sample the process for leaks;
* :func:`cli_checks` runs invalid ``engine query`` command lines in subprocesses.

The scripts import this module by name (``from bench_common import ...``): run them as
``python benchmarks/soak.py`` so that ``benchmarks/`` is on ``sys.path``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine.errors import EngineError, ImageReadError, IndexVersionError, InvalidInputError

__all__ = [
    "BENCH_DIR",
    "CACHE_DIR",
    "RESULTS_DIR",
    "IndexSpec",
    "Expect",
    "ANY_INPUT_ERROR",
    "INPUT_ERRORS",
    "Outcome",
    "engine_config",
    "ensure_index",
    "run_case",
    "judge",
    "message_problem",
    "scores_sorted",
    "rss_mb",
    "open_fds",
    "write_json",
    "short_repr",
    "CliCase",
    "cli_checks",
    "summarize_cli",
]

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"

INPUT_ERRORS: tuple[type[EngineError], ...] = (InvalidInputError, ImageReadError)
"""The error classes a bad query input may raise; any other EngineError (a missing checkpoint, a
broken index) is not the input's fault and counts as a failure."""


# ----------------------------------------------------------------------------------------------
# the index under test
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexSpec:
    """A synthetic corpus (``images`` scenes of ``size`` px, ``seed``) indexed with ``proposals``."""

    images: int = 48
    seed: int = 0
    size: int = 160
    proposals: str = "gt"

    @property
    def key(self) -> str:
        return f"synth-{self.images}img-seed{self.seed}-{self.size}px-{self.proposals}"


def engine_config(device: str, overrides: Sequence[str] = ()):  # -> EngineConfig
    """``EngineConfig(device=device)`` with ``KEY=VALUE`` overrides of its plain fields (bool, int,
    float, str, path), e.g. ``shortlist=200`` or ``stage3=false``."""
    from engine.config import EngineConfig

    config = EngineConfig(device=device)
    current = {f.name: getattr(config, f.name) for f in fields(config)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in current:
            raise InvalidInputError(f"--set {item!r}: use KEY=VALUE with KEY one of {sorted(current)}")
        changes[key] = _coerce(raw, current[key])
    return replace(config, **changes)


def _coerce(raw: str, like: Any) -> Any:
    if isinstance(like, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(like, int):
        return int(raw)
    if isinstance(like, float):
        return float(raw)
    if raw.lower() in ("none", "null"):
        return None
    return Path(raw) if isinstance(like, Path) else raw


def ensure_index(spec: IndexSpec, *, device: str = "cpu", index_dir: Path | None = None, corpus: Path | None = None) -> tuple[Path, Path]:
    """``(corpus, index_dir)``: the synthetic corpus of ``spec`` and an up-to-date index of it.

    Both default to ``benchmarks/.cache/<spec.key>/``; an existing corpus is reused and an
    existing index is only brought up to date (an incremental run that finds nothing to do). An
    index that this engine cannot open any more (:class:`IndexVersionError`) is rebuilt.
    """
    from engine.api import Engine
    from engine.config import EngineConfig, IndexConfig
    from engine.synth import SynthConfig, generate_corpus

    root = CACHE_DIR / spec.key
    corpus = corpus or root / "corpus"
    index_dir = index_dir or root / "index"
    if not (corpus / "annotations.jsonl").is_file():
        generate_corpus(corpus, SynthConfig(images=spec.images, seed=spec.seed, size=spec.size))
    config = IndexConfig(proposals=spec.proposals)
    try:
        with Engine(index_dir, config=EngineConfig(device=device)) as engine:
            engine.index(corpus, config=config)
    except IndexVersionError:
        shutil.rmtree(index_dir)
        with Engine(index_dir, config=EngineConfig(device=device)) as engine:
            engine.index(corpus, config=config)
    return corpus, index_dir


# ----------------------------------------------------------------------------------------------
# outcomes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    """What a case should do: answer (``error=None``), or raise ``error`` with one of ``words`` in its message.

    ``may_answer``: answering is fine too (fuzzing, where the outcome of a random input is not
    known in advance). ``error=EngineError`` accepts any input error (InvalidInputError, ImageReadError).
    """

    error: type[EngineError] | None = None
    words: tuple[str, ...] = ()
    may_answer: bool = False

    @property
    def name(self) -> str:
        return "answer" if self.error is None else self.error.__name__


ANY_INPUT_ERROR = Expect(EngineError, may_answer=True)
"""An answer or any input error."""


@dataclass
class Outcome:
    """What one call did: ``status`` is ``ok`` (answered), ``error`` (an EngineError) or ``crash`` (anything else)."""

    status: str
    seconds: float
    error: str | None = None
    message: str = ""
    hits: int = 0
    traceback: str = ""
    exception: BaseException | None = field(default=None, repr=False)
    result: Any = field(default=None, repr=False)


def run_case(call: Callable[[], Any]) -> Outcome:
    """Run ``call``; never raises (except KeyboardInterrupt / SystemExit)."""
    start = time.perf_counter()
    try:
        result = call()
    except EngineError as exc:
        return Outcome("error", time.perf_counter() - start, type(exc).__name__, str(exc), exception=exc)
    except Exception as exc:  # noqa: BLE001 - any other exception is what the benchmarks look for
        return Outcome("crash", time.perf_counter() - start, type(exc).__name__, str(exc), traceback=traceback.format_exc(limit=12), exception=exc)
    hits = len(result) if isinstance(result, list) else 0
    return Outcome("ok", time.perf_counter() - start, hits=hits, result=result)


def message_problem(message: str) -> str | None:
    """Why an error message is not a clear one-liner, or ``None`` when it is."""
    if not message.strip():
        return "empty error message"
    if any(ch in message for ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
        return "error message spans several lines"
    if "Traceback" in message:
        return "error message holds a traceback"
    return None


def judge(outcome: Outcome, expect: Expect, *, k: int | None = None, hits: bool = True, check_order: bool = True) -> str | None:
    """``None`` when ``outcome`` is what ``expect`` asks for, else the reason it is a failure.

    An answer is checked as a list of hits (at most ``k``, finite scores, good boxes, and with
    ``check_order`` scores that do not increase down the list) unless ``hits=False``.
    """
    if outcome.status == "crash":
        return f"crashed with {outcome.error}: {outcome.message[:300]}"
    if outcome.status == "ok":
        if expect.error is not None and not expect.may_answer:
            return f"answered ({outcome.hits} hits) but {expect.name} was expected"
        return _hits_problem(outcome.result, k, check_order) if hits else None
    assert outcome.exception is not None
    problem = message_problem(outcome.message)
    if problem:
        return f"{outcome.error}: {problem}: {outcome.message[:300]!r}"
    if expect.error is None:
        return f"valid query raised {outcome.error}: {outcome.message[:300]}"
    if expect.error is EngineError and not isinstance(outcome.exception, INPUT_ERRORS):
        return f"raised {outcome.error}, not an input error (InvalidInputError/ImageReadError): {outcome.message[:300]}"
    if not isinstance(outcome.exception, expect.error):
        return f"raised {outcome.error} but {expect.name} was expected: {outcome.message[:300]}"
    if expect.words and not any(w.lower() in outcome.message.lower() for w in expect.words):
        return f"message does not name the problem (none of {list(expect.words)}): {outcome.message[:300]}"
    return None


def scores_sorted(hits: Any) -> bool:
    """Whether the hits' scores never increase down the list (``Hit.score`` "ranks the hits")."""
    scores = [h.score for h in hits] if isinstance(hits, list) else []
    return all(a >= b - 1e-6 for a, b in zip(scores, scores[1:]))


def _hits_problem(hits: Any, k: int | None, check_order: bool = True) -> str | None:
    from engine.results import Hit

    if not isinstance(hits, list) or not all(isinstance(h, Hit) for h in hits):
        return f"answered {type(hits).__name__}, not a list of Hit"
    if k is not None and isinstance(k, int) and len(hits) > k:
        return f"answered {len(hits)} hits for k={k}"
    scores = [h.score for h in hits]
    if not all(math.isfinite(s) for s in scores):
        return f"non-finite hit score in {scores[:5]}"
    if check_order and not scores_sorted(hits):
        return "hits are not sorted by score"
    for h in hits:
        x1, y1, x2, y2 = h.box
        if not all(math.isfinite(v) for v in h.box) or x2 <= x1 or y2 <= y1:
            return f"hit {h.region_id} has a bad box {h.box}"
    return None


# ----------------------------------------------------------------------------------------------
# process sampling and output
# ----------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident memory of this process in MiB (psutil when installed, else ``/proc/self/status``)."""
    try:
        import psutil  # type: ignore[import-not-found]
    except ImportError:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")
    return psutil.Process().memory_info().rss / 2**20


def open_fds() -> int:
    """File descriptors this process holds open (Linux; -1 elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def short_repr(value: Any, limit: int = 160) -> str:
    """``repr(value)`` cut to ``limit`` characters (long fuzz texts stay readable in reports)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...<{len(text)} chars>"


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CliCase:
    """One invalid ``engine query`` invocation (arguments after ``query``) and a word its error must hold."""

    name: str
    args: tuple[str, ...]
    words: tuple[str, ...]


def _engine_command() -> list[str]:
    script = Path(sys.executable).parent / "engine"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "engine.cli"]


def cli_checks(cases: Sequence[CliCase], *, index_dir: Path, device: str = "cpu", timeout: float = 300.0) -> list[dict[str, Any]]:
    """Run each case as ``engine query --index DIR --device D ARGS``; a case passes when the exit
    code is 1 or 2 (click's error codes), stderr holds exactly one ``Error:`` line that names the
    problem, no other line but click's usage hint, and no traceback."""
    results = []
    for case in cases:
        cmd = [*_engine_command(), "query", "--index", str(index_dir), "--device", device, *case.args]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        results.append(_judge_cli(case, done, time.perf_counter() - start))
    return results


def _judge_cli(case: CliCase, done: subprocess.CompletedProcess, seconds: float) -> dict[str, Any]:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    others = [line for line in lines if not line.startswith(("Error:", "Usage:", "Try "))]
    problems = []
    if done.returncode not in (1, 2):
        problems.append(f"exit code {done.returncode}")
    if "Traceback" in done.stderr or "Traceback" in done.stdout:
        problems.append("traceback printed")
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'Error:' lines")
    if others:
        problems.append(f"other stderr lines: {others[:3]}")
    if errors and not any(w.lower() in errors[0].lower() for w in case.words):
        problems.append(f"error does not name the problem (none of {list(case.words)})")
    return {
        "name": case.name,
        "args": list(case.args),
        "exit_code": done.returncode,
        "stderr_lines": len(lines),
        "error_line": errors[0] if errors else None,
        "seconds": round(seconds, 2),
        "passed": not problems,
        "problems": problems,
        "stderr_tail": "" if not problems else done.stderr[-3000:],
    }


def summarize_cli(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"cases": len(results), "passed": sum(r["passed"] for r in results), "results": results}
