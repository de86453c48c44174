"""Checkpoints: a small ``NAME.pt`` (weights and whatever the model needs to rebuild, e.g. a vocabulary)
plus ``NAME.json``, its manifest (model name and version, config, training command, data, seed,
validation metrics, sha256 of the ``.pt``).

The default checkpoints ship inside the package (``engine/checkpoints/``) so a fresh install works offline.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Manifest",
    "PACKAGE_CHECKPOINTS",
    "save_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "installed_checkpoints",
    "default_checkpoint",
    "checkpoint_path",
    "load_text_model",
    "text_model_payload",
    "with_word_features",
]

PACKAGE_CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
_FORMAT = 1


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint is and how it was made. ``sha256`` is the digest of the ``.pt`` file."""

    model: str
    version: str
    config: dict[str, Any]
    command: str
    data: str
    seed: int
    metrics: dict[str, Any]
    sha256: str = ""
    created: str = ""
    size_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def save_checkpoint(path: Path, manifest: Manifest, payload: dict[str, Any]) -> Manifest:
    """Write ``payload`` (tensors, plain Python data) to ``path`` and its manifest beside it, atomically.

    Returns the manifest with ``sha256``, ``size_bytes`` and ``created`` filled in.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": _FORMAT, "model": manifest.model, "version": manifest.version, "payload": payload}, buffer)
    data = buffer.getvalue()
    final = Manifest(
        **{**asdict(manifest), "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data), "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    )
    _atomic_write(path, data)
    _atomic_write(_manifest_path(path), (json.dumps(final.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    return final


def read_manifest(path: Path) -> Manifest:
    """The manifest of checkpoint ``path`` (``NAME.pt`` or ``NAME.json``)."""
    mpath = _manifest_path(Path(path))
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint manifest {mpath} does not exist; a checkpoint is NAME.pt with NAME.json beside it, written by `engine train`")
    try:
        raw = json.loads(mpath.read_text())
        return Manifest(**raw)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {mpath} is malformed ({exc}); retrain with `engine train` or restore the file") from None


def load_checkpoint(path: Path, *, expected_model: str | tuple[str, ...] | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Load and verify a checkpoint: the file exists, its sha256 matches the manifest, the model name fits.

    Raises :class:`CheckpointError` naming the problem and the fix.
    """
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `engine train` or pass an existing file")
    manifest = read_manifest(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise CheckpointError(f"checkpoint {path} is corrupt: its sha256 {digest[:12]}… does not match the manifest's {manifest.sha256[:12]}…; retrain or restore it")
    allowed = (expected_model,) if isinstance(expected_model, str) else expected_model
    if allowed is not None and manifest.model not in allowed:
        raise CheckpointError(f"checkpoint {path} holds a {manifest.model!r} model, but a {' or '.join(map(repr, allowed))} model is needed here")
    import torch  # here, not at the top: reading manifests (`engine models`) needs no torch

    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged pickles
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc}); retrain or restore it") from None
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT or blob.get("model") != manifest.model:
        raise CheckpointError(f"checkpoint {path} is not in this engine's format (format {_FORMAT}, model {manifest.model!r}); retrain it with `engine train`")
    flush_subnormals(blob["payload"])
    return manifest, blob["payload"]


