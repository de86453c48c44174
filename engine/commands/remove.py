"""``engine remove PATH...`` and ``engine compact``: delete images from an index, reclaim their space."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from engine.commands.options import index_option, json_option
from engine.diskspace import disk_full_error

__all__ = ["remove_command", "compact_command", "format_bytes"]


def _engine(index_dir: Path):  # -> engine.api.Engine
    from engine.api import Engine
    from engine.config import EngineConfig

    return Engine(index_dir, config=EngineConfig(device="cpu"))


def format_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(n), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{int(n)} B" if unit == 0 else f"{value:.1f} {units[unit]}"


@contextmanager
def _disk_full_names(index_dir: Path, doing: str, advice: str) -> Iterator[None]:
    """A full disk while ``doing`` becomes one :class:`~engine.errors.DiskFullError` naming this command (the cause chained)."""
    try:
        yield
    except Exception as exc:
        full = disk_full_error(exc, doing=doing, advice=advice, where=index_dir)
        if full is not None:
            raise full from exc
        raise


@click.command("remove")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@json_option
def remove_command(paths: tuple[Path, ...], index_dir: Path, as_json: bool) -> None:
    """Remove the images at PATHS from the index: image files, or folders (every image indexed under them).

    All or nothing: a path with no indexed image at or under it is an error and nothing is removed.
    The files themselves are not touched; an image still inside a corpus folder comes back on the
    next `engine index` of that folder. Run `engine compact` to reclaim the feature storage.

    \b
    Example:
      engine remove corpus/old/ corpus/cat.jpg --index my-index
    """
    with _disk_full_names(index_dir, f"removing images from {index_dir}", "the index is unchanged; free space and re-run `engine remove`"):
        summary = _engine(index_dir).remove(paths)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
        return
    errors = f" and {summary.errors} error records" if summary.errors else ""
    click.echo(
        f"removed {summary.images} images ({summary.regions} regions){errors} from {index_dir}; "
        f"`engine compact --index {index_dir}` reclaims their feature storage"
    )


@click.command("compact")
@index_option
@json_option
def compact_command(index_dir: Path, as_json: bool) -> None:
    """Rewrite the feature store without the rows of removed or replaced images and report the bytes saved.

    Crash-safe: an interruption at any point leaves a working index. Needs the writer lock (it
    fails while `engine index` runs on the same index).

    \b
    Example:
      engine compact --index my-index
    """
    with _disk_full_names(index_dir, f"compacting {index_dir}", "the index is unchanged and works; free space (compaction writes a copy of the live feature rows first) and re-run `engine compact`"):
        summary = _engine(index_dir).compact()
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
        return
    if not summary.compacted:
        click.echo(
            f"nothing to compact in {index_dir}: no dead feature rows "
            f"({format_bytes(summary.bytes_after)} in feature and vector files)"
        )
        return
    click.echo(
        f"compacted {index_dir}: dropped {summary.dead_rows} of {summary.rows_before} feature rows; "
        f"features {format_bytes(summary.feature_bytes_before)} -> {format_bytes(summary.feature_bytes_after)}, "
        f"vectors {format_bytes(summary.vector_bytes_before)} -> {format_bytes(summary.vector_bytes_after)}, "
        f"total {format_bytes(summary.bytes_before)} -> {format_bytes(summary.bytes_after)}"
    )
