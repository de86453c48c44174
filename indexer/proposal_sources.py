"""Where an image's candidate regions come from during indexing: the trained region proposal network,
annotation boxes, or selective search.

A provider maps (path, image) to ``(boxes [N, 4] xyxy pixels, objectness [N])``; ``source`` is recorded
with every region.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image

from engine.errors import InvalidInputError, ImageReadError
from engine.datasets.annotations import read_annotations

if TYPE_CHECKING:
    from engine.models.rpn import ProposalNetwork
    from indexer.backbone import Backbone

__all__ = [
    "ProposalProvider",
    "RpnProposals",
    "GroundTruthProposals",
    "SelectiveSearchProposals",
    "create_proposal_provider",
    "PROPOSAL_CHOICES",
    "DEFAULT_RPN_PROPOSALS",
]

log = logging.getLogger(__name__)

PROPOSAL_CHOICES = ("auto", "rpn", "gt", "selective-search")
DEFAULT_RPN_PROPOSALS = 100
"""Proposals kept per image when indexing with the RPN (its test-split recall of regions is measured at 100)."""
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


@dataclass
class RpnProposals:
    """The trained region proposal network (:class:`~engine.models.rpn.ProposalNetwork`) on the backbone's maps.

    Args:
        network: the proposal network (eval mode).
        backbone: the frozen backbone whose ``c3``..``c5`` maps it reads; pass the region feature
            extractor's backbone so that both share one model in memory.
        max_proposals: proposals kept per image (best objectness first, after NMS).

    With the plain provider protocol (``provider(path, image)``) the backbone runs here for one image and
    again in the region feature extractor; :meth:`propose_batch` runs it once for a batch and returns the
    maps, from which the pipeline pools the region features (``RegionFeatureExtractor.from_feature_map``).
    """

    network: "ProposalNetwork"
    backbone: "Backbone"
    max_proposals: int = DEFAULT_RPN_PROPOSALS
    source: str = "rpn"

    def __post_init__(self) -> None:
        if self.max_proposals < 1:
            raise InvalidInputError(f"max_proposals must be a positive integer, got {self.max_proposals}; {DEFAULT_RPN_PROPOSALS} is the default")
        self.network.check_backbone(self.backbone.version, self.backbone.max_size)

    @classmethod
    def load(
        cls,
        checkpoint: Path | None = None,
        *,
        backbone: "Backbone | None" = None,
        device: torch.device | str = "cpu",
        max_proposals: int = DEFAULT_RPN_PROPOSALS,
    ) -> "RpnProposals":
        """The network of ``checkpoint`` (``None``: the shipped ``rpn.pt``) on ``backbone`` (default: a new
        EfficientNet-Lite0 on ``device``); a :class:`CheckpointError` when the checkpoint is missing or broken."""
        from engine.models.registry import load_model
        from indexer.backbone import BackboneConfig, create_backbone

        if backbone is None:
            backbone = create_backbone(BackboneConfig(), device=device)
        network = load_model(checkpoint, device=backbone.device, family="rpn")
        log.info("RPN proposals from %s (top %d per image)", network.version, max_proposals)
        return cls(network=network, backbone=backbone, max_proposals=max_proposals)

    @property
    def version(self) -> str:
        """The network's identity (manifest version and sha256 prefix), to record with an index."""
        return self.network.version

    def __call__(self, path: Path, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        _, proposals = self.propose_batch([image])
        return proposals[0]

    @torch.no_grad()
    def propose_batch(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[tuple[np.ndarray, np.ndarray]]]:
        """Run the backbone once on ``images`` (one padded batch; batch images of one size) and the RPN on its maps.

        Returns ``(maps, proposals)``: ``maps`` ``{level: Tensor[B, C, H, W]}`` for ``c3``..``c5`` (the region
        feature level among them, ready for ``RegionFeatureExtractor.pool``), and per image ``(boxes [N, 4]
        original pixels, objectness [N])``, ``N <= max_proposals``. An image without any proposal gets its
        whole frame with objectness 0, so that it is still searchable.
        """
        from indexer.backbone import preprocess

        batch, _ = preprocess(images, max_size=self.backbone.max_size)
        maps = self.backbone(batch.to(self.backbone.device), levels=list(self.network.config.levels))
        results = self.network.propose(maps, [im.size for im in images], max_proposals=self.max_proposals, max_size=self.backbone.max_size)
        out = []
        for image, (boxes, scores) in zip(images, results):
            if len(boxes) == 0:
                w, h = image.size
                log.debug("the RPN proposed nothing for a %dx%d image; indexing the whole image", w, h)
                boxes, scores = np.array([[0, 0, w, h]], np.float32), np.zeros(1, np.float32)
            out.append((boxes, scores))
        return maps, out


def create_proposal_provider(
    name: str,
    corpus: Path,
    *,
    backbone: "Backbone | None" = None,
    device: torch.device | str = "cpu",
    checkpoint: Path | None = None,
    max_proposals: int = DEFAULT_RPN_PROPOSALS,
) -> ProposalProvider:
    """The provider for ``--proposals NAME``.

    ``auto`` and ``rpn`` are the region proposal network of ``checkpoint`` (``None``: the shipped
    ``rpn.pt``), keeping ``max_proposals`` per image; it runs on ``backbone`` (pass the feature
    extractor's; default a new one on ``device``). ``gt`` are the boxes of ``CORPUS/annotations.jsonl``;
    ``selective-search`` the slow fallback.
    """
    if name not in PROPOSAL_CHOICES:
        raise InvalidInputError(f"--proposals {name!r} is not known; choose one of {', '.join(PROPOSAL_CHOICES)}")
    if name == "auto":
        name = "rpn"
        log.info("--proposals auto chose rpn (the trained region proposal network)")
    if name == "rpn":
        return RpnProposals.load(checkpoint, backbone=backbone, device=device, max_proposals=max_proposals)
    if name == "gt":
        if not (corpus / ANNOTATIONS_FILE).is_file():
            raise InvalidInputError(f"--proposals gt needs {corpus / ANNOTATIONS_FILE}, which does not exist; use --proposals rpn")
        return GroundTruthProposals.from_corpus(corpus)
    return SelectiveSearchProposals()