def flush_subnormals(payload: Any) -> int:
    """Set every subnormal value of the floating-point tensors in ``payload`` (nested dicts, lists and
    tuples) to zero, in place; returns how many were set.

    Weight decay leaves dead units' weights at 1e-39 … 1e-44 (the shipped Ref-NMS checkpoints: 39–47 %
    of the 3×3 head's weights), and a CPU multiplies subnormal numbers through a slow microcode path:
    the Ref-NMS head took 95 ms for 100 regions with them and 6 ms without, identical outputs (the
    values are below 1.2e-38). The file and its sha256, hence the model's version, are unchanged.
    """
    import torch

    if isinstance(payload, torch.Tensor):
        if not payload.is_floating_point():
            return 0
        subnormal = (payload.abs() < torch.finfo(payload.dtype).tiny) & (payload != 0)
        count = int(subnormal.sum())
        if count:
            payload.masked_fill_(subnormal, 0.0)
        return count
    if isinstance(payload, dict):
        return sum(flush_subnormals(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(flush_subnormals(v) for v in payload)
    return 0


def installed_checkpoints(directory: Path = PACKAGE_CHECKPOINTS) -> list[tuple[Path, Manifest]]:
    """The checkpoints in ``directory`` (the package's by default), by file name: each ``NAME.pt`` with
    its ``NAME.json`` (other JSON files there, such as stage 3's fitted weights, are not checkpoints)."""
    if not directory.is_dir():
        return []
    return [(p, read_manifest(p)) for p in sorted(directory.glob("*.pt"))]


def default_checkpoint(name: str) -> Path:
    """Path of the shipped checkpoint ``name`` (e.g. ``"rpn"``, ``"grn"``); a clear error when it is missing."""
    path = PACKAGE_CHECKPOINTS / f"{name}.pt"
    if not path.is_file():
        raise CheckpointError(
            f"the default {name!r} checkpoint {path} is missing from this install; reinstall the package or train one with `engine train {name}` and pass it explicitly"
        )
    return path


def checkpoint_path(spec: Path | str | None, *, default: str) -> Path:
    """A checkpoint file from ``spec``: ``None`` is the shipped ``default``; a bare name (no ``/``, not
    ending in ``.pt``) an installed checkpoint (a clear error listing the installed names when it is
    not installed); else a file path. The one resolver is :func:`engine.models.registry.resolve_checkpoint`."""
    from engine.models.registry import resolve_checkpoint

    return resolve_checkpoint(spec, default=default)


def load_text_model(spec: Path | str | None, *, default: str, expected_model: str, config_cls: Any, net_cls: Any, retrain: str, device: Any = "cpu") -> tuple[Manifest, Any, Any, Path]:
    """Load a model saved by :func:`text_model_payload`: ``(manifest, words, network, path)``.

    ``words`` is the model's text encoding (:mod:`engine.models.word_features`: a vocabulary, or MiniLM run
    on ``device``). ``config_cls(**payload["config"])`` and ``net_cls(config, vocab_size=...)`` rebuild the
    network; a checkpoint written before MiniLM (no ``word_features`` in its config) reads its vocabulary.
    A payload that does not fit is a :class:`CheckpointError` naming the retraining command ``retrain``.
    """
    from engine.errors import InvalidInputError
    from engine.models.word_features import words_from_payload

    path = checkpoint_path(spec, default=default)
    manifest, payload = load_checkpoint(path, expected_model=expected_model)
    try:
        words = words_from_payload(payload["vocab"], device=device)
        net = net_cls(config_cls(**with_word_features(config_cls, payload["config"])), vocab_size=len(words))
        net.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, InvalidInputError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this engine's {expected_model} ({type(exc).__name__}: {exc}); retrain it with `{retrain}`") from None
    return manifest, words, net, path


def with_word_features(config_cls: Any, config: dict[str, Any]) -> dict[str, Any]:
    """A stored config with ``word_features="vocab"`` filled in when it predates MiniLM (and the class has the field)."""
    fields = getattr(config_cls, "__dataclass_fields__", {})
    if "word_features" in fields and "word_features" not in config:
        return {**config, "word_features": "vocab"}
    return dict(config)


def text_model_payload(config: Any, words: Any, net: "torch.nn.Module") -> dict[str, Any]:
    """What :func:`load_text_model` reads: the config (``to_dict()``), the text encoding (a vocabulary's words, or
    MiniLM's name) and the weights."""
    from engine.models.word_features import words_payload

    return {"config": config.to_dict(), "vocab": words_payload(words), "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}


def _manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are shared read-only files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
