"""Region features: RoIAlign over backbone feature maps, and the visual key vector that goes to FAISS.

For each box, :class:`RegionFeatureExtractor` pools a ``C x 7 x 7`` map from the stride-16 level
``c4`` (112 channels for EfficientNet-Lite0) with :func:`torchvision.ops.roi_align`. The map is kept
(float16, in the feature store) for query-time gating (GRN, Ref-NMS, CM-Att read ``c4``: their
checkpoints were trained on it). The region's visual vector, the stage-1 FAISS key, is the
:func:`visual_key` of the key levels (default ``c4`` and ``c5``, 112 + 320 = 432-d): per level the
RoIAlign map's spatial mean L2-normalised, concatenated, L2-normalised again. On real cut-outs pasted
on real photographs the ``c4`` mean alone found the same object first about half the time, ``c5``
about 0.9 (``benchmarks/visual_key.py``, ``docs/query-pipeline.md``). All levels come from ONE
backbone pass (:meth:`RegionFeatureExtractor.feature_maps`, or the proposal network's maps).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align

from engine.errors import InvalidBoxError, InvalidInputError
from indexer.backbone import Backbone, preprocess, resized_size
from indexer.component_configs import KEY_POOLINGS, RegionFeatureConfig, whitening_tag

__all__ = ["RegionFeatureConfig", "RegionFeatureExtractor", "pool_vectors", "mean_maps", "image_vectors", "visual_key", "gem", "GEM_P"]

log = logging.getLogger(__name__)

_EPS = 1e-12
GEM_P = 3.0


class RegionFeatureExtractor:
    """Pools a feature map per box, and the box's visual key vector, from one backbone pass.

    Args:
        backbone: a frozen :class:`~indexer.backbone.Backbone`; images are resized for it with
            :func:`~indexer.backbone.preprocess` (longest side ``backbone.max_size``).
        config: level, output size and sampling of the pooling; levels and pooling of the key.

    ``map_shape`` is ``(C, output_size, output_size)`` of the configured ``level`` (``c4``: the stored
    7×7 maps and their ``pooled`` means, which the GRN, Ref-NMS and CM-Att checkpoints were trained on;
    retraining them on other levels is a later step). ``dim`` is the length of the visual key: the sum
    of the ``key_levels``' channels (432 for ``c4`` + ``c5``). ``levels`` are the backbone levels one
    pass must compute for both.
    """

    def __init__(self, *, backbone: Backbone, config: RegionFeatureConfig = RegionFeatureConfig()) -> None:
        for level in (config.level, *config.key_levels):
            if level not in backbone.channels:
                raise InvalidInputError(f"feature level {level!r} is not one of backbone {backbone.name}'s levels {list(backbone.channels)}")
        if not config.key_levels or len(set(config.key_levels)) != len(config.key_levels):
            raise InvalidInputError(f"key_levels must name one or more distinct levels, got {config.key_levels!r}")
        if config.key_pooling not in KEY_POOLINGS:
            raise InvalidInputError(f"key_pooling must be one of {', '.join(KEY_POOLINGS)}, got {config.key_pooling!r}")
        if config.output_size < 1:
            raise InvalidInputError(f"output_size must be >= 1, got {config.output_size}")
        if config.sampling_ratio < 0:
            raise InvalidInputError(f"sampling_ratio must be >= 0 (0 means adaptive), got {config.sampling_ratio}")
        self.backbone = backbone
        self.config = config
        channels = backbone.channels[config.level]
        self.map_shape: tuple[int, int, int] = (channels, config.output_size, config.output_size)
        self._whitening = None  # loaded on first use: extractors that only pool maps never read it

    @property
    def whitening(self):  # -> engine.models.key_whitening.KeyWhitening | None
        """The configured key whitening (``None`` without one), loaded once and checked to fit this key."""
        if self._whitening is None and self.config.key_whitening is not None:
            self._whitening = _load_whitening(self.config, self.backbone)
        return self._whitening

    @property
    def dim(self) -> int:
        """Length of the region vectors (the visual key): the key levels' channels summed, or the whitening's output."""
        if self.config.key_whitening is not None:
            return self.whitening.out_dim
        return sum(self.backbone.channels[level] for level in self.config.key_levels)

    @property
    def levels(self) -> list[str]:
        """The backbone levels that the maps and the key need, computed in one pass (sorted)."""
        return sorted({self.config.level, *self.config.key_levels})

    @property
    def key_version(self) -> str:
        """What an index records as its visual key (:func:`~indexer.component_configs.visual_key_version`)."""
        return f"{self.backbone.name}/{self.backbone.max_size}:{self.config.key_version}"

    @property
    def version(self) -> str:
        """Identity of the features, to record with an index: backbone version, pooling settings and the key."""
        c = self.config
        whitening = whitening_tag(c.key_whitening)
        return f"{self.backbone.version}+roi_align:{c.level}:{c.output_size}x{c.output_size}:s{c.sampling_ratio}:max{self.backbone.max_size}+key:{'+'.join(c.key_levels)}:{c.key_pooling}{whitening}"

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
            per image ``(maps, vectors)``: ``maps`` float16 ``[n_i, C, S, S]`` of the configured level
            and ``vectors`` float32 ``[n_i, dim]``, the visual key (:func:`visual_key`).

        Runs :func:`preprocess` and the backbone once for the whole batch (all of :attr:`levels`).
        """
        if len(images) != len(boxes):
            raise InvalidInputError(f"got {len(images)} images but {len(boxes)} box arrays; pass one [N, 4] array per image")
        if len(images) == 0:
            return []
        checked = [_check_boxes(b, i) for i, b in enumerate(boxes)]
        if sum(len(b) for b in checked) == 0:
            return self.from_feature_map(None, [im.size for im in images], checked)
        return self.from_feature_map(self.feature_maps(images), [im.size for im in images], checked)

    @torch.no_grad()
    def from_feature_map(self, fmap: Mapping[str, Tensor] | Tensor | None, sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Like :meth:`__call__`, from already computed backbone maps ``{level: [B, C, H, W]}`` holding
        :attr:`levels` (e.g. the ones a proposal network just used: no second backbone pass), the
        images' original ``sizes`` and their boxes. A bare tensor is the configured level's map alone,
        enough only when the key reads that level alone."""
        checked = [_check_boxes(b, i) for i, b in enumerate(boxes)]
        counts = [len(b) for b in checked]
        c, s, _ = self.map_shape
        if sum(counts) == 0:
            return [(np.zeros((0, c, s, s), np.float16), np.zeros((0, self.dim), np.float32)) for _ in sizes]
        if fmap is None:
            raise InvalidInputError("a feature map is needed to pool regions; compute it with feature_maps(images)")
        maps_of = self._levels_of(fmap)
        pooled = self.pool(maps_of[self.config.level], sizes, checked)
        vectors = self.key(maps_of, sizes, checked, pooled=pooled)
        maps = pooled.cpu().numpy().astype(np.float16)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        start = 0
        for n in counts:
            out.append((maps[start : start + n], vectors[start : start + n]))
            start += n
        return out

    @torch.no_grad()
    def key(self, fmaps: Mapping[str, Tensor], sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray], *, pooled: Tensor | None = None) -> np.ndarray:
        """The visual key float32 ``[K, dim]`` of checked, non-empty ``boxes`` from backbone maps ``fmaps``:
        per key level the RoIAlign map reduced by ``key_pooling`` and L2-normalised, concatenated in
        ``key_levels`` order, L2-normalised again, then whitened when the configuration has a
        ``key_whitening``. ``pooled``: the configured level's RoIAlign maps when already computed
        (reused, not pooled twice)."""
        parts = []
        for level in self.config.key_levels:
            if level not in fmaps:
                raise InvalidInputError(f"the visual key needs backbone level {level!r}; the maps given hold {sorted(fmaps)}: compute them with feature_maps(images)")
            if pooled is not None and level == self.config.level:
                region = pooled
            elif self.config.key_pooling == "mean" and self.config.sampling_ratio > 0:
                # the mean of an S x S map with r x r samples per bin is one bin of (S r) x (S r) samples:
                # the same sample points (up to float rounding), ~40 % less time than pooling the map
                c = self.config
                region = self.pool(fmaps[level], sizes, boxes, level=level, output_size=1, sampling_ratio=c.output_size * c.sampling_ratio)
            else:
                region = self.pool(fmaps[level], sizes, boxes, level=level)
            parts.append(region)
        key = visual_key(parts, pooling=self.config.key_pooling)
        return key if self.config.key_whitening is None else self.whitening.apply(key)

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
    def pool(
        self,
        fmap: Tensor,
        sizes: Sequence[tuple[int, int]],
        boxes: Sequence[np.ndarray],
        *,
        level: str | None = None,
        output_size: int | None = None,
        sampling_ratio: int | None = None,
    ) -> Tensor:
        """RoIAlign maps ``[K, C, S, S]`` (float32) from an already computed level map.

        Args:
            fmap: ``[B, C, H, W]`` the map of ``level`` (default: the configured level) of :meth:`feature_maps`
                (or a cached copy of it).
            sizes: each image's ORIGINAL ``(width, height)``.
            boxes: per image ``[n_i, 4]`` xyxy in original pixels (checked, non-empty boxes).
            output_size, sampling_ratio: override the configured ones (the key's one-bin means).
        """
        level = self.config.level if level is None else level
        rois = self._rois(sizes, boxes, level).to(device=fmap.device, dtype=fmap.dtype)
        stride = self.backbone.strides[level]
        return roi_align(
            fmap,
            rois,
            output_size=self.config.output_size if output_size is None else output_size,
            spatial_scale=1.0 / stride,
            sampling_ratio=self.config.sampling_ratio if sampling_ratio is None else sampling_ratio,
            aligned=True,
        ).float()

    def feature_map(self, images: Sequence[Image.Image]) -> Tensor:
        """The configured level's map ``[B, C, H, W]`` alone (the image context ``e_0``, training caches)."""
        batch, _ = preprocess(images, max_size=self.backbone.max_size)
        level = self.config.level
        return self.backbone(batch.to(self.backbone.device), levels=[level])[level]

    def feature_maps(self, images: Sequence[Image.Image], *, extra_levels: Sequence[str] = ()) -> dict[str, Tensor]:
        """The maps of all :attr:`levels` (and ``extra_levels``) ``{level: [B, C, H, W]}``, from one backbone pass."""
        batch, _ = preprocess(images, max_size=self.backbone.max_size)
        return self.backbone(batch.to(self.backbone.device), levels=sorted({*self.levels, *extra_levels}))

    def _levels_of(self, fmap: Mapping[str, Tensor] | Tensor) -> Mapping[str, Tensor]:
        if isinstance(fmap, Tensor):
            return {self.config.level: fmap}
        if self.config.level not in fmap:
            raise InvalidInputError(f"the region maps need backbone level {self.config.level!r}; the maps given hold {sorted(fmap)}")
        return fmap

    def _rois(self, sizes: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray], level: str | None = None) -> Tensor:
        """``Tensor[K, 5]`` rows ``(batch index, x1, y1, x2, y2)`` in resized pixels, shifted so that
        roi_align's ``aligned=True`` convention (cell ``i`` centred at ``(i + 0.5) * stride``) meets the
        backbone's true cell centres (``offsets[level] + i * stride``)."""
        level = self.config.level if level is None else level
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


def gem(maps: np.ndarray | Tensor, p: float = GEM_P) -> np.ndarray:
    """Generalised-mean pooling of region maps ``[N, C, H, W]``, not normalised: float32 ``[N, C]``
    (``mean(clamp(x, 1e-6) ** p) ** (1 / p)``)."""
    t = torch.as_tensor(maps).float()
    if t.ndim != 4:
        raise InvalidInputError(f"gem needs maps of shape [N, C, H, W], got {tuple(t.shape)}")
    return t.clamp_min(1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p).cpu().numpy()


def visual_key(level_maps: Sequence[np.ndarray | Tensor], *, pooling: str = "mean") -> np.ndarray:
    """The visual key float32 ``[N, sum C_l]`` of per-level region maps ``[N, C_l, H, W]`` (key-level order):
    each level reduced (``mean``: spatial mean, ``gem``: :func:`gem`) and L2-normalised, the levels
    concatenated and L2-normalised again, so that every level weighs the same whatever its channels
    or activation scale. One level with ``mean`` is :func:`pool_vectors`."""
    if pooling not in KEY_POOLINGS:
        raise InvalidInputError(f"pooling must be one of {', '.join(KEY_POOLINGS)}, got {pooling!r}")
    if not level_maps:
        raise InvalidInputError("visual_key needs the region maps of one or more levels")
    parts = []
    for maps in level_maps:
        v = torch.from_numpy(image_vectors(maps) if pooling == "mean" else gem(maps))
        parts.append(v / v.norm(dim=1, keepdim=True).clamp_min(_EPS))
    key = torch.cat(parts, dim=1)
    key = key / key.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return key.cpu().numpy().astype(np.float32, copy=False)


def _load_whitening(config: RegionFeatureConfig, backbone: Backbone):  # -> KeyWhitening | None
    """The configured key whitening, checked to be fitted on this backbone's key recipe (input size aside)."""
    if config.key_whitening is None:
        return None
    from engine.models.registry import load_model

    whitening = load_model(config.key_whitening, device=backbone.device, family="key-whitening")
    whitening.check_recipe(f"{backbone.name}:{config.key_recipe}", source=f"key whitening {config.key_whitening!r}")
    return whitening


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
