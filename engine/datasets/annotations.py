"""Reading, writing and validating ``annotations.jsonl`` and ``queries.jsonl`` (the engine's own format).

The format is documented in ``docs/synth.md``. Every problem raises :class:`AnnotationError` with
the file, the line number and what is wrong; the schema check is plain Python.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from engine.boxes import validate_box
from engine.datasets.types import Dataset, ImageAnn, ObjectAnn, RefAnn, RegionAnn, RetrievalQuery
from engine.errors import AnnotationError, InvalidBoxError

__all__ = [
    "ANNOTATIONS_FILE",
    "QUERIES_FILE",
    "read_annotations",
    "read_queries",
    "read_dataset",
    "write_annotations",
    "write_queries",
    "validate_annotation_line",
    "validate_query_line",
    "image_to_dict",
    "query_to_dict",
]

ANNOTATIONS_FILE = "annotations.jsonl"
QUERIES_FILE = "queries.jsonl"
_FIX = "fix the line or regenerate the corpus with `engine synth DIR`"


# --------------------------------------------------------------------------- schema checks


def _fail(where: str, what: str) -> AnnotationError:
    return AnnotationError(f"{where}: {what}; {_FIX}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require(obj: Mapping[str, Any], key: str, kind: str, where: str, what: str) -> Any:
    if key not in obj:
        raise _fail(where, f"{what} lacks the key {key!r}")
    value = obj[key]
    ok = {
        "int": _is_int(value),
        "str": isinstance(value, str) and value != "",
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
    }[kind]
    if not ok:
        expected = {"int": "an integer", "str": "a non-empty string", "list": "a list", "dict": "an object"}[kind]
        raise _fail(where, f"{what} key {key!r} must be {expected}, got {value!r:.60}")
    return value


def _check_box(box: Any, width: int | None, height: int | None, where: str, what: str) -> None:
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise _fail(where, f"{what} box must be a list of 4 numbers [x1, y1, x2, y2], got {box!r:.60}")
    try:
        validate_box(box, width, height, what=f"{what} box")
    except InvalidBoxError as exc:
        raise _fail(where, str(exc)) from None


def _check_rle(rle: Any, width: int, height: int, where: str, what: str) -> None:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise _fail(where, f"{what} must be COCO uncompressed RLE {{\"size\": [h, w], \"counts\": [...]}}")
    size, counts = rle["size"], rle["counts"]
    if size != [height, width]:
        raise _fail(where, f"{what} size {size!r} must be the image's [height, width] = [{height}, {width}]")
    if not isinstance(counts, list) or not all(_is_int(c) and c >= 0 for c in counts):
        raise _fail(where, f"{what} counts must be a list of non-negative integers")
    total = sum(counts)
    if total != width * height:
        raise _fail(where, f"{what} counts sum to {total}, must equal height*width = {height * width}")


def _check_int_list(value: Any, where: str, what: str) -> None:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise _fail(where, f"{what} must be a list of integer ids, got {value!r:.60}")


def _check_meaning(meaning: Any, where: str, what: str) -> None:
    if meaning is None:
        return
    if (
        not isinstance(meaning, dict)
        or not isinstance(meaning.get("objects"), list)
        or not all(isinstance(r, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in r.items()) for r in meaning["objects"])
        or not isinstance(meaning.get("relation"), str)
    ):
        raise _fail(where, f"{what} meaning must be {{\"objects\": [{{attribute: value}}, ...], \"relation\": str}}, got {meaning!r:.80}")


def validate_annotation_line(obj: dict, *, where: str) -> None:
    """Check one parsed line of ``annotations.jsonl`` against the documented schema.

    ``where`` (e.g. ``"data/annotations.jsonl:12"``) prefixes every error message.
    """
    if not isinstance(obj, dict):
        raise _fail(where, f"each line must be a JSON object, got {type(obj).__name__}")
    _require(obj, "image", "str", where, "the image line")
    width = _require(obj, "width", "int", where, "the image line")
    height = _require(obj, "height", "int", where, "the image line")
    if width <= 0 or height <= 0:
        raise _fail(where, f"width and height must be positive, got {width}x{height}")
    for key in ("split", "background"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise _fail(where, f"key {key!r} must be a string, got {obj[key]!r:.40}")
    if "image_id" in obj and obj["image_id"] is not None and not _is_int(obj["image_id"]):
        raise _fail(where, f"key 'image_id' must be an integer, got {obj['image_id']!r:.40}")
    if obj.get("saliency") is not None:
        _check_rle(obj["saliency"], width, height, where, "saliency")

    object_ids: set[int] = set()
    for obj_ann in _require(obj, "objects", "list", where, "the image line"):
        if not isinstance(obj_ann, dict):
            raise _fail(where, "every entry of 'objects' must be a JSON object")
        oid = _require(obj_ann, "id", "int", where, "an object")
        what = f"object {oid}"
        if oid in object_ids:
            raise _fail(where, f"{what} appears twice in the image")
        object_ids.add(oid)
        _check_box(obj_ann.get("box"), width, height, where, what)
        if "category" in obj_ann and not isinstance(obj_ann["category"], str):
            raise _fail(where, f"{what} category must be a string")
        attrs = obj_ann.get("attributes", {})
        if not isinstance(attrs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in attrs.items()):
            raise _fail(where, f"{what} attributes must map attribute names to string values, got {attrs!r:.60}")
        if obj_ann.get("mask") is not None:
            _check_rle(obj_ann["mask"], width, height, where, f"{what} mask")

    region_ids: set[int] = set()
    for region in _require(obj, "regions", "list", where, "the image line"):
        if not isinstance(region, dict):
            raise _fail(where, "every entry of 'regions' must be a JSON object")
        rid = _require(region, "id", "int", where, "a region")
        what = f"region {rid}"
        if rid in region_ids:
            raise _fail(where, f"{what} appears twice in the image")
        region_ids.add(rid)
        _check_box(region.get("box"), width, height, where, what)
        _require(region, "description", "str", where, what)
        _check_int_list(_require(region, "objects", "list", where, what), where, f"{what} objects")
        unknown = [o for o in region["objects"] if o not in object_ids]
        if unknown:
            raise _fail(where, f"{what} names object ids {unknown} that are not objects of this image")
        if region.get("relation") is not None and not isinstance(region["relation"], str):
            raise _fail(where, f"{what} relation must be a string or null")
        _check_meaning(region.get("meaning"), where, what)

    for ref in _require(obj, "refs", "list", where, "the image line"):
        if not isinstance(ref, dict):
            raise _fail(where, "every entry of 'refs' must be a JSON object")
        fid = _require(ref, "id", "int", where, "a ref")
        what = f"ref {fid}"
        _require(ref, "expression", "str", where, what)
        target = _require(ref, "object", "int", where, what)
        context = _require(ref, "context_objects", "list", where, what)
        _check_int_list(context, where, f"{what} context_objects")
        unknown = [o for o in [target, *context] if o not in object_ids]
        if unknown:
            raise _fail(where, f"{what} names object ids {unknown} that are not objects of this image")

    captions = _require(obj, "captions", "list", where, "the image line")
    if not all(isinstance(c, str) and c for c in captions):
        raise _fail(where, "captions must be a list of non-empty strings")


def validate_query_line(obj: dict, *, where: str) -> None:
    """Check one parsed line of ``queries.jsonl`` (image bounds are checked by :func:`read_dataset`)."""
    if not isinstance(obj, dict):
        raise _fail(where, f"each line must be a JSON object, got {type(obj).__name__}")
    _require(obj, "image", "str", where, "the query")
    _check_box(obj.get("region"), None, None, where, "the query region")
    _require(obj, "text", "str", where, "the query")
    _require(obj, "region_id", "int", where, "the query")
    _check_int_list(_require(obj, "positives", "list", where, "the query"), where, "the query positives")
    if "split" in obj and obj["split"] is not None and not isinstance(obj["split"], str):
        raise _fail(where, f"key 'split' must be a string, got {obj['split']!r:.40}")
    if "hard_negatives" in obj:
        _check_int_list(obj["hard_negatives"], where, "the query hard_negatives")
    _check_meaning(obj.get("meaning"), where, "the query")


# --------------------------------------------------------------------------- conversion


def _box(values: list[Any]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1, y1, x2, y2)


def _box_out(box: Iterable[float]) -> list[int | float]:
    return [int(v) if float(v).is_integer() else float(v) for v in box]


def _image_from_dict(d: dict[str, Any]) -> ImageAnn:
    split = d.get("split")
    return ImageAnn(
        image=d["image"],
        width=d["width"],
        height=d["height"],
        objects=tuple(
            ObjectAnn(
                id=o["id"],
                box=_box(o["box"]),
                category=o.get("category") or o.get("attributes", {}).get("shape", ""),
                attributes=dict(o.get("attributes", {})),
                mask=o.get("mask"),
            )
            for o in d["objects"]
        ),
        regions=tuple(
            RegionAnn(
                id=r["id"],
                box=_box(r["box"]),
                description=r["description"],
                objects=tuple(r["objects"]),
                relation=r.get("relation"),
                meaning=r.get("meaning"),
            )
            for r in d["regions"]
        ),
        refs=tuple(
            RefAnn(id=f["id"], expression=f["expression"], object=f["object"], context_objects=tuple(f["context_objects"]), split=split)
            for f in d["refs"]
        ),
        captions=tuple(d["captions"]),
        split=split,
        saliency=d.get("saliency"),
        image_id=d.get("image_id"),
    )


def image_to_dict(image: ImageAnn) -> dict[str, Any]:
    """The ``annotations.jsonl`` object of one image (keys in documented order)."""
    out: dict[str, Any] = {"image": image.image}
    if image.image_id is not None:
        out["image_id"] = image.image_id
    out["width"] = image.width
    out["height"] = image.height
    if image.split is not None:
        out["split"] = image.split
    objects = []
    for o in image.objects:
        d: dict[str, Any] = {"id": o.id, "box": _box_out(o.box), "category": o.category, "attributes": dict(o.attributes)}
        if o.mask is not None:
            d["mask"] = o.mask
        objects.append(d)
    out["objects"] = objects
    out["regions"] = [
        {
            "id": r.id,
            "box": _box_out(r.box),
            "description": r.description,
            "objects": list(r.objects),
            "relation": r.relation,
            "meaning": r.meaning,
        }
        for r in image.regions
    ]
    out["refs"] = [
        {"id": f.id, "expression": f.expression, "object": f.object, "context_objects": list(f.context_objects)} for f in image.refs
    ]
    out["captions"] = list(image.captions)
    if image.saliency is not None:
        out["saliency"] = image.saliency
    return out


def query_to_dict(query: RetrievalQuery) -> dict[str, Any]:
    """The ``queries.jsonl`` object of one query."""
    out: dict[str, Any] = {
        "image": query.image,
        "region": _box_out(query.region),
        "text": query.text,
        "region_id": query.region_id,
        "positives": list(query.positives),
    }
    if query.split is not None:
        out["split"] = query.split
    return out


# --------------------------------------------------------------------------- files


def _lines(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise AnnotationError(
            f"{path}: file not found; point to a corpus directory that holds {path.name}, or create one with `engine synth DIR`"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot be read as UTF-8 text ({exc}); regenerate it with `engine synth DIR`") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AnnotationError(
                f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object; {_FIX}"
            ) from None
        yield lineno, obj


def read_annotations(root: Path) -> list[ImageAnn]:
    """Read and validate ``root/annotations.jsonl``; object and region ids must be unique in the corpus."""
    path = Path(root) / ANNOTATIONS_FILE
    images: list[ImageAnn] = []
    seen: dict[str, dict[int, int]] = {"object": {}, "region": {}}
    for lineno, obj in _lines(path):
        where = f"{path}:{lineno}"
        validate_annotation_line(obj, where=where)
        for kind, key in (("object", "objects"), ("region", "regions")):
            for entry in obj[key]:
                first = seen[kind].setdefault(entry["id"], lineno)
                if first != lineno:
                    raise _fail(where, f"{kind} id {entry['id']} is used again (first on line {first}); ids must be unique in the corpus")
        images.append(_image_from_dict(obj))
    if not images:
        raise AnnotationError(f"{path}: holds no image lines; regenerate it with `engine synth DIR`")
    return images


def _read_queries(path: Path) -> list[tuple[int, RetrievalQuery]]:
    out = []
    for lineno, obj in _lines(path):
        validate_query_line(obj, where=f"{path}:{lineno}")
        query = RetrievalQuery(
            image=obj["image"],
            region=_box(obj["region"]),
            text=obj["text"],
            region_id=obj["region_id"],
            positives=tuple(obj["positives"]),
            split=obj.get("split"),
        )
        out.append((lineno, query))
    return out


def read_queries(root: Path) -> list[RetrievalQuery]:
    """Read and validate ``root/queries.jsonl``."""
    return [q for _, q in _read_queries(Path(root) / QUERIES_FILE)]


def read_dataset(root: Path) -> Dataset:
    """Images from ``annotations.jsonl`` and, when present, queries from ``queries.jsonl``, cross-checked.

    Every query must name an image of the corpus, lie inside it, and refer to existing region ids.
    """
    root = Path(root)
    images = read_annotations(root)
    queries: list[RetrievalQuery] = []
    path = root / QUERIES_FILE
    if path.is_file():
        numbered = _read_queries(path)
        queries = [q for _, q in numbered]
        by_path = {im.image: im for im in images}
        region_ids = {r.id for im in images for r in im.regions}
        for lineno, q in numbered:
            where = f"{path}:{lineno}"
            image = by_path.get(q.image)
            if image is None:
                raise _fail(where, f"image {q.image!r} is not in {ANNOTATIONS_FILE}")
            _check_box(list(q.region), image.width, image.height, where, f"query region {q.region_id}")
            missing = [rid for rid in (q.region_id, *q.positives) if rid not in region_ids]
            if missing:
                raise _fail(where, f"region ids {missing[:5]} are not regions of {ANNOTATIONS_FILE}")
    return Dataset(root=root, images=images, queries=queries, name=root.name)


def _write_lines(path: Path, lines: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)


def write_annotations(root: Path, images: Iterable[ImageAnn]) -> None:
    """Write ``root/annotations.jsonl`` (through a temporary file, so a crash leaves the old one)."""
    _write_lines(Path(root) / ANNOTATIONS_FILE, (image_to_dict(im) for im in images))


def write_queries(root: Path, queries: Iterable[RetrievalQuery]) -> None:
    """Write ``root/queries.jsonl`` (through a temporary file)."""
    _write_lines(Path(root) / QUERIES_FILE, (query_to_dict(q) for q in queries))
