"""Reader for RefCOCO / RefCOCO+ / RefCOCOg (the ``refer`` toolkit layout).

``data_dir`` (e.g. ``refer/data/refcocog``) holds ``refs(<split_by>).p`` — a pickled list of refs
``{"ref_id", "ann_id", "image_id", "split", "category_id", "file_name", "sent_ids",
"sentences": [{"tokens", "raw", "sent", "sent_id"}]}`` — and ``instances.json`` in COCO format
(``images``, ``annotations`` with ``bbox`` = ``[x, y, w, h]``, ``categories``). ``split_by`` is
``unc`` (RefCOCO, RefCOCO+), ``google`` or ``umd`` (RefCOCOg).

Mapping: each COCO image becomes an :class:`ImageAnn` (``image_id`` = COCO id); each annotation an
:class:`ObjectAnn` (``id`` = annotation id, ``category`` = category name, box clipped xyxy, ``mask`` =
the segmentation only when it is uncompressed RLE, polygons are not rasterized); each sentence of a
ref a :class:`RefAnn` (``id = sent_id``, ``expression = sent`` (else ``raw``), ``object = ann_id``,
``split`` = the ref's split, ``context_objects`` empty). An image's ``split`` is its refs' split when
they agree, else ``None`` (logged).

The pickle is read with an unpickler that can build only plain builtin containers (no code runs
from the file), and with ``encoding="latin1"`` so that Python 2 pickles load.
"""
from __future__ import annotations

import io
import logging
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

from engine.datasets._formats import (
    ImageResolver,
    coco_candidates,
    field,
    list_field,
    load_json,
    log_dropped,
    xywh_to_xyxy,
)
from engine.datasets.types import Dataset, ImageAnn, ObjectAnn, RefAnn
from engine.errors import DatasetFormatError, InvalidInputError

__all__ = ["read_refcoco", "load_refs", "SPLIT_BYS"]

logger = logging.getLogger(__name__)

SPLIT_BYS = ("unc", "google", "umd")
_SAFE_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "complex", "bool"}
)


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowed builtins."""


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except plain builtin container and scalar types."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return super().find_class("builtins", name)
        raise _ForbiddenGlobal(f"global {module}.{name} is not allowed")


def load_refs(path: Path) -> list[dict[str, Any]]:
    """Load a ``refs(*).p`` pickle safely (builtins only; Python 2 pickles via ``latin1``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(
            f"refs file {path} does not exist; pass the refer data folder that holds refs(unc).p, refs(google).p or refs(umd).p"
        )
    try:
        data = _BuiltinsOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise DatasetFormatError(
            f"{path} is not a plain refs pickle ({e}); only pickled lists of dicts are read, re-download the refs file"
        ) from None
    except Exception as e:  # truncated or garbage files raise EOFError, ValueError, IndexError, ...
        raise DatasetFormatError(f"{path} could not be unpickled ({type(e).__name__}: {e}); re-download the refs file") from None
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path} holds a {type(data).__name__}, not a list of refs; is this a refs(*).p file?")
    return data


