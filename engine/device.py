"""Explicit device choice: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; what ``auto`` picks is logged."""
from __future__ import annotations

import logging
import re

import torch

from engine.errors import InvalidInputError

__all__ = ["DEVICE_CHOICES", "resolve_device"]

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
"""What ``--device`` accepts (``N`` is a CUDA device index)."""

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def resolve_device(name: str) -> torch.device:
    """Turn a ``--device`` value into a :class:`torch.device`.

    ``auto`` chooses ``cuda`` when a CUDA device is available and ``cpu`` otherwise, and logs its
    choice. ``cuda`` or ``cuda:N`` without such a device raises :class:`InvalidInputError`; nothing
    falls back silently.
    """
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
            log.info("--device auto chose cuda (%s)", torch.cuda.get_device_name(0))
        else:
            device = torch.device("cpu")
            log.info("--device auto chose cpu (no CUDA device is available)")
        return device
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or _CUDA_INDEX.fullmatch(text):
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {text} requested but no CUDA device is available; use --device cpu or auto")
        if text != "cuda":
            index = int(text.split(":", 1)[1])
            count = torch.cuda.device_count()
            if index >= count:
                raise InvalidInputError(
                    f"--device {text} requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1}); "
                    "use one of those, cuda, or auto"
                )
        return torch.device(text)
    raise InvalidInputError(f"--device {name!r} is not known; choose one of {', '.join(DEVICE_CHOICES)}")
