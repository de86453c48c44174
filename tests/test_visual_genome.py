"""Visual Genome reader on tiny files in the real region_descriptions.json / image_data.json format."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from engine.datasets.types import RegionAnn
from engine.datasets.visual_genome import read_visual_genome
from engine.errors import DatasetFormatError, InvalidInputError

IMAGE_DATA = [
    {"width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "height": 600, "image_id": 1, "coco_id": None, "flickr_id": None},
    {"width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K/10.jpg", "height": 600, "image_id": 10, "coco_id": 2, "flickr_id": 15},
    {"width": 640, "url": "https://cs.stanford.edu/people/rak248/VG_100K/11.jpg", "height": 480, "image_id": 11, "coco_id": None, "flickr_id": None},
]
REGIONS = [
    {
        "regions": [
            {"region_id": 1382, "width": 82, "height": 139, "image_id": 1, "phrase": "the clock is green in colour", "y": 57, "x": 421},
            {"region_id": 1383, "width": 182, "height": 109, "image_id": 1, "phrase": "shade is along the street ", "y": 372, "x": 320},
            {"region_id": 1384, "width": 100, "height": 100, "image_id": 1, "phrase": "sign off the edge", "y": 550, "x": 750},
            {"region_id": 1385, "width": 0, "height": 20, "image_id": 1, "phrase": "zero width", "y": 5, "x": 5},
            {"region_id": 1386, "width": 20, "height": 20, "image_id": 1, "phrase": "   ", "y": 5, "x": 5},
        ],
        "id": 1,
    },
    {"regions": [{"region_id": 5000, "width": 10.5, "height": 20, "image_id": 10, "phrase": "man on a bike", "y": 0, "x": 1}], "id": 10},
    {"regions": [], "id": 11},
]


def _write(tmp_path: Path, regions=REGIONS, image_data=IMAGE_DATA) -> Path:
    d = tmp_path / "vg"
    d.mkdir(exist_ok=True)
    (d / "region_descriptions.json").write_text(json.dumps(regions))
    (d / "image_data.json").write_text(json.dumps(image_data))
    return d


def test_reads_images_and_regions(tmp_path, caplog):
    d = _write(tmp_path)
    root = tmp_path / "images"
    (root / "VG_100K_2").mkdir(parents=True)
    (root / "VG_100K_2" / "1.jpg").write_bytes(b"x")
    (root / "10.jpg").write_bytes(b"x")  # flat layout also found
    with caplog.at_level(logging.WARNING):
        ds = read_visual_genome(d, images_root=root)
    assert ds.root == root and ds.queries == [] and ds.name == "visual_genome"
    assert [im.image for im in ds.images] == ["VG_100K_2/1.jpg", "10.jpg", "VG_100K/11.jpg"]
    im1 = ds.images[0]
    assert (im1.width, im1.height, im1.image_id, im1.split) == (800, 600, 1, None)
    assert im1.regions == (
        RegionAnn(id=1382, box=(421.0, 57.0, 503.0, 196.0), description="the clock is green in colour"),
        RegionAnn(id=1383, box=(320.0, 372.0, 502.0, 481.0), description="shade is along the street"),
        RegionAnn(id=1384, box=(750.0, 550.0, 800.0, 600.0), description="sign off the edge"),  # clipped
    )
    assert ds.images[1].regions[0].box == (1.0, 0.0, 11.5, 20.0)
    assert ds.images[2].regions == ()
    text = caplog.text
    assert "1 regions with an empty box" in text and "1 regions with a blank phrase" in text
    assert "1 image files are not under" in text and "VG_100K/11.jpg" in text


def test_version_1_0_image_data_uses_id(tmp_path):
    image_data = [{"id": r["image_id"], **{k: v for k, v in r.items() if k != "image_id"}} for r in IMAGE_DATA]
    ds = read_visual_genome(_write(tmp_path, image_data=image_data), images_root=tmp_path)
    assert [im.image_id for im in ds.images] == [1, 10, 11]


def test_limit(tmp_path):
    ds = read_visual_genome(_write(tmp_path), images_root=tmp_path, limit=1)
    assert len(ds.images) == 1
    with pytest.raises(InvalidInputError, match="limit"):
        read_visual_genome(_write(tmp_path), images_root=tmp_path, limit=0)


def test_missing_file_names_it(tmp_path):
    d = _write(tmp_path)
    (d / "image_data.json").unlink()
    with pytest.raises(DatasetFormatError, match=r"image_data\.json does not exist"):
        read_visual_genome(d, images_root=tmp_path)


def test_invalid_json_names_file(tmp_path):
    d = _write(tmp_path)
    (d / "region_descriptions.json").write_text('[{"id": 1, "regions": [')
    with pytest.raises(DatasetFormatError, match=r"region_descriptions\.json is not valid JSON"):
        read_visual_genome(d, images_root=tmp_path)


@pytest.mark.parametrize(
    "regions,match",
    [
        ({"id": 1}, "top level must be a JSON list"),
        ([{"id": 1}], "lacks the field 'regions'"),
        ([{"regions": []}], "needs an integer image 'id'"),
        ([{"id": 99, "regions": []}], "image 99 is not in"),
        ([{"id": 1, "regions": [{"region_id": 1, "x": 0, "y": 0, "width": 5, "height": 5}]}], "lacks the field 'phrase'"),
        ([{"id": 1, "regions": [{"region_id": 1, "phrase": "a", "x": "0", "y": 0, "width": 5, "height": 5}]}], "field 'x' must be int/float"),
        ([{"id": 1, "regions": [{"region_id": True, "phrase": "a", "x": 0, "y": 0, "width": 5, "height": 5}]}], "field 'region_id' must be int"),
    ],
)
def test_malformed_content(tmp_path, regions, match):
    with pytest.raises(DatasetFormatError, match=match) as err:
        read_visual_genome(_write(tmp_path, regions=regions), images_root=tmp_path)
    assert "region_descriptions.json" in str(err.value)


def test_bad_image_size(tmp_path):
    image_data = [dict(IMAGE_DATA[0], width=0)]
    with pytest.raises(DatasetFormatError, match="sizes must be positive"):
        read_visual_genome(_write(tmp_path, image_data=image_data), images_root=tmp_path)
