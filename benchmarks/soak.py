"""Soak run: many random queries, valid and invalid, against one index in one process.

Every valid query must answer (a sorted list of at most ``k`` hits with finite scores); every
invalid one must raise the expected :class:`~engine.errors.EngineError` subclass with a one-line
message that names the problem; anything else is a failure. Resident memory (and open file
descriptors, and the number of live Python objects) is sampled every ``--sample-every`` queries;
the run fails when memory grows more than ``--max-growth-mb`` after the warm-up. Finally a few
invalid ``engine query`` command lines are run in subprocesses: exit code 1 or 2, one ``Error:``
line on stderr, no traceback.

Example::

    .venv/bin/python benchmarks/soak.py --queries 500            # a quick run
    nohup .venv/bin/python benchmarks/soak.py > soak.log 2>&1 &  # the full 10,000 queries

Writes ``benchmarks/results/soak.json``; exits 1 on any failure. See ``docs/reliability.md``.
"""
from __future__ import annotations

import argparse
import gc
import logging
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench_common import (
    RESULTS_DIR,
    CliCase,
    Expect,
    IndexSpec,
    Outcome,
    cli_checks,
    engine_config,
    ensure_index,
    judge,
    open_fds,
    scores_sorted,
    rss_mb,
    run_case,
    short_repr,
    summarize_cli,
    write_json,
)
from engine.errors import ImageReadError, InvalidBoxError, InvalidInputError

log = logging.getLogger("soak")

MAX_LISTED_FAILURES = 50


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoakCase:
    """One query: its ``kind``, the keyword arguments of ``Engine.search`` and what it must do."""

    kind: str
    kwargs: dict[str, Any]
    expect: Expect

    @property
    def valid(self) -> bool:
        return self.expect.error is None


@dataclass(frozen=True)
class CorpusImage:
    path: Path
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Fixtures:
    """Broken query files, written once into a temporary folder."""

    missing: Path
    corrupt: tuple[Path, ...]


def load_corpus(corpus: Path) -> list[CorpusImage]:
    from engine.datasets.annotations import read_annotations

    images = []
    for ann in read_annotations(corpus):
        texts = tuple(r.description for r in ann.regions) + tuple(r.expression for r in ann.refs)
        boxes = tuple(tuple(map(float, r.box)) for r in ann.regions) + tuple(tuple(map(float, o.box)) for o in ann.objects)
        images.append(CorpusImage(corpus / ann.image, ann.width, ann.height, boxes, texts))  # type: ignore[arg-type]
    return images


def write_fixtures(folder: Path, sample: Path, rng: np.random.Generator) -> Fixtures:
    """Files that are not readable images: truncated JPEG, random bytes, text as PNG, empty, a folder."""
    data = sample.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "random.jpg").write_bytes(rng.bytes(4096))
    (folder / "text.png").write_text("this is not a picture\n", encoding="utf-8")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "folder.jpg").mkdir()
    corrupt = tuple(folder / n for n in ("truncated.jpg", "random.jpg", "text.png", "empty.jpg", "folder.jpg"))
    return Fixtures(missing=folder / "does-not-exist.jpg", corrupt=corrupt)


