"""The stamps world generator: per image a photo crop, 2-6 stamps of the image's split, annotations; then queries.

Image *i* uses ``image_rng(seed, i)`` (as the shapes world), so any image can be regenerated alone;
its split is ``split_of(seed, i, split_fractions)`` and it draws stamps only from the stamps of that
split (:func:`engine.synth.stamps.catalog.stamp_split`), so val and test images hold no train stamp.
"""
from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.datasets.annotations import image_to_dict
from engine.datasets.types import ImageAnn, ObjectAnn, RefAnn, RegionAnn
from engine.errors import DataNotFoundError, EngineError, InvalidInputError
from engine.synth.corpus import FORMATS, SPLITS, SynthSummary, split_of
from engine.synth.relations import relation_is_clear
from engine.synth.rle import rle_encode, rle_encode_box
from engine.synth.stamps.backgrounds import PhotoLibrary
from engine.synth.stamps.catalog import Stamp, load_catalog
from engine.synth.stamps.compose import Canvas, StampCache, Visible, make_cutout, max_stamp_side
from engine.synth.stamps.language import captions, pair_phrase, refer
from engine.synth.writing import check_out_dir, image_rng, write_corpus

__all__ = ["StampsConfig", "StampsSummary", "StampsImage", "StampRegion", "StampsGenerator", "generate_stamps_corpus", "build_stamp_queries"]

logger = logging.getLogger(__name__)

_ID_STRIDE, _REGION_BASE, _REF_BASE = 1000, 100, 500
_PAIR_RELATIONS = ("left_of", "right_of", "above", "below", "next_to")
_STAMPS_SUBDIR = Path("usr/share/tuxpaint/stamps")


@dataclass(frozen=True)
class StampsConfig:
    """Knobs of the stamps world. Validated on construction (:class:`InvalidInputError`)."""

    stamps_dir: Path
    images: int = 200
    seed: int = 0
    size: int = 512
    format: str = "jpg"
    backgrounds_dirs: tuple[Path, ...] = ()
    package_photos: bool = True  # scikit-image / scikit-learn sample photos as backgrounds too
    min_objects: int = 2
    max_objects: int = 6
    min_scale: float = 0.12  # object long side, fraction of the image side
    max_scale: float = 0.45
    max_occlusion: float = 0.3  # a later object covers at most this fraction of an earlier one
    lookalike_prob: float = 0.3  # the next stamp is drawn from the category of one already in the image
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    jpeg_quality: tuple[int, int] = (70, 95)
    queries_per_stamp: int = 4
    pair_regions: int = 3  # at most this many described pairs per image

    def __post_init__(self) -> None:
        if not isinstance(self.images, int) or self.images < 1:
            raise InvalidInputError(f"images={self.images!r} is not allowed: need an integer >= 1, e.g. --images 200")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidInputError(f"seed={self.seed!r} is not allowed: need an integer >= 0, e.g. --seed 0")
        if not isinstance(self.size, int) or not 128 <= self.size <= 4096:
            raise InvalidInputError(f"size={self.size!r} is not allowed: need an integer in [128, 4096] for the stamps world, e.g. --size 512")
        if self.format not in FORMATS:
            raise InvalidInputError(f"format={self.format!r} is not allowed: use one of {', '.join(FORMATS)}, e.g. --format jpg")
        if not 1 <= self.min_objects <= self.max_objects <= 20:
            raise InvalidInputError(f"min_objects={self.min_objects}, max_objects={self.max_objects} are not allowed: need 1 <= min <= max <= 20")
        if not 0.02 <= self.min_scale <= self.max_scale <= 0.9:
            raise InvalidInputError(f"min_scale={self.min_scale}, max_scale={self.max_scale} are not allowed: need 0.02 <= min <= max <= 0.9")
        if not 0.0 <= self.max_occlusion < 1.0 or not 0.0 <= self.lookalike_prob <= 1.0:
            raise InvalidInputError("max_occlusion must be in [0, 1) and lookalike_prob in [0, 1]")
        fr = self.split_fractions
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise InvalidInputError(f"split_fractions={fr!r} is not allowed: need three non-negative fractions (train, val, test) summing to 1")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise InvalidInputError(f"jpeg_quality={self.jpeg_quality!r} is not allowed: need 1 <= low <= high <= 100")
        if self.queries_per_stamp < 1 or self.pair_regions < 0:
            raise InvalidInputError("queries_per_stamp must be >= 1 and pair_regions >= 0")

    @property
    def unpack_root(self) -> Path | None:
        """The folder the Debian packages were unpacked into, when ``stamps_dir`` is its ``usr/share/tuxpaint/stamps``."""
        p = Path(self.stamps_dir)
        return p.parents[3] if len(p.parts) > 4 and Path(*p.parts[-4:]) == _STAMPS_SUBDIR else None


