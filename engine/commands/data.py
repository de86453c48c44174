"""``engine data``: the data that the engine's generators need (``engine data fetch``)."""
from __future__ import annotations

from pathlib import Path

import click

from engine.data_fetch import PACKAGES, fetch_data

__all__ = ["data_group"]


@click.group("data")
def data_group() -> None:
    """Data the generators use: Debian packages of stamps and photographs.

    \b
    Example:
      engine data fetch
      ENGINE_DATA=/data/engine engine data fetch
    """


@data_group.command("fetch")
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache folder (default: $ENGINE_DATA, else ~/.cache/engine/data).",
)
def fetch_command(dest: Path | None) -> None:
    """Download and unpack the stamps world's Debian packages (apt-get download + dpkg -x; nothing is installed).

    Packages: tuxpaint-stamps-default (the stamps), opencv-doc (sample photos), mate-backgrounds and
    plasma-workspace-wallpapers (photographic wallpapers). Packages already unpacked are skipped.

    \b
    Example:
      engine data fetch
      engine data fetch --dest /data/engine
    """
    result = fetch_data(dest, log=click.echo)
    click.echo(f"{len(result.fetched)} fetched, {len(result.skipped)} already there ({len(PACKAGES)} packages) in {result.dest}")
