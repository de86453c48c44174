"""The visual key's learned PCA-whitening: the fit, its checkpoint, the extractor applying it, the
version an index records, and ``engine train key-whitening`` on a tiny corpus."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import Manifest, read_manifest
from engine.models.key_whitening import MODEL_NAME, CovarianceAccumulator, KeyWhitening, fit_matching, fit_whitening, matching_scatter
from engine.models.registry import load_model
from indexer.backbone import BackboneConfig, create_backbone
from indexer.component_configs import RegionFeatureConfig, visual_key_version
from indexer.region_features import RegionFeatureExtractor

RECIPE = "efficientnet_lite0:c4+c5:mean:roi7:s2"


def _correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.linspace(3.0, 0.1, d)[None]  # very unequal, correlated dimensions
    return rng.normal(size=(n, d)) @ mix.T + rng.normal(size=d)


def test_accumulator_streams_the_sample_mean_and_covariance() -> None:
    x = _correlated(500, 6)
    acc = CovarianceAccumulator(6)
    for part in np.array_split(x, 7):
        acc.add(part)
    assert acc.count == 500
    np.testing.assert_allclose(acc.mean(), x.mean(axis=0), atol=1e-10)
    np.testing.assert_allclose(acc.covariance(), np.cov(x.T), atol=1e-9)
    with pytest.raises(InvalidInputError, match=r"\[N, 6\]"):
        acc.add(np.zeros((2, 5)))


def test_whitening_decorrelates_and_normalises() -> None:
    x = _correlated(4000, 8)
    acc = CovarianceAccumulator(8)
    acc.add(x)
    w = fit_whitening(acc, recipe=RECIPE, shrink=0.0)
    raw = (torch.from_numpy(x).float() - w.mean) @ w.projection  # before the final normalisation
    np.testing.assert_allclose(np.cov(raw.numpy().T), np.eye(8), atol=2e-3)
    out = w.apply(x.astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    small = fit_whitening(acc, recipe=RECIPE, shrink=0.1, out_dim=3)
    assert small.apply(x[:5].astype(np.float32)).shape == (5, 3)
    # shrinkage pulls the eigenvalues together: the whitened scales of strong and weak axes differ less
    strong, weak = np.linalg.norm(w.projection.numpy(), axis=0)[[0, -1]]
    s_strong, s_weak = np.linalg.norm(fit_whitening(acc, recipe=RECIPE, shrink=0.4).projection.numpy(), axis=0)[[0, -1]]
    assert s_weak / s_strong < weak / strong
    with pytest.raises(InvalidInputError, match="shrink"):
        fit_whitening(acc, recipe=RECIPE, shrink=1.5)
    with pytest.raises(InvalidInputError, match="out_dim"):
        fit_whitening(acc, recipe=RECIPE, shrink=0.1, out_dim=9)


def test_matching_pairs_step_downweights_what_varies_within_an_object() -> None:
    """Groups of keys of one 'object' that vary along a nuisance direction stronger than objects differ:
    PCA-whitening alone retrieves the wrong object; the matching-pairs step (Radenović Eq. 4) the right one."""
    rng = np.random.default_rng(3)
    d, objects, views = 6, 20, 5
    nuisance = np.array([3.0, 3.0, 0.05, 0.05, 0.05, 0.05])  # views of one object differ on axes 0-1
    centres = rng.normal(size=(objects, d)) * np.array([0.0, 0, 1, 1, 1, 1])  # objects differ on axes 2-5
    groups = [c + rng.normal(size=(views, d)) * nuisance for c in centres]
    acc = CovarianceAccumulator(d)
    acc.add(np.concatenate(groups))
    pca = fit_whitening(acc, recipe=RECIPE, shrink=0.0)
    scatter, boxes = matching_scatter(pca, groups)
    assert boxes == objects * views and scatter.shape == (d, d)
    learned = fit_matching(pca, scatter, pairs_shrink=0.05, boxes=boxes)
    assert learned.config.pairs_shrink == 0.05 and learned.config.pairs == boxes and learned.out_dim == d

    def r1(w: KeyWhitening) -> float:
        test = [c + rng.normal(size=(2, d)) * nuisance for c in centres]
        a = w.apply(np.stack([t[0] for t in test]).astype(np.float32))
        b = w.apply(np.stack([t[1] for t in test]).astype(np.float32))
        return float(np.mean(np.argmax(a @ b.T, axis=1) == np.arange(objects)))

    assert r1(learned) >= 0.9 and r1(learned) >= r1(pca) + 0.2
    with pytest.raises(InvalidInputError, match="pairs_shrink"):
        fit_matching(pca, scatter, pairs_shrink=0.0, boxes=boxes)
    with pytest.raises(InvalidInputError, match="at least one group"):
        matching_scatter(pca, [g[:1] for g in groups])


def _saved(tmp_path: Path, recipe: str = RECIPE, dim: int = 432) -> Path:
    acc = CovarianceAccumulator(dim)
    acc.add(_correlated(3 * dim, dim, seed=1))
    w = fit_whitening(acc, recipe=recipe, shrink=0.1)
    path = tmp_path / "kw.pt"
    w.save(path, Manifest(model=MODEL_NAME, version="1", config=w.config.to_dict(), command="test", data="", seed=0, metrics={}))
    return path


def test_checkpoint_round_trip_and_recipe_check(tmp_path: Path) -> None:
    path = _saved(tmp_path, dim=10)
    original = KeyWhitening.from_checkpoint(path)
    loaded = load_model(path, family="key-whitening")
    x = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    np.testing.assert_array_equal(original.apply(x), loaded.apply(x))
    loaded.check_recipe(RECIPE)
    with pytest.raises(CheckpointError, match="fitted on visual key .*engine train key-whitening"):
        loaded.check_recipe("efficientnet_lite0:c4:mean:roi7:s2")
    with pytest.raises(CheckpointError, match="holds a 'key-whitening' model"):
        load_model(path, family="rpn")


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(BackboneConfig(max_size=160), device="cpu")


def test_extractor_whitens_the_key_and_records_it(tmp_path: Path, backbone) -> None:  # noqa: ANN001
    path = _saved(tmp_path)
    plain = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(key_whitening=None))
    white = RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(key_whitening=str(path)))
    image = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (150, 120), (90, 140, 200))
    boxes = np.array([[10, 10, 80, 90], [40, 20, 140, 110]], np.float64)
    [(maps_p, keys_p)] = plain([image], [boxes])
    [(maps_w, keys_w)] = white([image], [boxes])
    np.testing.assert_array_equal(maps_p, maps_w)  # the stored maps are not whitened
    np.testing.assert_allclose(keys_w, KeyWhitening.from_checkpoint(path).apply(keys_p), atol=1e-6)
    sha = read_manifest(path).sha256[:12]
    assert white.key_version == f"efficientnet_lite0/160:c4+c5:mean:roi7:s2+pcaw:{sha}" == visual_key_version(BackboneConfig(max_size=160), white.config)
    assert plain.key_version == "efficientnet_lite0/160:c4+c5:mean:roi7:s2"
    assert white.version.endswith(f"+key:c4+c5:mean+pcaw:{sha}")


def test_extractor_refuses_a_whitening_of_another_key(tmp_path: Path, backbone) -> None:  # noqa: ANN001
    path = _saved(tmp_path, recipe="efficientnet_lite0:c4:mean:roi7:s2", dim=112)
    with pytest.raises(CheckpointError, match="fitted on visual key 'efficientnet_lite0:c4:mean:roi7:s2'"):
        RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(key_whitening=str(path))).dim
    assert RegionFeatureExtractor(backbone=backbone, config=RegionFeatureConfig(key_levels=("c4",), key_whitening=str(path))).dim == 112


def test_the_shipped_whitening_fits_the_default_key(backbone) -> None:  # noqa: ANN001
    extractor = RegionFeatureExtractor(backbone=backbone)
    assert extractor.whitening is not None and extractor.dim == extractor.whitening.out_dim == 432
    manifest = read_manifest(Path(__file__).resolve().parents[1] / "engine/checkpoints/key-whitening.json")
    assert manifest.metrics["test_r1"] > manifest.metrics["test_r1_unwhitened"]  # measured when it was fitted
    assert RegionFeatureConfig().key_version.startswith("c4+c5:mean:roi7:s2+pcaw:")


def test_engine_train_key_whitening_cli(grn_corpus: Path, tmp_path: Path) -> None:
    from engine.cli import main

    out = tmp_path / "kw.pt"
    runner = CliRunner()
    result = runner.invoke(main, ["train", "key-whitening", "--data", str(grn_corpus), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["model"] == "key-whitening" and manifest["config"]["recipe"] == RECIPE
    m = manifest["metrics"]
    from engine.training.key_whitening import WhiteningTrainConfig

    shrinks = WhiteningTrainConfig().shrinks
    assert m["shrink"] in shrinks and m["fitted_boxes"] > 0 and m["val_queries"] > 0
    assert set(m["val_r1_by_shrink"]) == {str(s) for s in shrinks}
    best_pca = max(m["val_r1_by_shrink"].values())
    assert best_pca == round(m["val_r1_pca_only"], 4)  # the best shrinkage on val is kept
    if m["pairs_shrink"] is None:  # the matching-pairs step is kept only where val R@1 (then R@10) says it helps
        assert round(m["val_r1"], 4) == best_pca and manifest["config"]["pairs_shrink"] is None
    else:
        assert m["val_r1"] >= m["val_r1_pca_only"] and round(m["val_r1"], 4) == m["val_r1_by_pairs_shrink"][str(m["pairs_shrink"])]
        assert manifest["config"]["pairs_shrink"] == m["pairs_shrink"] and manifest["config"]["pairs"] == m["pairs_boxes"] > 0
    assert 0.0 <= m["test_r1"] <= m["test_r10"] <= 1.0
    whitening = load_model(out, family="key-whitening")
    assert whitening.out_dim == 432
    bad = runner.invoke(main, ["train", "key-whitening", "--data", str(grn_corpus), "--out", str(tmp_path / "x.pt"), "--epochs", "3"])
    assert bad.exit_code != 0 and "takes no --epochs" in bad.output and "Traceback" not in bad.output


def test_train_config_is_checked() -> None:
    from engine.training.key_whitening import WhiteningTrainConfig

    with pytest.raises(InvalidInputError, match="boxes must be one of"):
        WhiteningTrainConfig(boxes="everything")
    assert replace(WhiteningTrainConfig(), boxes="annotations").boxes == "annotations"
