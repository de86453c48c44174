"""The text projection (English -> the visual key space): the model, its loss and checkpoint, ``engine
train text-projection`` on a tiny corpus, and text-only search that uses it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import Manifest, read_manifest
from engine.models.registry import load_model
from engine.models.text_projection import MODEL_NAME, ProjectionConfig, TextProjection, info_nce

KEY = "efficientnet_lite0:c4+c5:mean:roi7:s2"


def _manifest() -> Manifest:
    return Manifest(model=MODEL_NAME, version="1", config={}, command="test", data="", seed=0, metrics={})


def test_projection_gives_unit_vectors_and_checks_its_input_and_key() -> None:
    model = TextProjection(ProjectionConfig(key_version=KEY, text_encoder="all-MiniLM-L6-v2", text_dim=6, key_dim=4))
    out = model.apply(np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32))
    assert out.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert model.apply(np.ones(6, np.float32)).shape == (4,)  # one vector in, one out
    with pytest.raises(InvalidInputError, match=r"\[N, 6\]"):
        model(torch.zeros(2, 5))
    model.check_key(KEY)
    with pytest.raises(CheckpointError, match="engine train text-projection"):
        model.check_key(KEY + "+pcaw:0123456789ab")
    with pytest.raises(InvalidInputError, match="temperature"):
        ProjectionConfig(key_version=KEY, text_encoder="x", text_dim=6, key_dim=4, temperature=0.0)


def test_checkpoint_round_trip_and_family_check(tmp_path: Path) -> None:
    model = TextProjection(ProjectionConfig(key_version=KEY, text_encoder="all-MiniLM-L6-v2", text_dim=6, key_dim=4))
    model.save(tmp_path / "tp.pt", _manifest())
    loaded = load_model(tmp_path / "tp.pt", family="text-projection")
    x = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
    np.testing.assert_allclose(loaded.apply(x), model.apply(x), atol=1e-6)
    assert loaded.config == model.config
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "tp.pt", family="key-whitening")


def test_info_nce_leaves_out_same_text_keys_and_counts_background() -> None:
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    text = keys.clone()
    distinct = info_nce(text, keys, torch.tensor([0, 1, 2]), 0.1)
    same = info_nce(text, keys, torch.tensor([0, 0, 2]), 0.1)  # rows 0 and 1 describe the same thing
    assert float(same) < float(distinct)  # a look-alike of the same text is not pushed away
    background = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05, 0.0]]), dim=1)
    assert float(info_nce(text, keys, torch.tensor([0, 1, 2]), 0.1, background)) > float(distinct)


def test_engine_train_text_projection_cli(grn_corpus: Path, tmp_path: Path) -> None:
    from engine.cli import main

    out = tmp_path / "tp.pt"
    runner = CliRunner()
    result = runner.invoke(main, ["train", "text-projection", "--data", str(grn_corpus), "--out", str(out), "--epochs", "3", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["model"] == "text-projection" and manifest["config"]["key_version"].startswith(KEY + "+pcaw:")
    m = manifest["metrics"]
    assert m["train_pairs"] > 0 and m["val_queries"] > 0 and 1 <= m["best_epoch"] <= 3
    history = manifest["extra"]["history"]
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]  # it learns
    assert max((h["val_r10"], h["val_r1"]) for h in history) == (round(m["val_r10"], 4), round(m["val_r1"], 4))  # the best val epoch is kept
    assert 0.0 <= m["test_r1"] <= m["test_r10"] <= 1.0
    assert load_model(out, family="text-projection").config.key_dim == 432


def test_the_shipped_projection_fits_the_default_key() -> None:
    from engine.api import Engine

    manifest = read_manifest(Path(__file__).resolve().parents[1] / "engine/checkpoints/text-projection.json")
    assert manifest.metrics["val_r10"] > 0 and manifest.config["text_encoder"] == "all-MiniLM-L6-v2"
    engine = Engine(Path("unused-index"))
    assert engine.text_projection is not None and engine.text_projection.config.key_dim == engine.extractor.dim
