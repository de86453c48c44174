"""Where an image's candidate regions come from during indexing: annotation boxes or selective search.

A provider maps (path, image) to ``(boxes [N, 4] xyxy pixels, objectness [N])``; ``source`` is recorded
with every region.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from engine.errors import InvalidInputError, ImageReadError
from engine.datasets.annotations import read_annotations

__all__ = ["ProposalProvider", "GroundTruthProposals", "SelectiveSearchProposals", "create_proposal_provider", "PROPOSAL_CHOICES"]

log = logging.getLogger(__name__)

PROPOSAL_CHOICES = ("auto", "gt", "selective-search")
ANNOTATIONS_FILE = "annotations.jsonl"


class ProposalProvider(Protocol):
    source: str

    def __call__(self, path: Path, image: Image.Image) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class GroundTruthProposals:
    """The region and object boxes of the corpus's ``annotations.jsonl`` (objectness 1)."""

    boxes_by_path: dict[str, np.ndarray]
    source: str = "gt"

    @classmethod
    def from_corpus(cls, corpus: Path) -> "GroundTruthProposals":
        corpus = corpus.resolve()
        boxes: dict[str, np.ndarray] = {}
        for ann in read_annotations(corpus):
            rows = [r.box for r in ann.regions] + [o.box for o in ann.objects]
            arr = np.unique(np.asarray(rows, dtype=np.float32).reshape(-1, 4), axis=0)
            boxes[str((corpus / ann.image).resolve())] = arr
        return cls(boxes_by_path=boxes)

    def __call__(self, path: Path, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        boxes = self.boxes_by_path.get(str(path))
        if boxes is None:
            raise ImageReadError(f"{path} has no entry in {ANNOTATIONS_FILE}, which --proposals gt needs; add it or use --proposals selective-search")
        if len(boxes) == 0:
            raise ImageReadError(f"{path} has no boxes in {ANNOTATIONS_FILE}; --proposals gt needs at least one")
        w, h = image.size
        boxes = boxes.copy()
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        if len(boxes) == 0:
            raise ImageReadError(f"{path}: every box of {ANNOTATIONS_FILE} lies outside the {w}x{h} image")
        return boxes, np.ones(len(boxes), dtype=np.float32)


@dataclass
class SelectiveSearchProposals:
    """Selective search (opencv-contrib, fast mode): the fallback for corpora without annotations."""

    max_proposals: int = 100
    source: str = "selective-search"

    def __call__(self, path: Path, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        from indexer.proposals import selective_search

        boxes, scores = selective_search(np.asarray(image), max_proposals=self.max_proposals)
        if len(boxes) == 0:
            w, h = image.size
            return np.array([[0, 0, w, h]], dtype=np.float32), np.ones(1, dtype=np.float32)
        return boxes.astype(np.float32), scores.astype(np.float32)


def create_proposal_provider(name: str, corpus: Path) -> ProposalProvider:
    """The provider for ``--proposals NAME``; ``auto`` picks ``gt`` when the corpus has annotations, else selective search."""
    if name not in PROPOSAL_CHOICES:
        raise InvalidInputError(f"--proposals {name!r} is not known; choose one of {', '.join(PROPOSAL_CHOICES)}")
    has_annotations = (corpus / ANNOTATIONS_FILE).is_file()
    if name == "auto":
        name = "gt" if has_annotations else "selective-search"
        log.info("--proposals auto chose %s (%s %s)", name, ANNOTATIONS_FILE, "found" if has_annotations else "not found")
    if name == "gt":
        if not has_annotations:
            raise InvalidInputError(f"--proposals gt needs {corpus / ANNOTATIONS_FILE}, which does not exist; use --proposals selective-search")
        return GroundTruthProposals.from_corpus(corpus)
    return SelectiveSearchProposals()