@dataclass(frozen=True)
class StampRegion:
    """What the queries need to know about one object region."""

    id: int
    image: str
    split: str
    box: tuple[int, int, int, int]
    description: str
    stamp: str
    category: str


@dataclass(frozen=True)
class StampsImage:
    """One generated image: annotation, ``annotations.jsonl`` line, encoded bytes, object-region records."""

    index: int
    annotation: ImageAnn
    line: dict[str, Any]
    data: bytes
    regions: tuple[StampRegion, ...]


@dataclass(frozen=True)
class StampsSummary(SynthSummary):
    """What :func:`generate_stamps_corpus` wrote: the shapes world's summary plus counts per split."""

    queries_per_split: dict[str, int] = field(default_factory=dict)
    images_per_split: dict[str, int] = field(default_factory=dict)
    stamps_per_split: dict[str, int] = field(default_factory=dict)  # catalog stamps of each split


@dataclass(frozen=True)
class _Placed:
    stamp: Stamp
    visible: Visible


class StampsGenerator:
    """Generates the images of one stamps corpus. Holds the catalog, the photographs and the stamp cache."""

    def __init__(self, config: StampsConfig) -> None:
        self.config = config
        self.catalog = load_catalog(config.stamps_dir)
        by_split: dict[str, list[Stamp]] = {s: [] for s in SPLITS}
        for stamp in self.catalog:
            by_split[stamp.split].append(stamp)
        self.by_split = {s: tuple(v) for s, v in by_split.items()}
        by_category: dict[tuple[str, str], list[Stamp]] = defaultdict(list)
        for stamp in self.catalog:
            by_category[(stamp.split, stamp.category)].append(stamp)
        self.by_category = {k: tuple(v) for k, v in by_category.items()}
        for split, frac in zip(SPLITS, config.split_fractions):
            if frac > 0 and not self.by_split[split]:
                raise DataNotFoundError(
                    f"stamps folder {config.stamps_dir} holds no stamp of the {split} split ({len(self.catalog)} stamps in all); "
                    "point --stamps-dir at the full tuxpaint stamps folder"
                )
        self.photos = PhotoLibrary(config.unpack_root, config.backgrounds_dirs, package_photos=config.package_photos)
        self.cache = StampCache(max_stamp_side(config.size, config.max_scale))

    def image_path(self, index: int) -> str:
        return f"images/{index:06d}.{self.config.format}"

    def split(self, index: int) -> str:
        return split_of(self.config.seed, index, self.config.split_fractions)

    def _draw_stamp(self, rng: np.random.Generator, split: str, chosen: Sequence[Stamp]) -> Stamp:
        if chosen and rng.random() < self.config.lookalike_prob:
            anchor = chosen[int(rng.integers(len(chosen)))]
            pool = self.by_category[(split, anchor.category)]
        else:
            pool = self.by_split[split]
        return pool[int(rng.integers(len(pool)))]

    def _compose(self, rng: np.random.Generator, split: str) -> tuple[Canvas, list[Stamp], str]:
        cfg = self.config
        background, bg_name = self.photos.crop(rng, cfg.size)
        canvas = Canvas(background)
        chosen: list[Stamp] = []
        target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        for _ in range(2 * target):
            if len(chosen) == target:
                break
            stamp = self._draw_stamp(rng, split, chosen)
            long_side = max(8, int(round(rng.uniform(cfg.min_scale, cfg.max_scale) * cfg.size)))
            cutout = make_cutout(
                self.cache.get(stamp),
                long_side,
                mirror=stamp.mirror and bool(rng.random() < 0.5),
                contrast=float(rng.uniform(0.8, 1.2)),
                brightness=float(rng.uniform(-25.0, 25.0)),
            )
            if canvas.try_paste(cutout, rng, max_occlusion=cfg.max_occlusion):
                chosen.append(stamp)
        return canvas, chosen, bg_name

    def generate(self, index: int) -> StampsImage:
        """Generate image ``index`` (deterministic for the config)."""
        cfg = self.config
        size = cfg.size
        rng = image_rng(cfg.seed, index)
        split = self.split(index)
        canvas, chosen, bg_name = self._compose(rng, split)
        placed = []
        for k, stamp in enumerate(chosen):
            vis = canvas.visible(k)
            if vis is None:  # cannot happen with max_occlusion < 1; kept as a guard
                raise EngineError(f"image {index}: object {k} ({stamp.key}) is fully hidden")
            placed.append(_Placed(stamp, vis))
        if not placed:
            raise EngineError(f"could not place any stamp in a {size}x{size} image {index}; use a larger --size")
        image_path = self.image_path(index)
        base = index * _ID_STRIDE
        objects = [
            ObjectAnn(
                id=base + k,
                box=p.visible.box,
                category=p.stamp.category,
                attributes={"name": p.stamp.name},
                mask=rle_encode_box(p.visible.mask, p.visible.box[0], p.visible.box[1], size, size),
            )
            for k, p in enumerate(placed)
        ]
        regions, kinds = self._regions(rng, base, placed, objects)
        refs = self._refs(rng, base, placed, objects, split)
        pair_texts = [r.description for r, kind in zip(regions, kinds) if kind == "pair"]
        annotation = ImageAnn(
            image=image_path,
            width=size,
            height=size,
            objects=tuple(objects),
            regions=tuple(regions),
            refs=tuple(refs),
            captions=tuple(captions([p.stamp.name for p in placed], pair_texts, rng)),
            split=split,
            saliency=rle_encode(canvas.labels > 0),
            image_id=index,
        )
        quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        line = image_to_dict(annotation)
        line["background"] = f"photo:{bg_name}"
        for d, o, p in zip(line["objects"], objects, placed):
            d["stamp"] = p.stamp.key
            d["description"] = p.stamp.description
            d["area"] = int(sum(o.mask["counts"][1::2])) if o.mask else 0
            d["visible"] = round(p.visible.fraction, 4)
        for d, kind in zip(line["regions"], kinds):
            d["kind"] = kind
        records = tuple(
            StampRegion(
                id=r.id,
                image=image_path,
                split=split,
                box=(int(r.box[0]), int(r.box[1]), int(r.box[2]), int(r.box[3])),
                description=r.description,
                stamp=placed[k].stamp.key,
                category=placed[k].stamp.category,
            )
            for k, r in enumerate(regions[: len(placed)])
        )
        return StampsImage(index=index, annotation=annotation, line=line, data=self._encode(canvas.pixels, quality), regions=records)

    def _regions(
        self, rng: np.random.Generator, base: int, placed: list[_Placed], objects: list[ObjectAnn]
    ) -> tuple[list[RegionAnn], list[str]]:
        """One region per object (its box, its stamp's description), then up to ``pair_regions`` described pairs."""
        size = self.config.size
        regions = [
            RegionAnn(id=base + _REGION_BASE + k, box=o.box, description=p.stamp.description, objects=(o.id,))
            for k, (p, o) in enumerate(zip(placed, objects))
        ]
        kinds = ["object"] * len(regions)
        pairs = [
            (a, b, rel)
            for a in range(len(objects))
            for b in range(len(objects))
            if a != b
            for rel in _PAIR_RELATIONS
            if (rel != "next_to" or a < b) and relation_is_clear(rel, [objects[a].box, objects[b].box], size, size)
        ]
        used: set[frozenset[int]] = set()
        for i in rng.permutation(len(pairs)).tolist():
            if len(kinds) - len(objects) >= self.config.pair_regions:
                break
            a, b, rel = pairs[i]
            if frozenset((a, b)) in used:
                continue
            used.add(frozenset((a, b)))
            ba, bb = objects[a].box, objects[b].box
            box = (min(ba[0], bb[0]), min(ba[1], bb[1]), max(ba[2], bb[2]), max(ba[3], bb[3]))
            regions.append(
                RegionAnn(
                    id=base + _REGION_BASE + len(regions),
                    box=box,
                    description=pair_phrase(placed[a].stamp.name, rel, placed[b].stamp.name, rng),
                    objects=(objects[a].id, objects[b].id),
                    relation=rel,
                )
            )
            kinds.append("pair")
        return regions, kinds

    def _refs(self, rng: np.random.Generator, base: int, placed: list[_Placed], objects: list[ObjectAnn], split: str) -> list[RefAnn]:
        size = self.config.size
        names = [p.stamp.name for p in placed]
        categories = [p.stamp.category for p in placed]
        boxes = [o.box for o in objects]
        refs: list[RefAnn] = []
        for t in range(len(objects)):
            ref = refer(t, names, categories, boxes, size, size, rng)
            if ref is None:
                continue
            context = () if ref.context is None else (objects[ref.context].id,)
            refs.append(RefAnn(id=base + _REF_BASE + len(refs), expression=ref.expression, object=objects[t].id, context_objects=context, split=split))
        return refs

    def _encode(self, pixels: np.ndarray, quality: int) -> bytes:
        buf = io.BytesIO()
        img = Image.fromarray(pixels)
        if self.config.format == "jpg":
            img.save(buf, format="JPEG", quality=quality)
        else:
            img.save(buf, format="PNG", compress_level=4)
        return buf.getvalue()


