"""Readers for image captions: COCO ``captions_*.json`` and the Karpathy splits ``dataset_*.json``.

COCO (``captions_train2014.json``, ``captions_val2014.json``)::

    {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 640, "height": 480, ...}],
     "annotations": [{"id": 48, "image_id": 9, "caption": "A plate of food."}, ...], ...}

Karpathy (``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``)::

    {"dataset": "flickr30k",
     "images": [{"filename": "1000092795.jpg", "imgid": 0, "split": "train",
                 "sentences": [{"raw": "Two young guys ...", "tokens": [...], "imgid": 0, "sentid": 0}],
                 "sentids": [0, ...], "filepath": "val2014", "cocoid": 391895}]}

(``filepath`` and ``cocoid`` only in ``dataset_coco.json``.) Each image becomes an :class:`ImageAnn`
with ``captions`` = the raw sentences stripped, in file order (COCO: by annotation id).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from engine.datasets._formats import ImageResolver, coco_candidates, field, list_field, load_json
from engine.datasets.types import Dataset, ImageAnn
from engine.errors import DatasetFormatError

__all__ = ["read_coco_captions", "read_karpathy"]

logger = logging.getLogger(__name__)


def read_coco_captions(captions_file: Path, *, images_root: Path, split: str | None = None, name: str | None = None) -> Dataset:
    """Read a COCO captions file into a :class:`Dataset` of images with captions.

    Image paths are ``file_name`` relative to ``images_root`` (or ``train2014/<file_name>`` etc. when
    that exists). Every image gets ``split`` (COCO files hold one split each). Images without captions
    are kept with ``captions=()``; a caption naming an unknown image raises :class:`DatasetFormatError`.
    """
    path = Path(captions_file)
    data = load_json(path, what="COCO captions")
    if not isinstance(data, dict):
        raise DatasetFormatError(
            f"{path}: the top level must be a JSON object with images and annotations; is this captions_*.json?"
        )
    name = name or path.stem
    infos = []
    for k, img in enumerate(list_field(data, "images", path=path, where="the top level")):
        where = f"image {k}"
        infos.append(
            (
                field(img, "id", int, path=path, where=where),
                field(img, "file_name", str, path=path, where=where),
                field(img, "width", int, path=path, where=where),
                field(img, "height", int, path=path, where=where),
            )
        )
    known = {i[0] for i in infos}
    caps: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for k, ann in enumerate(list_field(data, "annotations", path=path, where="the top level")):
        where = f"annotation {k}"
        image_id = field(ann, "image_id", int, path=path, where=where)
        caption = field(ann, "caption", str, path=path, where=where)
        ann_id = field(ann, "id", int, path=path, where=where)
        if image_id not in known:
            raise DatasetFormatError(f"{path}: caption {ann_id} refers to image {image_id}, which is not in its images list")
        caps[image_id].append((ann_id, caption.strip()))
    resolver = ImageResolver(images_root, dataset=name)
    images = [
        ImageAnn(
            image=resolver(coco_candidates(file_name)),
            width=width,
            height=height,
            captions=tuple(c for _, c in sorted(caps.get(image_id, ()))),
            split=split,
            image_id=image_id,
        )
        for image_id, file_name, width, height in infos
    ]
    resolver.report()
    logger.info("%s: read %d images, %d captions", name, len(images), sum(len(im.captions) for im in images))
    return Dataset(root=Path(images_root), images=images, name=name)


def read_karpathy(split_file: Path, *, images_root: Path, merge_restval: bool = False, name: str | None = None) -> Dataset:
    """Read a Karpathy split file (``dataset_coco.json`` / ``dataset_flickr30k.json``) into a :class:`Dataset`.

    Image paths are ``filepath/filename`` (COCO) or ``filename`` (Flickr) relative to ``images_root``,
    whichever exists. The files carry no image sizes: ``width``/``height`` are read from the image
    header when the image is there, else left 0 (counted in a warning). ``split`` is the file's
    (``train``/``val``/``test``/``restval``); ``merge_restval=True`` maps ``restval`` to ``train`` as
    most COCO retrieval work does. ``image_id`` is ``cocoid`` when present, else ``imgid``.
    """
    path = Path(split_file)
    data = load_json(path, what="Karpathy split")
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: the top level must be a JSON object with 'images'; is this a Karpathy dataset_*.json?")
    name = name or str(data.get("dataset") or path.stem)
    resolver = ImageResolver(images_root, dataset=name)
    no_size = 0
    images: list[ImageAnn] = []
    for k, img in enumerate(list_field(data, "images", path=path, where="the top level")):
        where = f"image {k}"
        filename = field(img, "filename", str, path=path, where=where)
        split = field(img, "split", str, path=path, where=where)
        sentences = field(img, "sentences", list, path=path, where=where)
        captions = tuple(field(s, "raw", str, path=path, where=f"{where} sentence {j}").strip() for j, s in enumerate(sentences))
        image_id = img.get("cocoid", img.get("imgid"))
        if image_id is not None and (isinstance(image_id, bool) or not isinstance(image_id, int)):
            raise DatasetFormatError(f"{path}: {where} has a non-integer cocoid/imgid {image_id!r}")
        filepath = img.get("filepath")
        has_dir = isinstance(filepath, str) and filepath != ""
        rel = resolver([str(PurePosixPath(filepath) / filename), filename] if has_dir else coco_candidates(filename))
        size = _image_size(Path(images_root) / rel) if resolver.exists(rel) else None
        if size is None:
            no_size += 1
        width, height = size or (0, 0)
        if merge_restval and split == "restval":
            split = "train"
        images.append(ImageAnn(image=rel, width=width, height=height, captions=captions, split=split, image_id=image_id))
    resolver.report()
    if no_size:
        logger.warning("%s: %d images have no readable file under %s; their width/height are 0", name, no_size, images_root)
    logger.info("%s: read %d images, %d captions", name, len(images), sum(len(im.captions) for im in images))
    return Dataset(root=Path(images_root), images=images, name=name)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header, ``None`` when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError):
        return None
