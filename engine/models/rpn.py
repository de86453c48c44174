"""Region proposal network: class-agnostic, DenseCap-style proposals over the frozen backbone's maps.

torchvision's :class:`~torchvision.models.detection.rpn.RegionProposalNetwork` (anchors, matcher,
sampler, box coder, losses, NMS) on a small neck:

* **neck** — a 1x1 lateral conv per level maps ``c3`` / ``c4`` / ``c5`` (40 / 112 / 320 channels for
  EfficientNet-Lite0) to one width, with a top-down sum (nearest upsampling, as in FPN), so that a
  single :class:`~torchvision.models.detection.rpn.RPNHead` serves every level;
* **anchors** — three sizes per level times the aspect ratios (h/w) 0.5, 1, 2: small objects on the
  stride-8 level, large objects and small regions on stride 16, multi-object regions up to the
  whole image on stride 32 (see :class:`RpnConfig`).

* **box head** (second stage, :mod:`engine.models.rpn_box_head`) — refines each of the first stage's
  proposals and predicts its IoU with an object; the refined boxes, ranked by predicted IoU and
  objectness, go through the final NMS. Without it the loose duplicates the first stage leaves around
  large objects crowd small objects out of an image's first 100 proposals.

**Cell centres.** torchvision's ``AnchorGenerator`` centres the anchors of feature cell ``i`` at
``i * stride``. The backbone's true cell centres are at ``Backbone.offsets[level] + i * stride``
(TF "same" padding pads bottom/right, so EfficientNet-Lite0's are at 7.5 / 15.5 / 31.5 px, not
0 or stride/2). :class:`OffsetAnchorGenerator` shifts every anchor of a level by that offset, so an
anchor sits exactly on the receptive field of the cell that predicts it; targets and decoded
proposals stay in plain resized-frame pixels.

The network works in the *resized frame* (the image after :func:`~indexer.backbone.preprocess`
scaled it to ``max_size``); :meth:`ProposalNetwork.propose` takes the original image sizes and
returns boxes in original pixels.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import checkpoint_path, load_checkpoint
from engine.models.rpn_box_head import BoxHead
from engine.imaging import resized_size

__all__ = ["RpnConfig", "OffsetAnchorGenerator", "ProposalNetwork", "MODEL_NAME", "MODEL_VERSION"]

log = logging.getLogger(__name__)

MODEL_NAME = "rpn"
MODEL_VERSION = "rpn-1"
"""Bumped whenever the architecture or the meaning of the config changes incompatibly."""


@dataclass(frozen=True)
class RpnConfig:
    """Everything needed to rebuild a :class:`ProposalNetwork` (stored in its checkpoint).

    Per level (fine to coarse): ``levels``, ``in_channels``, ``strides``, ``offsets`` (input position
    of cell 0's centre, :attr:`indexer.backbone.Backbone.offsets`) and ``anchor_sizes`` (anchor side
    at aspect 1, resized-frame pixels). ``backbone`` and ``max_size`` name the frozen backbone and
    resize the maps come from. The rest are torchvision's RPN settings: IoU thresholds of the
    matcher, anchors sampled per image and their positive fraction, top-n per level before NMS and
    total after NMS, for training and for inference. ``box_head``: hidden width of the second stage
    (:class:`~engine.models.rpn_box_head.BoxHead`; 0 = none, as in checkpoints made before it), which refines
    the first ``refine_top`` proposals (by objectness) and predicts each one's IoU ``q``, ``refine_steps`` times
    in a row (iterative box regression, each step on the boxes of the one before that its NMS kept; ``q`` of
    the last), reading RoIAlign features with ``roi_sampling`` points per bin and axis through a rank-``box_rank``
    linear bottleneck (0 = none, as in checkpoints made before it); proposals are then
    ranked by ``q ** quality_weight * objectness ** (1 - quality_weight)``.
    """

    levels: tuple[str, ...] = ("c3", "c4", "c5")
    in_channels: tuple[int, ...] = (40, 112, 320)
    strides: tuple[int, ...] = (8, 16, 32)
    offsets: tuple[float, ...] = (7.5, 15.5, 31.5)
    backbone: str = "efficientnet_lite0@imagenet-tf"
    max_size: int = 640
    width: int = 64
    top_down: bool = True
    head_depth: int = 1
    anchor_sizes: tuple[tuple[float, ...], ...] = ((32.0, 45.0, 64.0), (90.0, 128.0, 181.0), (256.0, 362.0, 512.0))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    batch_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_train: int = 1000
    post_nms_train: int = 300
    pre_nms_test: int = 1000
    post_nms_test: int = 1000
    nms: float = 0.7
    box_head: int = 0
    quality_weight: float = 0.5
    refine_steps: int = 1
    refine_top: int = 1000
    roi_sampling: int = 2
    box_rank: int = 0

    def __post_init__(self) -> None:
        n = len(self.levels)
        if not (len(self.in_channels) == len(self.strides) == len(self.offsets) == len(self.anchor_sizes) == n) or n == 0:
            raise InvalidInputError(
                f"RpnConfig needs one in_channels, stride, offset and anchor-size tuple per level {self.levels}, got "
                f"{len(self.in_channels)}, {len(self.strides)}, {len(self.offsets)}, {len(self.anchor_sizes)}"
            )
        if len({len(s) for s in self.anchor_sizes}) != 1:
            raise InvalidInputError(f"every level needs the same number of anchor sizes (one RPNHead serves all), got {self.anchor_sizes}")
        if self.box_head < 0 or self.box_rank < 0 or self.refine_steps < 1 or not 0.0 <= self.quality_weight <= 1.0:
            raise InvalidInputError(f"RpnConfig needs box_head >= 0, box_rank >= 0, refine_steps >= 1 and quality_weight in [0, 1], got {self.box_head}, {self.box_rank}, {self.refine_steps} and {self.quality_weight}")

    @property
    def anchors_per_cell(self) -> int:
        return len(self.anchor_sizes[0]) * len(self.aspect_ratios)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "RpnConfig":
        """Rebuild from :meth:`to_dict` (JSON / torch round trips turn tuples into lists)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise CheckpointError(f"RPN config has unknown keys {sorted(unknown)}; the checkpoint was written by a newer engine, retrain it with `engine train rpn`")
        values = dict(raw)
        for key in ("levels", "in_channels", "strides", "offsets", "aspect_ratios"):
            if key in values:
                values[key] = tuple(values[key])
        if "anchor_sizes" in values:
            values["anchor_sizes"] = tuple(tuple(float(v) for v in s) for s in values["anchor_sizes"])
        return cls(**values)


class OffsetAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with the anchors of level ``l`` shifted by ``offsets[l]`` pixels.

    ``AnchorGenerator`` centres cell ``i``'s anchors at ``i * stride``; with ``offsets`` they are centred at
    ``offsets[l] + i * stride``, the true receptive-field centre of the backbone cell (both axes).
    """

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]], offsets: Sequence[float]) -> None:
        super().__init__(sizes=tuple(tuple(s) for s in sizes), aspect_ratios=tuple(tuple(a) for a in aspect_ratios))
        if len(offsets) != len(self.sizes):
            raise InvalidInputError(f"need one offset per anchor level ({len(self.sizes)}), got {len(offsets)}")
        self.offsets = tuple(float(o) for o in offsets)

    def grid_anchors(self, grid_sizes: list[list[int]], strides: list[list[Tensor]]) -> list[Tensor]:
        anchors = super().grid_anchors(grid_sizes, strides)
        return [a + offset for a, offset in zip(anchors, self.offsets)]


class _Neck(nn.Module):
    """1x1 lateral convs to a common width, optionally summed top-down (coarse upsampled onto fine), then ReLU."""

    def __init__(self, *, in_channels: Sequence[int], width: int, top_down: bool) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in in_channels)
        self.top_down = top_down

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        out = [conv(f) for conv, f in zip(self.lateral, features)]
        if self.top_down:
            for i in range(len(out) - 2, -1, -1):
                out[i] = out[i] + F.interpolate(out[i + 1], size=out[i].shape[-2:], mode="nearest")
        return [F.relu(x) for x in out]


class ProposalNetwork(nn.Module):
    """Class-agnostic region proposals from cached or freshly computed backbone maps.

    Args:
        config: architecture, anchors and RPN settings (:class:`RpnConfig`).
        version: identity recorded with indexes, e.g. ``"rpn-1@3f2a…"`` (set by :meth:`from_checkpoint`).
    """

    version: str

    def __init__(self, *, config: RpnConfig = RpnConfig(), version: str = MODEL_VERSION) -> None:
        super().__init__()
        self.config = config
        self.version = version
        c = config
        self.neck = _Neck(in_channels=c.in_channels, width=c.width, top_down=c.top_down)
        anchors = OffsetAnchorGenerator(c.anchor_sizes, (c.aspect_ratios,) * len(c.levels), c.offsets)
        head = RPNHead(c.width, c.anchors_per_cell, conv_depth=c.head_depth)
        self.rpn = RegionProposalNetwork(
            anchors,
            head,
            fg_iou_thresh=c.fg_iou,
            bg_iou_thresh=c.bg_iou,
            batch_size_per_image=c.batch_per_image,
            positive_fraction=c.positive_fraction,
            pre_nms_top_n={"training": c.pre_nms_train, "testing": c.pre_nms_test},
            post_nms_top_n={"training": c.post_nms_train, "testing": c.post_nms_test},
            nms_thresh=c.nms,
        )
        self.box_head = BoxHead(levels=c.levels, width=c.width, hidden=c.box_head, sampling=c.roi_sampling, rank=c.box_rank) if c.box_head else None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: Path | str | None = None, *, device: torch.device | str = "cpu") -> "ProposalNetwork":
        """Load a trained network (``None``: the shipped ``engine/checkpoints/rpn.pt``), in eval mode on ``device``.

        Raises :class:`CheckpointError` when the file is missing, corrupt, of another model, or does not fit.
        """
        path = checkpoint_path(path, default=MODEL_NAME)
        manifest, payload = load_checkpoint(path, expected_model=MODEL_NAME)
        try:
            config = RpnConfig.from_dict(payload["config"])
            state = payload["state_dict"]
        except (KeyError, TypeError, InvalidInputError) as exc:
            raise CheckpointError(f"checkpoint {path} does not hold an RPN config and state dict ({exc}); retrain it with `engine train rpn`") from None
        net = cls(config=config, version=f"{manifest.version}@{manifest.sha256[:12]}")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"checkpoint {path} does not fit the RPN it describes: {detail}; retrain it with `engine train rpn`") from None
        from engine.device import resolve_device

        target = resolve_device(device) if isinstance(device, str) else device
        return net.to(target).eval()

    def payload(self) -> dict[str, Any]:
        """What a checkpoint stores: the config (plain data) and the state dict."""
        return {"config": self.config.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    def check_backbone(self, version: str, max_size: int) -> None:
        """Raise :class:`CheckpointError` unless the maps come from the backbone this network was trained on.

        Another ``max_size`` is allowed (anchors are in resized pixels, so objects change scale; it is logged).
        """
        if version != self.config.backbone:
            raise CheckpointError(
                f"the RPN ({self.version}) was trained on {self.config.backbone} maps, but the backbone is {version}; "
                f"use that backbone or train an RPN for it with `engine train rpn`"
            )
        if max_size != self.config.max_size:
            log.info("RPN trained with max_size %d runs on maps of max_size %d", self.config.max_size, max_size)

    # -- shared pieces ------------------------------------------------------------------------------
    def _features(self, maps: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
        missing = [lvl for lvl in self.config.levels if lvl not in maps]
        if missing:
            raise InvalidInputError(f"the RPN needs backbone levels {list(self.config.levels)}, the maps lack {missing}; compute them with levels={list(self.config.levels)}")
        dtype = next(self.parameters()).dtype
        device = next(self.parameters()).device
        feats = [maps[lvl].to(device=device, dtype=dtype) for lvl in self.config.levels]
        for lvl, f, ch in zip(self.config.levels, feats, self.config.in_channels):
            if f.ndim != 4 or f.shape[1] != ch:
                raise InvalidInputError(f"level {lvl} map must be [B, {ch}, H, W], got {tuple(f.shape)}; pass the backbone's padded maps")
        return OrderedDict(zip(self.config.levels, self.neck(feats)))

    def _image_list(self, features: Mapping[str, Tensor], frame_sizes: Sequence[tuple[int, int]]) -> ImageList:
        """An ``ImageList`` without pixels: the padded frame ``[B, 0, H, W]`` and each image's resized ``(h, w)``."""
        first = next(iter(features.values()))
        stride = self.config.strides[0]
        height, width = first.shape[-2] * stride, first.shape[-1] * stride
        dummy = first.new_empty((first.shape[0], 0, height, width))
        return ImageList(dummy, [(int(h), int(w)) for (w, h) in frame_sizes])

    def anchors(self, maps: Mapping[str, Tensor], frame_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Anchors per image ``[A, 4]`` xyxy in resized-frame pixels (level by level, cell-major, as the RPN orders them)."""
        features = self._features(maps)
        return self.rpn.anchor_generator(self._image_list(features, frame_sizes), list(features.values()))

    # -- training -------------------------------------------------------------------------------------
    def loss(self, maps: Mapping[str, Tensor], frame_sizes: Sequence[tuple[int, int]], targets: Sequence[Tensor]) -> dict[str, Tensor]:
        """torchvision's RPN losses (objectness BCE and smooth-L1 box regression over sampled anchors).

        Args:
            maps: padded level maps ``[B, C, H, W]``.
            frame_sizes: each image's RESIZED ``(w, h)`` (the part of the padded frame that is image).
            targets: per image ``[G, 4]`` ground-truth boxes xyxy in resized-frame pixels (``G`` may be 0).

        Skips the proposal filtering (top-n, NMS) of ``RegionProposalNetwork.forward``, which training does not need.
        """
        features = self._features(maps)
        feats = list(features.values())
        objectness, deltas = self.rpn.head(feats)
        anchors = self.rpn.anchor_generator(self._image_list(features, frame_sizes), feats)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        device = objectness.device
        boxes = [t.to(device=device, dtype=torch.float32).reshape(-1, 4) for t in targets]
        labels, matched = self.rpn.assign_targets_to_anchors(anchors, [{"boxes": b} for b in boxes])
        regression = self.rpn.box_coder.encode(matched, anchors)
        loss_obj, loss_box = self.rpn.compute_loss(objectness, deltas, labels, regression)
        return {"objectness": loss_obj, "box": loss_box}

    # -- inference ------------------------------------------------------------------------------------
    def _proposals(self, features: "OrderedDict[str, Tensor]", frame_sizes: Sequence[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """Decoded, clipped, per-level NMS'd boxes (resized frame) and their objectness probabilities, per image.

        ``RegionProposalNetwork.forward`` without the loss, returning the scores it computes but drops.
        """
        feats = list(features.values())
        objectness, deltas = self.rpn.head(feats)
        anchors = self.rpn.anchor_generator(self._image_list(features, frame_sizes), feats)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        image_sizes = [(int(h), int(w)) for (w, h) in frame_sizes]
        return self.rpn.filter_proposals(proposals, objectness, image_sizes, per_level)

    def _stage_one(self, features: "OrderedDict[str, Tensor]", frame_sizes: Sequence[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`_proposals` with the inference settings (top-n), whatever mode the network is in; no gradient."""
        was_training = self.rpn.training
        self.rpn.train(False)
        try:
            with torch.no_grad():
                return self._proposals(features, frame_sizes)
        finally:
            self.rpn.train(was_training)

    def box_head_loss(self, maps: Mapping[str, Tensor], frame_sizes: Sequence[tuple[int, int]], targets: Sequence[Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """The second stage's losses (:meth:`BoxHead.loss`) on the first stage's inference proposals; the first stage
        and the neck get no gradient. ``frame_sizes`` are RESIZED ``(w, h)``; ``targets`` per image ``[G, 4]`` in the frame."""
        if self.box_head is None:
            raise InvalidInputError("this RPN has no box head (config.box_head is 0); build it with RpnConfig(box_head=...)")
        with torch.no_grad():
            features = self._features(maps)
        boxes, _ = self._stage_one(features, frame_sizes)
        device = boxes[0].device if boxes else torch.device("cpu")
        frames_hw = [(int(h), int(w)) for (w, h) in frame_sizes]
        return self.box_head.loss(features, boxes, [t.to(device=device, dtype=torch.float32).reshape(-1, 4) for t in targets], frames_hw, generator)

    def _second_stage(self, features: "OrderedDict[str, Tensor]", boxes: list[Tensor], objectness: list[Tensor], frames_hw: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """The box head on the first ``refine_top`` proposals, ``refine_steps`` times; each step after the first
        refines only the boxes the previous step's NMS kept. Returns the boxes and their scores (:class:`RpnConfig`)."""
        assert self.box_head is not None
        c = self.config
        boxes, objectness = [b[: c.refine_top] for b in boxes], [s[: c.refine_top] for s in objectness]
        for step in range(c.refine_steps):
            # image by image: an image's proposals do not depend on the batch it came in (crash-resume, Ray)
            refined = [self.box_head.refine(OrderedDict((k, f[i : i + 1]) for k, f in features.items()), [b], [hw]) for i, (b, hw) in enumerate(zip(boxes, frames_hw))]
            boxes, quality = [r[0][0] for r in refined], [r[1][0] for r in refined]
            scores = [q.pow(c.quality_weight) * s.pow(1.0 - c.quality_weight) for q, s in zip(quality, objectness)]
            if step + 1 < c.refine_steps:
                keeps = [box_ops.nms(b, s, c.nms) for b, s in zip(boxes, scores)]
                boxes, objectness = [b[k] for b, k in zip(boxes, keeps)], [s[k] for s, k in zip(objectness, keeps)]
        return boxes, scores

    @torch.no_grad()
    def propose(
        self,
        maps: Mapping[str, Tensor],
        sizes: Sequence[tuple[int, int]],
        *,
        max_proposals: int = 300,
        max_size: int | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Proposals per image, best first.

        Args:
            maps: padded backbone level maps ``{level: Tensor[B, C, H, W]}`` (levels ``config.levels``), as the
                backbone returns them for ``preprocess(images, max_size=max_size)``.
            sizes: each image's ORIGINAL ``(w, h)``.
            max_proposals: at most this many per image (up to ``config.post_nms_test``, 1000 by default).
            max_size: the resize the maps were computed with (default ``config.max_size``).

        Returns:
            per image ``(boxes, objectness)``: float32 ``[N, 4]`` xyxy in original pixels clipped to the image
            and float32 ``[N]`` in (0, 1], sorted by decreasing score, ``N <= max_proposals``. Boxes are
            the top ``pre_nms_test`` anchors per level, decoded, after torchvision's per-level NMS, refined by
            the box head when the network has one (the score is then predicted IoU and objectness combined,
            :class:`RpnConfig`; objectness alone otherwise), and a final class-agnostic NMS over all levels
            (IoU ``config.nms``, 0.7).
        """
        if max_proposals < 1:
            raise InvalidInputError(f"max_proposals must be a positive integer, got {max_proposals}")
        max_size = self.config.max_size if max_size is None else max_size
        was_training = self.training
        self.eval()
        try:
            features = self._features(maps)
            batch = next(iter(features.values())).shape[0]
            if len(sizes) != batch:
                raise InvalidInputError(f"got maps of {batch} images but {len(sizes)} sizes; pass one original (w, h) per image")
            frames = [resized_size(int(w), int(h), max_size) for (w, h) in sizes]
            boxes, scores = self._proposals(features, frames)
            if self.box_head is not None:
                boxes, scores = self._second_stage(features, boxes, scores, [(h, w) for (w, h) in frames])
        finally:
            self.train(was_training)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for b, s, (w, h), (nw, nh) in zip(boxes, scores, sizes, frames):
            keep = box_ops.nms(b, s, self.config.nms)[:max_proposals]  # across levels; indices sorted by score
            b, s = b[keep].float(), s[keep].float()
            scale = b.new_tensor([w / nw, h / nh, w / nw, h / nh])
            b = b * scale
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & (s > 0)  # sigmoid underflows to 0 below -88
            out.append((b[valid].cpu().numpy().astype(np.float32), s[valid].cpu().numpy().astype(np.float32)))
        return out
