"""Click options shared by several ``engine`` commands (each defined once, here)."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import click

from engine.datasets.formats import DATA_FORMATS  # light: no torch, no readers

__all__ = ["DeviceType", "device_option", "index_option", "json_option", "format_option", "data_format_option"]

_DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+")


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, passed on as that (lower-case) string.

    ``cuda`` or ``cuda:N`` on a machine without that CUDA device fails here, in one line, before any
    work starts (:func:`engine.device.resolve_device` says why); nothing falls back to the CPU.
    ``auto`` is resolved (and its choice logged) where the models are loaded.
    """

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if not _DEVICE.fullmatch(text):
            self.fail(f"{value!r} is not a device; choose auto, cpu, cuda or cuda:N (N a CUDA device index)", param, ctx)
        if text.startswith("cuda"):
            from engine.device import resolve_device  # imports torch: only when a CUDA device is asked for
            from engine.errors import EngineError

            try:
                resolve_device(text)
            except EngineError as exc:
                self.fail(str(exc), param, ctx)
        return text


def device_option(func: Any) -> Any:
    """``--device auto|cpu|cuda|cuda:N`` (default ``auto``), passed as ``device``: where every model of
    the command runs. ``auto`` picks CUDA when present and logs the choice."""
    return click.option(
        "--device",
        type=DeviceType(),
        metavar="[auto|cpu|cuda|cuda:N]",
        default="auto",
        show_default=True,
        help="Where the models run: auto (CUDA when present, else CPU; the choice is logged), cpu, cuda or cuda:N. A CUDA device that is not there is an error.",
    )(func)


def index_option(func: Any) -> Any:
    """``--index DIR`` (or ``$ENGINE_INDEX``; default ``.engine``), passed as ``index_dir``."""
    return click.option(
        "--index",
        "index_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="ENGINE_INDEX",
        default=Path(".engine"),
        show_default=True,
        help="Index directory (or set ENGINE_INDEX).",
    )(func)


def json_option(func: Any) -> Any:
    """``--json``, passed as ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")(func)


def format_option(func: Any) -> Any:
    """``--format engine|vg|refcoco|coco|karpathy`` (default ``engine``), passed as ``data_format``."""
    return click.option(
        "--format",
        "data_format",
        type=click.Choice(DATA_FORMATS),
        default="engine",
        show_default=True,
        help="Format of the --data folder: engine (annotations.jsonl), vg (Visual Genome region_descriptions.json + image_data.json), refcoco (refs(*).p + instances.json), coco (captions_*.json), karpathy (dataset_*.json); others are converted once into the data cache (engine/datasets/formats.py).",
    )(func)


def data_format_option(func: Any) -> Any:
    """:func:`format_option`, with the command's ``data`` folder replaced by its engine-format conversion
    (:func:`engine.datasets.formats.prepare_dataset`) before the command runs."""

    @functools.wraps(func)
    def wrapper(*args: Any, data_format: str, **kwargs: Any) -> Any:
        if data_format != "engine":
            from engine.datasets.formats import prepare_dataset

            kwargs["data"] = prepare_dataset(kwargs["data"], data_format)
        return func(*args, **kwargs)

    return format_option(wrapper)