class CaseMaker:
    """Draws random :class:`SoakCase` s from ``WEIGHTS`` with a seeded generator."""

    WEIGHTS: dict[str, int] = {
        # valid
        "image+region+text": 14,
        "image+region": 16,
        "whole_image": 10,
        "image+text": 5,
        "text_only": 20,
        # invalid
        "missing_file": 4,
        "corrupt_file": 4,
        "box_outside": 4,
        "box_inverted": 3,
        "box_zero_area": 3,
        "box_non_finite": 2,
        "text_blank": 3,
        "text_no_words": 2,
        "text_unknown_words": 3,
        "k_not_positive": 3,
        "region_without_image": 2,
        "no_query": 2,
    }

    def __init__(self, images: list[CorpusImage], fixtures: Fixtures, rng: np.random.Generator) -> None:
        self.images = images
        self.fixtures = fixtures
        self.rng = rng
        self.kinds = list(self.WEIGHTS)
        weights = np.asarray([self.WEIGHTS[k] for k in self.kinds], np.float64)
        self.probs = weights / weights.sum()
        self.makers: dict[str, Callable[[], SoakCase]] = {k: getattr(self, "_" + k.replace("+", "_")) for k in self.kinds}

    def next(self) -> SoakCase:
        return self.makers[str(self.rng.choice(self.kinds, p=self.probs))]()

    # -- random parts -----------------------------------------------------------------------
    def _image(self) -> CorpusImage:
        return self.images[int(self.rng.integers(len(self.images)))]

    def _k(self) -> int:
        return int(self.rng.choice([1, 3, 5, 10, 10, 10, 20, 50, 100]))

    def _box(self, im: CorpusImage) -> tuple[float, ...]:
        if im.boxes and self.rng.random() < 0.5:
            return im.boxes[int(self.rng.integers(len(im.boxes)))]
        x1, x2 = sorted(self.rng.uniform(0, im.width, 2))
        y1, y2 = sorted(self.rng.uniform(0, im.height, 2))
        return (float(x1), float(y1), float(max(x2, x1 + 1.0)), float(max(y2, y1 + 1.0)))

    def _text(self, im: CorpusImage | None = None) -> str:
        source = im if im is not None and im.texts else self._image()
        return str(source.texts[int(self.rng.integers(len(source.texts)))])

    def _visual(self, kind: str, im: CorpusImage | None = None, **extra: Any) -> SoakCase:
        im = im or self._image()
        kwargs = {"image": im.path, "k": self._k(), "exclude_self": bool(self.rng.random() < 0.2), **extra}
        return SoakCase(kind, kwargs, Expect())

    # -- valid ------------------------------------------------------------------------------
    def _image_region_text(self) -> SoakCase:
        im = self._image()
        return self._visual("image+region+text", im, region=self._box(im), text=self._text(im))

    def _image_region(self) -> SoakCase:
        im = self._image()
        return self._visual("image+region", im, region=self._box(im))

    def _whole_image(self) -> SoakCase:
        return self._visual("whole_image")

    def _image_text(self) -> SoakCase:
        return self._visual("image+text", text=self._text())

    def _text_only(self) -> SoakCase:
        return SoakCase("text_only", {"text": self._text(), "k": self._k()}, Expect())

    # -- invalid ----------------------------------------------------------------------------
    def _missing_file(self) -> SoakCase:
        return SoakCase("missing_file", {"image": self.fixtures.missing, "k": 5}, Expect(ImageReadError, ("does not exist",)))

    def _corrupt_file(self) -> SoakCase:
        path = self.fixtures.corrupt[int(self.rng.integers(len(self.fixtures.corrupt)))]
        return SoakCase("corrupt_file", {"image": path, "k": 5}, Expect(ImageReadError, ("cannot read image",)))

    def _box_outside(self) -> SoakCase:
        im = self._image()
        x1, y1, x2, y2 = self._box(im)
        side = int(self.rng.integers(4))
        push = float(self.rng.choice([1e-3, 0.5, 1.0, 10.0, 1000.0]))  # how far past the border
        box = [-push if side == 0 else x1, -push if side == 1 else y1, im.width + push if side == 2 else x2, im.height + push if side == 3 else y2]
        return SoakCase("box_outside", {"image": im.path, "region": tuple(box), "k": 5}, Expect(InvalidBoxError, ("outside",)))

    def _box_inverted(self) -> SoakCase:
        im = self._image()
        x1, y1, x2, y2 = self._box(im)
        box = (x2, y1, x1, y2) if self.rng.random() < 0.5 else (x1, y2, x2, y1)
        return SoakCase("box_inverted", {"image": im.path, "region": box, "k": 5}, Expect(InvalidBoxError, ("empty",)))

    def _box_zero_area(self) -> SoakCase:
        im = self._image()
        x1, y1, x2, y2 = self._box(im)
        box = (x1, y1, x1, y2) if self.rng.random() < 0.5 else (x1, y1, x2, y1)
        return SoakCase("box_zero_area", {"image": im.path, "region": box, "k": 5}, Expect(InvalidBoxError, ("empty",)))

    def _box_non_finite(self) -> SoakCase:
        im = self._image()
        box = list(self._box(im))
        box[int(self.rng.integers(4))] = float(self.rng.choice([np.nan, np.inf, -np.inf]))
        return SoakCase("box_non_finite", {"image": im.path, "region": tuple(box), "k": 5}, Expect(InvalidBoxError, ("non-finite",)))

    def _text_blank(self) -> SoakCase:
        text = "".join(self.rng.choice([" ", "\t", "\n", "\u3000", "\u00a0"], size=int(self.rng.integers(0, 6))))
        with_image = self.rng.random() < 0.5
        kwargs: dict[str, Any] = {"text": text, "k": 5}
        if with_image:
            kwargs["image"] = self._image().path
        return SoakCase("text_blank", kwargs, Expect(InvalidInputError, ("empty",)))

    def _text_no_words(self) -> SoakCase:
        text = "".join(self.rng.choice(list("!?.,;:-()[]\"'…—🙂🔴"), size=int(self.rng.integers(1, 12))))
        return SoakCase("text_no_words", {"text": text, "k": 5}, Expect(InvalidInputError, ("no words",)))

    def _text_unknown_words(self) -> SoakCase:
        words = ["".join(self.rng.choice(list("qxzjvkw"), size=int(self.rng.integers(4, 9)))) for _ in range(int(self.rng.integers(1, 5)))]
        return SoakCase("text_unknown_words", {"text": " ".join(words), "k": 5}, Expect(InvalidInputError, ("none of the words",)))

    def _k_not_positive(self) -> SoakCase:
        k = int(self.rng.choice([0, -1, -100]))
        kwargs: dict[str, Any] = {"text": self._text(), "k": k} if self.rng.random() < 0.5 else {"image": self._image().path, "k": k}
        return SoakCase("k_not_positive", kwargs, Expect(InvalidInputError, ("positive",)))

    def _region_without_image(self) -> SoakCase:
        im = self._image()
        return SoakCase("region_without_image", {"region": self._box(im), "text": self._text(im), "k": 5}, Expect(InvalidInputError, ("needs --image", "needs an image")))

    def _no_query(self) -> SoakCase:
        return SoakCase("no_query", {"k": 5}, Expect(InvalidInputError, ("needs an image",)))


