"""Fuzzing of query inputs: boxes, texts and image files, drawn from a seeded generator.

Each case either answers or raises an :class:`~engine.errors.EngineError` input error
(``InvalidInputError``, ``InvalidBoxError``, ``ImageReadError``) with a one-line message; where the
right outcome is known in advance (a box inside the image must answer, one outside must be refused)
the case checks that too. Anything else is a failure, listed with its input.

Categories: ``parse_box`` (the CLI's box parser), ``validate_box`` (boxes given to the API),
``box_query`` (random boxes through ``Engine.search``), ``text_query`` (odd unicode, control
characters, 100k-character texts), ``image_query`` (tiny, huge, odd modes and formats, corrupt
files, odd paths), ``api_types`` (wrong-typed arguments) and ``cli`` (odd ``--region`` /
``--text`` through the ``engine query`` command, in-process).

Example::

    .venv/bin/python benchmarks/fuzz.py --seed 0 --cases 200

Writes ``benchmarks/results/fuzz.json``; exits 1 on any failure. See ``docs/reliability.md``.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from bench_common import (
    ANY_INPUT_ERROR,
    RESULTS_DIR,
    Expect,
    IndexSpec,
    Outcome,
    engine_config,
    ensure_index,
    judge,
    message_problem,
    scores_sorted,
    rss_mb,
    run_case,
    short_repr,
    write_json,
)
from engine.errors import ImageReadError, InvalidBoxError, InvalidInputError

log = logging.getLogger("fuzz")

SLOW_SECONDS = 10.0
MAX_LISTED_FAILURES = 100


@dataclass(frozen=True)
class FuzzCase:
    """One fuzz input: a ``call`` that runs it, what it must do, and how to show it in a report.

    ``tolerate``: exception types accepted besides EngineErrors (``TypeError`` for wrong-typed
    arguments); ``k``: the k the call asks for (answers are checked against it).
    """

    category: str
    shown: str
    call: Callable[[], Any]
    expect: Expect
    tolerate: tuple[type[BaseException], ...] = ()
    k: int | None = None
    hits: bool = True


@dataclass
class FuzzReport:
    """Counts per category, the failures with their inputs, and the slow cases."""

    counts: Counter = field(default_factory=Counter)
    answered: Counter = field(default_factory=Counter)
    tolerated: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    errors: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[dict[str, Any]] = field(default_factory=list)
    slow: list[dict[str, Any]] = field(default_factory=list)  # slower than SLOW_SECONDS, and every long text
    examples: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    unsorted: Counter = field(default_factory=Counter)

    def record(self, case: FuzzCase, outcome: Outcome, problem: str | None) -> None:
        c = case.category
        self.counts[c] += 1
        self.seconds[c] += outcome.seconds
        if outcome.status == "ok":
            self.answered[c] += 1
        elif outcome.status == "error":
            self.errors[c][outcome.error] += 1
            self.examples[c].setdefault(outcome.error, f"{case.shown} -> {outcome.message[:300]}")
        if problem is None and outcome.status == "crash":
            self.tolerated[c] += 1
        if problem is not None:
            self.failed[c] += 1
            if len(self.failures) < MAX_LISTED_FAILURES:
                self.failures.append({"category": c, "input": case.shown, "problem": problem, "traceback": outcome.traceback})
        if outcome.seconds > SLOW_SECONDS or c == "long_text":
            self.slow.append({"category": c, "input": case.shown, "seconds": round(outcome.seconds, 1), "status": outcome.status, "error": outcome.error})

    def categories(self) -> dict[str, dict[str, Any]]:
        return {
            c: {
                "cases": self.counts[c],
                "answered": self.answered[c],
                "errors": dict(self.errors[c].most_common()),
                "tolerated": self.tolerated[c],
                "failures": self.failed[c],
                "unsorted_hit_lists": self.unsorted[c],
                "seconds": round(self.seconds[c], 1),
                "example_errors": self.examples[c],
            }
            for c in self.counts
        }


def check(case: FuzzCase, *, check_order: bool = False) -> tuple[Outcome, str | None]:
    """Run one case; ``(outcome, None)`` when it behaved, else the reason it failed."""
    outcome = run_case(case.call)
    if outcome.status == "crash" and isinstance(outcome.exception, case.tolerate):
        problem = message_problem(outcome.message)
        return outcome, None if problem is None else f"{outcome.error}: {problem}"
    return outcome, judge(outcome, case.expect, k=case.k, hits=case.hits, check_order=check_order)


def run_cases(cases: Iterable[FuzzCase], report: FuzzReport, *, total: int | None = None, desc: str = "fuzz", quiet: bool = False, check_order: bool = False) -> FuzzReport:
    """Run and record every case. Hit lists whose scores are not in descending order are counted
    (``report.unsorted``), and are failures only with ``check_order``."""
    for case in tqdm(cases, total=total, desc=desc, unit="case", disable=quiet, dynamic_ncols=True, mininterval=2):
        outcome, problem = check(case, check_order=check_order)
        if outcome.status == "ok" and case.hits and not scores_sorted(outcome.result):
            report.unsorted[case.category] += 1
        report.record(case, outcome, problem)
    return report


# ----------------------------------------------------------------------------------------------
# boxes
# ----------------------------------------------------------------------------------------------
_NUMBER_TOKENS = (
    "0", "-0", "1", "-1", "12", "160", "159.5", "1e3", "1E-3", "-2.5e2", "1e308", "-1e308", "1e309", "-1e309",
    "1e-320", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "+3", "3.", ".5", "0x10", "1_000", "٣", "１２",
    "\u22121", "5e", "--1", "", " ", " 7 ", "\t9", "1 2", "a", "🙂", "\x00", "1\n", "9" * 400,
)


def random_box_text(rng: np.random.Generator) -> str:
    """A random ``x1,y1,x2,y2``-like string: half of them four well-formed numbers (in any order),
    the others with odd tokens, counts and separators."""
    if rng.random() < 0.5:
        values = rng.uniform(-20, 400, 4) * float(rng.choice([1e-6, 1.0, 1.0, 1e6]))
        if rng.random() < 0.7:
            values = np.concatenate([np.minimum(values[:2], values[2:]), np.maximum(values[:2], values[2:])])
        fmt = str(rng.choice(["{!r}", "{:g}", "{:.0f}", "{:e}", " {} "]))
        return ",".join(fmt.format(float(v)) for v in values)
    n = int(rng.choice([4, 4, 4, 4, 3, 5, 0, 1, 8]))
    parts = []
    for _ in range(n):
        if rng.random() < 0.6:
            value = float(rng.choice([rng.uniform(-50, 300), rng.integers(-5, 400), rng.uniform(0, 1e-6), rng.uniform(-1e12, 1e12)]))
            parts.append(repr(value) if rng.random() < 0.5 else f"{value:g}")
        else:
            parts.append(str(rng.choice(_NUMBER_TOKENS)))
    sep = str(rng.choice([",", ",", ",", ", ", ";", " ", ",,"]))
    return sep.join(parts)


def _finite_box(values: Sequence[float]) -> bool:
    return len(values) == 4 and all(np.isfinite(values)) and values[2] > values[0] and values[3] > values[1]


def _check_parsed(text: str) -> None:
    """Property of ``parse_box``: a returned box is 4 finite floats with x2 > x1, y2 > y1, equal to the
    numbers of the text when it is four plain comma-separated floats."""
    from engine.boxes import parse_box

    box = parse_box(text)
    assert isinstance(box, tuple) and len(box) == 4 and all(isinstance(v, float) for v in box), f"parse_box returned {box!r}"
    assert _finite_box(box), f"parse_box returned a bad box {box!r}"
    try:
        plain = [float(p) for p in text.split(",")]
    except ValueError:
        return
    assert len(plain) != 4 or list(box) == plain, f"parse_box({text!r}) = {box}, expected {plain}"


def parse_box_cases(rng: np.random.Generator, n: int) -> list[FuzzCase]:
    """Random strings through :func:`engine.boxes.parse_box` (answer = a good box, or InvalidBoxError)."""
    texts = [random_box_text(rng) for _ in range(n)]
    return [FuzzCase("parse_box", short_repr(t), functools.partial(_check_parsed, t), Expect(InvalidBoxError, may_answer=True), hits=False) for t in texts]


_ODD_VALUES: tuple[Any, ...] = (
    float("nan"), float("inf"), -float("inf"), 10**400, -(10**400), 1e308, -1e-320, True, None, "7", "x", b"1", 3 + 4j,
    np.float32(5), np.int64(7), np.float16(65504), [1], (), {},
)


def random_box_value(rng: np.random.Generator, width: int, height: int) -> Any:
    """A random region argument: often a box inside a ``width`` x ``height`` image, else something odd."""
    r = rng.random()
    x1, x2 = sorted(rng.uniform(0, width, 2))
    y1, y2 = sorted(rng.uniform(0, height, 2))
    box: list[Any] = [float(x1), float(y1), float(max(x2, x1 + 0.5)), float(max(y2, y1 + 0.5))]
    if r < 0.3:
        return tuple(min(v, lim) for v, lim in zip(box, (width, height, width, height)))
    if r < 0.4:
        return (0, 0, width, height)
    if r < 0.5:
        return [box[2], box[1], box[0], box[3]]  # reversed
    if r < 0.6:
        scale = float(rng.choice([-1.0, 1e3, 1e30, 1e308]))
        return [v * scale for v in box]
    if r < 0.65:
        return np.asarray(box, dtype=rng.choice([np.float32, np.float64, np.int32]))
    if r < 0.7:
        return (box[0], box[1], box[0] + 1e-6, box[1] + 1e-6)  # sub-pixel
    if r < 0.75:
        return (0.0, 0.0, width + 1e-9, float(height))  # a hair outside
    if r < 0.9:
        box[int(rng.integers(4))] = _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))]
        return box
    shapes: tuple[Any, ...] = (box[:3], box + [1.0], [], [box], 5, None, "0,0,10,10", {"x1": 1}, iter(box))
    return shapes[int(rng.integers(len(shapes)))]


def expected_box_outcome(value: Any, width: int, height: int) -> Expect:
    """Answer when ``value`` is four numbers (anything ``float()`` takes) of a finite, non-empty box
    inside the image; ``None`` is the whole image; anything else is an InvalidBoxError."""
    if value is None:
        return Expect()
    if isinstance(value, (str, bytes, dict, set)) or not hasattr(value, "__iter__"):
        return Expect(InvalidBoxError)
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        return Expect(InvalidBoxError)
    if not _finite_box(numbers):
        return Expect(InvalidBoxError)
    x1, y1, x2, y2 = numbers
    inside = x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height
    return Expect() if inside else Expect(InvalidBoxError, ("outside",))


def validate_box_cases(rng: np.random.Generator, n: int) -> list[FuzzCase]:
    """Random region arguments through :func:`engine.boxes.validate_box` against random image sizes."""
    from engine.boxes import validate_box

    cases = []
    for _ in range(n):
        width, height = int(rng.integers(1, 5000)), int(rng.integers(1, 5000))
        value = random_box_value(rng, width, height)
        if value is None:
            continue
        items = list(value) if isinstance(value, _ITERATOR) else None  # an iterator is used up by one look
        expect = expected_box_outcome(items if items is not None else value, width, height)
        argument = iter(items) if items is not None else value
        shown = f"iter({short_repr(items)})" if items is not None else short_repr(value)
        cases.append(FuzzCase("validate_box", f"{shown} in {width}x{height}", functools.partial(validate_box, argument, width, height), expect, hits=False))
    return cases


_ITERATOR = type(iter([]))


def box_query_cases(engine, images: Sequence[Path], sizes: Sequence[tuple[int, int]], rng: np.random.Generator, n: int) -> list[FuzzCase]:  # noqa: ANN001
    """Random region arguments of corpus images through ``Engine.search``."""
    cases = []
    for _ in range(n):
        i = int(rng.integers(len(images)))
        (width, height), path = sizes[i], images[i]
        value = random_box_value(rng, width, height)
        if isinstance(value, _ITERATOR):
            value = list(value)
        expect = expected_box_outcome(value, width, height)
        cases.append(FuzzCase("box_query", f"{path.name} {width}x{height} region={short_repr(value)}", functools.partial(engine.search, image=path, region=value, k=5), expect, k=5))
    return cases


# ----------------------------------------------------------------------------------------------
# texts
# ----------------------------------------------------------------------------------------------
_KNOWN = ("red", "blue", "green", "circle", "square", "triangle", "left of", "above", "the small", "a big", "next to", "striped")
_ODD_TEXT = {
    "emoji": ("🔴", "🟦", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "🙂🙃"),
    "rtl": ("دائرة حمراء", "עיגול כחול", "\u200f", "\u200e", "\u202eder\u202c", "\u2067x\u2069"),
    "combining": ("e\u0301", "r\u0336e\u0336d\u0336", "a" + "\u0300\u0301\u0302\u0303" * 10, "\u0301"),
    "zero_width": ("\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", "\u00ad"),
    "control": ("\x00", "\x07", "\x1b[31m", "\r", "\n", "\t", "\x7f", "\x85", "\u2028", "\x0c"),
    "surrogate": ("\ud800", "\udfff", "\udcff"),
    "lookalike": ("ｒｅｄ", "𝐫𝐞𝐝", "ᴿᴱᴰ", "ⓡⓔⓓ", "сircle", "İSTANBUL", "straße", "ﬁve"),
    "punctuation": ("!", "?!", "...", "—", "«»", "()", "'", '"', "\\", "%s", "{}", "<b>", "';--"),
    "space": (" ", "\u3000", "\u00a0", "\u2003", "\t\t"),
}


def random_text(rng: np.random.Generator, max_parts: int = 8) -> str:
    """A random query text: known words mixed with odd unicode of every family above."""
    parts = []
    for _ in range(int(rng.integers(1, max_parts + 1))):
        if rng.random() < 0.35:
            parts.append(str(rng.choice(_KNOWN)))
        else:
            family = _ODD_TEXT[str(rng.choice(list(_ODD_TEXT)))]
            parts.append(str(family[int(rng.integers(len(family)))]))
    sep = str(rng.choice([" ", "", "\u200b", "\n"]))
    return sep.join(parts)


def long_texts(length: int = 100_000) -> list[tuple[str, str]]:
    """``(label, text)`` of ``length``-character texts: known words, one word in a sea of zero-width
    characters, emoji, combining marks, whitespace, unknown words."""
    def fill(unit: str) -> str:
        return (unit * (length // len(unit) + 1))[:length]

    return [
        ("known words x100k chars", fill("red circle left of a blue square ")),
        ("one word + zero-width x100k", "red" + fill("\u200b")[3:]),
        ("emoji x100k", fill("🔴")),
        ("combining marks x100k", fill("a\u0301")),
        ("whitespace x100k", fill(" \t")),
        ("unknown words x100k", fill("zqxv ")),
        ("control chars x100k", fill("\x00\x01\x1b")),
    ]


def _text_expect(text: str) -> Expect:
    """Blank or wordless texts must be refused; anything else may answer or be refused as an input error."""
    from engine.models.vocab import tokenize

    if not text.strip() or not tokenize(text):
        return Expect(InvalidInputError)
    return ANY_INPUT_ERROR


def text_query_cases(engine, image: Path, rng: np.random.Generator, n: int, *, long: int = 0) -> list[FuzzCase]:  # noqa: ANN001
    """Random odd texts, text-only (3 in 4) and with the image (1 in 4); plus ``long`` 100k-character texts."""
    cases = []
    for _ in range(n):
        text = random_text(rng)
        with_image = rng.random() < 0.25
        kwargs: dict[str, Any] = {"text": text, "k": 5, **({"image": image} if with_image else {})}
        shown = f"{'image+' if with_image else ''}text={short_repr(text)}"
        cases.append(FuzzCase("text_query", shown, functools.partial(engine.search, **kwargs), _text_expect(text), k=5))
    for label, text in long_texts()[:long]:
        cases.append(FuzzCase("long_text", f"text-only: {label}", functools.partial(engine.search, text=text, k=5), _text_expect(text), k=5))
    return cases


# ----------------------------------------------------------------------------------------------
# image files
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFile:
    """A query file written by :func:`write_image_files`: ``size`` is the upright (width, height) when
    it is a decodable image; ``expect`` what a query of it must do."""

    name: str
    path: Path
    expect: Expect
    size: tuple[int, int] | None = None


def _noise(rng: np.random.Generator, width: int, height: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _shapes(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (40, 120, 200))
    draw = ImageDraw.Draw(image)
    for i in range(8):
        x, y = (i * 97) % max(1, width - 10), (i * 61) % max(1, height - 10)
        draw.ellipse((x, y, x + width // 6, y + height // 6), fill=((i * 50) % 256, 200, 30))
    return image


def _png_header(width: int, height: int, *, with_data: bool = False) -> bytes:
    """A PNG that claims ``width`` x ``height`` (8-bit grey) without the pixels: tests size guards
    without allocating anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64)) if with_data else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def _decodable(folder: Path, rng: np.random.Generator, *, big: bool) -> list[ImageFile]:
    answer = Expect()
    files: list[tuple[str, Callable[[Path], None], tuple[int, int]]] = [
        ("1x1.png", lambda p: Image.new("RGB", (1, 1), (255, 0, 0)).save(p), (1, 1)),
        ("2x3.jpg", lambda p: Image.fromarray(_noise(rng, 2, 3)).save(p), (2, 3)),
        ("1x10000.png", lambda p: Image.fromarray(_noise(rng, 1, 10000)).save(p), (1, 10000)),
        ("10000x1.png", lambda p: Image.fromarray(_noise(rng, 10000, 1)).save(p), (10000, 1)),
        ("gray.png", lambda p: Image.fromarray(_noise(rng, 64, 48, 1), "L").save(p), (64, 48)),
        ("gray_alpha.png", lambda p: Image.fromarray(_noise(rng, 64, 48, 2), "LA").save(p), (64, 48)),
        ("rgba.png", lambda p: Image.fromarray(_noise(rng, 64, 48, 4), "RGBA").save(p), (64, 48)),
        ("palette.png", lambda p: _shapes(64, 48).quantize(16).save(p), (64, 48)),
        ("palette_transparent.png", lambda p: _shapes(64, 48).quantize(16).save(p, transparency=0), (64, 48)),
        ("16bit.png", lambda p: Image.fromarray(rng.integers(0, 65536, (48, 64), dtype=np.uint16)).save(p), (64, 48)),
        ("int32.tif", lambda p: Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (48, 64), dtype=np.int32)).save(p), (64, 48)),
        ("float.tif", lambda p: Image.fromarray(rng.normal(0, 1e4, (48, 64)).astype(np.float32)).save(p), (64, 48)),
        ("float_nan.tif", lambda p: Image.fromarray(np.full((48, 64), np.nan, np.float32)).save(p), (64, 48)),
        ("bilevel.png", lambda p: Image.fromarray(_noise(rng, 64, 48, 1) > 127).save(p), (64, 48)),
        ("cmyk.jpg", lambda p: _shapes(64, 48).convert("CMYK").save(p), (64, 48)),
        ("rgb.webp", lambda p: _shapes(64, 48).save(p), (64, 48)),
        ("rgb.bmp", lambda p: _shapes(64, 48).save(p), (64, 48)),
        ("rgb.gif", lambda p: _shapes(64, 48).save(p), (64, 48)),
        ("animated.gif", lambda p: _shapes(64, 48).save(p, save_all=True, append_images=[_shapes(64, 48).rotate(90)]), (64, 48)),
        ("rgb.tiff", lambda p: _shapes(64, 48).save(p), (64, 48)),
        ("png_named.jpg", lambda p: _shapes(64, 48).save(p, format="PNG"), (64, 48)),
        ("exif_rotated.jpg", lambda p: _exif_rotated(p), (60, 120)),
        ("new\nline.jpg", lambda p: _shapes(64, 48).save(p), (64, 48)),
        ("unicode name 🔴 دائرة.jpg", lambda p: _shapes(64, 48).save(p), (64, 48)),
        ("50000x1_header.png", lambda p: p.write_bytes(_png_header(50000, 1, with_data=True)), (50000, 1)),
    ]
    if big:
        files.append(("8000x8000.jpg", lambda p: _shapes(8000, 8000).save(p, quality=80), (8000, 8000)))
    out = []
    for name, make, size in files:
        path = folder / name
        make(path)
        expect = answer if name != "50000x1_header.png" else ANY_INPUT_ERROR  # pixels missing: may be refused
        out.append(ImageFile(name, path, expect, size))
    return out