def build_stamp_queries(records: Sequence[StampRegion], rng: np.random.Generator, *, per_stamp: int) -> list[dict[str, Any]]:
    """Queries as ``queries.jsonl`` dicts: per split and per stamp seen in >= 2 images of the split, up to
    ``per_stamp`` of its object regions (a seeded choice). Positives: every other object region of the
    stamp in the split; hard negatives: object regions of the other stamps of its category in the split."""
    groups: dict[tuple[str, str], list[StampRegion]] = defaultdict(list)
    by_category: dict[tuple[str, str], list[StampRegion]] = defaultdict(list)
    for rec in records:
        groups[(rec.split, rec.stamp)].append(rec)
        by_category[(rec.split, rec.category)].append(rec)
    queries: list[dict[str, Any]] = []
    for split, stamp in sorted(groups):
        members = sorted(groups[(split, stamp)], key=lambda r: r.id)
        if len({r.image for r in members}) < 2:
            continue
        order = rng.permutation(len(members)).tolist()
        for i in sorted(order[:per_stamp]):
            rec = members[i]
            queries.append(
                {
                    "id": len(queries),
                    "image": rec.image,
                    "region": list(rec.box),
                    "text": rec.description,
                    "region_id": rec.id,
                    "positives": [r.id for r in members if r.id != rec.id],
                    "split": split,
                    "stamp": stamp,
                    "category": rec.category,
                    "hard_negatives": sorted(r.id for r in by_category[(split, rec.category)] if r.stamp != stamp),
                }
            )
    return queries


