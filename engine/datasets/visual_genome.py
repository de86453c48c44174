"""Reader for Visual Genome region descriptions (``region_descriptions.json`` + ``image_data.json``).

``region_descriptions.json`` is a list with one entry per image::

    [{"id": 1, "regions": [{"region_id": 1382, "image_id": 1, "phrase": "the clock is green",
                            "x": 421, "y": 57, "width": 82, "height": 139}, ...]}, ...]

``image_data.json`` is a list ``[{"image_id": 1, "url": ".../VG_100K_2/1.jpg", "width": 800,
"height": 600, "coco_id": null, "flickr_id": null}, ...]`` (version 1.0 names the id ``"id"``).
Each image becomes an :class:`ImageAnn` with one :class:`RegionAnn` per region (``id = region_id``,
``description = phrase`` stripped, box ``(x, y, x + width, y + height)`` clipped to the image).
Regions whose clipped box is empty or whose phrase is blank are dropped and counted in a warning.
"""
from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from engine.datasets._formats import (
    ImageResolver,
    expect_list,
    field,
    list_field,
    load_json,
    log_dropped,
    xywh_to_xyxy,
)
from engine.datasets.types import Dataset, ImageAnn, RegionAnn
from engine.errors import DatasetFormatError, InvalidInputError

__all__ = ["read_visual_genome"]

logger = logging.getLogger(__name__)

_NUM = (int, float)


def read_visual_genome(
    data_dir: Path,
    *,
    images_root: Path,
    region_file: str = "region_descriptions.json",
    image_file: str = "image_data.json",
    limit: int | None = None,
    name: str = "visual_genome",
) -> Dataset:
    """Read Visual Genome region descriptions into a :class:`Dataset` (no queries, no splits).

    ``data_dir`` holds ``region_file`` and ``image_file``; image paths are relative to ``images_root``
    (``VG_100K/1.jpg`` or ``VG_100K_2/1.jpg`` as in the image URL, else ``1.jpg``, whichever exists).
    ``limit`` keeps only the first ``limit`` entries of ``region_file`` (quick runs).
    Raises :class:`DatasetFormatError` for a missing file, malformed content, or a region entry whose
    image is absent from ``image_file``.
    """
    if limit is not None and limit < 1:
        raise InvalidInputError(f"limit must be a positive number of images or None for all, got {limit}")
    data_dir = Path(data_dir)
    region_path, image_path = data_dir / region_file, data_dir / image_file
    images_meta = _read_image_data(image_path)
    entries = load_json(region_path, what="Visual Genome region descriptions")
    entries = expect_list(entries, path=region_path, where="the top level")
    if limit is not None:
        entries = entries[:limit]

    resolver = ImageResolver(images_root, dataset=name)
    dropped = {"regions with an empty box": 0, "regions with a blank phrase": 0}
    images: list[ImageAnn] = []
    for k, entry in enumerate(entries):
        where = f"entry {k}"
        if not isinstance(entry, dict):
            raise DatasetFormatError(
                f"{region_path}: {where} must be a JSON object with 'id' and 'regions', got {type(entry).__name__}"
            )
        image_id = entry.get("id", entry.get("image_id"))
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise DatasetFormatError(
                f"{region_path}: {where} needs an integer image 'id', got {image_id!r}; is this region_descriptions.json?"
            )
        if image_id not in images_meta:
            raise DatasetFormatError(
                f"{region_path}: image {image_id} is not in {image_path}; use the image_data.json of the same Visual Genome version"
            )
        width, height, candidates = images_meta[image_id]
        regions: list[RegionAnn] = []
        for j, reg in enumerate(list_field(entry, "regions", path=region_path, where=where)):
            rwhere = f"image {image_id} region {j}"
            region_id = field(reg, "region_id", int, path=region_path, where=rwhere)
            phrase = field(reg, "phrase", str, path=region_path, where=rwhere).strip()
            x, y, w, h = (field(reg, key, _NUM, path=region_path, where=rwhere) for key in ("x", "y", "width", "height"))
            box = xywh_to_xyxy(x, y, w, h, width, height)
            if box is None:
                dropped["regions with an empty box"] += 1
                continue
            if not phrase:
                dropped["regions with a blank phrase"] += 1
                continue
            regions.append(RegionAnn(id=region_id, box=box, description=phrase))
        images.append(
            ImageAnn(image=resolver(candidates), width=width, height=height, regions=tuple(regions), image_id=image_id)
        )
    resolver.report()
    log_dropped(name, dropped)
    logger.info("%s: read %d images, %d regions", name, len(images), sum(len(im.regions) for im in images))
    return Dataset(root=Path(images_root), images=images, name=name)


def _read_image_data(path: Path) -> dict[int, tuple[int, int, list[str]]]:
    """image id → (width, height, candidate relative paths)."""
    records = expect_list(load_json(path, what="Visual Genome image data"), path=path, where="the top level")
    out: dict[int, tuple[int, int, list[str]]] = {}
    for k, rec in enumerate(records):
        where = f"entry {k}"
        key = "image_id" if isinstance(rec, dict) and "image_id" in rec else "id"
        image_id = field(rec, key, int, path=path, where=where)
        width = field(rec, "width", int, path=path, where=where)
        height = field(rec, "height", int, path=path, where=where)
        if width <= 0 or height <= 0:
            raise DatasetFormatError(f"{path}: image {image_id} has size {width}x{height}; sizes must be positive")
        candidates: list[str] = []
        url = rec.get("url")
        if isinstance(url, str) and url:
            parts = PurePosixPath(urlparse(url).path).parts
            if len(parts) >= 2:
                candidates.append(str(PurePosixPath(parts[-2], parts[-1])))
            if parts:
                candidates.append(parts[-1])
        for c in (f"{image_id}.jpg", f"VG_100K/{image_id}.jpg", f"VG_100K_2/{image_id}.jpg"):
            if c not in candidates:
                candidates.append(c)
        out[image_id] = (width, height, candidates)
    return out
