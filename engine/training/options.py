"""Options every ``engine train MODEL`` shares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import InvalidInputError

if TYPE_CHECKING:
    from engine.datasets.types import Dataset
    from engine.models.checkpoint import Manifest

__all__ = ["TrainOptions", "read_splits"]


@dataclass(frozen=True)
class TrainOptions:
    """Where the data is, where the checkpoint goes, and how long and how reproducibly to train.

    ``epochs=None`` means the model's own default. ``command`` is the command line recorded in the manifest.
    ``text_encoder``: where a text model's word features come from (:mod:`engine.models.word_features`):
    ``minilm`` (the frozen English encoder, the default) or ``vocab`` (words of the training text, the ablation).
    ``extra_data`` are more dataset folders trained on together with ``data`` (``engine train rpn --data A
    --data B``: the proposal network learns both worlds); the other trainers read ``data`` only and refuse them.
    ``init``: a checkpoint to start from (``engine train rpn --init rpn.pt``: its first stage is kept and only the
    box head trains); the other trainers refuse it.
    """

    data: Path
    out: Path | None = None
    epochs: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    command: str = ""
    cache_dir: Path | None = None
    extra_data: tuple[Path, ...] = ()
    text_encoder: str = "minilm"
    init: Path | None = None

    def __post_init__(self) -> None:
        from engine.models.word_features import check_kind

        check_kind(self.text_encoder)
        if self.epochs is not None and self.epochs <= 0:
            raise InvalidInputError(f"--epochs must be a positive integer, got {self.epochs}")
        for folder in self.datasets:
            if not Path(folder).is_dir():
                raise InvalidInputError(f"--data {folder} is not a folder; pass a dataset folder (e.g. made by `engine synth`)")
        if self.init is not None and not Path(self.init).is_file():
            raise InvalidInputError(f"--init {self.init} is not a file; pass an existing checkpoint")
        names = [Path(d).resolve().name for d in self.datasets]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"--data folders need distinct names (got {', '.join(names)}): each names its dataset in the manifest")

    def recorded_command(self, model: str) -> str:
        """The command line a manifest records: ``command`` when given, else the ``engine train`` call these options make."""
        return self.command or " ".join([f"engine train {model}", *(f"--data {d}" for d in self.datasets), f"--seed {self.seed}"])

    def recorded_data(self) -> str:
        """The dataset folders a manifest records (absolute, comma-separated)."""
        return ", ".join(str(Path(d).resolve()) for d in self.datasets)

    def manifest(self, model: str, version: str, family: str, *, config: dict, metrics: dict, extra: dict) -> "Manifest":
        """The manifest of a model trained with these options: what it is (``model``, ``version``, ``config``),
        how it was made (the ``engine train family`` command, the data folders, the seed) and what it measured."""
        from engine.models.checkpoint import Manifest

        return Manifest(model=model, version=version, config=config, command=self.recorded_command(family), data=self.recorded_data(), seed=self.seed, metrics=metrics, extra=extra)

    @property
    def datasets(self) -> tuple[Path, ...]:
        """Every dataset folder: ``data`` first, then ``extra_data``."""
        return (Path(self.data), *(Path(d) for d in self.extra_data))


def read_splits(data: Path) -> tuple["Dataset", "Dataset", "Dataset", "Dataset"]:
    """The dataset in ``data`` and its train, val and test splits; a clear error when the train split is empty."""
    from engine.datasets.annotations import read_dataset

    dataset = read_dataset(Path(data))
    train, val, test = (dataset.split(s) for s in ("train", "val", "test"))
    if not train.images:
        raise InvalidInputError(f"{data} has no images in the train split; generate a corpus with splits (`engine synth`)")
    return dataset, train, val, test
