"""A small training loop shared by every head: epochs with a progress bar showing the loss, a validation
metric per epoch, and the best epoch's weights kept."""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

__all__ = ["FitResult", "fit", "to_device"]

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """The best epoch (by ``metric``, higher is better), its validation metrics, and every epoch's record."""

    best_epoch: int
    best_metrics: dict[str, float]
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    model: nn.Module,
    *,
    batches: Callable[[int], Iterable[Any]],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    validate: Callable[[nn.Module], dict[str, float]],
    metric: str,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    progress: bool = True,
    desc: str = "train",
    device: torch.device | None = None,
) -> FitResult:
    """Train ``model`` for ``epochs``; after each epoch run ``validate`` and keep the weights of the best one.

    Args:
        batches: ``batches(epoch)`` yields the epoch's batches (the caller shuffles with its own seeded RNG).
        loss_fn: ``loss_fn(model, batch)`` returns a scalar loss.
        validate: ``validate(model)`` returns metrics (model in eval mode, no grad); ``metric`` picks the best.
        device: where to train: ``model`` is moved there and every batch's tensors with it
            (:func:`to_device`); ``None`` leaves both where they are.
    """
    if device is not None:
        model.to(device)
    best: FitResult | None = None
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        items = list(batches(epoch))
        with tqdm(items, desc=f"{desc} {epoch}/{epochs}", unit="batch", disable=not progress, dynamic_ncols=True) as bar:
            for batch in bar:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch if device is None else to_device(batch, device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch}; lower the learning rate")
                loss.backward()
                optimizer.step()
                total += float(loss.item())
                count += 1
                bar.set_postfix(loss=f"{total / count:.4f}")
        if scheduler is not None:
            scheduler.step()
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in validate(model).items()}
        record = {"epoch": epoch, "loss": total / max(count, 1), **metrics}
        history.append(record)
        log.info("%s epoch %d: %s", desc, epoch, ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        value = metrics.get(metric, -math.inf)
        if best is None or value > best.best_metrics.get(metric, -math.inf):
            best = FitResult(best_epoch=epoch, best_metrics=metrics, best_state=copy.deepcopy(model.state_dict()))
    assert best is not None  # epochs >= 1
    best.history = history
    model.load_state_dict(best.best_state)
    return best


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in dicts, lists and tuples) moved to ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ``lr · ½(1 + cos(π · e / epochs))`` after epoch ``e`` (stepped once per epoch by :func:`fit`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))


def epoch_rngs(seed: int, epochs: int) -> list[np.random.Generator]:
    """One independent, seeded random generator per epoch (epoch ``e`` uses item ``e - 1``)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(epochs)]
