"""Result filters: path glob, minimum score, hits per image, and duplicates of one picture.

Applied to a ranked hit list, in order: a hit is dropped when its image path does not match
``path_glob`` (``fnmatch`` on the absolute path, so ``*`` also matches ``/``), when its score is below
``min_score``, when its image already has ``max_per_image`` hits, or when it is a near-identical box
(IoU > ``duplicate_iou``) in a copy of an image already shown (same content hash, another path).

Every search applies one (``HitFilter()`` when none is given): by default a query's hits come from
distinct images, each image's best box (``max_per_image=1``); ``max_per_image=N`` allows up to ``N``
boxes of one image, ``0`` (or ``None``) any number. Evaluations that measure per-region recall pass
``max_per_image=0`` (their papers' protocols).
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.boxes import box_iou
from engine.errors import InvalidInputError
from engine.results import Hit

__all__ = ["HitFilter", "DEFAULT_MAX_PER_IMAGE"]

DEFAULT_MAX_PER_IMAGE = 1
"""Hits per image unless asked otherwise: a result list shows distinct images."""


@dataclass(frozen=True)
class HitFilter:
    path_glob: str | None = None
    min_score: float | None = None
    max_per_image: int | None = DEFAULT_MAX_PER_IMAGE
    duplicate_iou: float = 0.5

    def __post_init__(self) -> None:
        if self.path_glob is not None and not isinstance(self.path_glob, str):
            raise InvalidInputError(f"--path-glob must be a string pattern, got {type(self.path_glob).__name__} {_show(self.path_glob)}; e.g. '*/cats/*.jpg'")
        if self.path_glob is not None and not self.path_glob.strip():
            raise InvalidInputError("--path-glob is empty; give a pattern such as '*/cats/*.jpg'")
        if self.min_score is not None and not _is_finite_number(self.min_score):
            raise InvalidInputError(f"--min-score must be a finite number, got {_show(self.min_score)}")
        if self.max_per_image is not None and (isinstance(self.max_per_image, bool) or not isinstance(self.max_per_image, int) or self.max_per_image < 0):
            raise InvalidInputError(f"--max-per-image must be an integer >= 0 (0: no limit), got {_show(self.max_per_image)}")
        if not _is_finite_number(self.duplicate_iou) or not 0.0 < self.duplicate_iou <= 1.0:
            raise InvalidInputError(f"duplicate_iou must be in (0, 1], got {_show(self.duplicate_iou)}")

    @property
    def active(self) -> bool:
        """Whether anything but the defaults (duplicate removal, one hit per image) is asked for."""
        return self.path_glob is not None or self.min_score is not None or self.max_per_image != DEFAULT_MAX_PER_IMAGE

    def matches(self, path: str) -> bool:
        return self.path_glob is None or fnmatch.fnmatch(path, self.path_glob)

    def apply(self, hits: Sequence[Hit]) -> list[Hit]:
        """The hits that pass, in their order (duplicates are found by the hits' ``content_hash``)."""
        kept: list[Hit] = []
        per_image: dict[str, int] = defaultdict(int)
        shown: dict[str, list[Hit]] = defaultdict(list)  # content hash -> kept hits of that picture
        for hit in hits:
            if not self.matches(hit.image) or (self.min_score is not None and hit.score < self.min_score):
                continue
            if self.max_per_image and per_image[hit.image] >= self.max_per_image:
                continue
            digest = hit.content_hash
            if digest is not None and self._duplicate(hit, shown[digest]):
                continue
            kept.append(hit)
            per_image[hit.image] += 1
            if digest is not None:
                shown[digest].append(hit)
        return kept

    def _duplicate(self, hit: Hit, same_picture: list[Hit]) -> bool:
        others = [h for h in same_picture if h.image != hit.image]
        if not others:
            return False
        return bool((box_iou([hit.box], [h.box for h in others])[0] > self.duplicate_iou).any())


def _is_finite_number(value: object) -> bool:
    """A real number (not a bool, not a string) that is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return bool(np.isfinite(float(value)))
    except OverflowError:  # an int too large for a float
        return False


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
