"""``engine check``: verify an index's files against its database; ``--repair`` rebuilds what is damaged."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from indexer.integrity import CheckReport

from engine.commands.options import device_option, index_option, json_option

__all__ = ["check_command"]


@click.command("check")
@index_option
@click.option("--repair", is_flag=True, help="Rebuild damaged FAISS files and the region table from the feature store and re-extract the damaged images' features from their files (takes the writer lock).")
@device_option
@json_option
def check_command(index_dir: Path, repair: bool, device: str, as_json: bool) -> None:
    """Verify every file of the index against what its database says: feature-file sizes against the
    committed rows, the checksum of every feature segment (recorded at each commit), the FAISS files and
    the region table. Prints one line per damaged part and a summary; exits 1 when damage is found and
    not repaired.

    \b
    Example:
      engine check --index my-index
      engine check --index my-index --repair
    """
    from engine.api import Engine
    from engine.config import EngineConfig

    # the models load (on --device) only when --repair has images to re-extract
    report = Engine(index_dir, config=EngineConfig(device=device)).check(repair=repair)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        _print(report)
    if not report.ok:
        sys.exit(1)


def _print(report: CheckReport) -> None:
    for part in report.damaged:
        click.echo(f"damaged: {part.line()}")
    for note in report.notes:
        click.echo(f"note: {note}")
    repair = report.repair
    if repair is not None and not report.clean:
        for path in repair.padded:
            click.echo(f"extended {path} to its committed size (NaN rows, re-extracted)")
        for path in repair.rebuilt:
            click.echo(f"rebuilt {path} from the feature store")
        if repair.reindexed:
            click.echo(f"re-extracted the features of {len(repair.reindexed)} image(s)")
        for path, reason in repair.unrepairable:
            click.echo(f"could not repair {path}: {reason}", err=True)
        for part in repair.after.damaged:
            click.echo(f"still damaged: {part.line()}", err=True)
    click.echo(report.summary())
