"""Region features: RoIAlign against a slow reference, box coordinate handling, and real-backbone properties."""
from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align

from engine.errors import InvalidBoxError, InvalidInputError
from indexer.backbone import Backbone, BackboneConfig, create_backbone
from indexer.component_configs import visual_key_version
from indexer.region_features import RegionFeatureConfig, RegionFeatureExtractor, gem, pool_vectors, visual_key

# --------------------------------------------------------------------------- slow references


def _bilinear(fmap: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's bilinear sample of ``fmap [C, H, W]`` at ``(y, x)`` (zero beyond one cell outside)."""
    _, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(fmap.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return (
        (1 - ly) * (1 - lx) * fmap[:, y0, x0] + (1 - ly) * lx * fmap[:, y0, x1] + ly * (1 - lx) * fmap[:, y1, x0] + ly * lx * fmap[:, y1, x1]
    )


def _reference_roi_align(fmap: np.ndarray, box: np.ndarray, size: int, scale: float, ratio: int) -> np.ndarray:
    """Loop-by-loop RoIAlign (``aligned=True``) of one box ``(x1, y1, x2, y2)`` over ``fmap [C, H, W]``."""
    x1, y1, x2, y2 = (v * scale - 0.5 for v in box)
    bin_h, bin_w = (y2 - y1) / size, (x2 - x1) / size
    out = np.zeros((fmap.shape[0], size, size))
    for i in range(size):
        for j in range(size):
            acc = np.zeros(fmap.shape[0])
            for iy in range(ratio):
                for ix in range(ratio):
                    y = y1 + i * bin_h + (iy + 0.5) * bin_h / ratio
                    x = x1 + j * bin_w + (ix + 0.5) * bin_w / ratio
                    acc += _bilinear(fmap, y, x)
            out[:, i, j] = acc / (ratio * ratio)
    return out


def test_roi_align_matches_slow_reference() -> None:
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(5, 9, 12))
    boxes = np.array([[3.0, 5.0, 150.0, 120.0], [0.0, 0.0, 192.0, 144.0], [40.0, 33.3, 61.7, 50.2], [-10.0, 100.0, 30.0, 150.0]])
    rois = torch.from_numpy(np.column_stack([np.zeros(len(boxes)), boxes])).float()
    got = roi_align(torch.from_numpy(fmap).float()[None], rois, output_size=7, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
    for k, box in enumerate(boxes):
        np.testing.assert_allclose(got[k].numpy(), _reference_roi_align(fmap, box, 7, 1 / 16, 2), atol=1e-5)


def test_pool_vectors() -> None:
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 4, 7, 7)).astype(np.float32)
    maps[2] = 0.0
    expected = maps.mean(axis=(2, 3))
    expected[:2] /= np.linalg.norm(expected[:2], axis=1, keepdims=True)
    np.testing.assert_allclose(pool_vectors(maps), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool_vectors(torch.from_numpy(maps).half()), expected, atol=2e-3)
    assert pool_vectors(maps).dtype == np.float32
    assert not np.isnan(pool_vectors(maps)).any()
    with pytest.raises(InvalidInputError, match=r"shape \[N, C, H, W\]"):
        pool_vectors(maps[0])


# --------------------------------------------------------------------------- coordinates, with a stub backbone


