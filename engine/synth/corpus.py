"""Orchestration: one image at a time from ``(seed, index)``, then the benchmark queries, then the files.

Every image has its own ``numpy.random.Generator`` seeded from ``(seed, index)``, so any image can
be regenerated alone (:meth:`SynthGenerator.generate`); the meaning pool depends on the seed only.
Files are written through temporary names and renamed, so an interrupted run leaves no
half-written file.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.datasets.annotations import image_to_dict
from engine.datasets.types import ImageAnn, ObjectAnn, RefAnn, RegionAnn
from engine.errors import EngineError, InvalidInputError
from engine.synth.backgrounds import BackgroundMaker
from engine.synth.grammar import captions as make_captions
from engine.synth.grammar import describe_region, refer
from engine.synth.meaning import SceneObject, objects_in_region
from engine.synth.pool import MeaningPool, make_variant, random_named_attributes
from engine.synth.queries import RegionRecord, build_queries
from engine.synth.refs import choose_reference
from engine.synth.relations import relation_holds, relation_is_clear
from engine.synth.render import object_pixels, paint_object, shape_mask
from engine.synth.rle import rle_encode
from engine.synth.scene import PlacedObject, Plant, layout_scene, spec_for_role
from engine.synth.writing import check_out_dir, image_rng, write_corpus

__all__ = ["SynthConfig", "SynthSummary", "SynthImage", "SynthGenerator", "generate_corpus", "split_of", "SPLITS"]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMATS: tuple[str, ...] = ("jpg", "png")
_MIN_SIZE, _MAX_SIZE = 96, 4096
_MIN_REGION_AREA, _MAX_REGION_AREA = 0.10, 0.90
# id layout inside an image: objects k, regions 100 + r, refs 500 + j  (image_index * 1000 + ...)
_ID_STRIDE, _REGION_BASE, _REF_BASE = 1000, 100, 500
_PAIR_RELATIONS = ("left_of", "right_of", "above", "below", "next_to")


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator. Validated on construction (:class:`InvalidInputError`)."""

    images: int = 200
    seed: int = 0
    size: int = 320
    format: str = "jpg"  # "jpg" | "png"
    min_objects: int = 3
    max_objects: int = 8
    max_overlap: float = 0.12  # two object boxes share at most this fraction of the smaller box
    meaning_pool: int = 32  # distinct planted meanings per corpus
    variant_prob: float = 0.3  # a planted meaning is a one-change variant (hard negative) this often
    queries_per_meaning: int = 3  # per split and planted meaning
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test
    jpeg_quality: int = 90
    photo_backgrounds: bool = True

    def __post_init__(self) -> None:
        def bad(what: str) -> InvalidInputError:
            return InvalidInputError(what)

        if not isinstance(self.images, int) or self.images < 1:
            raise bad(f"images={self.images!r} is not allowed: need an integer >= 1, e.g. --images 200")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise bad(f"seed={self.seed!r} is not allowed: need an integer >= 0, e.g. --seed 0")
        if not isinstance(self.size, int) or not _MIN_SIZE <= self.size <= _MAX_SIZE:
            raise bad(f"size={self.size!r} is not allowed: need an integer in [{_MIN_SIZE}, {_MAX_SIZE}], e.g. --size 320")
        if self.format not in FORMATS:
            raise bad(f"format={self.format!r} is not allowed: use one of {', '.join(FORMATS)}, e.g. --format jpg")
        if not 1 <= self.min_objects <= self.max_objects <= 20:
            raise bad(
                f"min_objects={self.min_objects!r}, max_objects={self.max_objects!r} are not allowed: need 1 <= min <= max <= 20"
            )
        if not 0.0 <= self.max_overlap < 1.0:
            raise bad(f"max_overlap={self.max_overlap!r} is not allowed: need a fraction in [0, 1)")
        if self.meaning_pool < 1 or self.queries_per_meaning < 1:
            raise bad("meaning_pool and queries_per_meaning must be >= 1")
        if not 0.0 <= self.variant_prob <= 1.0:
            raise bad(f"variant_prob={self.variant_prob!r} is not allowed: need a probability in [0, 1]")
        fr = self.split_fractions
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise bad(f"split_fractions={fr!r} is not allowed: need three non-negative fractions (train, val, test) summing to 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise bad(f"jpeg_quality={self.jpeg_quality!r} is not allowed: need an integer in [1, 100]")


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_corpus` wrote."""

    images: int
    objects: int
    regions: int
    refs: int
    queries: int
    seconds: float
    out_dir: Path


@dataclass(frozen=True)
class SynthImage:
    """One generated image: its annotation, its ``annotations.jsonl`` line, its encoded bytes, its regions."""

    index: int
    annotation: ImageAnn
    line: dict[str, Any]
    data: bytes
    regions: tuple[RegionRecord, ...]


def split_of(seed: int, index: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """The split of image ``index``: a seeded hash (BLAKE2b of ``"seed:index"``) mapped to [0, 1) and cut by ``fractions``."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def _region_box(
    rng: np.random.Generator,
    member_boxes: list[tuple[int, int, int, int]],
    all_boxes: list[tuple[int, int, int, int]],
    size: int,
) -> tuple[int, int, int, int] | None:
    """A region around ``member_boxes``: padded, grown to >= 10 % of the image, snapped to objects it mostly covers."""
    x1 = min(b[0] for b in member_boxes)
    y1 = min(b[1] for b in member_boxes)
    x2 = max(b[2] for b in member_boxes)
    y2 = max(b[3] for b in member_boxes)
    pad = rng.uniform(0.0, 0.08, size=4) * size
    x1, y1 = max(0, int(x1 - pad[0])), max(0, int(y1 - pad[1]))
    x2, y2 = min(size, int(x2 + pad[2])), min(size, int(y2 + pad[3]))
    step = max(1, int(0.03 * size))
    for _ in range(200):
        if (x2 - x1) * (y2 - y1) >= _MIN_REGION_AREA * size * size:
            break
        side = int(rng.integers(4))
        if side == 0:
            x1 = max(0, x1 - step)
        elif side == 1:
            y1 = max(0, y1 - step)
        elif side == 2:
            x2 = min(size, x2 + step)
        else:
            y2 = min(size, y2 + step)
    for _ in range(2):  # an object mostly inside is taken in whole, so few objects are cut
        for bx1, by1, bx2, by2 in all_boxes:
            iw = min(x2, bx2) - max(x1, bx1)
            ih = min(y2, by2) - max(y1, by1)
            if iw > 0 and ih > 0 and 0.5 < iw * ih / ((bx2 - bx1) * (by2 - by1)) < 1.0:
                x1, y1, x2, y2 = min(x1, bx1), min(y1, by1), max(x2, bx2), max(y2, by2)
    area = (x2 - x1) * (y2 - y1) / float(size * size)
    if not _MIN_REGION_AREA <= area <= _MAX_REGION_AREA:
        return None
    return (x1, y1, x2, y2)


class SynthGenerator:
    """Generates the images of one corpus. Holds the background photographs and the meaning pool."""

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.backgrounds = BackgroundMaker(photos=config.photo_backgrounds)
        pool_rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1,)))
        self.pool = MeaningPool(pool_rng, config.meaning_pool)

    def image_path(self, index: int) -> str:
        """Path of image ``index`` relative to the corpus root: ``images/000123.jpg``."""
        return f"images/{index:06d}.{self.config.format}"

    def split(self, index: int) -> str:
        return split_of(self.config.seed, index, self.config.split_fractions)

    # ------------------------------------------------------------------ one image

    def _plants(self, rng: np.random.Generator) -> list[Plant]:
        cfg = self.config
        plants: list[Plant] = []
        n_plants = int(rng.choice(3, p=[0.1, 0.5, 0.4]))
        budget = cfg.max_objects
        for _ in range(n_plants):
            meaning = self.pool.draw(rng)
            source = "pool"
            if rng.random() < cfg.variant_prob:
                meaning, source = make_variant(rng, meaning), "variant"
            specs = [spec_for_role(rng, role) for role in meaning["objects"]]
            if len(specs) <= budget:
                plants.append(Plant(meaning=meaning, source=source, specs=specs))
                budget -= len(specs)
        return plants

    def generate(self, index: int) -> SynthImage:
        """Generate image ``index`` (deterministic for the config's seed)."""
        cfg = self.config
        size = cfg.size
        rng = image_rng(cfg.seed, index)
        background, bg_kind = self.backgrounds.make(rng, size)

        for _ in range(5):
            plants = self._plants(rng)
            n_objects = max(int(rng.integers(cfg.min_objects, cfg.max_objects + 1)), sum(len(p.specs) for p in plants))
            placed = layout_scene(rng, size, plants, n_objects, min_objects=cfg.min_objects, max_overlap=cfg.max_overlap)
            if len(placed) >= cfg.min_objects:
                break
        else:
            raise EngineError(
                f"could not place {cfg.min_objects} objects in a {size}x{size} image {index}; use a larger --size or smaller min_objects"
            )

        canvas, labels = self._paint(rng, background, placed)
        objects, scene, keep = self._visible_objects(index, placed, labels)
        split = self.split(index)
        image_path = self.image_path(index)
        regions, region_sources = self._regions(rng, index, plants, keep, objects, scene, size)
        refs, ref_meanings = self._refs(rng, objects, split, index)
        caption_list = make_captions([o.attributes for o in objects], bg_kind, [r.description for r in regions], rng)
        annotation = ImageAnn(
            image=image_path,
            width=size,
            height=size,
            objects=tuple(objects),
            regions=tuple(regions),
            refs=tuple(refs),
            captions=tuple(caption_list),
            split=split,
            saliency=rle_encode(labels > 0),
            image_id=index,
        )
        line = image_to_dict(annotation)
        line["background"] = bg_kind
        for d, o in zip(line["objects"], objects):
            d["area"] = int(sum(o.mask["counts"][1::2])) if o.mask else 0
        for d, source in zip(line["regions"], region_sources):
            d["source"] = source
        for d, meaning in zip(line["refs"], ref_meanings):
            d["meaning"] = meaning
        records = tuple(
            RegionRecord(
                id=r.id,
                image=image_path,
                split=split,
                box=tuple(int(v) for v in r.box),  # type: ignore[arg-type]
                description=r.description,
                meaning=r.meaning or {},
                source=source,
                contents=tuple(objects_in_region(r.box, scene)),
                width=size,
                height=size,
            )
            for r, source in zip(regions, region_sources)
        )
        return SynthImage(index=index, annotation=annotation, line=line, data=self._encode(canvas), regions=records)

    @staticmethod
    def _paint(rng: np.random.Generator, background: np.ndarray, placed: list[PlacedObject]) -> tuple[np.ndarray, np.ndarray]:
        """Draw the objects in a random z-order; ``labels[y, x]`` is 1 + the index of the visible object (0: none)."""
        canvas = background.copy()
        labels = np.zeros(background.shape[:2], dtype=np.int16)
        for k in rng.permutation(len(placed)).tolist():
            obj = placed[k]
            x1, y1, x2, y2 = obj.box
            mask = shape_mask(obj.spec.shape, x2 - x1, y2 - y1, rng)
            pixels = object_pixels(obj.spec.color, obj.spec.pattern, x2 - x1, y2 - y1, rng)
            paint_object(canvas, labels, k + 1, obj.box, mask, pixels)
        return canvas, labels

    @staticmethod
    def _visible_objects(
        index: int, placed: list[PlacedObject], labels: np.ndarray
    ) -> tuple[list[ObjectAnn], list[SceneObject], dict[int, int]]:
        """Objects with their visible mask and its tight box; ``keep`` maps placed index -> object position."""
        keep: dict[int, int] = {}
        objects: list[ObjectAnn] = []
        scene: list[SceneObject] = []
        for k, obj in enumerate(placed):
            x1, y1, x2, y2 = obj.box
            local = labels[y1:y2, x1:x2] == k + 1
            rows, cols = np.flatnonzero(local.any(axis=1)), np.flatnonzero(local.any(axis=0))
            if rows.size == 0:
                continue  # fully hidden (never seen with the default overlap limit)
            box = (x1 + int(cols[0]), y1 + int(rows[0]), x1 + int(cols[-1]) + 1, y1 + int(rows[-1]) + 1)
            oid = index * _ID_STRIDE + len(objects)
            keep[k] = len(objects)
            attrs = obj.spec.attributes()
            objects.append(ObjectAnn(id=oid, box=box, category=obj.spec.shape, attributes=attrs, mask=rle_encode(labels == k + 1)))
            scene.append(SceneObject(oid, attrs, box))
        return objects, scene, keep

    def _regions(
        self,
        rng: np.random.Generator,
        index: int,
        plants: list[Plant],
        keep: dict[int, int],
        objects: list[ObjectAnn],
        scene: list[SceneObject],
        size: int,
    ) -> tuple[list[RegionAnn], list[str]]:
        boxes = [o.box for o in objects]
        regions: list[RegionAnn] = []
        sources: list[str] = []
        used: set[frozenset[int]] = set()
        target = int(rng.integers(3, 7))

        def add(members: list[int], meaning: dict[str, Any], source: str) -> None:
            box = _region_box(rng, [boxes[m] for m in members], boxes, size)
            if box is None:
                return
            used.add(frozenset(members))
            regions.append(
                RegionAnn(
                    id=index * _ID_STRIDE + _REGION_BASE + len(regions),
                    box=box,
                    description=describe_region(meaning, rng),
                    objects=tuple(objects[m].id for m in members),
                    relation=meaning["relation"],
                    meaning=meaning,
                )
            )
            sources.append(source)

        for plant in plants:
            if not plant.placed or any(k not in keep for k in plant.placed):
                continue
            members = [keep[k] for k in plant.placed]
            if relation_holds(plant.meaning["relation"], [boxes[m] for m in members], size, size):
                add(members, plant.meaning, plant.source)

        n = len(objects)
        for _ in range(40):
            if len(regions) >= target:
                break
            k = 3 if n >= 3 and rng.random() < 0.2 else 2
            members = [int(i) for i in rng.choice(n, size=k, replace=False)]
            if frozenset(members) in used:
                continue
            if k == 3:
                if not relation_is_clear("between", [boxes[m] for m in members], size, size):
                    continue
                relation = "between"
            else:
                rels = [r for r in _PAIR_RELATIONS if relation_is_clear(r, [boxes[m] for m in members], size, size)]
                if not rels:
                    continue
                relation = rels[int(rng.integers(len(rels)))]
            roles = [random_named_attributes(rng, scene[m].attributes) for m in members]  # type: ignore[arg-type]
            add(members, {"objects": roles, "relation": relation}, "random")
        return regions, sources

    def _refs(self, rng: np.random.Generator, objects: list[ObjectAnn], split: str, index: int) -> tuple[list[RefAnn], list[dict]]:
        attrs = [o.attributes for o in objects]
        boxes = [o.box for o in objects]
        refs: list[RefAnn] = []
        meanings: list[dict] = []
        for t in range(len(objects)):
            choice = choose_reference(t, attrs, boxes, self.config.size, self.config.size, rng)
            if choice is None:
                continue
            context = () if choice.context is None else (objects[choice.context].id,)
            refs.append(
                RefAnn(
                    id=index * _ID_STRIDE + _REF_BASE + len(refs),
                    expression=refer(choice.target_attrs, choice.relation, choice.context_attrs, rng),
                    object=objects[t].id,
                    context_objects=context,
                    split=split,
                )
            )
            meanings.append(choice.meaning())
        return refs, meanings

    def _encode(self, canvas: np.ndarray) -> bytes:
        buf = io.BytesIO()
        img = Image.fromarray(canvas)
        if self.config.format == "jpg":
            img.save(buf, format="JPEG", quality=self.config.jpeg_quality)
        else:
            img.save(buf, format="PNG", compress_level=4)
        return buf.getvalue()


# ---------------------------------------------------------------------- the corpus


def generate_corpus(out_dir: Path, config: SynthConfig, *, progress: bool = False) -> SynthSummary:
    """Write ``images/``, ``annotations.jsonl`` and ``queries.jsonl`` of a synthetic corpus under ``out_dir``.

    Deterministic: the same ``config`` gives byte-identical files. An existing synthetic corpus in
    ``out_dir`` is overwritten; a non-empty directory without one is refused.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    generator = SynthGenerator(config)

    def make_queries(records: list[RegionRecord]) -> list[dict[str, Any]]:
        query_rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(2,)))
        return build_queries(records, query_rng, per_meaning=config.queries_per_meaning)

    written = write_corpus(out_dir, config.images, generator.generate, make_queries, progress=progress)
    summary = SynthSummary(
        images=written.images,
        objects=written.objects,
        regions=len(written.records),
        refs=written.refs,
        queries=len(written.queries),
        seconds=written.seconds,
        out_dir=out_dir,
    )
    logger.info(
        "synthetic corpus: %d images, %d objects, %d regions, %d refs, %d queries in %.1f s -> %s",
        summary.images, summary.objects, summary.regions, summary.refs, summary.queries, summary.seconds, out_dir,
    )
    return summary
