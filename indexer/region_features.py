"""Region features: RoIAlign over a backbone feature map, and the pooled vector that goes to FAISS.

For each box, :class:`RegionFeatureExtractor` pools a ``C x 7 x 7`` map from the stride-16 level
``c4`` (112 channels for EfficientNet-Lite0) with :func:`torchvision.ops.roi_align`. The map is kept
(float16, in the feature store) for query-time gating; its spatial mean, L2-normalised
(:func:`pool_vectors`), is the region's visual vector: the GRN paper's "Visual Feature" baseline and
the stage-1 FAISS key.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align

from engine.errors import InvalidBoxError, InvalidInputError
from indexer.backbone import Backbone, preprocess, resized_size
from indexer.component_configs import RegionFeatureConfig

__all__ = ["RegionFeatureConfig", "RegionFeatureExtractor", "pool_vectors", "mean_maps"]

log = logging.getLogger(__name__)

_EPS = 1e-12


class RegionFeatureExtractor:
    """Pools a feature map per box and its L2-normalised mean vector.

    Args:
        backbone: a frozen :class:`~indexer.backbone.Backbone`; images are resized for it with
            :func:`~indexer.backbone.preprocess` (longest side ``backbone.max_size``).
        config: level, output size and sampling of the pooling.

    ``map_shape`` is ``(C, output_size, output_size)``; ``dim`` is ``C``.
    """

    def __init__(self, *, backbone: Backbone, config: RegionFeatureConfig = RegionFeatureConfig()) -> None:
        if config.level not in backbone.channels:
            raise InvalidInputError(f"feature level {config.level!r} is not one of backbone {backbone.name}'s levels {list(backbone.channels)}")
        if config.output_size < 1:
            raise InvalidInputError(f"output_size must be >= 1, got {config.output_size}")
        if config.sampling_ratio < 0:
            raise InvalidInputError(f"sampling_ratio must be >= 0 (0 means adaptive), got {config.sampling_ratio}")
        self.backbone = backbone
        self.config = config
        channels = backbone.channels[config.level]
        self.map_shape: tuple[int, int, int] = (channels, config.output_size, config.output_size)

    @property
    def dim(self) -> int:
        """Length of the region vectors (the level's channels)."""
        return self.map_shape[0]

    @property
    def version(self) -> str:
        """Identity of the features, to record with an index: backbone version plus pooling settings."""
        c = self.config
        return f"{self.backbone.version}+roi_align:{c.level}:{c.output_size}x{c.output_size}:s{c.sampling_ratio}:max{self.backbone.max_size}"

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Region maps and vectors for each image's boxes.

        Args:
            images: RGB images (any sizes; images of one size batch best, since padding to a common
                size changes features near the right and bottom borders of the smaller images).
            boxes: per image, ``[n_i, 4]`` ``(x1, y1, x2, y2)`` in that image's ORIGINAL pixels
                (``n_i`` may be 0); they are scaled into the resized frame here. Boxes should lie
                inside the image; parts outside read the padding.

        Returns:
            per image ``(maps, vectors)``: ``maps`` float16 ``[n_i, C, S, S]`` and ``vectors``
            float32 ``[n_i, C]``, L2-normalised (``pool_vectors`` of the float32 maps).

        Runs :func:`preprocess` and the backbone once for the whole batch.
        """
        if len(images) != len(boxes):
            raise InvalidInputError(f"got {len(images)} images but {len(boxes)} box arrays; pass one [N, 4] array per image")
        if len(images) == 0:
            return []
        checked = [_check_boxes(b, i) for i, b in enumerate(boxes)]
        if sum(len(b) for b in checked) == 0:
            return self.from_feature_map(None, [im.size for im in images], checked)
        return self.from_feature_map(self.feature_map(images), [im.size for im in images], checked)

    @torch.no_grad()
    def from_feature_map(self, fmap: Tensor | None, sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Like :meth:`__call__`, from an already computed map of the configured level ``[B, C, H, W]``
        (e.g. the one a proposal network just used), the images' original ``sizes`` and their boxes."""
        checked = [_check_boxes(b, i) for i, b in enumerate(boxes)]
        counts = [len(b) for b in checked]
        c, s, _ = self.map_shape
        if sum(counts) == 0:
            return [(np.zeros((0, c, s, s), np.float16), np.zeros((0, c), np.float32)) for _ in sizes]
        if fmap is None:
            raise InvalidInputError("a feature map is needed to pool regions; compute it with feature_map(images)")
        pooled = self.pool(fmap, sizes, checked)
        vectors = pool_vectors(pooled)
        maps = pooled.cpu().numpy().astype(np.float16)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        start = 0
        for n in counts:
            out.append((maps[start : start + n], vectors[start : start + n]))
            start += n
        return out

    @torch.no_grad()
    def image_maps(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """Whole-image feature maps of the configured level, float16 ``[C, h_i, w_i]`` per image.

        ``h_i, w_i`` cover the resized image only (the padding is cropped off); cell ``(y, x)`` is
        centred at resized pixel ``offsets[level] + (x, y) * stride``, and the resized size is
        :func:`~indexer.backbone.resized_size` of the original with ``backbone.max_size``.
        """
        if len(images) == 0:
            return []
        fmap = self.feature_map(images).float().cpu().numpy()
        stride = self.backbone.strides[self.config.level]
        out = []
        for i, image in enumerate(images):
            nw, nh = resized_size(image.size[0], image.size[1], self.backbone.max_size)
            h, w = -(-nh // stride), -(-nw // stride)
            out.append(fmap[i, :, :h, :w].astype(np.float16))
        return out

    @torch.no_grad()
    def pool(self, fmap: Tensor, sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray]) -> Tensor:
        """RoIAlign maps ``[K, C, S, S]`` (float32) from an already computed level map.

        Args:
            fmap: ``[B, C, H, W]`` the configured level of :meth:`feature_map` (or a cached copy of it).
            sizes: each image's ORIGINAL ``(width, height)``.
            boxes: per image ``[n_i, 4]`` xyxy in original pixels (checked, non-empty boxes).
        """
        rois = self._rois(sizes, boxes).to(device=fmap.device, dtype=fmap.dtype)
        stride = self.backbone.strides[self.config.level]
        return roi_align(
            fmap,
            rois,
            output_size=self.config.output_size,
            spatial_scale=1.0 / stride,
            sampling_ratio=self.config.sampling_ratio,
            aligned=True,
        ).float()

    def feature_map(self, images: Sequence[Image.Image]) -> Tensor:
        batch, _ = preprocess(images, max_size=self.backbone.max_size)
        level = self.config.level
        return self.backbone(batch.to(self.backbone.device), levels=[level])[level]

    def _rois(self, sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray]) -> Tensor:
        """``Tensor[K, 5]`` rows ``(batch index, x1, y1, x2, y2)`` in resized pixels, shifted so that
        roi_align's ``aligned=True`` convention (cell ``i`` centred at ``(i + 0.5) * stride``) meets the
        backbone's true cell centres (``offsets[level] + i * stride``)."""
        level = self.config.level
        shift = self.backbone.strides[level] / 2 - self.backbone.offsets[level]
        rows = []
        for i, ((w, h), b) in enumerate(zip(sizes, boxes)):
            if len(b) == 0:
                continue
            nw, nh = resized_size(w, h, self.backbone.max_size)
            scale = np.array([nw / w, nh / h, nw / w, nh / h])
            rows.append(np.column_stack([np.full(len(b), i, np.float64), b * scale + shift]))
        return torch.from_numpy(np.concatenate(rows).astype(np.float32))


def mean_maps(maps: np.ndarray | Tensor) -> np.ndarray:
    """Spatial mean of region maps ``[N, C, H, W]``, not normalised: float16 ``[N, C]`` (the ``pooled``
    array; a non-spatial stage-2 model such as ``grn-fc`` reads it instead of the 49× larger map)."""
    a = maps.detach().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps)
    if a.ndim != 4:
        raise InvalidInputError(f"mean_maps needs maps of shape [N, C, H, W], got {tuple(a.shape)}")
    return a.mean(axis=(2, 3), dtype=np.float32).astype(np.float16)  # float32 sums, no float32 copy of the maps