# ----------------------------------------------------------------------------------------------
# bookkeeping
# ----------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """Per-kind counts and latencies, error classes, and the failures (first few in full)."""

    counts: Counter = field(default_factory=Counter)
    answered: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    error_classes: Counter = field(default_factory=Counter)
    errors_by_kind: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: list[dict[str, Any]] = field(default_factory=list)
    unsorted: Counter = field(default_factory=Counter)
    unsorted_example: dict[str, Any] | None = None
    valid: int = 0
    invalid: int = 0

    def record(self, index: int, case: SoakCase, outcome: Outcome, problem: str | None) -> None:
        self.counts[case.kind] += 1
        self.seconds[case.kind].append(outcome.seconds)
        self.valid += case.valid
        self.invalid += not case.valid
        if outcome.status == "ok":
            self.answered[case.kind] += 1
            if not scores_sorted(outcome.result):
                self.unsorted[case.kind] += 1
                if self.unsorted_example is None:
                    self.unsorted_example = {"query": index, "kind": case.kind, "args": {k: short_repr(v) for k, v in case.kwargs.items()}, "scores": [round(h.score, 4) for h in outcome.result]}
        elif outcome.error:
            self.errors_by_kind[case.kind][outcome.error] += 1
            if not case.valid:
                self.error_classes[outcome.error] += 1
        if problem is not None:
            self.failed[case.kind] += 1
            if len(self.failures) < MAX_LISTED_FAILURES:
                args = {k: short_repr(v) for k, v in case.kwargs.items()}
                self.failures.append({"query": index, "kind": case.kind, "args": args, "problem": problem, "traceback": outcome.traceback})

    def by_kind(self) -> dict[str, dict[str, Any]]:
        out = {}
        for kind in sorted(self.counts):
            ms = sorted(1000 * s for s in self.seconds[kind])
            out[kind] = {
                "count": self.counts[kind],
                "answered": self.answered[kind],
                "errors": dict(self.errors_by_kind[kind]),
                "failures": self.failed[kind],
                "unsorted_hit_lists": self.unsorted[kind],
                "ms_median": round(statistics.median(ms), 1),
                "ms_p95": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
                "ms_max": round(ms[-1], 1),
            }
        return out