def _find_split_by(data_dir: Path, split_by: str | None) -> str:
    if split_by is not None:
        if split_by not in SPLIT_BYS:
            raise InvalidInputError(
                f"split_by {split_by!r} is not one of {', '.join(SPLIT_BYS)}; RefCOCO/RefCOCO+ use unc, RefCOCOg google or umd"
            )
        return split_by
    found = [s for s in SPLIT_BYS if (data_dir / f"refs({s}).p").is_file()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetFormatError(
            f"{data_dir} holds no refs(unc).p, refs(google).p or refs(umd).p; "
            "pass the refer data folder of one dataset, e.g. data/refcoco"
        )
    raise InvalidInputError(f"{data_dir} holds refs for several split_by values ({', '.join(found)}); choose one with split_by")


def read_refcoco(
    data_dir: Path,
    *,
    images_root: Path,
    split_by: str | None = None,
    name: str | None = None,
) -> Dataset:
    """Read a RefCOCO-family dataset into a :class:`Dataset` of images with objects and refs.

    ``data_dir`` holds ``refs(<split_by>).p`` and ``instances.json``; ``split_by`` may be left out when
    exactly one refs file is there. Image paths are the COCO ``file_name`` relative to ``images_root``
    (or ``train2014/<file_name>`` when that exists). Annotations whose clipped box is empty are dropped
    with the refs that point at them (counted in a warning). A ref naming an unknown image,
    annotation or category raises :class:`DatasetFormatError`.
    """
    data_dir = Path(data_dir)
    split_by = _find_split_by(data_dir, split_by)
    name = name or f"{data_dir.name}({split_by})"
    refs_path, inst_path = data_dir / f"refs({split_by}).p", data_dir / "instances.json"
    refs = load_refs(refs_path)
    inst = load_json(inst_path, what="COCO instances")
    if not isinstance(inst, dict):
        raise DatasetFormatError(f"{inst_path}: the top level must be a JSON object with images, annotations, categories")

    categories: dict[int, str] = {}
    for k, cat in enumerate(list_field(inst, "categories", path=inst_path, where="the top level")):
        cat_id = field(cat, "id", int, path=inst_path, where=f"category {k}")
        categories[cat_id] = field(cat, "name", str, path=inst_path, where=f"category {k}")

    image_info: dict[int, dict[str, Any]] = {}
    for k, img in enumerate(list_field(inst, "images", path=inst_path, where="the top level")):
        where = f"image {k}"
        image_id = field(img, "id", int, path=inst_path, where=where)
        image_info[image_id] = {
            "file_name": field(img, "file_name", str, path=inst_path, where=where),
            "width": field(img, "width", int, path=inst_path, where=where),
            "height": field(img, "height", int, path=inst_path, where=where),
        }

    dropped = {"annotations with an empty box": 0, "sentences of refs to dropped annotations": 0}
    objects: dict[int, list[ObjectAnn]] = defaultdict(list)
    ann_image: dict[int, int] = {}
    for k, ann in enumerate(list_field(inst, "annotations", path=inst_path, where="the top level")):
        where = f"annotation {k}"
        ann_id = field(ann, "id", int, path=inst_path, where=where)
        image_id = field(ann, "image_id", int, path=inst_path, where=where)
        cat_id = field(ann, "category_id", int, path=inst_path, where=where)
        bbox = field(ann, "bbox", list, path=inst_path, where=where)
        if image_id not in image_info:
            raise DatasetFormatError(
                f"{inst_path}: annotation {ann_id} refers to image {image_id}, which is not in its images list"
            )
        if cat_id not in categories:
            raise DatasetFormatError(
                f"{inst_path}: annotation {ann_id} has category_id {cat_id}, which is not in its categories list"
            )
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise DatasetFormatError(f"{inst_path}: annotation {ann_id} bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        info = image_info[image_id]
        box = xywh_to_xyxy(*bbox, info["width"], info["height"])
        if box is None:
            dropped["annotations with an empty box"] += 1
            ann_image[ann_id] = -1
            continue
        seg = ann.get("segmentation")
        mask = seg if isinstance(seg, dict) and isinstance(seg.get("counts"), list) else None
        objects[image_id].append(ObjectAnn(id=ann_id, box=box, category=categories[cat_id], mask=mask))
        ann_image[ann_id] = image_id

    image_refs: dict[int, list[RefAnn]] = defaultdict(list)
    for k, ref in enumerate(refs):
        where = f"ref {k}"
        ann_id = field(ref, "ann_id", int, path=refs_path, where=where)
        image_id = field(ref, "image_id", int, path=refs_path, where=where)
        split = field(ref, "split", str, path=refs_path, where=where)
        sentences = field(ref, "sentences", list, path=refs_path, where=where)
        if ann_id not in ann_image:
            raise DatasetFormatError(
                f"{refs_path}: ref {ref.get('ref_id', k)} points at annotation {ann_id}, which is not in {inst_path}; "
                "use the instances.json shipped with these refs"
            )
        if ann_image[ann_id] == -1:
            dropped["sentences of refs to dropped annotations"] += len(sentences)
            continue
        if ann_image[ann_id] != image_id:
            raise DatasetFormatError(
                f"{refs_path}: ref {ref.get('ref_id', k)} says image {image_id} but annotation {ann_id} "
                f"is in image {ann_image[ann_id]} of {inst_path}; use the instances.json shipped with these refs"
            )
        for j, sent in enumerate(sentences):
            swhere = f"ref {ref.get('ref_id', k)} sentence {j}"
            sent_id = field(sent, "sent_id", int, path=refs_path, where=swhere)
            text = sent.get("sent")
            if not (isinstance(text, str) and text.strip()):
                text = field(sent, "raw", str, path=refs_path, where=swhere)
            image_refs[image_id].append(RefAnn(id=sent_id, expression=text.strip(), object=ann_id, split=split))

    resolver = ImageResolver(images_root, dataset=name)
    mixed = 0
    images: list[ImageAnn] = []
    for image_id, info in image_info.items():
        rs = tuple(image_refs.get(image_id, ()))
        splits = {r.split for r in rs}
        if len(splits) > 1:
            mixed += 1
        images.append(
            ImageAnn(
                image=resolver(coco_candidates(info["file_name"])),
                width=info["width"],
                height=info["height"],
                objects=tuple(objects.get(image_id, ())),
                refs=rs,
                split=splits.pop() if len(splits) == 1 else None,
                image_id=image_id,
            )
        )
    if mixed:
        logger.warning(
            "%s: %d images hold refs of several splits; their ImageAnn.split is None (each RefAnn keeps its split)",
            name,
            mixed,
        )
    resolver.report()
    log_dropped(name, dropped)
    logger.info("%s: read %d images, %d refs", name, len(images), sum(len(im.refs) for im in images))
    return Dataset(root=Path(images_root), images=images, name=name)
