"""RefCOCO-family reader on tiny refs(*).p + instances.json files in the refer toolkit format."""
from __future__ import annotations

import json
import logging
import os
import pickle
import struct
from pathlib import Path

import pytest

from engine.datasets.refcoco import load_refs, read_refcoco
from engine.datasets.types import ObjectAnn, RefAnn
from engine.errors import DatasetFormatError, InvalidInputError

INSTANCES = {
    "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset."},
    "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution-NonCommercial-ShareAlike License"}],
    "images": [
        {"license": 1, "file_name": "COCO_train2014_000000581857.jpg", "coco_url": "http://mscoco.org/images/581857", "height": 640, "width": 427, "date_captured": "2013-11-16 23:47:15", "flickr_url": "http://farm4.staticflickr.com/x.jpg", "id": 581857},
        {"license": 1, "file_name": "COCO_train2014_000000000009.jpg", "coco_url": "http://mscoco.org/images/9", "height": 480, "width": 640, "date_captured": "2013-11-19 20:40:11", "flickr_url": "http://farm5.staticflickr.com/y.jpg", "id": 9},
    ],
    "annotations": [
        {"segmentation": [[103.58, 299.99, 107.2, 309.76, 152.1, 300.0]], "area": 1500.5, "iscrowd": 0, "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.42], "category_id": 1, "id": 1719310},
        {"segmentation": [[1.0, 2.0, 30.0, 2.0, 30.0, 40.0]], "area": 800.0, "iscrowd": 0, "image_id": 581857, "bbox": [400.0, 600.0, 50.0, 60.0], "category_id": 18, "id": 1719311},
        {"segmentation": {"size": [480, 640], "counts": [100, 20, 300]}, "area": 400.0, "iscrowd": 1, "image_id": 9, "bbox": [10, 20, 30, 40], "category_id": 18, "id": 5},
        {"segmentation": [[0, 0, 0, 0]], "area": 0.0, "iscrowd": 0, "image_id": 9, "bbox": [50, 50, 0, 10], "category_id": 1, "id": 6},
    ],
    "categories": [
        {"supercategory": "person", "id": 1, "name": "person"},
        {"supercategory": "animal", "id": 18, "name": "dog"},
    ],
}


def _ref(ref_id, ann_id, image_id, split, cat, sents):
    return {
        "sent_ids": [s[0] for s in sents],
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "ann_id": ann_id,
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": [{"tokens": raw.lower().split(), "raw": raw, "sent_id": sid, "sent": sent} for sid, raw, sent in sents],
        "category_id": cat,
    }


REFS = [
    _ref(0, 1719310, 581857, "train", 1, [(0, "THE LADY WITH THE BLUE SHIRT", "the lady with the blue shirt"), (1, "lady w back to us", "lady w back to us")]),
    _ref(1, 1719311, 581857, "train", 18, [(2, "Dog, bottom right", "")]),  # empty 'sent' falls back to 'raw'
    _ref(2, 5, 9, "testB", 18, [(3, "dog on left", "dog on left")]),
    _ref(3, 6, 9, "testB", 1, [(4, "tiny person", "tiny person")]),  # its box is empty -> dropped
]


def _write(tmp_path: Path, refs=REFS, instances=INSTANCES, split_by="unc", protocol=2) -> Path:
    d = tmp_path / "refcoco"
    d.mkdir(exist_ok=True)
    (d / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=protocol))
    (d / "instances.json").write_text(json.dumps(instances))
    return d


def _py2_pickle(obj) -> bytes:
    """Encode like Python 2 ``cPickle.dump(obj, f, 2)``: byte strings as (SHORT_)BINSTRING."""
    out = bytearray(b"\x80\x02")

    def enc(o):
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                enc(k)
                enc(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                enc(v)
            out.extend(b"e")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, str):
            raw = o.encode("latin1")
            out.extend((b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))) + raw)
        else:
            raise TypeError(o)

    enc(obj)
    out.extend(b".")
    return bytes(out)


def test_reads_images_objects_and_refs(tmp_path, caplog):
    d = _write(tmp_path)
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "train2014" / "COCO_train2014_000000581857.jpg").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        ds = read_refcoco(d, images_root=root)
    assert ds.name == "refcoco(unc)" and ds.root == root
    by_id = {im.image_id: im for im in ds.images}
    im = by_id[581857]
    assert im.image == "train2014/COCO_train2014_000000581857.jpg"  # found in the train2014 sub-folder
    assert (im.width, im.height, im.split) == (427, 640, "train")
    obj = im.objects[0]
    assert obj.id == 1719310 and obj.category == "person" and obj.mask is None  # polygons not rasterized
    assert obj.box == pytest.approx((103.93, 299.99, 103.93 + 134.22, 299.99 + 177.42))
    assert im.objects[1].box == (400.0, 600.0, 427.0, 640.0)  # clipped to the image
    assert im.refs == (
        RefAnn(id=0, expression="the lady with the blue shirt", object=1719310, split="train"),
        RefAnn(id=1, expression="lady w back to us", object=1719310, split="train"),
        RefAnn(id=2, expression="Dog, bottom right", object=1719311, split="train"),
    )
    im9 = by_id[9]
    assert im9.image == "COCO_train2014_000000000009.jpg" and im9.split == "testB"
    assert im9.objects == (ObjectAnn(id=5, box=(10.0, 20.0, 40.0, 60.0), category="dog", mask={"size": [480, 640], "counts": [100, 20, 300]}),)
    assert [r.id for r in im9.refs] == [3]
    assert "1 annotations with an empty box" in caplog.text and "1 sentences of refs to dropped annotations" in caplog.text
    assert [im.image_id for im in ds.split("testB").images] == [9]