def generate_stamps_corpus(out_dir: Path, config: StampsConfig, *, progress: bool = False) -> StampsSummary:
    """Write ``images/``, ``annotations.jsonl`` and ``queries.jsonl`` of a stamps corpus under ``out_dir``.

    Deterministic: the same config (and the same stamp and photo files) gives byte-identical files.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    generator = StampsGenerator(config)

    def make_queries(records: list[StampRegion]) -> list[dict[str, Any]]:
        query_rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(2,)))
        return build_stamp_queries(records, query_rng, per_stamp=config.queries_per_stamp)

    written = write_corpus(out_dir, config.images, generator.generate, make_queries, progress=progress, desc="synth stamps")
    per_split = {s: sum(q["split"] == s for q in written.queries) for s in SPLITS}
    images_per_split = {s: sum(generator.split(i) == s for i in range(config.images)) for s in SPLITS}
    summary = StampsSummary(
        images=written.images,
        objects=written.objects,
        regions=written.regions,
        refs=written.refs,
        queries=len(written.queries),
        queries_per_split=per_split,
        images_per_split=images_per_split,
        stamps_per_split={s: len(generator.by_split[s]) for s in SPLITS},
        seconds=written.seconds,
        out_dir=out_dir,
    )
    logger.info(
        "stamps corpus: %d images, %d objects, %d refs, %d queries (%s) in %.1f s -> %s",
        summary.images, summary.objects, summary.refs, summary.queries, per_split, summary.seconds, out_dir,
    )
    return summary
