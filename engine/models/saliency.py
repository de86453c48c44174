"""A light saliency network in the spirit of RRSNet (SAN paper §3.2.1, Eq. 4–6) on the frozen backbone.

The paper's RRSNet splits the first three feature maps of its backbone into a low-level group (the
first two, fused) and a high-level group (the third), predicts an initial map from the high level and
learns the residual between it and the ground truth from the low level (the Residual Refinement
Block of R3Net). Here the three maps are the frozen EfficientNet-Lite0 levels ``c3`` / ``c4`` /
``c5`` (40 / 112 / 320 channels, strides 8 / 16 / 32), and the output is at the ``c3`` grid:

* ``F_low = g_c(Cat(f1, up(f2)))`` — 1×1 reduction, 3×3 conv, PReLU (Eq. 4);
* ``F_high = g_c(f3)`` — 1×1 conv, PReLU (Eq. 5);
* ``S0 = conv(F_high)`` upsampled to the ``c3`` grid; ``residue = Φ(Cat(S0, F_low))``;
  ``S1 = residue + S0`` (Eq. 6).

``S0`` and ``S1`` are logits (the SVA module applies the sigmoid itself, Eq. 7). Cell ``(y, x)`` of
the output is centred where the ``c3`` cell is (``Backbone.offsets["c3"] + 8 · (x, y)`` in
resized-frame pixels), so RoIAlign with the ``c3`` stride pools a region's saliency grid from it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import Manifest, checkpoint_path, load_checkpoint

__all__ = ["MODEL_NAME", "MODEL_VERSION", "SaliencyConfig", "SaliencyNet", "saliency_loss", "mask_targets", "saliency_to_image", "saliency_quality"]

log = logging.getLogger(__name__)

MODEL_NAME = "saliency"
MODEL_VERSION = "rrs-1"
LEVELS = ("c3", "c4", "c5")


@dataclass(frozen=True)
class SaliencyConfig:
    """What a :class:`SaliencyNet` is: input channels per level (``c3``, ``c4``, ``c5``), inner width,
    the ``c3`` stride and cell offset (for targets and pooling), the backbone it reads."""

    in_channels: tuple[int, int, int] = (40, 112, 320)
    width: int = 32
    stride: int = 8
    offset: float = 7.5
    backbone: str = "efficientnet_lite0@imagenet-tf"
    max_size: int = 640

    def __post_init__(self) -> None:
        if len(self.in_channels) != 3 or min(self.in_channels) < 1:
            raise InvalidInputError(f"SaliencyConfig.in_channels needs three positive channel counts (c3, c4, c5), got {self.in_channels}")
        if self.width < 1:
            raise InvalidInputError(f"SaliencyConfig.width must be >= 1, got {self.width}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SaliencyConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"the saliency checkpoint's config has unknown keys {unknown}; it was written by a newer engine — retrain with `engine train saliency`")
        values = dict(data)
        values["in_channels"] = tuple(values.get("in_channels", cls.in_channels))
        return cls(**values)


class SaliencyNet(nn.Module):
    """RRSNet-style saliency head over backbone maps; :meth:`forward` returns ``(S0, S1)`` logits ``[B, 1, H3, W3]``."""

    def __init__(self, config: SaliencyConfig = SaliencyConfig()) -> None:
        super().__init__()
        self.config = config
        c3, c4, c5 = config.in_channels
        w = config.width
        # Eq. 4: g_c, the low-level fusion of the first two levels
        self.low = nn.Sequential(nn.Conv2d(c3 + c4, w, 1), nn.PReLU(w), nn.Conv2d(w, w, 3, padding=1), nn.PReLU(w))
        # Eq. 5: the high-level feature of the third level
        self.high = nn.Sequential(nn.Conv2d(c5, w, 1), nn.PReLU(w), nn.Conv2d(w, w, 3, padding=1), nn.PReLU(w))
        self.initial = nn.Conv2d(w, 1, 3, padding=1)  # Eq. 6: S0 = g_c(F_high)
        # Eq. 6: Φ, the residual refinement block on Cat(S0, F_low)
        self.refine = nn.Sequential(nn.Conv2d(w + 1, w, 3, padding=1), nn.PReLU(w), nn.Conv2d(w, 1, 3, padding=1))
        self.register_buffer("input_scale", torch.ones(3))
        self.manifest: Manifest | None = None

    def forward(self, maps: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        missing = [lvl for lvl in LEVELS if lvl not in maps]
        if missing:
            raise InvalidInputError(f"the saliency network needs backbone levels {list(LEVELS)}, missing {missing}")
        f1, f2, f3 = (maps[lvl].float() * self.input_scale[i] for i, lvl in enumerate(LEVELS))
        size = f1.shape[-2:]
        f_low = self.low(torch.cat([f1, F.interpolate(f2, size=size, mode="bilinear", align_corners=False)], 1))  # Eq. 4
        f_high = self.high(f3)  # Eq. 5
        s0 = F.interpolate(self.initial(f_high), size=size, mode="bilinear", align_corners=False)  # Eq. 6
        residue = self.refine(torch.cat([s0, f_low], 1))
        return s0, residue + s0  # S1 = residue + S0

    @property
    def version(self) -> str:
        tail = f":{self.manifest.sha256[:12]}" if self.manifest is not None and self.manifest.sha256 else ""
        return f"{MODEL_VERSION}{tail}"

    def check_backbone(self, version: str, max_size: int) -> None:
        """A clear error when the backbone feeding the maps is not the one the network was trained on."""
        if version != self.config.backbone or max_size != self.config.max_size:
            raise CheckpointError(
                f"the saliency network was trained on {self.config.backbone} (max {self.config.max_size} px) maps, "
                f"but the engine's backbone is {version} (max {max_size} px); retrain it with `engine train saliency`"
            )

    def payload(self) -> dict[str, Any]:
        return {"state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}, "config": self.config.to_dict()}

    @classmethod
    def from_checkpoint(cls, path: Path | str | None = None, *, device: str | torch.device = "cpu") -> "SaliencyNet":
        """Load a saliency checkpoint (``None``: the shipped ``saliency.pt``); :class:`CheckpointError` when
        it is missing, corrupt or not a saliency network."""
        path = checkpoint_path(path, default="saliency")
        manifest, payload = load_checkpoint(path, expected_model=MODEL_NAME)
        if manifest.version != MODEL_VERSION:
            raise CheckpointError(f"checkpoint {path} is saliency version {manifest.version!r}, this engine reads {MODEL_VERSION!r}; retrain it with `engine train saliency`")
        try:
            net = cls(SaliencyConfig.from_dict(payload["config"]))
            net.load_state_dict(payload["state_dict"])
        except (KeyError, TypeError, RuntimeError, InvalidInputError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit the saliency network ({type(exc).__name__}: {exc}); retrain it") from None
        net.manifest = manifest
        return net.to(device).eval()


def saliency_loss(s0: Tensor, s1: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Binary cross-entropy of both predictions (S0 deeply supervised, as in R3Net) against soft targets
    ``[B, 1, H, W]`` in [0, 1], averaged over the ``valid`` cells (the image, not the padding)."""
    weight = valid.float()
    denom = weight.sum().clamp_min(1.0)
    loss = 0.0
    for logits in (s0, s1):
        loss = loss + (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / denom
    return loss  # type: ignore[return-value]


def mask_targets(mask: np.ndarray, frame: tuple[int, int], grid: tuple[int, int], *, stride: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """A binary image mask ``[h, w]`` as soft targets on the ``grid`` (``(H3, W3)``) of a map whose cell
    ``i`` is centred at ``offset + stride · i`` in the resized ``frame`` (``(w, h)``).

    Returns ``(target float32 [H3, W3], valid bool [H3, W3])``: the mask's area fraction in each cell's
    window and whether the cell centre lies inside the image.
    """
    nw, nh = frame
    m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    m = F.interpolate(m, size=(nh, nw), mode="area") if m.shape[-2:] != (nh, nw) else m
    shift = int(round(offset - stride / 2))  # the window of cell i starts at offset - stride/2 + stride·i
    gh, gw = grid
    canvas = torch.zeros(1, 1, gh * stride, gw * stride)
    src = m[..., shift:, shift:]
    hh, ww = min(src.shape[-2], canvas.shape[-2]), min(src.shape[-1], canvas.shape[-1])
    canvas[..., :hh, :ww] = src[..., :hh, :ww]
    target = F.avg_pool2d(canvas, stride)[0, 0].numpy()
    ys = offset + stride * np.arange(gh)
    xs = offset + stride * np.arange(gw)
    valid = (ys[:, None] < nh) & (xs[None, :] < nw)
    return target.astype(np.float32), valid


def saliency_to_image(prob: np.ndarray | Tensor, size: tuple[int, int], *, stride: int, offset: float, max_size: int) -> np.ndarray:
    """A saliency grid ``[H3, W3]`` (probabilities on the ``c3`` cells) as a float32 map ``[h, w]`` over the
    original image of ``size`` (``(w, h)``): bilinear upsampling, shifted to the cells' true centres."""
    from engine.imaging import resized_size

    w, h = size
    nw, nh = resized_size(w, h, max_size)
    grid = torch.as_tensor(prob).detach().cpu().float()[None, None]
    up = F.interpolate(grid, scale_factor=stride, mode="bilinear", align_corners=False)  # cell i centred at stride·i + stride/2
    shift = int(round(offset - stride / 2))
    if shift > 0:
        up = F.pad(up, (shift, 0, shift, 0), mode="replicate")
    up = up[..., :nh, :nw]
    if up.shape[-2:] != (nh, nw):
        up = F.pad(up, (0, nw - up.shape[-1], 0, nh - up.shape[-2]), mode="replicate")
    if (nw, nh) != (w, h):
        up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
    return up[0, 0].cpu().numpy().astype(np.float32)


def saliency_quality(pred: np.ndarray, mask: np.ndarray, *, threshold: float = 0.5) -> tuple[float, float]:
    """``(MAE, IoU)`` of a predicted saliency map in [0, 1] against a binary mask of the same shape; IoU
    thresholds the prediction at ``threshold`` (1.0 when both are empty)."""
    p = np.asarray(pred, np.float32)
    m = np.asarray(mask, bool)
    mae = float(np.abs(p - m).mean())
    b = p >= threshold
    union = int((b | m).sum())
    iou = 1.0 if union == 0 else float((b & m).sum()) / union
    return mae, iou
