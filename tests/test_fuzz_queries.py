"""Fast versions of the fuzz properties of ``benchmarks/fuzz.py`` (a few cases each, on the tiny index),
and regression tests of the bugs the fuzzing found.

Every query input either answers or raises an input error (``InvalidInputError``,
``InvalidBoxError``, ``ImageReadError``) with a one-line message; never anything else.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from engine.api import Engine
from engine.boxes import validate_box
from engine.errors import CheckpointError, ImageReadError, InvalidBoxError, InvalidInputError
from indexer.images import load_image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, as_name: str) -> ModuleType:
    if as_name in sys.modules:
        return sys.modules[as_name]
    spec = importlib.util.spec_from_file_location(as_name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    _load("bench_common", "bench_common")  # fuzz.py imports it by this name
    return _load("fuzz", "benchmarks_fuzz")


def _run(fuzz: ModuleType, cases: list) -> None:
    report = fuzz.run_cases(cases, fuzz.FuzzReport(), quiet=True)
    assert sum(report.counts.values()) == len(cases)
    assert not report.failures, "\n".join(f"{f['input']}: {f['problem']}" for f in report.failures[:10])


def _first_image(corpus: Path) -> Path:
    return sorted((corpus / "images").iterdir())[0]


# ----------------------------------------------------------------------------------------------
# the fuzz properties, few cases
# ----------------------------------------------------------------------------------------------
def test_parse_box_gives_a_good_box_or_a_one_line_invalid_box_error(fuzz: ModuleType) -> None:
    _run(fuzz, fuzz.parse_box_cases(np.random.default_rng(0), 500))


def test_validate_box_takes_four_numbers_inside_the_image_and_nothing_else(fuzz: ModuleType) -> None:
    _run(fuzz, fuzz.validate_box_cases(np.random.default_rng(1), 500))


def test_random_regions_answer_or_are_refused(fuzz: ModuleType, tiny_engine: Engine, tiny_corpus: Path) -> None:
    image = _first_image(tiny_corpus)
    size = Image.open(image).size
    _run(fuzz, fuzz.box_query_cases(tiny_engine, [image], [size], np.random.default_rng(2), 12))


def test_odd_unicode_texts_answer_or_are_refused(fuzz: ModuleType, tiny_engine: Engine, tiny_corpus: Path) -> None:
    cases = fuzz.text_query_cases(tiny_engine, _first_image(tiny_corpus), np.random.default_rng(3), 16)
    _run(fuzz, [c for c in cases if not c.shown.startswith("image+")])


def test_odd_unicode_texts_with_an_image_answer_or_are_refused(fuzz: ModuleType, tiny_engine: Engine, tiny_corpus: Path) -> None:
    try:
        tiny_engine.search(image=_first_image(tiny_corpus), text="a red circle", k=1)
    except CheckpointError as exc:  # e.g. stage 3's fitted weights not shipped yet
        pytest.skip(f"combined image+text queries cannot run here: {exc}")
    cases = fuzz.text_query_cases(tiny_engine, _first_image(tiny_corpus), np.random.default_rng(4), 16)
    _run(fuzz, [c for c in cases if c.shown.startswith("image+")][:2])


def test_long_texts_without_words_are_refused_quickly(fuzz: ModuleType, tiny_engine: Engine) -> None:
    wordless = [text for label, text in fuzz.long_texts() if label.split()[0] in ("emoji", "whitespace", "control")]
    assert len(wordless) == 3
    for text in wordless:
        with pytest.raises(InvalidInputError) as caught:
            tiny_engine.search(text=text, k=5)
        assert "\n" not in str(caught.value)


def test_odd_image_files_answer_or_are_refused(fuzz: ModuleType, tiny_engine: Engine, tiny_corpus: Path, tmp_path: Path) -> None:
    files = fuzz.write_image_files(tmp_path, np.random.default_rng(5), _first_image(tiny_corpus), big=False)
    names = {f.name for f in files}
    assert {"1x10000.png", "16bit.png", "palette_transparent.png", "q.jpg", "empty.jpg", "text_file.png", "random_bytes.jpg"} <= names
    decoded = {"1x1.png", "1x10000.png", "10000x1.png", "16bit.png", "float_nan.tif", "palette_transparent.png", "cmyk.jpg", "exif_rotated.jpg", "new\nline.jpg"}
    chosen = [f for f in files if f.expect.error is not None or f.name in decoded]  # every broken file, a few good ones (seconds)
    _run(fuzz, fuzz.image_query_cases(tiny_engine, chosen, np.random.default_rng(6), regions=0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"region": 5},
        {"region": "0,0,10,10"},
        {"region": {"x": 1}},
        {"region": [1, 2, 3, float("nan")]},
        {"region": [0, 0, 10**400, 5]},
        {"image": 5},
        {"image": ""},
        {"k": 2.0},
        {"k": "3"},
        {"text": 5, "image": None},
        {"text": ["red", "circle"], "image": None},
        {"text": b"red circle"},
    ],
    ids=lambda kw: ",".join(f"{k}={v!r:.12}" for k, v in kw.items()),
)
def test_wrong_typed_arguments_are_clear_errors(tiny_engine: Engine, tiny_corpus: Path, kwargs: dict) -> None:
    args = {"image": _first_image(tiny_corpus), "k": 5, **kwargs}
    try:
        tiny_engine.search(**args)
    except Exception as exc:  # noqa: BLE001
        from engine.errors import EngineError

        assert isinstance(exc, (EngineError, TypeError)), f"{type(exc).__name__}: {exc}"
        assert "\n" not in str(exc) and str(exc).strip()
    else:
        pytest.fail(f"search({kwargs}) answered")


# ----------------------------------------------------------------------------------------------
# regressions of what the fuzzing found
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [5, None, "1234", b"1234", {1: 0, 2: 0, 3: 0, 4: 0}, {1, 2, 3, 4}, 3.5])
def test_validate_box_refuses_strings_mappings_and_non_sequences(value: object) -> None:
    with pytest.raises(InvalidBoxError, match="must be 4 numbers"):
        validate_box(value, 100, 100)  # type: ignore[arg-type]


def test_validate_box_refuses_ints_too_large_for_a_float_and_takes_iterables() -> None:
    with pytest.raises(InvalidBoxError, match="must hold numbers"):
        validate_box([0, 0, 10**400, 5], 100, 100)
    assert validate_box(iter([1, 2, 3, 4]), 10, 10) == (1.0, 2.0, 3.0, 4.0)
    assert validate_box(np.asarray([1, 2, 3, 4], np.int32), 10, 10) == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize("name", ["miss\ning.jpg", "tab\there.jpg", "x" * 300 + ".jpg", "nul\x00.jpg"])
def test_unreadable_paths_give_one_line_image_read_errors(tmp_path: Path, name: str) -> None:
    with pytest.raises(ImageReadError) as caught:
        load_image(tmp_path / name)
    message = str(caught.value)
    assert "\n" not in message and "\t" not in message and message.startswith("cannot read image")


def test_an_image_with_a_newline_in_its_name_loads(tmp_path: Path) -> None:
    path = tmp_path / "new\nline.png"
    Image.new("RGB", (4, 3), (1, 2, 3)).save(path, format="PNG")
    assert load_image(path).size == (4, 3)


def test_load_image_of_a_non_path_is_an_image_read_error() -> None:
    with pytest.raises(ImageReadError, match="not a file path"):
        load_image(5)  # type: ignore[arg-type]


def test_float_image_with_nan_pixels_loads_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "nan.tif"
    pixels = np.full((6, 8), np.nan, np.float32)
    pixels[0, 0] = np.inf
    Image.fromarray(pixels).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)


def test_a_region_thinner_than_float32_resolution_answers(tiny_engine: Engine, tiny_corpus: Path) -> None:
    x, y = 21.589223734846836, 14.822087838985976
    hits = tiny_engine.search(image=_first_image(tiny_corpus), region=(x, y, x + 1e-6, y + 1e-6), k=3)
    assert len(hits) == 3