@dataclass
class MemoryLog:
    """Samples of resident memory, open file descriptors and live Python objects."""

    samples: list[dict[str, float]] = field(default_factory=list)

    def sample(self, queries: int) -> dict[str, float]:
        row = {"queries": queries, "rss_mb": round(rss_mb(), 1), "fds": open_fds(), "py_objects": len(gc.get_objects())}
        self.samples.append(row)
        return row

    def at(self, queries: int) -> dict[str, float]:
        """The last sample taken at or before ``queries``."""
        return [s for s in self.samples if s["queries"] <= queries][-1]

    def summary(self, warmup: int, max_growth_mb: float, max_fd_growth: int) -> dict[str, Any]:
        start, end = self.samples[0], self.samples[-1]
        warm = self.at(warmup)
        after = [s for s in self.samples if s["queries"] >= warm["queries"]]
        slope = _slope([s["queries"] for s in after], [s["rss_mb"] for s in after])
        growth = round(end["rss_mb"] - warm["rss_mb"], 1)
        fd_growth = int(end["fds"] - warm["fds"])
        return {
            "start_rss_mb": start["rss_mb"],
            "warmup_queries": warm["queries"],
            "warmup_rss_mb": warm["rss_mb"],
            "end_rss_mb": end["rss_mb"],
            "peak_rss_mb": max(s["rss_mb"] for s in self.samples),
            "growth_after_warmup_mb": growth,
            "slope_mb_per_1000_queries": None if slope is None else round(1000 * slope, 3),
            "max_growth_mb": max_growth_mb,
            "fds_start": start["fds"],
            "fds_warmup": warm["fds"],
            "fds_end": end["fds"],
            "fd_growth_after_warmup": fd_growth,
            "py_objects_warmup": warm["py_objects"],
            "py_objects_end": end["py_objects"],
            "leak": growth > max_growth_mb or fd_growth > max_fd_growth,
            "samples": self.samples,
        }


def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    return float(np.polyfit(np.asarray(xs, np.float64), np.asarray(ys, np.float64), 1)[0])


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def soak(engine, maker: CaseMaker, args: argparse.Namespace) -> tuple[Tally, MemoryLog, float, bool]:  # noqa: ANN001
    """Run ``args.queries`` cases; returns the tally, the memory log, the seconds and whether it was interrupted."""
    tally, memory = Tally(), MemoryLog()
    memory.sample(0)
    start = time.perf_counter()
    done = 0
    try:
        with tqdm(total=args.queries, unit="q", desc="soak", dynamic_ncols=True, mininterval=5, disable=args.quiet) as bar:
            for i in range(args.queries):
                case = maker.next()
                outcome = run_case(lambda: engine.search(**case.kwargs))
                tally.record(i, case, outcome, judge(outcome, case.expect, k=case.kwargs.get("k"), check_order=args.strict_order))
                outcome.exception = outcome.result = None  # keep nothing of the query alive
                done = i + 1
                bar.update(1)
                if done % args.sample_every == 0:
                    row = memory.sample(done)
                    bar.set_postfix(rss=f"{row['rss_mb']:.0f}MB", fds=row["fds"], fail=sum(tally.failed.values()))
    except KeyboardInterrupt:
        log.warning("interrupted after %d queries; writing what was measured", done)
        if memory.samples[-1]["queries"] != done:
            memory.sample(done)
        return tally, memory, time.perf_counter() - start, True
    if memory.samples[-1]["queries"] != done:
        memory.sample(done)
    return tally, memory, time.perf_counter() - start, False


