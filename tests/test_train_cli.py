"""``engine train rpn`` and ``engine models`` through the CLI, on a tiny seeded corpus."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import main


@pytest.fixture(scope="module")
def trained(split_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ckpt") / "rpn.pt"
    result = CliRunner().invoke(main, ["train", "rpn", "--data", str(split_corpus), "--out", str(out), "--epochs", "1", "--seed", "5", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_rpn_writes_checkpoint_and_manifest(trained: tuple[Path, str], split_corpus: Path) -> None:
    out, output = trained
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert output.startswith(f"wrote {out} (") and "best epoch 1" in output and "val_recall@100=" in output
    assert len(output.strip().splitlines()) == 1
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert {"model", "version", "config", "command", "data", "seed", "metrics", "sha256", "created", "size_bytes", "extra"} <= set(manifest)
    assert manifest["model"] == "rpn" and manifest["seed"] == 5
    assert manifest["command"] == f"engine train rpn --data {split_corpus} --out {out} --epochs 1 --seed 5 --device cpu"
    metrics = manifest["metrics"]
    assert metrics["best_epoch"] == 1 and 0 <= metrics["val_recall@100"] <= 1
    assert metrics["test_images"] == 2
    for kind in ("regions", "objects"):
        values = [metrics[f"test_{kind}@{n}"] for n in (10, 50, 100, 300)]
        assert all(0 <= v <= 1 for v in values) and values == sorted(values)  # recall grows with N
    assert manifest["config"]["offsets"] == [7.5, 15.5, 31.5]
    assert len(manifest["extra"]["history"]) == 1
    assert manifest["config"]["box_head"] == 512 and len(manifest["extra"]["box_head_history"]) == 1  # both stages
    assert metrics["box_head_best_epoch"] == 1


def test_train_rpn_from_a_checkpoint_trains_only_the_box_head(trained: tuple[Path, str], split_corpus: Path, tmp_path: Path) -> None:
    """--init keeps the first stage of the given checkpoint bit for bit, trains a fresh box head and records where it started."""
    import torch

    from engine.models.rpn import ProposalNetwork

    first, _ = trained
    out = tmp_path / "rpn2.pt"
    args = ["train", "rpn", "--data", str(split_corpus), "--init", str(first), "--out", str(out), "--epochs", "1", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.with_suffix(".json").read_text())
    before = json.loads(first.with_suffix(".json").read_text())
    assert manifest["extra"]["init"]["sha256"] == before["sha256"] and manifest["extra"]["init"]["command"] == before["command"]
    assert manifest["extra"]["history"] == before["extra"]["history"] and len(manifest["extra"]["box_head_history"]) == 1
    assert f"--init {first}" in manifest["command"]
    old, new = ProposalNetwork.from_checkpoint(first), ProposalNetwork.from_checkpoint(out)
    old_state, new_state = old.state_dict(), new.state_dict()
    for name, value in new_state.items():
        if name.startswith("box_head."):
            assert not torch.equal(value, old_state[name]) or value.abs().sum() == 0
        else:
            assert torch.equal(value, old_state[name]), name


def test_init_is_refused_where_it_does_not_apply(trained: tuple[Path, str], split_corpus: Path, tmp_path: Path) -> None:
    first, _ = trained
    runner = CliRunner()
    result = runner.invoke(main, ["train", "grn", "--data", str(split_corpus), "--init", str(first), "--quiet"])
    assert result.exit_code != 0 and "--init applies to rpn only" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["train", "rpn", "--data", str(split_corpus), "--init", str(tmp_path / "none.pt"), "--quiet"])
    assert result.exit_code != 0 and "is not a file" in result.output and "Traceback" not in result.output


def test_trained_network_loads_and_proposes_inside_the_image(trained: tuple[Path, str], split_corpus: Path) -> None:
    import torch

    from engine.models.rpn import ProposalNetwork
    from indexer.backbone import BackboneConfig, create_backbone, preprocess
    from indexer.images import load_image

    out, _ = trained
    net = ProposalNetwork.from_checkpoint(out)
    assert net.version.startswith("rpn-1@") and not net.training
    image = load_image(split_corpus / "images" / "000000.jpg")
    backbone = create_backbone(BackboneConfig(), device="cpu")
    with torch.no_grad():
        maps = backbone(preprocess([image], max_size=640)[0], levels=["c3", "c4", "c5"])
    (boxes, scores), = net.propose(maps, [image.size], max_proposals=25)
    assert 0 < len(boxes) <= 25
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 128).all()
    assert (np.diff(scores) <= 0).all() and (scores > 0).all() and (scores <= 1).all()


def test_rpn_recall_on_the_trained_checkpoint(trained: tuple[Path, str], split_corpus: Path) -> None:
    from engine.evaluation.proposals_recall import rpn_recall

    out, _ = trained
    table = rpn_recall(split_corpus, checkpoint=out, split="test", ns=(10, 300))
    assert table["images"] == 2 and set(table) == {"regions", "objects", "images"}
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert table["regions"][300] == pytest.approx(manifest["metrics"]["test_regions@300"])
    assert table["objects"][10] == pytest.approx(manifest["metrics"]["test_objects@10"])


def test_train_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["train", "nosuch", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "'nosuch' is not one of 'rpn'" in result.output
    result = runner.invoke(main, ["train", "rpn", "--data", str(tmp_path / "missing")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "is not a folder" in result.output
    line = {"image": "a.jpg", "width": 10, "height": 10, "objects": [], "regions": [], "refs": [], "captions": []}  # no split
    (tmp_path / "annotations.jsonl").write_text(json.dumps(line) + "\n")
    result = runner.invoke(main, ["train", "rpn", "--data", str(tmp_path), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 1 and "no images of split 'train'" in result.output and result.output.count("\n") == 1


def test_help_lists_models_and_has_an_example() -> None:
    runner = CliRunner()
    text = runner.invoke(main, ["train", "--help"]).output
    assert "Example:" in text and "engine train rpn --data" in text and "rpn, " in text
    assert "Example:" in runner.invoke(main, ["models", "--help"]).output


def test_models_lists_the_shipped_rpn() -> None:
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)["checkpoints"]}
    assert rows["rpn"]["model"] == "rpn" and len(rows["rpn"]["sha256"]) == 64
    assert rows["rpn"]["key_metrics"]["test_regions@100"] >= 0.85  # pooled over both worlds (each world's own: test_checkpoint)
    table = CliRunner().invoke(main, ["models"]).output
    assert "rpn" in table and rows["rpn"]["sha256"][:12] in table


def test_train_rpn_on_two_datasets_reports_each(split_corpus: Path, tmp_path: Path) -> None:
    """Two --data folders train one network; the manifest has the pooled test recall and each dataset's own."""
    from engine.synth import SynthConfig, generate_corpus

    other = tmp_path / "other"
    generate_corpus(other, SynthConfig(images=12, size=160, seed=7))
    out = tmp_path / "rpn.pt"
    args = ["train", "rpn", "--data", str(split_corpus), "--data", str(other), "--out", str(out), "--epochs", "1", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["command"] == f"engine train rpn --data {split_corpus} --data {other} --out {out} --epochs 1 --seed 0 --device cpu"
    assert manifest["data"] == f"{split_corpus.resolve()}, {other.resolve()}"
    metrics = manifest["metrics"]
    per = {name: metrics[f"{name}/test_images"] for name in (split_corpus.name, other.name) if f"{name}/test_images" in metrics}
    assert per and sum(per.values()) == metrics["test_images"]
    for name in per:
        assert 0 <= metrics[f"{name}/test_objects@100"] <= 1


def test_several_datasets_need_each_to_be_a_dataset(split_corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    result = CliRunner().invoke(main, ["train", "grn", "--data", str(split_corpus), "--data", str(other), "--epochs", "1", "--quiet"])
    assert result.exit_code != 0
    assert "annotations.jsonl does not exist" in result.output and "Traceback" not in result.output
