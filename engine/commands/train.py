"""``engine train MODEL``: train a head on a dataset's cached backbone maps and write its checkpoint."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click

from engine.commands.options import device_option, format_option

__all__ = ["train_command", "model_names"]


def model_names() -> tuple[str, ...]:
    """Every trainable name, from the model registry (:func:`engine.models.registry.model_names`): ``rpn``,
    the GRN family's methods, ``saliency`` and SAN's (``san`` and its ablations), MCB's weakly supervised
    attention, Ref-NMS and CM-Att grounding."""
    from engine.models.registry import model_names as registered

    return registered()


class _ModelChoice(click.Choice):
    """A ``click.Choice`` whose names are read only when needed, so that ``engine --help`` does not import torch."""

    def __init__(self) -> None:
        super().__init__((), case_sensitive=True)

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return model_names()

    @choices.setter
    def choices(self, value: Any) -> None:  # click.Choice.__init__ assigns it
        pass


class _TrainCommand(click.Command):
    """Lists the trainable models after the options (read lazily, like :class:`_ModelChoice`)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        with formatter.section("Models"):
            formatter.write_text("\b\n" + ", ".join(model_names()))


@click.command("train", cls=_TrainCommand)
@click.argument("model", type=_ModelChoice(), metavar="MODEL")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), required=True, multiple=True, help="Dataset folder with annotations.jsonl (train/val/test split per image), e.g. made by `engine synth`. Give it more than once to learn several worlds together: rpn, key-whitening, text-projection and instance-head read each folder; any other model trains on their union (made once in the data cache).")
@format_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint file to write (its manifest goes beside it as .json); default MODEL.pt in the working directory.")
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs (default: the model's own; for rpn, the epochs of each of its two stages).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of every random choice; the same seed and data give the same checkpoint on the same machine.")
@click.option("--text-encoder", type=click.Choice(["minilm", "vocab"]), default="minilm", show_default=True, help="Where a text model's word features come from: the frozen English encoder all-MiniLM-L6-v2 (every English word), or `vocab`, the words of the training text (the first wave's, an ablation). Only for models that read words (the GRN family, SAN, MCB, Ref-NMS, CM-Att); for any other it is an error.")
@click.option("--init", type=click.Path(dir_okay=False, path_type=Path), help="rpn only: start from this RPN checkpoint; its first stage (neck and anchor head) is kept as it is and only the box head that refines its proposals trains.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_command(model: str, data: tuple[Path, ...], data_format: str, out: Path | None, epochs: int | None, seed: int, text_encoder: str, init: Path | None, device: str, quiet: bool) -> None:
    """Train MODEL on DATA's cached backbone maps and write a checkpoint with its manifest.

    MODEL is a name of the model registry (all are listed under Models
    below): `rpn`, a GRN-family method (grn, grn-fc, vl-concat, …), `saliency`,
    `san` and its ablations, `mcb`, `ref-nms-b`/`-r`, `cm-att`, `cm-att-erase`,
    `key-whitening` (the visual key's learned whitening: PCA, then matching pairs;
    closed form),
    `text-projection` (English into the visual key, for text-only search),
    `instance-head` (the region instance embedding of region-only queries' stage 2).
    The best epoch by the validation split's metric is kept; the test split's
    metrics go into the manifest. --device cuda trains on the GPU (an error
    when there is none).

    \b
    Example:
      engine synth data/synth --images 1500 --seed 1
      engine train rpn --data data/synth --out rpn.pt --seed 0
      engine train rpn --data data/synth --data data/stamps --out rpn.pt
      engine train rpn --data data/synth --data data/stamps --init rpn.pt --out rpn2.pt
      engine train key-whitening --data data/synth --data data/stamps
      engine train grn --data data/synth --epochs 5
      engine train text-projection --format vg --data ~/data/visual-genome
    """
    from engine.datasets.formats import prepare_dataset
    from engine.training.options import TrainOptions
    from engine.training.registry import train_model, trains_on_several

    folders = tuple(prepare_dataset(d, data_format) for d in data)  # other formats: converted once into the data cache
    if len(folders) > 1 and not trains_on_several(model):
        from engine.datasets.formats import union_datasets

        folders = (union_datasets(folders),)  # a one-dataset trainer learns every world from their union
    options = TrainOptions(
        data=folders[0],
        extra_data=tuple(folders[1:]),
        out=out if out is not None else Path(f"{model}.pt"),
        epochs=epochs,
        seed=seed,
        device=device,
        progress=not quiet,
        command=_command_line(model, data, out, epochs, seed, device, data_format, text_encoder, init),
        text_encoder=text_encoder,
        init=init,
    )
    started = time.perf_counter()
    manifest = train_model(model, options)
    click.echo(_summary(options.out, manifest, time.perf_counter() - started))


def _command_line(model: str, data: tuple[Path, ...], out: Path | None, epochs: int | None, seed: int, device: str, data_format: str = "engine", text_encoder: str = "minilm", init: Path | None = None) -> str:
    """The reproducing command line recorded in the manifest (progress flags left out)."""
    parts = ["engine", "train", model]
    if data_format != "engine":
        parts += ["--format", data_format]
    for folder in data:
        parts += ["--data", str(folder)]
    if out is not None:
        parts += ["--out", str(out)]
    if epochs is not None:
        parts += ["--epochs", str(epochs)]
    parts += ["--seed", str(seed)]
    if text_encoder != "minilm":
        parts += ["--text-encoder", text_encoder]
    if init is not None:
        parts += ["--init", str(init)]
    if device != "auto":
        parts += ["--device", device]
    return shlex.join(parts)


def _summary(path: Path | None, manifest: Any, seconds: float) -> str:
    from engine.commands.models import flat_metrics

    metrics = flat_metrics(manifest.metrics or {})
    best = metrics.pop("best_epoch", None)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("val_"))
    epoch = f", best epoch {best:g}" if best is not None else ""
    return (
        f"wrote {path} ({manifest.size_bytes / 1e6:.2f} MB, sha256 {manifest.sha256[:12]}){epoch}"
        f"{': ' + shown if shown else ''}; {seconds:.0f} s"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_command())
