"""End to end through the Python API on the tiny synthetic corpus (GT boxes, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.api import Engine
from engine.config import EngineConfig, IndexConfig
from engine.datasets.annotations import read_annotations
from engine.errors import ImageReadError, IndexNotFoundError, InvalidBoxError, InvalidInputError


def _first_region(corpus: Path):
    ann = read_annotations(corpus)[0]
    return corpus / ann.image, ann.regions[0].box


def test_region_of_an_indexed_image_finds_itself_first(tiny_engine: Engine, tiny_corpus: Path) -> None:
    image, box = _first_region(tiny_corpus)
    hits = tiny_engine.search(image=image, region=box, k=5)
    assert len(hits) == 5
    assert Path(hits[0].image) == image.resolve()
    assert np.allclose(hits[0].box, box, atol=1e-3)
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_exclude_self_drops_the_query_image(tiny_engine: Engine, tiny_corpus: Path) -> None:
    image, box = _first_region(tiny_corpus)
    hits = tiny_engine.search(image=image, region=box, k=10, exclude_self=True)
    assert hits and all(Path(h.image) != image.resolve() for h in hits)


def test_one_image_does_not_fill_the_list_with_overlapping_boxes(tiny_engine: Engine, tiny_corpus: Path) -> None:
    from engine.boxes import box_iou

    image, box = _first_region(tiny_corpus)
    hits = tiny_engine.search(image=image, region=box, k=30)
    for i, a in enumerate(hits):
        for b in hits[i + 1 :]:
            if a.image == b.image:
                assert box_iou([a.box], [b.box])[0, 0] <= 0.5


def test_whole_image_query_and_hit_json(tiny_engine: Engine, tiny_corpus: Path) -> None:
    image, _ = _first_region(tiny_corpus)
    hits = tiny_engine.search(image=image, k=3)
    assert len(hits) == 3
    d = hits[0].to_dict()
    assert set(d) == {"image", "box", "score", "region_id", "scores"} and set(d["scores"]) == {"visual", "layout", "instance"}
    json.dumps(d)


def test_info_counts(tiny_engine: Engine, tiny_corpus: Path) -> None:
    info = tiny_engine.info().to_dict()
    anns = read_annotations(tiny_corpus)
    assert info["images"] == len(anns)
    assert info["regions"] > len(anns)
    assert info["errors"] == 0
    assert info["index_type"] and info["device"] == "cpu"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image": None}, InvalidInputError, "needs an image"),
        ({"text": "   "}, InvalidInputError, "empty"),
        ({"k": 0}, InvalidInputError, "positive"),
        ({"region": (0, 0, 10_000, 10)}, InvalidBoxError, "outside"),
        ({"region": (50, 50, 50, 80)}, InvalidBoxError, "empty"),
    ],
)
def test_bad_queries_are_clear_errors(tiny_engine: Engine, tiny_corpus: Path, kwargs, error, match) -> None:
    image, _ = _first_region(tiny_corpus)
    args = {"image": image, **kwargs}
    with pytest.raises(error, match=match):
        tiny_engine.search(**args)


def test_missing_query_image_and_missing_index(tiny_engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        tiny_engine.search(image=tmp_path / "nope.jpg")
    with pytest.raises(IndexNotFoundError):
        Engine(tmp_path / "no-index", config=EngineConfig(device="cpu")).info()


def test_incremental_reindex_changes_deletes_and_errors(corpus_copy: Path, tmp_path: Path) -> None:
    engine = Engine(tmp_path / "idx", config=EngineConfig(device="cpu"))
    gt = IndexConfig(proposals="gt")
    first = engine.index(corpus_copy, config=gt)
    n = len(read_annotations(corpus_copy))
    assert (first.processed, first.unchanged, first.removed, first.errors) == (n, 0, 0, 0)
    assert engine.index(corpus_copy, config=gt).processed == 0  # unchanged corpus: nothing to do

    anns = read_annotations(corpus_copy)
    images = [corpus_copy / a.image for a in anns]
    box1 = anns[1].regions[0].box
    before = engine.search(image=images[1], region=box1, k=1)[0]
    images[0].unlink()  # deleted
    Image.open(images[1]).save(images[1], quality=60)  # changed content, same scene
    (corpus_copy / "broken").mkdir()
    (corpus_copy / "broken" / "empty.jpg").write_bytes(b"")  # zero-byte
    (corpus_copy / "broken" / "text.png").write_text("not an image")
    (corpus_copy / "broken" / "cut.jpg").write_bytes(images[3].read_bytes()[:300])  # truncated
    second = engine.index(corpus_copy, config=gt)
    assert (second.processed, second.removed, second.errors) == (1, 1, 3)
    assert second.unchanged == n - 2
    errors = dict(engine.errors())
    assert set(Path(p).name for p in errors) == {"empty.jpg", "text.png", "cut.jpg"}
    assert all(reason for reason in errors.values())
    info = engine.info().to_dict()
    assert info["images"] == n - 1 and info["errors"] == 3

    # the deleted image never comes back; the changed one is found under new region ids, once
    hits = engine.search(image=images[1], region=box1, k=50)
    assert all(Path(h.image) != images[0].resolve() for h in hits)
    assert Path(hits[0].image) == images[1].resolve() and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[0].region_id != before.region_id
    assert before.region_id not in {h.region_id for h in hits}
    assert engine.index(corpus_copy, config=gt).processed == 0  # broken files are not retried until they change
    engine.close()
