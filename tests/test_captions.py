"""COCO captions and Karpathy split readers on tiny files in the real formats."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from engine.datasets.captions import read_coco_captions, read_karpathy
from engine.errors import DatasetFormatError

COCO_CAPTIONS = {
    "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset.", "year": 2014},
    "images": [
        {"license": 5, "file_name": "COCO_train2014_000000057870.jpg", "coco_url": "http://mscoco.org/images/57870", "height": 480, "width": 640, "date_captured": "2013-11-14 16:28:13", "flickr_url": "http://farm4.staticflickr.com/a.jpg", "id": 57870},
        {"license": 5, "file_name": "COCO_train2014_000000384029.jpg", "coco_url": "http://mscoco.org/images/384029", "height": 429, "width": 640, "date_captured": "2013-11-14 16:29:45", "flickr_url": "http://farm3.staticflickr.com/b.jpg", "id": 384029},
        {"license": 5, "file_name": "COCO_train2014_000000000001.jpg", "height": 10, "width": 10, "id": 1},
    ],
    "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution-NonCommercial-ShareAlike License"}],
    "annotations": [
        {"image_id": 57870, "id": 787980, "caption": "A restaurant has modern wooden tables and chairs."},
        {"image_id": 384029, "id": 16, "caption": "A man preparing desserts in a kitchen covered in frosting.\n"},
        {"image_id": 57870, "id": 789366, "caption": "A long restaurant table with rattan rounded back chairs."},
    ],
}

KARPATHY_COCO = {
    "images": [
        {
            "filepath": "val2014",
            "sentids": [770337, 771687],
            "filename": "COCO_val2014_000000391895.jpg",
            "imgid": 0,
            "split": "test",
            "sentences": [
                {"tokens": ["a", "man", "with", "a", "red", "helmet"], "raw": "A man with a red helmet on a small moped on a dirt road. ", "imgid": 0, "sentid": 770337},
                {"tokens": ["man", "riding", "a", "motor", "bike"], "raw": "Man riding a motor bike on a dirt road on the countryside.", "imgid": 0, "sentid": 771687},
            ],
            "cocoid": 391895,
        },
        {
            "filepath": "train2014",
            "sentids": [1],
            "filename": "COCO_train2014_000000057870.jpg",
            "imgid": 1,
            "split": "restval",
            "sentences": [{"tokens": ["a", "restaurant"], "raw": "A restaurant.", "imgid": 1, "sentid": 1}],
            "cocoid": 57870,
        },
    ],
    "dataset": "coco",
}

KARPATHY_FLICKR = {
    "images": [
        {
            "sentids": [0, 1],
            "imgid": 0,
            "sentences": [
                {"tokens": ["two", "young", "guys"], "raw": "Two young guys with shaggy hair look at their hands while hanging out in the yard.", "imgid": 0, "sentid": 0},
                {"tokens": ["two", "young", "white", "males"], "raw": "Two young, White males are outside near many bushes.", "imgid": 0, "sentid": 1},
            ],
            "split": "train",
            "filename": "1000092795.jpg",
        },
        {"sentids": [5], "imgid": 1, "sentences": [{"tokens": ["a", "dog"], "raw": "A dog.", "imgid": 1, "sentid": 5}], "split": "val", "filename": "10002456.jpg"},
    ],
    "dataset": "flickr30k",
}


def _json(tmp_path: Path, name: str, data) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_coco_captions(tmp_path):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "train2014" / "COCO_train2014_000000057870.jpg").write_bytes(b"x")
    (root / "COCO_train2014_000000384029.jpg").write_bytes(b"x")
    ds = read_coco_captions(_json(tmp_path, "captions_train2014.json", COCO_CAPTIONS), images_root=root, split="train")
    assert ds.name == "captions_train2014" and ds.root == root
    a, b, c = ds.images
    assert a.image == "train2014/COCO_train2014_000000057870.jpg" and b.image == "COCO_train2014_000000384029.jpg"
    assert (a.width, a.height, a.image_id, a.split) == (640, 480, 57870, "train")
    assert a.captions == ("A restaurant has modern wooden tables and chairs.", "A long restaurant table with rattan rounded back chairs.")
    assert b.captions == ("A man preparing desserts in a kitchen covered in frosting.",)
    assert c.captions == ()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d["annotations"].append({"image_id": 5, "id": 1, "caption": "x"}), "caption 1 refers to image 5"),
        (lambda d: d["annotations"][0].pop("caption"), "lacks the field 'caption'"),
        (lambda d: d["images"][0].pop("file_name"), "lacks the field 'file_name'"),
        (lambda d: d.pop("annotations"), "lacks the field 'annotations'"),
    ],
)
def test_coco_captions_malformed(tmp_path, mutate, match):
    data = json.loads(json.dumps(COCO_CAPTIONS))
    mutate(data)
    with pytest.raises(DatasetFormatError, match=match) as err:
        read_coco_captions(_json(tmp_path, "captions_val2014.json", data), images_root=tmp_path)
    assert "captions_val2014.json" in str(err.value)


def test_coco_captions_missing_file(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"captions_train2014\.json does not exist"):
        read_coco_captions(tmp_path / "captions_train2014.json", images_root=tmp_path)


def test_karpathy_coco_reads_sizes_from_images(tmp_path, caplog):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "val2014" / "COCO_val2014_000000391895.jpg")
    with caplog.at_level(logging.WARNING):
        ds = read_karpathy(_json(tmp_path, "dataset_coco.json", KARPATHY_COCO), images_root=root)
    assert ds.name == "coco"
    a, b = ds.images
    assert (a.image, a.width, a.height, a.split, a.image_id) == ("val2014/COCO_val2014_000000391895.jpg", 64, 48, "test", 391895)
    assert a.captions == ("A man with a red helmet on a small moped on a dirt road.", "Man riding a motor bike on a dirt road on the countryside.")
    assert (b.image, b.width, b.height, b.split) == ("train2014/COCO_train2014_000000057870.jpg", 0, 0, "restval")
    assert "1 images have no readable file" in caplog.text
    merged = read_karpathy(tmp_path / "dataset_coco.json", images_root=root, merge_restval=True)
    assert [im.split for im in merged.images] == ["test", "train"]


def test_karpathy_flickr(tmp_path):
    root = tmp_path / "flickr30k-images"
    root.mkdir()
    Image.new("RGB", (500, 333)).save(root / "1000092795.jpg")
    ds = read_karpathy(_json(tmp_path, "dataset_flickr30k.json", KARPATHY_FLICKR), images_root=root)
    a, b = ds.images
    assert (a.image, a.width, a.height, a.split, a.image_id, len(a.captions)) == ("1000092795.jpg", 500, 333, "train", 0, 2)
    assert (b.image, b.split, b.image_id, b.captions) == ("10002456.jpg", "val", 1, ("A dog.",))
    assert [im.image for im in ds.split("val").images] == ["10002456.jpg"]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d["images"][0].pop("split"), "lacks the field 'split'"),
        (lambda d: d["images"][0]["sentences"][0].pop("raw"), "sentence 0 lacks the field 'raw'"),
        (lambda d: d.update(images={}), "field 'images' must be list"),
        (lambda d: d["images"][0].update(imgid="0"), "non-integer cocoid/imgid"),
    ],
)
def test_karpathy_malformed(tmp_path, mutate, match):
    data = json.loads(json.dumps(KARPATHY_FLICKR))
    mutate(data)
    with pytest.raises(DatasetFormatError, match=match) as err:
        read_karpathy(_json(tmp_path, "dataset_flickr30k.json", data), images_root=tmp_path)
    assert "dataset_flickr30k.json" in str(err.value)


def test_karpathy_top_level_not_object(tmp_path):
    with pytest.raises(DatasetFormatError, match="top level must be a JSON object"):
        read_karpathy(_json(tmp_path, "dataset_flickr30k.json", [1, 2]), images_root=tmp_path)
