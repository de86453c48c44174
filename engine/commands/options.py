"""Click options shared by several ``engine`` commands."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["index_option", "json_option"]


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
