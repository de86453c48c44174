"""Reading, writing and validating annotations.jsonl / queries.jsonl: one-line errors with file and line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.datasets.annotations import (
    read_annotations,
    read_dataset,
    read_queries,
    validate_annotation_line,
    write_annotations,
    write_queries,
)
from engine.errors import AnnotationError
from engine.synth import SynthConfig, generate_corpus


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ann") / "corpus"
    generate_corpus(root, SynthConfig(images=24, seed=3, size=128))
    return root


@pytest.fixture()
def copy(small: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "c"
    shutil.copytree(small, dst)
    return dst


def _edit(path: Path, lineno: int, change) -> None:
    lines = path.read_text().splitlines()
    obj = json.loads(lines[lineno - 1])
    change(obj)
    lines[lineno - 1] = json.dumps(obj)
    path.write_text("\n".join(lines) + "\n")


def test_round_trip_through_the_types(small: Path, tmp_path: Path) -> None:
    images = read_annotations(small)
    queries = read_queries(small)
    write_annotations(tmp_path / "rt", images)
    write_queries(tmp_path / "rt", queries)
    assert read_annotations(tmp_path / "rt") == images
    assert read_queries(tmp_path / "rt") == queries
    assert images[0].objects[0].category == images[0].objects[0].attributes["shape"]
    assert all(ref.split == im.split for im in images for ref in im.refs)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match=r"annotations\.jsonl: file not found"):
        read_annotations(tmp_path)
    with pytest.raises(AnnotationError, match=r"queries\.jsonl: file not found"):
        read_queries(tmp_path)


def test_dataset_without_queries(copy: Path) -> None:
    (copy / "queries.jsonl").unlink()
    ds = read_dataset(copy)
    assert len(ds.images) == 24 and ds.queries == []


def test_bad_json_names_the_line(copy: Path) -> None:
    path = copy / "annotations.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"annotations\.jsonl:3: not valid JSON") as err:
        read_annotations(copy)
    assert "\n" not in str(err.value)


def _set_box(obj: dict) -> None:
    obj["objects"][1]["box"] = [10, 10, 999, 40]


@pytest.mark.parametrize(
    "change, pattern",
    [
        (_set_box, r":2: object \d+ box \[10, 10, 999, 40\] lies outside the 128x128 image"),
        (lambda o: o.pop("captions"), r":2: the image line lacks the key 'captions'"),
        (lambda o: o.update(width="wide"), r":2: the image line key 'width' must be an integer"),
        (lambda o: o["regions"][0].update(objects=[12345678]), r":2: region \d+ names object ids \[12345678\]"),
        (lambda o: o["refs"][0].pop("expression"), r":2: ref \d+ lacks the key 'expression'"),
        (lambda o: o["objects"][0]["mask"]["counts"].append(5), r":2: object \d+ mask counts sum to"),
        (lambda o: o["regions"][0].update(box=[5, 5, 5, 9]), r":2: region \d+ box .* is empty"),
        (lambda o: o["objects"][1].update(id=o["objects"][0]["id"]), r":2: object \d+ appears twice"),
    ],
)
def test_schema_errors_name_line_and_value(copy: Path, change, pattern: str) -> None:
    _edit(copy / "annotations.jsonl", 2, change)
    with pytest.raises(AnnotationError, match=pattern):
        read_annotations(copy)


def test_ids_must_be_unique_across_the_corpus(copy: Path) -> None:
    first = json.loads((copy / "annotations.jsonl").read_text().splitlines()[0])
    _edit(copy / "annotations.jsonl", 4, lambda o: o["regions"][0].update(id=first["regions"][0]["id"]))
    with pytest.raises(AnnotationError, match=r":4: region id \d+ is used again \(first on line 1\)"):
        read_annotations(copy)


def test_query_errors(copy: Path) -> None:
    _edit(copy / "queries.jsonl", 1, lambda q: q.update(positives=q["positives"] + [99999999]))
    with pytest.raises(AnnotationError, match=r"queries\.jsonl:1: region ids \[99999999\] are not regions"):
        read_dataset(copy)
    _edit(copy / "queries.jsonl", 1, lambda q: q.pop("text"))
    with pytest.raises(AnnotationError, match=r"queries\.jsonl:1: the query lacks the key 'text'"):
        read_queries(copy)


def test_validate_line_directly() -> None:
    good = {"image": "a.jpg", "width": 10, "height": 10, "objects": [], "regions": [], "refs": [], "captions": []}
    validate_annotation_line(good, where="x:1")
    with pytest.raises(AnnotationError, match="^x:1: each line must be a JSON object"):
        validate_annotation_line([], where="x:1")  # type: ignore[arg-type]
