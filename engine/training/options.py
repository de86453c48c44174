"""Options every ``engine train MODEL`` shares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidInputError

__all__ = ["TrainOptions"]


@dataclass(frozen=True)
class TrainOptions:
    """Where the data is, where the checkpoint goes, and how long and how reproducibly to train.

    ``epochs=None`` means the model's own default. ``command`` is the command line recorded in the manifest.
    """

    data: Path
    out: Path | None = None
    epochs: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    command: str = ""
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs <= 0:
            raise InvalidInputError(f"--epochs must be a positive integer, got {self.epochs}")
        if not Path(self.data).is_dir():
            raise InvalidInputError(f"--data {self.data} is not a folder; pass a dataset folder (e.g. made by `engine synth`)")