class _GridBackbone(Backbone):
    """A stub whose ``c4`` map is ``[x, y, 1]`` (cell column, row, one) whatever the image: pooling it
    measures exactly where RoIAlign sampled. Its ``c5`` (stride 32) is the same grid of its own cells.
    ``calls`` counts the passes and ``asked`` records the levels each asked for."""

    def __init__(self, *, max_size: int, offset: float) -> None:
        super().__init__(name="grid", version="grid@0", channels={"c4": 3, "c5": 3}, strides={"c4": 16, "c5": 32}, offsets={"c4": offset, "c5": 2 * offset}, max_size=max_size)
        self.calls = 0
        self.asked: list[list[str]] = []

    def forward(self, x: Tensor, *, levels=None) -> dict[str, Tensor]:  # noqa: ANN001
        self.calls += 1
        wanted = sorted(levels) if levels is not None else ["c4", "c5"]
        self.asked.append(wanted)
        b, _, h, w = x.shape
        out = {}
        for level, stride in (("c4", 16), ("c5", 32)):
            ys, xs = torch.meshgrid(torch.arange(h // stride, dtype=torch.float32), torch.arange(w // stride, dtype=torch.float32), indexing="ij")
            grid = torch.stack([xs, ys, torch.ones_like(xs)])
            out[level] = grid[None].expand(b, -1, -1, -1).contiguous()
        return {k: out[k] for k in wanted}


class _RandomBackbone(Backbone):
    """A stub with random ``c4`` (5 channels) and ``c5`` (7 channels) maps, fixed per input shape."""

    def __init__(self, *, max_size: int = 128) -> None:
        super().__init__(name="rand", version="rand@0", channels={"c3": 2, "c4": 5, "c5": 7}, strides={"c3": 8, "c4": 16, "c5": 32}, offsets={"c3": 3.5, "c4": 7.5, "c5": 15.5}, max_size=max_size)
        self.calls = 0
        self.maps: dict[str, Tensor] = {}

    def forward(self, x: Tensor, *, levels=None) -> dict[str, Tensor]:  # noqa: ANN001
        self.calls += 1
        b, _, h, w = x.shape
        g = torch.Generator().manual_seed(0)
        self.maps = {lv: torch.randn(b, c, h // s, w // s, generator=g) for lv, c, s in (("c3", 2, 8), ("c4", 5, 16), ("c5", 7, 32))}
        return {k: self.maps[k] for k in (levels or self.maps)}


@pytest.mark.parametrize("offset", [8.0, 15.5])
def test_boxes_in_original_pixels_land_on_the_right_cells(offset: float) -> None:
    # 400 x 200 image, max_size 200 -> resized 200 x 100 (scale 0.5) -> padded 224 x 128 -> c4 14 x 8
    extractor = RegionFeatureExtractor(backbone=_GridBackbone(max_size=200, offset=offset), config=RegionFeatureConfig(key_whitening=None))
    image = Image.new("RGB", (400, 200))
    boxes = np.array([[100.0, 60.0, 300.0, 180.0], [64.0, 64.0, 128.0, 96.0]])
    [(maps, vectors)] = extractor([image], [boxes])
    assert maps.shape == (2, 3, 7, 7) and maps.dtype == np.float16 and vectors.shape == (2, 6)
    for k, (x1, y1, x2, y2) in enumerate(boxes * 0.5):
        # bin j samples around x1 + (j + 0.5) * (x2 - x1) / 7 in resized pixels; cell i sits at offset + 16 i
        centres_x = (x1 + (np.arange(7) + 0.5) * (x2 - x1) / 7 - offset) / 16
        centres_y = (y1 + (np.arange(7) + 0.5) * (y2 - y1) / 7 - offset) / 16
        np.testing.assert_allclose(maps[k, 0], np.tile(centres_x, (7, 1)), atol=5e-3)
        np.testing.assert_allclose(maps[k, 1], np.tile(centres_y[:, None], (1, 7)), atol=5e-3)
        np.testing.assert_allclose(maps[k, 2], 1.0, atol=1e-3)


def test_box_covering_cells_exactly_reads_those_cells() -> None:
    extractor = RegionFeatureExtractor(backbone=_GridBackbone(max_size=640, offset=8.0), config=RegionFeatureConfig(key_whitening=None, sampling_ratio=1))
    image = Image.new("RGB", (320, 160))  # c4 is 20 x 10
    [(maps, _)] = extractor([image], [np.array([[2 * 16, 1 * 16, 9 * 16, 8 * 16]], float)])
    np.testing.assert_array_equal(maps[0, 0], np.tile(np.arange(2, 9), (7, 1)))
    np.testing.assert_array_equal(maps[0, 1], np.tile(np.arange(1, 8)[:, None], (1, 7)))
    # the pooled vector is the mean of exactly those cells
    mean = np.array([5.0, 4.0, 1.0])
    np.testing.assert_allclose(pool_vectors(maps.astype(np.float32))[0], mean / np.linalg.norm(mean), rtol=1e-6)


def test_box_argument_checks() -> None:
    extractor = RegionFeatureExtractor(backbone=_GridBackbone(max_size=64, offset=8.0), config=RegionFeatureConfig(key_whitening=None))
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InvalidInputError, match="got 1 images but 2 box arrays"):
        extractor([image], [np.zeros((0, 4)), np.zeros((0, 4))])
    with pytest.raises(InvalidBoxError, match=r"boxes of image 0 must have shape \[N, 4\]"):
        extractor([image], [np.zeros((2, 3))])
    with pytest.raises(InvalidBoxError, match=r"box 1 of image 0 \[10.0, 10.0, 10.0, 20.0\] is empty"):
        extractor([image], [np.array([[0, 0, 5, 5], [10, 10, 10, 20]], float)])
    with pytest.raises(InvalidBoxError, match="non-finite"):
        extractor([image], [np.array([[0, 0, np.nan, 5]])])
    with pytest.raises(InvalidInputError, match=r"feature level 'c3' is not one of backbone grid's levels \['c4', 'c5'\]"):
        RegionFeatureExtractor(backbone=_GridBackbone(max_size=64, offset=8.0), config=RegionFeatureConfig(key_whitening=None, level="c3"))


def test_images_without_boxes_give_empty_arrays() -> None:
    extractor = RegionFeatureExtractor(backbone=_GridBackbone(max_size=64, offset=8.0), config=RegionFeatureConfig(key_whitening=None))
    images = [Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64))]
    out = extractor(images, [np.zeros((0, 4)), np.array([[0, 0, 32, 32]], float)])
    assert out[0][0].shape == (0, 3, 7, 7) and out[0][1].shape == (0, 6)
    assert out[1][0].shape == (1, 3, 7, 7)
    assert extractor([], []) == []


# --------------------------------------------------------------------------- the real backbone


@pytest.fixture(scope="module")
def extractor() -> RegionFeatureExtractor:
    return RegionFeatureExtractor(backbone=create_backbone(BackboneConfig(max_size=160)), config=RegionFeatureConfig(key_whitening=None))


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    """skimage's Chelsea, 160 x 120 (cat face around x 60-120, y 10-70)."""
    return Image.fromarray(skimage.data.chelsea()).resize((160, 120), Image.Resampling.BILINEAR)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_real_maps_and_unit_vectors(extractor: RegionFeatureExtractor, cat: Image.Image) -> None:
    boxes = np.array([[60, 10, 120, 70], [0, 0, 160, 120], [5, 80, 40, 115]], float)
    [(maps, vectors)] = extractor([cat], [boxes])
    assert extractor.map_shape == (112, 7, 7) and extractor.dim == 112 + 320
    assert maps.shape == (3, 112, 7, 7) and maps.dtype == np.float16
    assert vectors.shape == (3, 432) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # the c4 half is the c4 maps' normalised mean, scaled by 1/sqrt(2) (two unit halves, normalised again)
    np.testing.assert_allclose(pool_vectors(maps) / np.sqrt(2), vectors[:, :112], atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(vectors[:, 112:], axis=1), 1 / np.sqrt(2), atol=1e-5)
    assert extractor.version == "efficientnet_lite0@imagenet-tf+roi_align:c4:7x7:s2:max160+key:c4+c5:mean"
    assert extractor.key_version == "efficientnet_lite0/160:c4+c5:mean:roi7:s2" == visual_key_version(BackboneConfig(max_size=160), RegionFeatureConfig(key_whitening=None))


def test_same_box_same_vector(extractor: RegionFeatureExtractor, cat: Image.Image) -> None:
    box = np.array([[60, 10, 120, 70]], float)
    [(m1, v1)] = extractor([cat], [box])
    [(m2, v2)] = extractor([cat.copy()], [box])
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(m1, m2)
    # batched with another image of the same size: the same numbers up to float rounding
    (_, v3), _ = extractor([cat, cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], [box, box])
    np.testing.assert_allclose(v3, v1, atol=1e-5)


def test_shifted_box_is_closer_than_a_box_elsewhere(extractor: RegionFeatureExtractor, cat: Image.Image) -> None:
    boxes = np.array([[60, 10, 120, 70], [64, 13, 124, 73], [0, 70, 60, 120]], float)
    [(_, v)] = extractor([cat], [boxes])
    near, far = _cos(v[0], v[1]), _cos(v[0], v[2])
    assert near > 0.95 and near > far + 0.05, (near, far)


def test_boxes_scale_with_the_image(extractor: RegionFeatureExtractor, cat: Image.Image) -> None:
    # the 2x copy is downscaled back to 160 x 120 for the backbone; doubled boxes must pool the same cells
    big = cat.resize((320, 240), Image.Resampling.BICUBIC)
    boxes = np.array([[60, 10, 120, 70], [0, 70, 60, 120], [10, 5, 150, 110]], float)
    [(_, small_v)] = extractor([cat], [boxes])
    [(_, big_v)] = extractor([big], [boxes * 2])
    for k in range(len(boxes)):
        assert _cos(small_v[k], big_v[k]) > 0.9
    # and a mis-scaled box would not match as well
    [(_, wrong)] = extractor([big], [boxes])
    assert _cos(small_v[0], big_v[0]) > _cos(small_v[0], wrong[0])


def test_image_maps_crop_padding(extractor: RegionFeatureExtractor, cat: Image.Image) -> None:
    [fmap] = extractor.image_maps([cat])
    assert fmap.shape == (112, math.ceil(120 / 16), math.ceil(160 / 16)) and fmap.dtype == np.float16


# --------------------------------------------------------------------------- the visual key


def _direct_key(fmaps: dict[str, Tensor], boxes: np.ndarray, levels: tuple[str, ...], backbone: Backbone, pooling: str = "mean") -> np.ndarray:
    """The key written out by hand: per level roi_align (boxes in resized pixels, aligned to the
    backbone's cell centres), reduce, L2, concatenate, L2."""
    parts = []
    for level in levels:
        stride, offset = backbone.strides[level], backbone.offsets[level]
        rois = torch.from_numpy(np.column_stack([np.zeros(len(boxes)), boxes + stride / 2 - offset])).float()
        m = roi_align(fmaps[level], rois, output_size=7, spatial_scale=1 / stride, sampling_ratio=2, aligned=True).double().numpy()
        v = m.mean(axis=(2, 3)) if pooling == "mean" else (np.clip(m, 1e-6, None) ** 3).mean(axis=(2, 3)) ** (1 / 3)
        parts.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    key = np.concatenate(parts, axis=1)
    return key / np.linalg.norm(key, axis=1, keepdims=True)


@pytest.mark.parametrize(("levels", "pooling"), [(("c4", "c5"), "mean"), (("c3", "c4", "c5"), "mean"), (("c5",), "mean"), (("c4", "c5"), "gem")])
def test_key_is_the_concatenation_of_per_level_normalised_means(levels: tuple[str, ...], pooling: str) -> None:
    backbone = _RandomBackbone(max_size=128)
    extractor = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(key_whitening=None, key_levels=levels, key_pooling=pooling))
    image = Image.new("RGB", (128, 96))  # no resize: box pixels are resized pixels
    boxes = np.array([[10.0, 8.0, 90.0, 70.0], [40.0, 30.0, 120.0, 90.0], [0.0, 0.0, 128.0, 96.0]])
    [(maps, vectors)] = extractor([image], [boxes])
    assert extractor.dim == sum(backbone.channels[lv] for lv in levels) == vectors.shape[1]
    assert maps.shape == (3, 5, 7, 7)  # the stored maps stay c4's
    np.testing.assert_allclose(vectors, _direct_key(backbone.maps, boxes, levels, backbone, pooling), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_visual_key_function() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 3, 7, 7)).astype(np.float32), rng.normal(size=(4, 6, 7, 7)).astype(np.float32)
    key = visual_key([a, b])
    expected = np.concatenate([pool_vectors(a), pool_vectors(b)], axis=1) / np.sqrt(2)
    np.testing.assert_allclose(key, expected, atol=1e-6)
    np.testing.assert_allclose(visual_key([a]), pool_vectors(a), atol=1e-7)  # one level: the old key
    g = gem(np.abs(a))
    np.testing.assert_allclose(g, (np.abs(a) ** 3).mean(axis=(2, 3)) ** (1 / 3), rtol=1e-4)
    with pytest.raises(InvalidInputError, match="pooling must be one of"):
        visual_key([a], pooling="max")


