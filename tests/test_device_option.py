"""``--device`` is defined once, appears on every command that loads a model, and is honoured: every
trainer puts its model (and batches) on the resolved device; ``--device cuda`` without CUDA is a clear
one-line error, never a silent CPU run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner

from engine.cli import main
from engine.commands.options import DeviceType

NO_MODEL = {"info", "models", "remove", "compact", "synth", "data fetch", "shards list", "shards add"}
"""Commands that load no model (and so take no --device)."""

@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, also where one is present (the error is what these tests check)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    out = []
    for name in group.list_commands(click.Context(group)):
        cmd = group.get_command(click.Context(group), name)
        if isinstance(cmd, click.Group):
            out += _leaf_commands(cmd, (*prefix, name))
        else:
            out.append((" ".join((*prefix, name)), cmd))
    return out


def test_every_command_that_loads_a_model_takes_the_one_device_option() -> None:
    commands = _leaf_commands(main)
    assert {"train", "eval attention", "eval matching", "eval grounding", "eval proposals", "bench", "query", "index"} <= {n for n, _ in commands}
    missing, other = [], []
    for name, cmd in commands:
        options = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
        if name in NO_MODEL:
            assert "device" not in options, f"`engine {name}` loads no model but takes --device"
            continue
        if "device" not in options:
            missing.append(name)
        elif not isinstance(options["device"].type, DeviceType) or options["device"].default != "auto":
            other.append(name)
    assert not missing, f"commands that load a model without --device: {missing}"
    assert not other, f"commands whose --device is not engine.commands.options.device_option: {other}"


def test_device_type_accepts_the_documented_values_and_rejects_others() -> None:
    kind = DeviceType()
    assert kind.convert("auto", None, None) == "auto"
    assert kind.convert("CPU", None, None) == "cpu"
    with pytest.raises(click.BadParameter, match="choose auto, cpu, cuda or cuda:N"):
        kind.convert("gpu", None, None)


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize(
    "args",
    [
        ["train", "grn", "--epochs", "1"],
        ["train", "rpn"],
        ["eval", "rpn"],
        ["eval", "matching"],
        ["eval", "attention"],
        ["eval", "grounding"],
    ],
    ids=lambda a: " ".join(a),
)
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_one_line_error(args: list[str], device: str, split_corpus: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [*args, "--data", str(split_corpus), "--device", device])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "no CUDA device is available" in errors[0] and "--device cpu" in errors[0], result.output
    assert not list(tmp_path.iterdir()) and not (split_corpus / ".engine-cache").exists()  # nothing ran


@pytest.mark.usefixtures("no_cuda")
def test_load_model_refuses_cuda_without_cuda() -> None:
    from engine.errors import InvalidInputError
    from engine.models.registry import load_model

    with pytest.raises(InvalidInputError, match="no CUDA device is available"):
        load_model("rpn", device="cuda")


# --------------------------------------------------------------------------- each trainer honours the device


class _Stop(Exception):
    """Raised by the stand-in ``fit`` once it has seen the model."""


TRAINERS = ["rpn", "grn", "saliency", "san", "mcb", "ref-nms-b", "cm-att"]


@pytest.fixture(scope="module")
def train_corpus(grn_corpus: Path) -> Path:
    """The session's GRN corpus: queries answerable in other images (what GRN validation needs); one feature
    cache for all trainers."""
    return grn_corpus


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINERS)
def test_each_trainer_puts_its_model_on_the_resolved_device(name: str, train_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer resolves ``options.device`` and hands ``fit`` its model on that device and the device
    itself (``fit`` then moves every batch there). Before the fix six of seven trainers ignored it."""
    import importlib

    from engine.models.registry import family_of_name
    from engine.training.options import TrainOptions
    from engine.training.registry import train_model

    module = importlib.import_module(f"engine.training.{ {'rpn': 'rpn', 'grn-family': 'grn', 'saliency': 'saliency', 'san': 'san', 'mcb-attention': 'mcb', 'ref-nms': 'ref_nms', 'cm-att': 'cm_att'}[family_of_name(name).name] }")
    asked: list[str] = []
    seen: dict[str, Any] = {}

    def resolve(value: str) -> torch.device:
        asked.append(value)
        return torch.device("cpu")

    def fake_fit(model: torch.nn.Module, **kwargs: Any) -> None:
        seen["device"] = kwargs.get("device")
        seen["params"] = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
        raise _Stop

    monkeypatch.setattr(module, "resolve_device", resolve)
    monkeypatch.setattr(module, "fit", fake_fit)
    options = TrainOptions(data=train_corpus, out=tmp_path / f"{name}.pt", epochs=1, device="cpu", progress=False, cache_dir=train_corpus.parent / "cache")
    with pytest.raises(_Stop):
        train_model(name, options)
    assert asked == ["cpu"]
    assert seen["device"] == torch.device("cpu")
    assert seen["params"] == {torch.device("cpu")}


def test_fit_moves_the_model_and_every_batch_to_its_device() -> None:
    from engine.training.loop import fit, to_device

    net = torch.nn.Linear(2, 1)
    devices: list[torch.device] = []

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        devices.extend([batch["x"].device, batch["pair"][0].device])
        return model(batch["x"]).pow(2).mean()

    batch = {"x": torch.ones(3, 2), "pair": (torch.zeros(1), 5), "name": "b"}
    fit(net, batches=lambda e: [batch], loss_fn=loss_fn, validate=lambda m: {"m": 1.0}, metric="m", epochs=1, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), progress=False, device=torch.device("cpu"))
    assert devices == [torch.device("cpu")] * 2
    moved = to_device(batch, torch.device("cpu"))
    assert moved["name"] == "b" and moved["pair"][1] == 5 and isinstance(moved["pair"], tuple)