def image_vectors(maps: np.ndarray | Tensor) -> np.ndarray:
    """Spatial mean of feature maps ``[N, C, H, W]``, not normalised: float32 ``[N, C]``. Of a whole
    image's map at the extractor's level it is the image context ``e_0`` that Ref-NMS and CM-Att take."""
    t = torch.as_tensor(maps).float()
    if t.ndim != 4:
        raise InvalidInputError(f"image_vectors needs maps of shape [N, C, H, W], got {tuple(t.shape)}")
    return t.mean(dim=(2, 3)).cpu().numpy()


def pool_vectors(maps: np.ndarray | Tensor) -> np.ndarray:
    """Spatial mean of region maps ``[N, C, H, W]``, L2-normalised: float32 ``[N, C]``.

    An all-zero map gives an all-zero vector (no division by zero).
    """
    if np.ndim(maps) != 4:
        raise InvalidInputError(f"pool_vectors needs maps of shape [N, C, H, W], got {tuple(np.shape(maps))}")
    v = torch.from_numpy(image_vectors(maps))
    v = v / v.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return v.cpu().numpy().astype(np.float32, copy=False)


def _check_boxes(boxes: np.ndarray, image_index: int) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InvalidBoxError(f"boxes of image {image_index} must have shape [N, 4] (x1, y1, x2, y2), got {arr.shape}")
    if not np.isfinite(arr).all():
        row = int(np.argwhere(~np.isfinite(arr))[0, 0])
        raise InvalidBoxError(f"box {row} of image {image_index} {arr[row].tolist()} holds a non-finite number; pass finite pixel coordinates")
    empty = (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise InvalidBoxError(f"box {row} of image {image_index} {arr[row].tolist()} is empty: need x2 > x1 and y2 > y1; drop such boxes first")
    return arr