def test_one_backbone_pass_for_maps_and_key() -> None:
    backbone = _GridBackbone(max_size=200, offset=8.0)
    extractor = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(key_whitening=None))
    images = [Image.new("RGB", (200, 100)), Image.new("RGB", (200, 100))]
    extractor(images, [np.array([[0.0, 0.0, 100.0, 80.0]]), np.array([[20.0, 10.0, 180.0, 90.0], [0.0, 0.0, 50.0, 50.0]])])
    assert backbone.calls == 1 and backbone.asked == [["c4", "c5"]]
    # from maps already computed (the RPN's c3..c5): no pass at all; a bare c4 tensor is not enough for the key
    maps = backbone(torch.zeros(1, 3, 128, 224), levels=["c4", "c5"])
    backbone.calls = 0
    [(m, v)] = extractor.from_feature_map(maps, [(224, 128)], [np.array([[0.0, 0.0, 64.0, 64.0]])])
    assert backbone.calls == 0 and m.shape == (1, 3, 7, 7) and v.shape == (1, 6)
    with pytest.raises(InvalidInputError, match="the visual key needs backbone level 'c5'"):
        extractor.from_feature_map(maps["c4"], [(224, 128)], [np.array([[0.0, 0.0, 64.0, 64.0]])])


def test_version_and_dim_follow_the_key() -> None:
    backbone = _RandomBackbone()
    versions = set()
    for levels, pooling in [(("c4",), "mean"), (("c4", "c5"), "mean"), (("c4", "c5"), "gem"), (("c3", "c4", "c5"), "mean")]:
        ex = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(key_whitening=None, key_levels=levels, key_pooling=pooling))
        versions.add(ex.version)
        versions.add(ex.key_version)
        assert "+".join(levels) in ex.version and pooling in ex.key_version
        assert ex.dim == sum(backbone.channels[lv] for lv in levels) and ex.map_shape == (5, 7, 7)
    assert len(versions) == 8
    assert RegionFeatureConfig(key_whitening=None, key_levels=("c4",)).key_version == "c4:mean:roi7:s2"
    with pytest.raises(InvalidInputError, match="key_pooling must be one of"):
        RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(key_whitening=None, key_pooling="max"))
    with pytest.raises(InvalidInputError, match="key_levels must name"):
        RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(key_whitening=None, key_levels=()))


def test_a_feature_only_backbone_says_it_has_no_classifier() -> None:
    from engine.errors import InvalidInputError

    backbone = _GridBackbone(max_size=128, offset=8.0)
    for call in (lambda: backbone.head_map(torch.zeros(1, 3, 2, 2)), lambda: backbone.head_logits(torch.zeros(1, 3)), lambda: backbone.classify(torch.zeros(1, 3, 32, 32))):
        with pytest.raises(InvalidInputError, match="grid has no ImageNet classifier"):
            call()

    class _NoForward(Backbone):
        pass

    with pytest.raises(TypeError, match="forward"):
        _NoForward(name="x", version="x", channels={}, strides={}, offsets={}, max_size=32)
