"""Query stage 3: localize the described region in each of the best images (Ref-NMS + CM-Att).

For each of the first ``images`` images of the stage-2 ranking (DESIGN §2):

1. every indexed region of the image is a candidate: its box, objectness ``c_i`` and RoI map come
   from the index (no image is decoded);
2. Ref-NMS (Ref-NMS Eq. 1–2) scores each candidate's relatedness ``r_i`` to the query text; boxes
   with ``c_i < δ`` are dropped and NMS runs over ``s_i = r_i × c_i`` (the paper's fused score);
3. CM-Att (CM-Att Eq. 4–11) scores each surviving candidate against the text: ``g_i``, with the
   image's mean backbone feature ``e_0`` stored at index time;
4. the stage-2 scorer (GRN, + SAN) scores the same candidates: ``s2_i``;
5. ``final_i = s2_i + w_r · r_i + w_g · g_i``; the image's hit is its grounded region, the
   candidate with the best ``final``.

The grounded hits (one per image) are ranked by ``final`` and come first; the stage-2 hits follow in
stage-2 order (a grounded image's other regions among them, unless they repeat its grounded box). The weights and ``images`` are fitted on the validation split
by ``engine eval stage3`` and shipped in ``engine/checkpoints/stage3.json``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.boxes import box_iou
from engine.errors import CheckpointError, EngineError, InvalidInputError
from engine.models.cm_att import GroundingImage
from engine.models.ref_nms import fused_nms
from engine.results import Hit
from indexer.store import MAPS_ARRAY, REFNMS_ARRAY, VECTOR_ARRAY, IndexStore, RegionRow
from query.filters import HitFilter
from query.rerank import Rescorer, StageScores

__all__ = ["STAGE3_FILE", "Stage3Weights", "Stage3Candidates", "GroundingModels", "GroundingStage", "load_stage3_weights", "rank_stage3", "best_images", "stage2_depth", "stage3_hits"]

log = logging.getLogger(__name__)

STAGE3_FILE = "stage3.json"
"""The fitted weights, beside the shipped checkpoints."""

@dataclass(frozen=True)
class Stage3Weights:
    """``images``: how many of the best stage-2 images are grounded; ``relatedness`` / ``grounding``:
    the weights ``w_r`` and ``w_g`` of ``final = s2 + w_r · r + w_g · g``."""

    images: int = 10
    relatedness: float = 0.0
    grounding: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.images, int) or self.images < 0:
            raise InvalidInputError(f"stage 3 images must be an integer >= 0, got {self.images!r}")
        if not (np.isfinite(self.relatedness) and np.isfinite(self.grounding)):
            raise InvalidInputError(f"stage 3 weights must be finite numbers, got {self.relatedness!r}, {self.grounding!r}")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def load_stage3_weights(path: Path | None = None) -> Stage3Weights:
    """The fitted weights from ``path`` (default: the shipped ``engine/checkpoints/stage3.json``)."""
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS

    path = Path(path) if path is not None else PACKAGE_CHECKPOINTS / STAGE3_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Stage3Weights(images=int(data["images"]), relatedness=float(data["relatedness"]), grounding=float(data["grounding"]))
    except FileNotFoundError:
        raise CheckpointError(f"stage 3 weights {path} are missing; fit them with: engine eval stage3 --data DATA --write {path}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"stage 3 weights {path} are unreadable ({exc}); fit them again with: engine eval stage3 --data DATA --write {path}") from None


@dataclass(frozen=True)
class GroundingModels:
    """What stage 3 runs: its fitted weights, the Ref-NMS model and the CM-Att scorer (loaded once by the engine)."""

    weights: Stage3Weights
    ref_nms: Any  # engine.models.ref_nms.RefNMSModel
    scorer: Any  # engine.models.cm_att.GroundingScorer


@dataclass(frozen=True)
class Stage3Candidates:
    """One image's candidates after Ref-NMS, with every part of their score, aligned with ``rows``:
    the stage-1 ``visual`` cosine, stage 2's scores, Ref-NMS's ``relatedness`` and CM-Att's ``grounding``."""

    rows: list[RegionRow]
    visual: np.ndarray
    stage2: StageScores
    relatedness: np.ndarray
    grounding: np.ndarray

    def final(self, weights: Stage3Weights) -> np.ndarray:
        """``stage2 + w_r · relatedness + w_g · grounding``."""
        return self.stage2.final + weights.relatedness * self.relatedness + weights.grounding * self.grounding

    def scores(self, i: int) -> dict[str, float]:
        """Every part of candidate ``i``'s score by name, as a hit shows them."""
        parts = {"visual": self.visual, **self.stage2.parts(), "stage2": self.stage2.final, "relatedness": self.relatedness, "grounding": self.grounding}
        return {name: float(v[i]) for name, v in parts.items()}


