"""Checkpoint files: round trip, sha256 verification, model-name check, clear errors; the shipped checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.errors import CheckpointError
from engine.models.checkpoint import PACKAGE_CHECKPOINTS, Manifest, installed_checkpoints, load_checkpoint, read_manifest, save_checkpoint


def _manifest(model: str = "rpn") -> Manifest:
    return Manifest(model=model, version=f"{model}-1", config={"width": 8}, command="engine train rpn --data d --seed 3", data="d", seed=3, metrics={"val_recall@100": 0.5})


def _payload() -> dict:
    torch.manual_seed(0)
    return {"state_dict": {"w": torch.randn(3, 4), "b": torch.zeros(4)}, "config": {"width": 8, "sizes": [1, 2]}}


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rpn.pt"
    saved = save_checkpoint(path, _manifest(), _payload())
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert saved.size_bytes == path.stat().st_size and len(saved.sha256) == 64 and saved.created
    on_disk = json.loads(path.with_suffix(".json").read_text())
    assert on_disk["sha256"] == saved.sha256 and on_disk["command"] == "engine train rpn --data d --seed 3"
    manifest, payload = load_checkpoint(path, expected_model="rpn")
    assert manifest == saved == read_manifest(path)
    assert torch.equal(payload["state_dict"]["w"], _payload()["state_dict"]["w"])
    assert payload["config"] == {"width": 8, "sizes": [1, 2]}
    assert load_checkpoint(path.with_suffix(".json"))[0].sha256 == saved.sha256  # the manifest path works too


def test_subnormal_weights_load_as_zeros_and_the_file_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "rpn.pt"
    w = torch.tensor([[1e-40, -5e-44, 0.25], [1.2e-38, -3.0, 0.0]])  # two subnormals, the smallest normal, ordinary values
    half = torch.tensor([1e-6, 0.5], dtype=torch.float16)  # 1e-6 is subnormal in float16
    saved = save_checkpoint(path, _manifest(), {"state_dict": {"w": w, "ids": torch.tensor([0, 1])}, "nested": [(half,)]})
    _, payload = load_checkpoint(path, expected_model="rpn")
    assert torch.equal(payload["state_dict"]["w"], torch.tensor([[0.0, 0.0, 0.25], [1.2e-38, -3.0, 0.0]]))
    assert payload["nested"][0][0].tolist() == [0.0, 0.5] and torch.equal(payload["state_dict"]["ids"], torch.tensor([0, 1]))
    assert load_checkpoint(path)[0].sha256 == saved.sha256  # the file (and the model's version) is unchanged


def test_shipped_ref_nms_loads_without_subnormal_weights() -> None:
    from engine.models.ref_nms import RefNMSModel

    tiny = torch.finfo(torch.float32).tiny
    net = RefNMSModel.from_checkpoint().net
    assert all(not ((p.abs() < tiny) & (p != 0)).any() for p in net.parameters())


def test_flipped_bytes_are_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "rpn.pt"
    save_checkpoint(path, _manifest(), _payload())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt.*sha256"):
        load_checkpoint(path, expected_model="rpn")


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "grn.pt"
    save_checkpoint(path, _manifest("grn"), _payload())
    with pytest.raises(CheckpointError, match=r"holds a 'grn' model, but a 'rpn' model is needed"):
        load_checkpoint(path, expected_model="rpn")
    from engine.models.rpn import ProposalNetwork

    with pytest.raises(CheckpointError, match="'grn' model"):
        ProposalNetwork.from_checkpoint(path)


def test_missing_file_and_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "rpn.pt"
    save_checkpoint(path, _manifest(), _payload())
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(path)


def test_rpn_checkpoint_without_state_is_a_checkpoint_error(tmp_path: Path) -> None:
    from engine.models.rpn import ProposalNetwork

    path = tmp_path / "rpn.pt"
    save_checkpoint(path, _manifest(), {"config": {"no_such_key": 1}, "state_dict": {}})
    with pytest.raises(CheckpointError, match="unknown keys"):
        ProposalNetwork.from_checkpoint(path)


def test_shipped_rpn_checkpoint_is_installed_and_verifies() -> None:
    found = {path.stem: manifest for path, manifest in installed_checkpoints()}
    assert "rpn" in found, f"engine/checkpoints/rpn.pt is missing from {PACKAGE_CHECKPOINTS}"
    manifest = found["rpn"]
    assert manifest.model == "rpn" and manifest.size_bytes < 10_000_000  # 7.8 MB with the box head
    # trained on both worlds: each world's own test recall is recorded, the shapes world's kept high
    assert manifest.metrics["synth/test_regions@100"] >= 0.9 and manifest.metrics["synth/test_objects@100"] >= 0.98
    assert manifest.metrics["stamps/test_objects@100"] >= 0.8
    load_checkpoint(PACKAGE_CHECKPOINTS / "rpn.pt", expected_model="rpn")  # sha256 matches