def cli_cases(corpus_image: Path, fixtures: Fixtures) -> list[CliCase]:
    image = str(corpus_image)
    return [
        CliCase("missing image", ("--image", str(fixtures.missing)), ("does not exist",)),
        CliCase("corrupt image", ("--image", str(fixtures.corrupt[0])), ("cannot read image",)),
        CliCase("folder as image", ("--image", str(fixtures.corrupt[-1])), ("not a regular file",)),
        CliCase("three numbers", ("--image", image, "--region", "10,20,30"), ("four comma-separated",)),
        CliCase("nan in box", ("--image", image, "--region", "nan,0,10,10"), ("non-finite",)),
        CliCase("box outside", ("--image", image, "--region", "0,0,99999,10"), ("outside",)),
        CliCase("inverted box", ("--image", image, "--region", "50,50,10,10"), ("empty",)),
        CliCase("blank text", ("--text", "   "), ("empty",)),
        CliCase("unknown words", ("--text", "qzxv jjkwq"), ("none of the words",)),
        CliCase("k = 0", ("--image", image, "-k", "0"), ("range", "positive")),
        CliCase("region without image", ("--region", "1,1,5,5", "--text", "red circle"), ("needs --image",)),
        CliCase("no query", (), ("needs an image",)),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--queries", type=int, default=10_000, help="number of random queries")
    p.add_argument("--seed", type=int, default=0, help="seed of the query mix")
    p.add_argument("--index", type=Path, default=None, help="index directory to build or reuse (default: benchmarks/.cache/<corpus>/index)")
    p.add_argument("--corpus", type=Path, default=None, help="synthetic corpus to generate or reuse (default: benchmarks/.cache/<corpus>/corpus)")
    p.add_argument("--images", type=int, default=48, help="images of the synthetic corpus")
    p.add_argument("--size", type=int, default=160, help="side of the synthetic images, px")
    p.add_argument("--corpus-seed", type=int, default=0, help="seed of the synthetic corpus")
    p.add_argument("--proposals", default="gt", choices=["gt", "rpn", "auto"], help="region proposals of the index (gt is fastest)")
    p.add_argument("--device", default="cpu", help="engine device: cpu, cuda, auto")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override an EngineConfig field, e.g. --set shortlist=200 (repeatable)")
    p.add_argument("--warmup", type=int, default=1000, help="queries before the memory baseline is taken")
    p.add_argument("--sample-every", type=int, default=500, help="queries between memory samples")
    p.add_argument("--max-growth-mb", type=float, default=50.0, help="fail when RSS grows more than this after the warm-up")
    p.add_argument("--max-fd-growth", type=int, default=16, help="fail when open file descriptors grow more than this after the warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default; on a shared CPU more threads can be many times slower)")
    p.add_argument("--strict-order", action="store_true", help="count answers whose hit scores are not in descending order as failures (by default they are only counted)")
    p.add_argument("--skip-cli", action="store_true", help="skip the engine query command-line checks")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json", help="result file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.queries < 1 or args.sample_every < 1 or args.warmup < 0:
        p.error("--queries and --sample-every must be >= 1, --warmup >= 0")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` writes the results measured so far, as Ctrl-C does
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("engine").setLevel(logging.ERROR)  # the invalid queries would log warnings
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from engine.api import Engine

    spec = IndexSpec(images=args.images, seed=args.corpus_seed, size=args.size, proposals=args.proposals)
    t0 = time.perf_counter()
    corpus, index_dir = ensure_index(spec, device=args.device, index_dir=args.index, corpus=args.corpus)
    build_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    images = load_corpus(corpus)
    with tempfile.TemporaryDirectory(prefix="soak-fixtures-") as tmp:
        fixtures = write_fixtures(Path(tmp), images[0].path, rng)
        config = engine_config(args.device, args.overrides)
        with Engine(index_dir, config=config) as engine:
            info = engine.info().to_dict()
            tally, memory, seconds, interrupted = soak(engine, CaseMaker(images, fixtures, rng), args)
        cli = summarize_cli(cli_checks(cli_cases(images[0].path, fixtures), index_dir=index_dir, device=args.device)) if not (args.skip_cli or interrupted) else None
    mem = memory.summary(args.warmup, args.max_growth_mb, args.max_fd_growth)
    failures = sum(tally.failed.values())
    cli_failed = cli is not None and cli["passed"] != cli["cases"]
    done = sum(tally.counts.values())
    result = {
        "passed": not (failures or mem["leak"] or cli_failed or interrupted),
        "interrupted": interrupted,
        "queries": done,
        "valid_queries": tally.valid,
        "invalid_queries": tally.invalid,
        "seconds": round(seconds, 1),
        "queries_per_s": round(done / seconds, 2) if seconds > 0 else None,
        "failures": failures,
        "invalid_error_classes": dict(tally.error_classes.most_common()),
        "unsorted_hit_lists": sum(tally.unsorted.values()),
        "unsorted_example": tally.unsorted_example,
        "memory": mem,
        "by_kind": tally.by_kind(),
        "failure_details": tally.failures,
        "cli": cli,
        "setup": {
            "seed": args.seed,
            "corpus": str(corpus),
            "index": str(index_dir),
            "index_info": {k: info[k] for k in ("images", "regions", "index_type", "device", "vectors")},
            "index_build_or_check_seconds": round(build_seconds, 1),
            "device": args.device,
            "overrides": args.overrides,
            "strict_order": args.strict_order,
            "threads": args.threads or None,
            "python": sys.version.split()[0],
        },
    }
    write_json(args.out, result)
    _print_summary(result, args.out)
    return 0 if result["passed"] else 1


def _print_summary(result: dict[str, Any], out: Path) -> None:
    mem = result["memory"]
    print(
        f"soak: {result['queries']} queries ({result['valid_queries']} valid, {result['invalid_queries']} invalid) in "
        f"{result['seconds']} s = {result['queries_per_s']} q/s; failures: {result['failures']}; "
        f"RSS start {mem['start_rss_mb']} MB, after warm-up {mem['warmup_rss_mb']} MB, end {mem['end_rss_mb']} MB "
        f"(growth {mem['growth_after_warmup_mb']} MB, limit {mem['max_growth_mb']}); fds {mem['fds_warmup']} -> {mem['fds_end']}"
    )
    print(f"invalid queries by error class: {result['invalid_error_classes']}")
    if result["unsorted_hit_lists"]:
        print(f"answers whose hit scores are not in descending order: {result['unsorted_hit_lists']} (see unsorted_example)")
    if result["cli"] is not None:
        print(f"cli checks: {result['cli']['passed']}/{result['cli']['cases']} passed")
    for failure in result["failure_details"][:10]:
        print(f"  FAIL #{failure['query']} {failure['kind']}: {failure['problem']}")
    print(f"{'PASSED' if result['passed'] else 'FAILED'}; results in {out}")


if __name__ == "__main__":
    sys.exit(main())
