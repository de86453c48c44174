"""The model registry: names → families → classes, one loader for shipped names and paths, and
``engine train`` dispatching through it."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import PACKAGE_CHECKPOINTS
from engine.models.registry import FAMILIES, family, family_of_name, known_checkpoints, load_model, model_names, resolve_checkpoint


def test_names_are_the_models_own_and_every_family_loads_a_class() -> None:
    from engine.models.cm_att import CM_ATT_NAMES, REGION_GROUNDING_NAME
    from engine.models.grn import METHODS as GRN_METHODS
    from engine.models.ref_nms import REF_NMS_NAMES
    from engine.models.san import METHODS as SAN_METHODS

    assert set(family("grn-family").names) == set(GRN_METHODS)
    assert set(family("san").names) == {"san", *(f"san-{m}" for m in SAN_METHODS if m != "fv+ft")}
    assert family("ref-nms").names == REF_NMS_NAMES
    assert family("cm-att").names == (*CM_ATT_NAMES, REGION_GROUNDING_NAME)
    assert len(set(model_names())) == len(model_names())
    for fam in FAMILIES:
        cls = fam.model_class()
        assert callable(cls.from_checkpoint)
        assert fam.default in fam.names


def test_shipped_checkpoints_all_belong_to_a_family() -> None:
    from engine.models.checkpoint import read_manifest

    names = known_checkpoints()
    assert "grn" in names and "rpn" in names
    for name in names:
        assert read_manifest(resolve_checkpoint(name)).model in {f.name for f in FAMILIES}


@pytest.mark.parametrize(
    ("spec", "family_name", "class_name"),
    [("grn-fc", "grn-family", "RegionRetrievalModel"), ("rpn", None, "ProposalNetwork"), (None, "ref-nms", "RefNMSModel"), ("cm-att", "cm-att", "GroundingScorer"), ("san", None, "SANModel"), ("saliency", None, "SaliencyNet"), ("mcb", None, "GroundingModel")],
)
def test_load_model_by_name(spec: str | None, family_name: str | None, class_name: str) -> None:
    model = load_model(spec, device="cpu", family=family_name)
    assert type(model).__name__ == class_name


def test_load_model_by_path_equals_by_name(tmp_path: Path) -> None:
    import torch

    for suffix in (".pt", ".json"):
        shutil.copy(PACKAGE_CHECKPOINTS / f"rpn{suffix}", tmp_path / f"mine{suffix}")
    by_path = load_model(tmp_path / "mine.pt", device="cpu")
    by_text = load_model(str(tmp_path / "mine.pt"))
    by_name = load_model("rpn")
    for a, b, c in zip(by_path.state_dict().values(), by_text.state_dict().values(), by_name.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_unknown_name_lists_the_installed_ones() -> None:
    with pytest.raises(CheckpointError) as info:
        load_model("no-such-model")
    message = str(info.value)
    assert "'no-such-model'" in message and "grn-fc" in message and "rpn" in message
    with pytest.raises(InvalidInputError, match="choose one of rpn, visual"):
        family_of_name("no-such-model")


def test_a_checkpoint_of_another_family_is_refused() -> None:
    with pytest.raises(CheckpointError, match="holds a 'rpn' model, but a 'grn-family' model is needed"):
        load_model("rpn", family="grn-family")


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent.pt")


def test_from_checkpoint_takes_names_like_load_model() -> None:
    from engine.models.retrieval import RegionRetrievalModel
    from engine.models.rpn import ProposalNetwork

    assert RegionRetrievalModel.from_checkpoint("grn-fc").method == "grn-fc"
    assert ProposalNetwork.from_checkpoint("rpn").version == ProposalNetwork.from_checkpoint(None).version


def test_train_dispatches_through_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from engine.cli import main
    from engine.models.checkpoint import Manifest
    from engine.training import registry

    calls: list[tuple[str, Any]] = []

    def fake(name: str, options: Any) -> Manifest:
        calls.append((name, options))
        return Manifest(model="grn-family", version="1", config={}, command="", data="", seed=0, metrics={"best_epoch": 1}, sha256="0" * 64, size_bytes=10)

    monkeypatch.setitem(registry.TRAINERS, "grn-family", fake)
    result = CliRunner().invoke(main, ["train", "grn-fc", "--data", str(tmp_path), "--out", str(tmp_path / "x.pt"), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [(n, o.device) for n, o in calls] == [("grn-fc", "cpu")]
    bad = CliRunner().invoke(main, ["train", "no-such-model", "--data", str(tmp_path)])
    assert bad.exit_code == 2 and "grn-fc" in bad.output
