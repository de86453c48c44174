"""The model registry: every model family by name, and one way to load a checkpoint (timm's ``_registry`` style).

A *family* is one model class and its checkpoints' manifest name (``"grn-family"``, ``"rpn"``, …); each
family has the names ``engine train`` accepts (``grn``, ``grn-fc``, …: one checkpoint each) and a
default checkpoint. :func:`load_model` takes a shipped name (``engine/checkpoints/NAME.pt`` with its
``NAME.json`` manifest) or a path, reads the manifest, and builds the family's class through its
``from_checkpoint`` on the resolved device::

    from engine.models.registry import load_model
    grn = load_model("grn-fc", device="auto")                    # a RegionRetrievalModel
    rpn = load_model(None, family="rpn", device="cpu")           # the shipped RPN
    scorer = load_model(Path("runs/cm-att.pt"), family="cm-att")  # a file, checked to be CM-Att

This module imports no torch until a model is loaded, so listing names stays cheap (``engine --help``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import CheckpointError, InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = ["FAMILIES", "ModelFamily", "family", "family_of_name", "known_checkpoints", "load_model", "model_names", "resolve_checkpoint"]


@dataclass(frozen=True)
class ModelFamily:
    """One model class: ``name`` is its checkpoints' manifest ``model``; ``loader`` the class as
    ``"module:Class"`` (imported when a model is loaded); ``names`` the checkpoints ``engine train``
    makes (each an installable name); ``default`` the shipped checkpoint used when none is named."""

    name: str
    loader: str
    names: tuple[str, ...]
    default: str

    def model_class(self) -> Any:
        """The family's class (its module imported now)."""
        module, _, attr = self.loader.partition(":")
        return getattr(importlib.import_module(module), attr)


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("rpn", "engine.models.rpn:ProposalNetwork", ("rpn",), "rpn"),
    ModelFamily(
        "grn-family",
        "engine.models.retrieval:RegionRetrievalModel",
        ("visual", "vl-lstm", "vl-concat", "grn-no-residual", "grn", "grn-lstm", "grn-visual-residual", "grn-fc"),
        "grn",
    ),
    ModelFamily("saliency", "engine.models.saliency:SaliencyNet", ("saliency",), "saliency"),
    ModelFamily("san", "engine.models.san:SANModel", ("san", "san-gv+gt", "san-sv+gt", "san-fv+gt", "san-fv+it"), "san"),
    ModelFamily("mcb-attention", "engine.models.mcb:GroundingModel", ("mcb", "mcb-no-sparsity"), "mcb"),
    ModelFamily("ref-nms", "engine.models.ref_nms:RefNMSModel", ("ref-nms-b", "ref-nms-r"), "ref-nms-r"),
    ModelFamily("cm-att", "engine.models.cm_att:GroundingScorer", ("cm-att", "cm-att-erase", "cm-att-erase-region"), "cm-att-erase"),
    ModelFamily("key-whitening", "engine.models.key_whitening:KeyWhitening", ("key-whitening",), "key-whitening"),
    ModelFamily("text-projection", "engine.models.text_projection:TextProjection", ("text-projection",), "text-projection"),
    ModelFamily("instance-head", "engine.models.instance_head:InstanceHead", ("instance-head",), "instance-head"),
)
"""Every model family, in the order ``engine train`` lists them."""

_BY_FAMILY = {f.name: f for f in FAMILIES}
_BY_NAME = {n: f for f in FAMILIES for n in f.names}


def model_names() -> tuple[str, ...]:
    """Every name ``engine train`` accepts (one checkpoint each), family by family."""
    return tuple(n for f in FAMILIES for n in f.names)


def family(name: str) -> ModelFamily:
    """The family whose manifest name is ``name`` (``"grn-family"``, ``"rpn"``, …); a clear error listing them."""
    found = _BY_FAMILY.get(name)
    if found is None:
        raise CheckpointError(f"model family {name!r} is not known; the known families are {', '.join(_BY_FAMILY)}")
    return found