class GroundingStage:
    """Ref-NMS and CM-Att over the indexed regions of one image at a time.

    Args:
        store: the open index (arrays ``maps`` and ``visual``; image vectors).
        ref_nms: a :class:`engine.models.ref_nms.RefNMSModel`.
        scorer: a :class:`engine.models.cm_att.GroundingScorer`.
        image_vector: computes ``e_0`` of an image file for images indexed without one.
        region_maps: computes the 7×7 maps of an image's indexed regions from its file, for an index
            built without maps (``None`` when the file is gone or changed since it was indexed).
        stored_relatedness_features: the index holds ``ref_nms``'s own visual features ``v_i`` (array
            ``refnms``): Ref-NMS reads them instead of running its convolutional head on the maps.
    """

    def __init__(self, *, store: IndexStore, ref_nms, scorer, image_vector: Callable[[str], np.ndarray], region_maps: Callable[[str, list[RegionRow]], np.ndarray | None] | None = None, stored_relatedness_features: bool = False) -> None:  # noqa: ANN001
        self.store = store
        self.ref_nms = ref_nms
        self.scorer = scorer
        self.image_vector = image_vector
        self.region_maps = region_maps
        self.stored_relatedness_features = stored_relatedness_features

    def candidates(self, path: str, text: str, stage2: Rescorer, query_vector: np.ndarray) -> Stage3Candidates | None:
        """The candidates of the image at ``path``; ``None`` when it cannot be grounded (no regions,
        or no image vector: an old index whose image file is gone)."""
        return self.candidates_many([path], text, stage2, query_vector).get(path)

    def candidates_many(self, paths: Sequence[str], text: str, stage2: Rescorer, query_vector: np.ndarray) -> dict[str, Stage3Candidates]:
        """:meth:`candidates` of the images at ``paths`` (those that can be grounded, in ``paths`` order), computed
        together: one database read, the text encoded once, Ref-NMS over every image's stored features in
        one pass, CM-Att over every image's survivors in one batch, stage 2 over them all at once. Each
        region's scores are the ones the image alone gets (every part scores a region on its own)."""
        found = self.store.regions_of_images(paths)
        vectors = self.store.image_vectors([p for p in paths if p in found])
        images: list[_Image] = []
        for path in paths:
            rows = found.get(path)
            if not rows:
                continue
            e0 = vectors.get(path)
            if e0 is None:
                e0 = self._e0(path)
            if e0 is None:
                continue
            objectness = np.asarray([r.objectness for r in rows], np.float32)
            idx = np.flatnonzero(objectness >= self.ref_nms.config.delta)
            if len(idx):
                images.append(_Image(path=path, rows=rows, boxes=np.asarray([r.box for r in rows], np.float32), objectness=objectness, idx=idx, e0=np.asarray(e0, np.float32)))
        if self.stored_relatedness_features:  # Ref-NMS's visual half was stored at index time: one pass over every image
            features = self.store.read_arrays(REFNMS_ARRAY, _feature_rows([im.rows[i] for im in images for i in im.idx]))
            r_all = self.ref_nms.relatedness_from_features(features, text) if len(features) else np.zeros(0, np.float32)
            for im, r in zip(images, np.split(r_all, np.cumsum([len(im.idx) for im in images])[:-1]) if images else []):
                im.relatedness = r
        else:
            for im in images:
                im.maps = self._maps(im.path, [im.rows[i] for i in im.idx])
                im.relatedness = self.ref_nms.relatedness(im.maps, text) if im.maps is not None else None
        images = [im for im in images if im.relatedness is not None]
        for im in images:
            order = fused_nms(im.boxes[im.idx], im.objectness[im.idx], im.relatedness, iou=self.ref_nms.config.nms_iou)  # NMS over s_i = r_i × c_i
            im.keep, im.relatedness = im.idx[order], im.relatedness[order]
            im.maps = im.maps[order] if im.maps is not None else None
        if self.store.has_array(MAPS_ARRAY):  # CM-Att reads the survivors' maps only: one read for every image
            kept_maps = self.store.read_arrays(MAPS_ARRAY, _feature_rows([im.rows[i] for im in images for i in im.keep])).astype(np.float32)
            for im, maps in zip(images, np.split(kept_maps, np.cumsum([len(im.keep) for im in images])[:-1]) if images else []):
                im.maps = maps
        else:
            for im in images:
                im.maps = im.maps if im.maps is not None else self._maps(im.path, [im.rows[i] for i in im.keep])
        images = [im for im in images if im.maps is not None]
        grounding = self.scorer.score_images([GroundingImage(maps=im.maps, boxes=im.boxes[im.keep], size=(int(im.rows[0].width or 0), int(im.rows[0].height or 0)), image_vector=im.e0) for im in images], text)
        kept = [[im.rows[i] for i in im.keep] for im in images]
        rows = _feature_rows([r for group in kept for r in group])
        if not len(rows):
            return {}
        scores, visual = stage2(rows), self._visual([r for group in kept for r in group], query_vector)
        out: dict[str, Stage3Candidates] = {}
        start = 0
        for im, group, g in zip(images, kept, grounding):
            part = slice(start, start + len(group))
            start += len(group)
            out[im.path] = Stage3Candidates(rows=group, visual=visual[part], stage2=scores.take(part), relatedness=np.asarray(im.relatedness), grounding=np.asarray(g))
        return out

    def _maps(self, path: str, rows: list[RegionRow]) -> np.ndarray | None:
        """The regions' 7×7 maps (float32): stored, or computed again from the image file when the index
        was built without them."""
        if self.store.has_array(MAPS_ARRAY):
            return self.store.read_arrays(MAPS_ARRAY, _feature_rows(rows)).astype(np.float32)
        maps = self.region_maps(path, rows) if self.region_maps is not None else None
        if maps is None:
            log.warning("stage 3 skips %s: the index holds no 7x7 maps and the file is gone or changed since it was indexed", path)
            return None
        return np.asarray(maps, np.float32)

    def _e0(self, path: str) -> np.ndarray | None:
        stored = self.store.image_vectors([path]).get(path)
        if stored is not None:
            return stored
        try:
            return self.image_vector(path)
        except EngineError as exc:
            log.warning("stage 3 skips %s: %s", path, exc)
            return None

    def _visual(self, rows: list[RegionRow], query_vector: np.ndarray) -> np.ndarray:
        vectors = self.store.read_arrays(VECTOR_ARRAY, np.asarray([r.row for r in rows], np.int64)).astype(np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        q = np.asarray(query_vector, np.float32).reshape(-1)
        return (vectors @ (q / max(float(np.linalg.norm(q)), 1e-12))).astype(np.float32)


@dataclass
class _Image:
    """One image on its way through :meth:`GroundingStage.candidates_many`: its regions, those Ref-NMS may
    keep (``idx``: objectness ≥ δ), their relatedness, the survivors of its NMS (``keep``) and their maps."""

    path: str
    rows: list[RegionRow]
    boxes: np.ndarray
    objectness: np.ndarray
    idx: np.ndarray
    e0: np.ndarray
    relatedness: np.ndarray | None = None
    keep: np.ndarray | None = None
    maps: np.ndarray | None = None


def _feature_rows(rows: Sequence[RegionRow]) -> np.ndarray:
    return np.asarray([r.row for r in rows], np.int64)


def rank_stage3(stage2_hits: Sequence[Hit], grounded: dict[str, Stage3Candidates], weights: Stage3Weights, k: int, *, iou: float = 0.5) -> list[Hit]:
    """The final ranking: one hit per grounded image — its grounded region, the candidate with the
    best ``final`` — ranked by ``final``; then the stage-2 hits in stage-2 order, less those that
    overlap their image's grounded region by IoU > ``iou`` (they would repeat it); ``k`` hits."""
    hits: list[Hit] = []
    for cand in grounded.values():
        final = cand.final(weights)
        i = int(np.argmax(final))
        row = cand.rows[i]
        hits.append(Hit(image=row.image_path, box=row.box, score=float(final[i]), region_id=row.id, scores=cand.scores(i), content_hash=getattr(row, "content_hash", None)))
    hits.sort(key=lambda h: -h.score)
    boxes = {h.image: h.box for h in hits}
    rest = [h for h in stage2_hits if h.image not in boxes or box_iou([h.box], [boxes[h.image]])[0, 0] <= iou]
    return (hits + rest)[:k]


def stage3_hits(ranked: Sequence[Hit], grounded: dict[str, Stage3Candidates], weights: Stage3Weights, filters: HitFilter) -> list[Hit]:
    """The grounded hits merged into the stage-2 ranking ``ranked`` (:func:`rank_stage3`), then ``filters``."""
    return filters.apply(rank_stage3(ranked, grounded, weights, len(ranked) + sum(len(c.rows) for c in grounded.values())))


def stage2_depth(k: int, images: int, max_per_image: int | None, shortlist: int) -> int:
    """How many stage-2 hits stage 3 needs so that its top ``k`` equal those over the whole shortlist.

    The stage-2 ranking holds at most ``max_per_image`` (m) hits of an image, so its first ``images · m``
    hits name the ``images`` images to ground, and merging the grounded hits drops at most ``m`` stage-2
    hits per grounded image (overlap or the per-image cap): ``k + images · m`` hits leave ``k``. The
    filters keep a prefix of their input's answer, so the caller only has to rank the whole shortlist
    again when fewer than ``k`` hits survive (copies of a picture removed as duplicates). Without a
    per-image cap (0 or ``None``) the images to ground may lie anywhere: the whole shortlist."""
    if not max_per_image:
        return shortlist
    return min(shortlist, k + images * max_per_image)


def best_images(hits: Sequence[Hit], n: int) -> list[str]:
    """The first ``n`` distinct images of a ranking."""
    return list(dict.fromkeys(h.image for h in hits))[:n]
