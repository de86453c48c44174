"""The saliency network (SAN §3.2.1, Eq. 4–6): blocks, targets, a tiny training run, the checkpoint, the CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.cli import main
from engine.errors import CheckpointError
from engine.models.saliency import SaliencyConfig, SaliencyNet, mask_targets, saliency_loss, saliency_quality, saliency_to_image


def _maps(b: int = 2, h: int = 8, w: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "c3": torch.randn(b, 40, h, w, generator=g),
        "c4": torch.randn(b, 112, (h + 1) // 2, (w + 1) // 2, generator=g),
        "c5": torch.randn(b, 320, (h + 3) // 4, (w + 3) // 4, generator=g),
    }


def test_output_is_on_the_c3_grid_and_s1_is_s0_plus_the_residue() -> None:
    net = SaliencyNet(SaliencyConfig(width=8)).eval()
    maps = _maps()
    with torch.no_grad():
        s0, s1 = net(maps)
        assert s0.shape == s1.shape == (2, 1, 8, 6)
        f1, f2 = maps["c3"], torch.nn.functional.interpolate(maps["c4"], size=(8, 6), mode="bilinear", align_corners=False)
        f_low = net.low(torch.cat([f1, f2], 1))  # Eq. 4
        residue = net.refine(torch.cat([s0, f_low], 1))  # Eq. 6
    torch.testing.assert_close(s1, s0 + residue)


def test_missing_level_is_a_clear_error() -> None:
    from engine.errors import InvalidInputError

    maps = _maps()
    del maps["c5"]
    with pytest.raises(InvalidInputError, match="c5"):
        SaliencyNet(SaliencyConfig(width=4))(maps)


def test_mask_targets_cover_the_image_cells() -> None:
    mask = np.zeros((64, 48), bool)
    mask[:, :24] = True  # left half
    target, valid = mask_targets(mask, (48, 64), (8, 6), stride=8, offset=4.0)
    assert target.shape == valid.shape == (8, 6)
    assert valid.all()
    np.testing.assert_allclose(target[:, :3], 1.0)
    np.testing.assert_allclose(target[:, 3:], 0.0)
    # cells whose centre lies past the image are not valid
    _, valid = mask_targets(mask, (48, 64), (10, 8), stride=8, offset=4.0)
    assert valid[:8, :6].all() and not valid[8:].any() and not valid[:, 6:].any()


def test_saliency_to_image_and_quality() -> None:
    grid = np.zeros((8, 6), np.float32)
    grid[:, :3] = 1.0
    up = saliency_to_image(grid, (48, 64), stride=8, offset=4.0, max_size=640)
    assert up.shape == (64, 48)
    assert up[:, :20].min() > 0.99 and up[:, 28:].max() < 0.01
    mask = up > 0.5
    assert saliency_quality(mask.astype(np.float32), mask) == (0.0, 1.0)
    mae, iou = saliency_quality(np.zeros_like(up), mask)
    assert mae == pytest.approx(mask.mean()) and iou == 0.0


def test_loss_ignores_padding_cells() -> None:
    s = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    valid = torch.tensor([[[[True, False], [False, False]]]])
    big = torch.tensor([[[[0.0, 50.0], [50.0, 50.0]]]])  # wildly wrong only where invalid
    assert saliency_loss(big, big, target, valid).item() == pytest.approx(saliency_loss(s, s, target, valid).item())


@pytest.fixture(scope="module")
def trained(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from engine.training.options import TrainOptions
    from engine.training.saliency import SaliencyTrainConfig, train_saliency

    out = tmp_path_factory.mktemp("sal") / "saliency.pt"
    manifest = train_saliency(TrainOptions(data=tiny_corpus, out=out, epochs=3, progress=False, cache_dir=tmp_path_factory.mktemp("salcache")), train_config=SaliencyTrainConfig(batch_size=4, width=8))
    return out, manifest


def test_tiny_training_lowers_the_loss_and_writes_a_loadable_checkpoint(trained: tuple[Path, object]) -> None:
    out, manifest = trained
    history = manifest.metrics["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0.0 <= manifest.metrics["val_mae"] <= 1.0 and 0.0 <= manifest.metrics["val_iou"] <= 1.0
    net = SaliencyNet.from_checkpoint(out)
    assert net.config.width == 8 and not net.training
    assert net.version.startswith("rrs-1:")


def test_corrupt_checkpoint_is_a_clear_error(trained: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = trained
    bad = tmp_path / "saliency.pt"
    bad.write_bytes(out.read_bytes()[:-10] + b"0123456789")
    (tmp_path / "saliency.json").write_text(out.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="corrupt"):
        SaliencyNet.from_checkpoint(bad)


def test_cli_renders_a_png_and_reports_bad_input_in_one_line(trained: tuple[Path, object], tiny_corpus: Path, tmp_path: Path) -> None:
    from PIL import Image

    out, _ = trained
    image = next((tiny_corpus / "images").glob("*.jpg"))
    runner = CliRunner()
    png = tmp_path / "s.png"
    result = runner.invoke(main, ["saliency", str(image), "--out", str(png), "--checkpoint", str(out)])
    assert result.exit_code == 0, result.output
    w, h = Image.open(image).size
    assert Image.open(png).size == (3 * w, h)
    for bad_image in (tmp_path / "missing.jpg", tmp_path / "broken.jpg"):
        if bad_image.name == "broken.jpg":
            bad_image.write_bytes(b"not an image at all")
        result = runner.invoke(main, ["saliency", str(bad_image), "--out", str(png), "--checkpoint", str(out)])
        assert result.exit_code == 1
        assert result.output.startswith("Error:") and len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(main, ["saliency", str(image), "--out", str(png), "--checkpoint", str(tmp_path / "none.pt")])
    assert result.exit_code == 1 and "does not exist" in result.output
