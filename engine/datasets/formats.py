"""Public dataset formats for ``engine train`` and ``engine eval`` (``--format``): each is read by its reader
and written once as an engine-format dataset (``annotations.jsonl``, ``queries.jsonl``), which every
trainer and evaluation then reads as it reads ``engine synth``'s output.

A ``--data DIR`` of each format holds (images relative to ``DIR``, as the readers resolve them):

* ``engine``: ``annotations.jsonl`` (+ ``queries.jsonl``), used as it is;
* ``vg``: Visual Genome's ``region_descriptions.json`` and ``image_data.json``; the GRN paper's
  benchmark is built from them (:func:`engine.datasets.vg_benchmark.build_grn_benchmark`: relational
  descriptions, area filter, de-duplication, 7/9 · 1/9 · 1/9 image splits, query sets of similar
  descriptions in other images);
* ``refcoco``: the refer toolkit's ``refs(<split_by>).p`` and ``instances.json`` (RefCOCO, RefCOCO+,
  RefCOCOg); an image's split is its refs' (``testA`` / ``testB`` count as ``test``), and each
  referring expression is also a described region (its object's box), for the models that learn
  from region descriptions;
* ``coco``: COCO's ``captions_*.json`` (in ``DIR`` or ``DIR/annotations``): a file named ``train``
  gives the train split; COCO publishes no test captions, so the images of a ``val`` file go to val
  (even image id) and test (odd);
* ``karpathy``: one Karpathy split file ``dataset_*.json`` (COCO or Flickr30k); ``restval`` joins train.

:func:`union_datasets` joins several engine-format datasets into one (``engine train MODEL --data A --data
B`` for a model whose trainer reads one dataset): each folder is a link inside the union, its image
paths prefixed by the folder's name, and its image, object and region ids moved past the previous
folders' (regions, refs and queries follow), so that no two share an id.

The converted dataset lives in the data cache (``$ENGINE_DATA/converted/<format>-<name>-<digest>/``,
:func:`engine.data_fetch.data_dir`), its ``images`` a link to ``DIR``; it is rebuilt when a source
file changes (size or modification time) and reused otherwise.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import DatasetFormatError, InvalidInputError

if TYPE_CHECKING:  # the readers and types import numpy: only when a dataset is converted
    from engine.datasets.types import Dataset, ImageAnn

__all__ = ["DATA_FORMATS", "prepare_dataset", "load_format", "union_datasets"]

log = logging.getLogger(__name__)

DATA_FORMATS: tuple[str, ...] = ("engine", "vg", "refcoco", "coco", "karpathy")
_STAMP = "source.json"
_IMAGES = "images"


def prepare_dataset(data: Path, fmt: str = "engine", *, cache: Path | None = None) -> Path:
    """The engine-format folder of dataset ``data`` in format ``fmt``: ``data`` itself for ``engine``,
    else its conversion in the data cache (made now, or reused when its sources are unchanged)."""
    data = Path(data)
    if fmt not in DATA_FORMATS:
        raise InvalidInputError(f"--format {fmt!r} is not known; choose one of {', '.join(DATA_FORMATS)}")
    if not data.is_dir():
        raise InvalidInputError(f"--data {data} is not a folder; pass the folder that holds the {fmt} dataset's files")
    if fmt == "engine":
        return data
    source = data.resolve()
    return _made_once(fmt, [source], _source_files(source, fmt), cache, lambda root, stamp: _write(root, load_format(source, fmt), source, stamp))


def load_format(data: Path, fmt: str) -> Dataset:
    """Dataset ``data`` of format ``fmt`` (not ``engine``) read by its reader, with ``train`` / ``val`` /
    ``test`` splits as the module docstring says; image paths relative to ``data``."""
    if fmt == "vg":
        from engine.datasets.vg_benchmark import build_grn_benchmark
        from engine.datasets.visual_genome import read_visual_genome

        return build_grn_benchmark(read_visual_genome(data, images_root=data, name=data.name)).dataset
    if fmt == "refcoco":
        from engine.datasets.refcoco import read_refcoco

        return _refs_as_regions(read_refcoco(data, images_root=data))
    if fmt == "coco":
        return _coco(data)
    if fmt == "karpathy":
        from engine.datasets.captions import read_karpathy

        return read_karpathy(_one(data, "dataset_*.json", "a Karpathy split file"), images_root=data, merge_restval=True)
    raise InvalidInputError(f"--format {fmt!r} is not a format to convert; choose one of {', '.join(DATA_FORMATS[1:])}")


def union_datasets(folders: Sequence[Path], *, cache: Path | None = None) -> Path:
    """One engine-format dataset holding every dataset of ``folders`` (module docstring), made in the data
    cache or reused while their ``annotations.jsonl`` / ``queries.jsonl`` are unchanged."""
    from engine.datasets.annotations import ANNOTATIONS_FILE, QUERIES_FILE

    sources = [Path(f).resolve() for f in folders]
    names = [s.name for s in sources]
    if len(sources) < 2:
        raise InvalidInputError("a union needs at least two dataset folders")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"the dataset folders need distinct names to be joined (got {', '.join(names)})")
    files = [p for s in sources for p in (_exists(s / ANNOTATIONS_FILE, "engine-format dataset"), s / QUERIES_FILE) if p.is_file()]
    return _made_once("union", sources, files, cache, lambda root, stamp: _write_union(root, sources, stamp))


def _made_once(kind: str, sources: Sequence[Path], files: Sequence[Path], cache: Path | None, make) -> Path:  # noqa: ANN001
    """The cache folder of ``kind`` made from ``sources``: reused when its stamp (each source file's size and
    modification time) still matches, else made by ``make(root, stamp)``."""
    stamp = {"format": kind, "source": [str(s) for s in sources], "files": {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}
    digest = hashlib.sha256("\n".join(str(s) for s in sources).encode()).hexdigest()[:12]
    root = _cache_root(cache) / f"{kind}-{'+'.join(s.name for s in sources)}-{digest}"
    if (root / _STAMP).is_file() and json.loads((root / _STAMP).read_text()) == stamp:
        return root
    log.info("making the %s dataset of %s in %s", kind, ", ".join(map(str, sources)), root)
    make(root, stamp)
    return root


def _write_union(root: Path, sources: Sequence[Path], stamp: dict) -> None:
    from engine.datasets.annotations import read_dataset

    images, queries = [], []
    image_offset = region_offset = object_offset = 0
    for source in sources:
        dataset = read_dataset(source)
        for im in dataset.images:
            objects = tuple(replace(o, id=o.id + object_offset) for o in im.objects)
            regions = tuple(replace(r, id=r.id + region_offset, objects=tuple(o + object_offset for o in r.objects)) for r in im.regions)
            refs = tuple(replace(f, object=f.object + object_offset, context_objects=tuple(o + object_offset for o in f.context_objects)) for f in im.refs)
            image_id = None if im.image_id is None else im.image_id + image_offset
            images.append(replace(im, image=f"{source.name}/{im.image}", objects=objects, regions=regions, refs=refs, image_id=image_id))
        for q in dataset.queries:
            queries.append(replace(q, image=f"{source.name}/{q.image}", region_id=q.region_id + region_offset, positives=tuple(p + region_offset for p in q.positives)))
        image_offset = 1 + max([image_offset - 1, *(im.image_id for im in images if im.image_id is not None)])
        region_offset = 1 + max([region_offset - 1, *(r.id for im in images for r in im.regions)])
        object_offset = 1 + max([object_offset - 1, *(o.id for im in images for o in im.objects)])
    _publish(root, {source.name: source for source in sources}, images, queries, stamp)


def _source_files(data: Path, fmt: str) -> list[Path]:
    """The files format ``fmt`` reads in ``data`` (a clear error naming what is missing)."""
    if fmt == "vg":
        return [_exists(data / "region_descriptions.json", "Visual Genome"), _exists(data / "image_data.json", "Visual Genome")]
    if fmt == "refcoco":
        refs = sorted(data.glob("refs(*).p"))
        if not refs:
            raise DatasetFormatError(f"{data} holds no refs(<split_by>).p file; a RefCOCO-family folder holds refs(unc).p (or refs(umd).p, refs(google).p) and instances.json")
        return [*refs, _exists(data / "instances.json", "RefCOCO")]
    if fmt == "coco":
        return _captions_files(data)
    return [_one(data, "dataset_*.json", "a Karpathy split file")]


def _exists(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetFormatError(f"{path} does not exist; a {what} folder holds it (see engine/datasets/formats.py)")
    return path


def _one(data: Path, pattern: str, what: str) -> Path:
    found = sorted(data.glob(pattern))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DatasetFormatError(f"{data} should hold exactly one {pattern} ({what}), found {names}")
    return found[0]


def _captions_files(data: Path) -> list[Path]:
    found = sorted([*data.glob("captions_*.json"), *data.glob("annotations/captions_*.json")])
    if not found:
        raise DatasetFormatError(f"{data} holds no captions_*.json (in it or in annotations/); a COCO folder holds captions_train2014.json and captions_val2014.json")
    for path in found:
        if "train" not in path.name and "val" not in path.name:
            raise DatasetFormatError(f"{path.name}: a COCO captions file name says its split (train or val)")
    return found


def _coco(data: Path) -> Dataset:
    from engine.datasets.captions import read_coco_captions
    from engine.datasets.types import Dataset

    images: list[ImageAnn] = []
    for path in _captions_files(data):
        part = read_coco_captions(path, images_root=data, split="train" if "train" in path.name else "val")
        for im in part.images:
            if im.split == "val" and (im.image_id or 0) % 2 == 1:
                im = replace(im, split="test")  # COCO has no public test captions: half of val is held out
            images.append(im)
    return Dataset(root=data, images=images, name=data.name)


def _refs_as_regions(dataset: Dataset) -> Dataset:
    """RefCOCO's test splits as ``test``, and each expression also a described region (its object's box)."""
    from engine.datasets.types import RegionAnn

    images = []
    for im in dataset.images:
        boxes = {o.id: o.box for o in im.objects}
        regions = tuple(RegionAnn(id=r.id, box=boxes[r.object], description=r.expression, objects=(r.object,)) for r in im.refs if r.object in boxes)
        split = "test" if im.split in ("testA", "testB") else im.split
        images.append(replace(im, regions=im.regions + regions, split=split))
    return replace(dataset, images=images)


def _write(root: Path, dataset: Dataset, source: Path, stamp: dict) -> None:
    """Write the converted dataset into ``root`` (:func:`_publish`)."""
    if not any(im.split in ("train", "val", "test") for im in dataset.images):
        raise DatasetFormatError(f"{source}: no image of this dataset is in a train, val or test split")
    images = [replace(im, image=f"{_IMAGES}/{im.image}") for im in dataset.images]
    _publish(root, {_IMAGES: source}, images, [replace(q, image=f"{_IMAGES}/{q.image}") for q in dataset.queries], stamp)


def _publish(root: Path, links: dict[str, Path], images: list, queries: list, stamp: dict) -> None:
    """Write ``root`` (its folder ``links``, annotations, queries and source stamp) through a temporary
    folder renamed into place: a crash leaves the old conversion or none, never half of one."""
    from engine.datasets.annotations import write_annotations, write_queries

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for name, target in links.items():
            os.symlink(target, tmp / name, target_is_directory=True)
        write_annotations(tmp, images)
        write_queries(tmp, queries)
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=1))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _cache_root(cache: Path | None) -> Path:
    from engine.data_fetch import data_dir

    return (Path(cache) if cache is not None else data_dir()) / "converted"