def _exif_rotated(path: Path) -> None:
    """A 120x60 JPEG with EXIF orientation 6 (rotate 90° clockwise): upright it is 60x120."""
    image = _shapes(120, 60)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif)


def _broken(folder: Path, rng: np.random.Generator, sample: bytes, png: bytes) -> list[ImageFile]:
    refused = Expect(ImageReadError, ("cannot read image",))
    out: list[ImageFile] = []

    def add(name: str, data: bytes | None, expect: Expect = refused) -> None:
        path = folder / name
        if data is not None:
            path.write_bytes(data)
        out.append(ImageFile(name, path, expect))

    for cut in sorted({10, 100, len(sample) // 3, len(sample) // 2, len(sample) - 2, int(rng.integers(20, len(sample)))}):
        add(f"truncated_{cut}.jpg", sample[:cut], ANY_INPUT_ERROR if cut > 600 else refused)
    add("truncated.png", png[: len(png) // 2], ANY_INPUT_ERROR)
    for i in range(3):
        flipped = bytearray(sample)
        for at in rng.integers(len(sample) // 4, len(sample), 16):
            flipped[int(at)] ^= 0xFF
        add(f"bitflip_{i}.jpg", bytes(flipped), ANY_INPUT_ERROR)
    bad_crc = bytearray(png)
    bad_crc[-20] ^= 0x55
    add("bad_crc.png", bytes(bad_crc), ANY_INPUT_ERROR)
    add("random_bytes.jpg", rng.bytes(5000))
    add("text_file.png", b"this is plain text, not a picture\n")
    add("svg_named.jpg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    add("empty.jpg", b"")
    add("bomb_12000x9000_header.png", _png_header(12000, 9000), Expect(ImageReadError, ("limit",)))
    add("bomb_70000x70000_header.png", _png_header(70000, 70000), Expect(ImageReadError, ("limit", "too large")))
    add("header_only_100x100.png", _png_header(100, 100))
    (folder / "q.jpg").mkdir()
    add("q.jpg", None, Expect(ImageReadError, ("not a regular file",)))
    (folder / "broken_link.jpg").symlink_to(folder / "nowhere.jpg")
    add("broken_link.jpg", None, Expect(ImageReadError, ("does not exist",)))
    os.mkfifo(folder / "fifo.jpg")
    add("fifo.jpg", None, Expect(ImageReadError, ("not a regular file",)))
    add("missing.jpg", None, Expect(ImageReadError, ("does not exist",)))
    add("miss\ning.jpg", None, Expect(ImageReadError, ("does not exist",)))
    add("x" * 300 + ".jpg", None, refused)
    add("nul\x00byte.jpg", None, refused)
    unreadable = folder / "no_permission.jpg"
    unreadable.write_bytes(sample)
    unreadable.chmod(0)
    out.append(ImageFile(unreadable.name, unreadable, Expect() if os.access(unreadable, os.R_OK) else refused, None))
    return out


def write_image_files(folder: Path, rng: np.random.Generator, sample: Path, *, big: bool) -> list[ImageFile]:
    """Every query file of the ``image_query`` category, written into ``folder``."""
    png = folder / "_sample.png"
    Image.open(sample).save(png)
    files = _decodable(folder, rng, big=big) + _broken(folder, rng, sample.read_bytes(), png.read_bytes())
    png.unlink()
    return files


def image_query_cases(engine, files: Sequence[ImageFile], rng: np.random.Generator, *, regions: int = 1) -> list[FuzzCase]:  # noqa: ANN001
    """Each file queried whole, and ``regions`` times with a random box inside it (decodable ones)."""
    cases = []
    for f in files:
        cases.append(FuzzCase("image_query", short_repr(f.name), functools.partial(engine.search, image=f.path, k=5), f.expect, k=5))
        if f.size is None or f.expect.error is not None:
            continue
        width, height = f.size
        for _ in range(regions):
            x1, x2 = sorted(rng.uniform(0, width, 2))
            y1, y2 = sorted(rng.uniform(0, height, 2))
            box = (float(x1), float(y1), float(min(width, max(x2, x1 + 0.5))), float(min(height, max(y2, y1 + 0.5))))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            cases.append(FuzzCase("image_query", f"{short_repr(f.name)} region={box}", functools.partial(engine.search, image=f.path, region=box, k=5), f.expect, k=5))
    return cases


# ----------------------------------------------------------------------------------------------
# wrong-typed arguments and the command line
# ----------------------------------------------------------------------------------------------
def api_type_cases(engine, image: Path) -> list[FuzzCase]:  # noqa: ANN001
    """Arguments of the wrong type: a clear EngineError, or a one-line TypeError, never anything else."""
    odd: list[dict[str, Any]] = [
        {"image": image, "region": 5}, {"image": image, "region": "0,0,10,10"}, {"image": image, "region": {"x": 1}},
        {"image": image, "region": [1, 2, 3, float("nan")]}, {"image": 5}, {"image": b"q.jpg"}, {"image": ""},
        {"text": 5}, {"text": b"red circle"}, {"text": ["red", "circle"]}, {"image": image, "k": True},
        {"image": image, "k": 2.0}, {"image": image, "k": "3"}, {"image": image, "k": None}, {"image": image, "k": 10**12},
    ]
    return [
        FuzzCase("api_types", short_repr(kw), functools.partial(engine.search, **kw), ANY_INPUT_ERROR, tolerate=(TypeError,), k=kw.get("k") if isinstance(kw.get("k"), int) else None)
        for kw in odd
    ]


def _cli_call(index_dir: Path, device: str, args: list[str]) -> Any:
    """Run ``engine query`` in-process; raise a RuntimeError naming what went wrong if it crashed."""
    from click.testing import CliRunner

    from engine.cli import main

    result = CliRunner().invoke(main, ["query", "--index", str(index_dir), "--device", device, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise RuntimeError(f"engine query crashed with {type(result.exception).__name__}: {result.exception}")
    if "Traceback" in result.output:
        raise RuntimeError("engine query printed a traceback")
    if result.exit_code not in (0, 1, 2):
        raise RuntimeError(f"engine query exited with {result.exit_code}")
    if result.exit_code != 0:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        if len(errors) != 1:
            raise RuntimeError(f"engine query printed {len(errors)} 'Error:' lines: {result.output[-300:]!r}")
    return []


def cli_cases(index_dir: Path, image: Path, rng: np.random.Generator, n: int, device: str) -> list[FuzzCase]:
    """Odd ``--region`` strings and ``--text`` values through ``engine query`` (click's runner, in-process)."""
    cases = []
    for i in range(n):
        if i % 2 == 0:
            args = ["--image", str(image), "--region", random_box_text(rng), "-k", "3"]
        else:
            args = ["--text", random_text(rng, 4).replace("\x00", ""), "-k", "3"]  # argv cannot hold NUL
        cases.append(FuzzCase("cli", short_repr(args[2:]), functools.partial(_cli_call, index_dir, device, args), Expect(), hits=False))
    return cases


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def build_cases(engine, corpus: Path, index_dir: Path, folder: Path, args: argparse.Namespace) -> list[FuzzCase]:  # noqa: ANN001
    from engine.datasets.annotations import read_annotations

    rng = np.random.default_rng(args.seed)
    anns = read_annotations(corpus)
    images = [corpus / a.image for a in anns]
    sizes = [(a.width, a.height) for a in anns]
    n = args.cases
    files = write_image_files(folder, rng, images[0], big=args.big)
    return [
        *parse_box_cases(rng, 20 * n),
        *validate_box_cases(rng, 10 * n),
        *box_query_cases(engine, images, sizes, rng, n),
        *text_query_cases(engine, images[0], rng, n, long=args.long_texts),
        *image_query_cases(engine, files, rng, regions=max(1, n // 100)),
        *api_type_cases(engine, images[0]),
        *cli_cases(index_dir, images[0], rng, max(2, n // 20), args.device),
    ]


def _big_image_ok(min_available_gb: float = 4.0) -> bool:
    """Whether the machine has the memory to decode an 8000x8000 image (about 0.2 GB, plus the network's copy)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20 >= min_available_gb
    except OSError:
        pass
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of every random input")
    p.add_argument("--cases", type=int, default=200, help="scale: box and text queries each; parse_box gets 20x, validate_box 10x")
    p.add_argument("--long-texts", type=int, default=7, help="100k-character texts to try (0-7; each may take a minute)")
    p.add_argument("--big", action=argparse.BooleanOptionalAction, default=None, help="include an 8000x8000 image (default: when 4 GB are free)")
    p.add_argument("--index", type=Path, default=None, help="index directory to build or reuse (default: benchmarks/.cache/<corpus>/index)")
    p.add_argument("--corpus", type=Path, default=None, help="synthetic corpus to generate or reuse")
    p.add_argument("--images", type=int, default=48, help="images of the synthetic corpus")
    p.add_argument("--size", type=int, default=160, help="side of the synthetic images, px")
    p.add_argument("--proposals", default="gt", choices=["gt", "rpn", "auto"], help="region proposals of the index")
    p.add_argument("--device", default="cpu", help="engine device: cpu, cuda, auto")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override an EngineConfig field, e.g. --set stage3=false (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--strict-order", action="store_true", help="count answers whose hit scores are not in descending order as failures (by default they are only counted)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "fuzz.json", help="result file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.cases < 1:
        p.error("--cases must be >= 1")
    if args.big is None:
        args.big = _big_image_ok()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("engine").setLevel(logging.ERROR)
    logging.getLogger("indexer").setLevel(logging.ERROR)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from engine.api import Engine

    corpus, index_dir = ensure_index(IndexSpec(images=args.images, size=args.size, proposals=args.proposals), device=args.device, index_dir=args.index, corpus=args.corpus)
    start = time.perf_counter()
    rss_before = rss_mb()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp, Engine(index_dir, config=engine_config(args.device, args.overrides)) as engine:
        cases = build_cases(engine, corpus, index_dir, Path(tmp), args)
        report = run_cases(cases, FuzzReport(), total=len(cases), quiet=args.quiet, check_order=args.strict_order)
    failures = sum(report.failed.values())
    result = {
        "passed": failures == 0,
        "seed": args.seed,
        "cases": sum(report.counts.values()),
        "failures": failures,
        "unsorted_hit_lists": sum(report.unsorted.values()),
        "seconds": round(time.perf_counter() - start, 1),
        "rss_mb": {"before": round(rss_before, 1), "after": round(rss_mb(), 1)},
        "big_image": args.big,
        "categories": report.categories(),
        "failure_details": report.failures,
        "slow_cases": report.slow,
        "setup": {"corpus": str(corpus), "index": str(index_dir), "device": args.device, "overrides": args.overrides, "cases_scale": args.cases, "long_texts": args.long_texts, "threads": args.threads or None, "strict_order": args.strict_order},
    }
    write_json(args.out, result)
    _print_summary(result, args.out)
    return 0 if result["passed"] else 1


def _print_summary(result: dict[str, Any], out: Path) -> None:
    print(f"fuzz: {result['cases']} cases in {result['seconds']} s, {result['failures']} failures (seed {result['seed']})")
    for name, c in result["categories"].items():
        print(f"  {name:<13} {c['cases']:>5} cases  {c['answered']:>5} answered  {sum(c['errors'].values()):>5} errors  {c['tolerated']:>3} tolerated  {c['failures']:>3} failures  {c['seconds']:>7.1f} s")
    for failure in result["failure_details"][:20]:
        print(f"  FAIL {failure['category']} {failure['input']}: {failure['problem']}")
    for slow in result["slow_cases"]:
        print(f"  {'SLOW' if slow['seconds'] > SLOW_SECONDS else 'time'} {slow['category']} {slow['input']}: {slow['seconds']} s ({slow['status']} {slow['error'] or ''})")
    print(f"{'PASSED' if result['passed'] else 'FAILED'}; results in {out}")


if __name__ == "__main__":
    sys.exit(main())