def test_python2_pickle_with_latin1_bytes(tmp_path):
    refs = [_ref(0, 5, 9, "val", 18, [(7, "caf\xe9 dog", "caf\xe9 dog")])]
    d = _write(tmp_path, refs=[])
    (d / "refs(unc).p").write_bytes(_py2_pickle(refs))
    assert load_refs(d / "refs(unc).p") == refs
    ds = read_refcoco(d, images_root=tmp_path)
    refs_out = [r for im in ds.images for r in im.refs]
    assert refs_out == [RefAnn(id=7, expression="caf\xe9 dog", object=5, split="val")]


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = _write(tmp_path)
    (d / "refs(unc).p").write_bytes(pickle.dumps([Evil()], protocol=2))
    with pytest.raises(DatasetFormatError, match=r"refs\(unc\)\.p is not a plain refs pickle .*system is not allowed"):
        read_refcoco(d, images_root=tmp_path)


def test_corrupt_and_wrong_type_pickles(tmp_path):
    d = _write(tmp_path)
    (d / "refs(unc).p").write_bytes(pickle.dumps(REFS)[:30])
    with pytest.raises(DatasetFormatError, match="could not be unpickled"):
        load_refs(d / "refs(unc).p")
    (d / "refs(unc).p").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DatasetFormatError, match="not a list of refs"):
        load_refs(d / "refs(unc).p")


def test_split_by_choice(tmp_path):
    d = _write(tmp_path, split_by="google")
    (d / "refs(umd).p").write_bytes(pickle.dumps(REFS[:1]))
    with pytest.raises(InvalidInputError, match="several split_by values"):
        read_refcoco(d, images_root=tmp_path)
    ds = read_refcoco(d, images_root=tmp_path, split_by="umd")
    assert sum(len(im.refs) for im in ds.images) == 2
    with pytest.raises(InvalidInputError, match="not one of unc, google, umd"):
        read_refcoco(d, images_root=tmp_path, split_by="berkeley")
    with pytest.raises(DatasetFormatError, match="holds no refs"):
        read_refcoco(tmp_path, images_root=tmp_path)


def test_mixed_split_image_has_no_image_split(tmp_path, caplog):
    refs = [REFS[0], dict(REFS[1], split="val")]
    with caplog.at_level(logging.WARNING):
        ds = read_refcoco(_write(tmp_path, refs=refs), images_root=tmp_path)
    im = next(im for im in ds.images if im.image_id == 581857)
    assert im.split is None and {r.split for r in im.refs} == {"train", "val"}
    assert "several splits" in caplog.text


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda refs, inst: refs.append(_ref(9, 424242, 9, "val", 1, [(9, "x", "x")])), "annotation 424242, which is not in"),
        (lambda refs, inst: refs.append(_ref(9, 5, 581857, "val", 1, [(9, "x", "x")])), "says image 581857 but annotation 5 is in image 9"),
        (lambda refs, inst: refs[0].pop("ann_id"), "lacks the field 'ann_id'"),
        (lambda refs, inst: refs[0]["sentences"][0].pop("sent_id"), "lacks the field 'sent_id'"),
        (lambda refs, inst: inst["annotations"][0].update(category_id=99), "category_id 99, which is not in"),
        (lambda refs, inst: inst["annotations"][0].update(image_id=99), "image 99, which is not in"),
        (lambda refs, inst: inst["annotations"][0].update(bbox=[1, 2, 3]), "bbox must be 4 numbers"),
        (lambda refs, inst: inst.pop("categories"), "lacks the field 'categories'"),
    ],
)
def test_malformed_content(tmp_path, mutate, match):
    refs, inst = json.loads(json.dumps(REFS)), json.loads(json.dumps(INSTANCES))
    mutate(refs, inst)
    with pytest.raises(DatasetFormatError, match=match):
        read_refcoco(_write(tmp_path, refs=refs, instances=inst), images_root=tmp_path)


def test_missing_instances(tmp_path):
    d = _write(tmp_path)
    (d / "instances.json").unlink()
    with pytest.raises(DatasetFormatError, match=r"instances\.json does not exist"):
        read_refcoco(d, images_root=tmp_path)