def family_of_name(name: str) -> ModelFamily:
    """The family that trains checkpoint ``name`` (``"grn-fc"`` → the GRN family); a clear error listing the names."""
    found = _BY_NAME.get(name)
    if found is None:
        raise InvalidInputError(f"model {name!r} is not known; choose one of {', '.join(model_names())}")
    return found


def known_checkpoints(directory: Path | None = None) -> tuple[str, ...]:
    """The names of the checkpoints installed in ``directory`` (the package's by default): each ``NAME.pt`` with its ``NAME.json``."""
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS

    root = PACKAGE_CHECKPOINTS if directory is None else Path(directory)
    return tuple(sorted(p.stem for p in root.glob("*.pt") if p.with_suffix(".json").is_file())) if root.is_dir() else ()


def resolve_checkpoint(name_or_path: Path | str | None, *, default: str | None = None) -> Path:
    """The checkpoint file of ``name_or_path``.

    ``None`` is ``default`` (a shipped name); a bare name (a ``str`` with no ``/`` that does not end in
    ``.pt``) is a shipped checkpoint, a clear :class:`CheckpointError` listing the installed names when
    it is not installed; anything else is a file path (checked when it is loaded).
    """
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS

    if name_or_path is None:
        if default is None:
            raise CheckpointError("no checkpoint given; pass an installed name or a .pt file")
        name_or_path = default
    text = str(name_or_path)
    if isinstance(name_or_path, str) and "/" not in text and not text.endswith((".pt", ".json")):
        path = PACKAGE_CHECKPOINTS / f"{text}.pt"
        if not path.is_file():
            known = ", ".join(known_checkpoints()) or "none"
            hint = f"train it with `engine train {text}` and pass the file" if text in _BY_NAME else "pass a .pt file or one of those names"
            raise CheckpointError(f"no installed checkpoint is named {text!r} (installed in {PACKAGE_CHECKPOINTS}: {known}); {hint}")
        return path
    return Path(name_or_path)


def load_model(name_or_path: Path | str | None, *, device: "str | torch.device" = "cpu", family: str | None = None) -> Any:
    """Load the checkpoint ``name_or_path`` (a shipped name or a path; ``None``: ``family``'s default) on ``device``.

    The manifest's ``model`` picks the class; with ``family`` given, a checkpoint of another family
    is a :class:`CheckpointError` naming both. ``device`` is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or
    a :class:`torch.device` (resolved by :func:`engine.device.resolve_device`: a missing CUDA device is
    an error, never a silent CPU run).
    """
    from engine.device import resolve_device
    from engine.models.checkpoint import read_manifest

    wanted = _family_named(family) if family is not None else None
    path = resolve_checkpoint(name_or_path, default=wanted.default if wanted is not None else None)
    if path.suffix == ".json":
        path = path.with_suffix(".pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing .pt file or an installed name ({', '.join(known_checkpoints()) or 'none installed'})")
    manifest = read_manifest(path)
    found = _BY_FAMILY.get(manifest.model)
    if found is None:
        raise CheckpointError(f"checkpoint {path} holds a {manifest.model!r} model, which this engine cannot load; the known families are {', '.join(_BY_FAMILY)}")
    if wanted is not None and found is not wanted:
        raise CheckpointError(f"checkpoint {path} holds a {found.name!r} model, but a {wanted.name!r} model is needed here (e.g. {', '.join(wanted.names)})")
    target = resolve_device(device) if isinstance(device, str) else device
    return found.model_class().from_checkpoint(path, device=target)


def _family_named(name: str) -> ModelFamily:
    found = _BY_FAMILY.get(name)
    if found is None:
        raise InvalidInputError(f"model family {name!r} is not known; choose one of {', '.join(_BY_FAMILY)}")
    return found
