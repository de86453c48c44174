"""The proposal network's second stage: refine each proposal box and predict how well it fits an object.

The first stage (torchvision's RPN over anchors) leaves around each object several loose boxes that NMS
at IoU 0.7 keeps, and those duplicates crowd small objects out of an image's first 100 proposals. This
head reads each proposal's features from the RPN's own neck (multi-scale RoIAlign, 7 x 7, the FPN level
rule of Lin et al. 2017, Eq. 1) and predicts, as Fast R-CNN's class-agnostic box branch does (Girshick,
ICCV 2015, Eq. 3 targets / smooth-L1 loss), the box deltas to the target box it overlaps most, and, as
IoU-Net (Jiang et al., ECCV 2018) does, the IoU of the proposal with that box. Refined duplicates
collapse onto one box, which the final NMS then keeps once.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import MultiScaleRoIAlign, box_iou

__all__ = ["BoxHead", "BOX_CODER_WEIGHTS", "IOU_BINS", "sample_training_boxes"]

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
"""Fast R-CNN's box-delta weights (torchvision's ``RoIHeads`` default)."""

IOU_BINS = (0.3, 0.5, 0.7)
"""Training samples are drawn evenly from the IoU ranges these edges make (below 0.3, 0.3-0.5, 0.5-0.7, above)."""

ROI_SIZE = 7


class BoxHead(nn.Module):
    """RoIAlign of each box on the neck's levels, two fully connected layers, then ``[quality logit, 4 deltas]``.

    Args:
        levels: the neck's level names (fine to coarse), the keys of the feature dict it reads.
        width: the neck's channels.
        hidden: width of the two hidden layers.
        sampling: RoIAlign's sampling points per bin and axis.
        rank: 0, or the width of a linear bottleneck (no bias, no activation) before the first hidden layer:
            the first layer, ``width * 49`` inputs wide, is most of the head's arithmetic, and its trained
            weights are close to low rank (a rank-64 SVD truncation of the full 512-wide layer kept the val
            recall@100 on both worlds; ``rank`` 64 costs 3136 * 64 + 64 * 512 instead of 3136 * 512 a box).
    """

    def __init__(self, *, levels: Sequence[str], width: int, hidden: int, sampling: int = 2, rank: int = 0) -> None:
        super().__init__()
        self.pool = MultiScaleRoIAlign(list(levels), ROI_SIZE, sampling_ratio=sampling)
        inputs = width * ROI_SIZE * ROI_SIZE
        self.reduce = nn.Linear(inputs, rank, bias=False) if rank else nn.Identity()
        self.fc1 = nn.Linear(rank or inputs, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 5)
        self.coder = BoxCoder(BOX_CODER_WEIGHTS)

    def forward(self, features: "OrderedDict[str, Tensor]", boxes: Sequence[Tensor], frames_hw: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Quality logits ``[N]`` and deltas ``[N, 4]`` of every box of every image, concatenated image by image.

        ``boxes`` are per image ``[n_i, 4]`` xyxy in resized-frame pixels; ``frames_hw`` each image's resized ``(h, w)``.
        """
        x = self.reduce(self.pool(features, list(boxes), list(frames_hw)).flatten(1))
        out = self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))
        return out[:, 0], out[:, 1:]

    def refine(self, features: "OrderedDict[str, Tensor]", boxes: Sequence[Tensor], frames_hw: Sequence[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image the refined boxes (clipped to the frame) and their predicted IoU in (0, 1)."""
        if not boxes:
            return [], []
        logits, deltas = self(features, boxes, frames_hw)
        counts = [len(b) for b in boxes]
        refined, quality = [], []
        for b, d, q, (h, w) in zip(boxes, deltas.split(counts), logits.split(counts), frames_hw):
            r = self.coder.decode_single(d, b)
            r[:, 0::2] = r[:, 0::2].clamp(0, w)
            r[:, 1::2] = r[:, 1::2].clamp(0, h)
            refined.append(r)
            quality.append(torch.sigmoid(q))
        return refined, quality

    def loss(self, features: "OrderedDict[str, Tensor]", boxes: Sequence[Tensor], targets: Sequence[Tensor], frames_hw: Sequence[tuple[int, int]], generator: torch.Generator) -> dict[str, Tensor]:
        """IoU-prediction loss (BCE against the proposal's IoU with its best target) and the smooth-L1 box loss of
        the proposals with IoU > 0.5, over :func:`sample_training_boxes` of each image's ``boxes``."""
        picked, ious, regression, positive = [], [], [], []
        for b, t in zip(boxes, targets):
            sample, iou, matched = sample_training_boxes(b, t, generator=generator)
            picked.append(sample)
            ious.append(iou)
            regression.append(self.coder.encode_single(matched, sample))
            positive.append(iou > 0.5)
        logits, deltas = self(features, picked, frames_hw)
        iou, reg, pos = torch.cat(ious), torch.cat(regression), torch.cat(positive)
        quality = F.binary_cross_entropy_with_logits(logits, iou)
        box = F.smooth_l1_loss(deltas[pos], reg[pos], beta=1 / 9, reduction="sum") / max(1, len(iou))
        return {"quality": quality, "box": box}


def sample_training_boxes(boxes: Tensor, targets: Tensor, *, per_bin: int = 32, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``per_bin`` proposals from each IoU range of :data:`IOU_BINS`, their IoU with the target they overlap
    most and that target (the proposal itself where an image has no target)."""
    if len(targets) == 0:
        iou, matched = boxes.new_zeros(len(boxes)), boxes
    else:
        best, index = box_iou(boxes, targets).max(1)
        iou, matched = best, targets[index]
    bins = torch.bucketize(iou, torch.tensor(IOU_BINS, dtype=iou.dtype))
    chosen = []
    for k in range(len(IOU_BINS) + 1):
        members = (bins == k).nonzero().flatten()
        if len(members):
            chosen.append(members[torch.randperm(len(members), generator=generator)[:per_bin]])
    pick = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
    return boxes[pick], iou[pick], matched[pick]
