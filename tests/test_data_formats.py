"""``--format vg|refcoco|coco|karpathy``: public-format datasets converted once and read by ``engine train``
and ``engine eval``. The fixtures are a tiny shapes corpus written out in each format's real layout."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.datasets.annotations import read_dataset
from engine.datasets.formats import prepare_dataset
from engine.errors import DatasetFormatError, InvalidInputError


def _images(corpus: Path, dst: Path, folder: str, name) -> list:  # noqa: ANN001
    """The corpus's images copied to ``dst/folder/name(i)``, with their annotations."""
    anns = read_dataset(corpus).images
    (dst / folder).mkdir(parents=True, exist_ok=True)
    for i, ann in enumerate(anns):
        shutil.copy(corpus / ann.image, dst / folder / name(i))
    return anns


def _to_vg(corpus: Path, dst: Path) -> Path:
    anns = _images(corpus, dst, "VG_100K", lambda i: f"{i + 1}.jpg")
    image_data = [{"image_id": i + 1, "width": a.width, "height": a.height, "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{i + 1}.jpg", "coco_id": None, "flickr_id": None} for i, a in enumerate(anns)]
    regions = [
        {"id": i + 1, "regions": [{"region_id": (i + 1) * 1000 + j, "image_id": i + 1, "x": r.box[0], "y": r.box[1], "width": r.box[2] - r.box[0], "height": r.box[3] - r.box[1], "phrase": r.description} for j, r in enumerate(a.regions)]}
        for i, a in enumerate(anns)
    ]
    (dst / "image_data.json").write_text(json.dumps(image_data))
    (dst / "region_descriptions.json").write_text(json.dumps(regions))
    return dst


