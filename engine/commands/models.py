"""``engine models``: the checkpoints installed with the package, with their manifests' key facts."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

__all__ = ["models_command", "flat_metrics", "key_metrics"]

_KEY_PATTERNS = ("@100", "R@10", "R@1")


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of a manifest, nested dicts flattened to ``outer.inner`` (lists such as the history left out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            for inner, v in flat_metrics(value).items():
                out[f"{key}.{inner}"] = v
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def key_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A few headline metrics: the best epoch, validation metrics and the test metrics at 100 proposals / R@1 / R@10."""
    flat = flat_metrics(metrics)
    return {
        k: v
        for k, v in flat.items()
        if k in ("best_epoch", "test_gt_acc") or k.startswith(("val_", "val.")) or (k.startswith("test_") and any(k.endswith(p) for p in _KEY_PATTERNS))
    }


def _describe(path: Path, manifest: Any) -> dict[str, Any]:
    from engine.models.registry import FAMILIES

    loader = next((f.loader for f in FAMILIES if f.name == manifest.model), None)
    return {
        "name": path.stem,
        "path": str(path),
        "model": manifest.model,
        "class": loader,
        "version": manifest.version,
        "size_bytes": manifest.size_bytes,
        "sha256": manifest.sha256,
        "created": manifest.created,
        "command": manifest.command,
        "seed": manifest.seed,
        "key_metrics": key_metrics(manifest.metrics or {}),
        "metrics": manifest.metrics,
    }


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def models_command(as_json: bool) -> None:
    """List the trained checkpoints installed with the engine (engine/checkpoints/).

    For each: name, model, version, size, key metrics from its manifest and the
    first 12 hex digits of its sha256. `--json` adds the full metrics, the
    command that trained it and the class that loads it (the model registry,
    engine/models/registry.py). Any NAME listed here loads with
    `load_model(NAME)` and works wherever a command takes a model name.

    \b
    Example:
      engine models
      engine models --json
    """
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS, read_manifest
    from engine.models.registry import known_checkpoints, resolve_checkpoint

    rows = [_describe(path, read_manifest(path)) for path in map(resolve_checkpoint, known_checkpoints())]
    if as_json:
        click.echo(json.dumps({"directory": str(PACKAGE_CHECKPOINTS), "checkpoints": rows}, default=str))
        return
    if not rows:
        click.echo(f"no checkpoints installed in {PACKAGE_CHECKPOINTS}; train one with `engine train MODEL --out {PACKAGE_CHECKPOINTS}/MODEL.pt`")
        return
    click.echo(f"{'name':<22} {'model':<10} {'version':<18} {'size':>9}  {'sha256':<12}  key metrics")
    for row in rows:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in row["key_metrics"].items())
        click.echo(f"{row['name']:<22} {row['model']:<10} {row['version']:<18} {row['size_bytes'] / 1e6:>7.2f}MB  {row['sha256'][:12]:<12}  {shown}")