def _to_refcoco(corpus: Path, dst: Path) -> Path:
    anns = _images(corpus, dst, "train2014", lambda i: f"COCO_train2014_{i + 1:012d}.jpg")
    categories = sorted({o.category for a in anns for o in a.objects})
    images, annotations, refs = [], [], []
    for i, a in enumerate(anns):
        images.append({"id": i + 1, "file_name": f"COCO_train2014_{i + 1:012d}.jpg", "width": a.width, "height": a.height})
        for o in a.objects:
            ann_id = (i + 1) * 100 + o.id
            x1, y1, x2, y2 = o.box
            annotations.append({"id": ann_id, "image_id": i + 1, "category_id": categories.index(o.category) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})
        split = {"train": "train", "val": "val"}.get(a.split or "", "testA")
        for r in a.refs:
            sid = (i + 1) * 1000 + r.id
            refs.append({"ref_id": sid, "ann_id": (i + 1) * 100 + r.object, "image_id": i + 1, "split": split, "category_id": 1, "sentences": [{"sent_id": sid, "sent": r.expression, "raw": r.expression, "tokens": r.expression.split()}]})
    (dst / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": k + 1, "name": c} for k, c in enumerate(categories)]}))
    (dst / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return dst


def _to_coco(corpus: Path, dst: Path) -> Path:
    anns = _images(corpus, dst, "train2014", lambda i: f"COCO_train2014_{i + 1:012d}.jpg")
    (dst / "annotations").mkdir()
    for split in ("train", "val"):
        chosen = [(i, a) for i, a in enumerate(anns) if (a.split == "train") == (split == "train")]
        data = {
            "images": [{"id": i + 1, "file_name": f"COCO_train2014_{i + 1:012d}.jpg", "width": a.width, "height": a.height} for i, a in chosen],
            "annotations": [{"id": (i + 1) * 10 + j, "image_id": i + 1, "caption": c} for i, a in chosen for j, c in enumerate(a.captions)],
        }
        (dst / "annotations" / f"captions_{split}2014.json").write_text(json.dumps(data))
    return dst


def _to_karpathy(corpus: Path, dst: Path) -> Path:
    anns = _images(corpus, dst, "train2014", lambda i: f"COCO_train2014_{i + 1:012d}.jpg")
    images = [
        {"filepath": "train2014", "filename": f"COCO_train2014_{i + 1:012d}.jpg", "imgid": i, "cocoid": i + 1, "split": "restval" if a.split == "train" and i % 2 else a.split, "sentences": [{"raw": c, "tokens": c.split()} for c in a.captions]}
        for i, a in enumerate(anns)
    ]
    (dst / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return dst


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ENGINE_DATA", str(tmp_path / "engine-data"))
    return tmp_path / "engine-data"


def test_every_format_converts_with_splits(grn_corpus: Path, tmp_path: Path, cache: Path) -> None:
    source = read_dataset(grn_corpus)
    for fmt, make in (("vg", _to_vg), ("refcoco", _to_refcoco), ("coco", _to_coco), ("karpathy", _to_karpathy)):
        folder = make(grn_corpus, tmp_path / fmt)
        converted = prepare_dataset(folder, fmt)
        assert converted.is_relative_to(cache / "converted")
        dataset = read_dataset(converted)
        assert all((converted / im.image).is_file() for im in dataset.images), fmt  # images reached through the link
        assert {im.split for im in dataset.images} <= {"train", "val", "test", None}
        assert dataset.split("train").images, fmt
        if fmt == "vg":  # the GRN benchmark: relational descriptions, sets of similar ones as queries
            assert dataset.queries and all(r.description for im in dataset.images for r in im.regions)
        if fmt == "refcoco":  # objects, refs, and each expression as a described region of its object's box
            im = next(im for im in dataset.images if im.refs)
            boxes = {o.id: o.box for o in im.objects}
            assert {(r.description, r.box) for r in im.regions} == {(r.expression, boxes[r.object]) for r in im.refs}
            assert dataset.split("test").images  # testA counts as test
        if fmt in ("coco", "karpathy"):
            assert sum(len(im.captions) for im in dataset.images) == sum(len(im.captions) for im in source.images)
        if fmt == "coco":
            assert dataset.split("val").images and dataset.split("test").images  # the val file halved
        assert prepare_dataset(folder, fmt) == converted  # unchanged sources: reused


def test_a_changed_source_is_converted_again(grn_corpus: Path, tmp_path: Path, cache: Path) -> None:
    folder = _to_karpathy(grn_corpus, tmp_path / "k")
    first = prepare_dataset(folder, "karpathy")
    before = len(read_dataset(first).split("test").images)
    data = json.loads((folder / "dataset_coco.json").read_text())
    for im in data["images"]:
        im["split"] = "test"
    (folder / "dataset_coco.json").write_text(json.dumps(data))
    assert prepare_dataset(folder, "karpathy") == first
    assert len(read_dataset(first).split("test").images) == len(data["images"]) > before


def test_missing_files_are_named(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="region_descriptions.json"):
        prepare_dataset(tmp_path / "empty", "vg")
    with pytest.raises(DatasetFormatError, match=r"refs\(<split_by>\).p"):
        prepare_dataset(tmp_path / "empty", "refcoco")
    with pytest.raises(DatasetFormatError, match="captions_"):
        prepare_dataset(tmp_path / "empty", "coco")
    with pytest.raises(DatasetFormatError, match="exactly one dataset_"):
        prepare_dataset(tmp_path / "empty", "karpathy")
    with pytest.raises(InvalidInputError, match="not a folder"):
        prepare_dataset(tmp_path / "nowhere", "vg")
    with pytest.raises(InvalidInputError, match="--format 'pascal'"):
        prepare_dataset(tmp_path / "empty", "pascal")
    assert prepare_dataset(tmp_path / "empty", "engine") == tmp_path / "empty"


def test_engine_train_and_eval_read_a_public_format(grn_corpus: Path, tmp_path: Path, cache: Path) -> None:
    from engine.cli import main

    vg = _to_vg(grn_corpus, tmp_path / "vg")
    runner = CliRunner()
    out = tmp_path / "tp.pt"
    result = runner.invoke(main, ["train", "text-projection", "--format", "vg", "--data", str(vg), "--out", str(out), "--epochs", "1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["command"].startswith(f"engine train text-projection --format vg --data {vg}")
    assert manifest["metrics"]["train_pairs"] > 0
    refcoco = _to_refcoco(grn_corpus, tmp_path / "refcoco")
    result = runner.invoke(main, ["eval", "rpn", "--format", "refcoco", "--data", str(refcoco), "--split", "test", "--ns", "10", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "10" in result.output
    bad = runner.invoke(main, ["eval", "rpn", "--format", "vg", "--data", str(refcoco)])
    assert bad.exit_code != 0 and "region_descriptions.json" in bad.output and "Traceback" not in bad.output


def test_a_union_of_datasets_keeps_every_image_region_and_query_apart(grn_corpus: Path, tmp_path: Path, cache: Path) -> None:
    from engine.datasets.formats import union_datasets

    twin = tmp_path / "twin"
    shutil.copytree(grn_corpus, twin, ignore=shutil.ignore_patterns(".engine-cache"))
    union = union_datasets([grn_corpus, twin])
    assert union.is_relative_to(cache / "converted") and union_datasets([grn_corpus, twin]) == union
    joined, one = read_dataset(union), read_dataset(grn_corpus)
    assert len(joined.images) == 2 * len(one.images) and len(joined.queries) == 2 * len(one.queries)
    assert all((union / im.image).is_file() for im in joined.images)
    ids = [r.id for im in joined.images for r in im.regions]
    assert len(ids) == len(set(ids))  # the twin's regions moved past the first dataset's
    where = {r.id: im.image for im in joined.images for r in im.regions}
    for q in joined.queries:  # each query still points at its own world's regions
        world = q.image.split("/")[0]
        assert {where[p].split("/")[0] for p in (q.region_id, *q.positives)} == {world}
    assert {im.split for im in joined.images} == {im.split for im in one.images}
    with pytest.raises(InvalidInputError, match="distinct names"):
        union_datasets([grn_corpus, grn_corpus])


def test_a_one_dataset_trainer_learns_several_worlds_from_their_union(grn_corpus: Path, tmp_path: Path, cache: Path) -> None:
    from engine.cli import main

    twin = tmp_path / "twin"
    shutil.copytree(grn_corpus, twin, ignore=shutil.ignore_patterns(".engine-cache"))
    out = tmp_path / "grn-fc.pt"
    result = CliRunner().invoke(main, ["train", "grn-fc", "--data", str(grn_corpus), "--data", str(twin), "--out", str(out), "--epochs", "1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["command"].startswith(f"engine train grn-fc --data {grn_corpus} --data {twin}")
    assert "union-" in manifest["data"]
