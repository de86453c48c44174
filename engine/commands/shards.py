"""``engine shards list`` and ``engine shards add``: the shards of a sharded index (``indexer/shards.py``)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from engine.commands.options import index_option, json_option

__all__ = ["shards_group"]


@click.group("shards")
def shards_group() -> None:
    """The shards of a sharded index (made by `engine index CORPUS --index DIR --shards N`).

    \b
    Example:
      engine shards list --index big-index
      engine shards add --index big-index /mnt/node2/index
    """


@shards_group.command("list")
@index_option
@json_option
def list_command(index_dir: Path, as_json: bool) -> None:
    """Each shard's folder, whether `engine index` writes to it, and its images and regions.

    \b
    Example:
      engine shards list --index big-index
    """
    rows = [{"shard": i, "path": str(path), "hashed": entry.hashed, **_counts(path)} for i, (entry, path) in enumerate(_shards(index_dir))]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(f"{row['shard']:>4}  {'hashed ' if row['hashed'] else 'attached'}  {row['images']:>9} images  {row['regions']:>11} regions  {row['path']}")


@shards_group.command("add")
@index_option
@click.argument("shard_dir", type=click.Path(file_okay=False, path_type=Path))
def add_command(index_dir: Path, shard_dir: Path) -> None:
    """Attach SHARD_DIR, an index built elsewhere (same visual key), as one more shard: searched with the
    others, never written by `engine index` of this sharded index.

    \b
    Example:
      engine shards add --index big-index /mnt/node2/index
    """
    from engine.api import Engine
    from engine.config import EngineConfig
    from indexer.shards import ShardLayout
    from indexer.store import IndexStore

    layout = ShardLayout.read(index_dir)
    if layout is None:
        raise click.UsageError(f"{index_dir} is not a sharded index; make one with: engine index CORPUS --index {index_dir} --shards N")
    engine = Engine(index_dir, config=EngineConfig(device="cpu"))
    with IndexStore.open(shard_dir, config=engine.config.store, visual_key=engine.visual_key) as store:  # an index, of this key
        arrays, regions = sorted(store.array_specs), store.vector_count()
    with IndexStore.open(layout.paths[0], config=engine.config.store, visual_key=engine.visual_key) as first:
        expected = sorted(first.array_specs)
    if arrays != expected:
        raise click.UsageError(f"{shard_dir} stores the arrays {', '.join(arrays)}, the shards of {index_dir} {', '.join(expected)}; index it with the same options")
    layout = layout.attach(shard_dir)
    click.echo(f"attached {shard_dir} ({regions} regions) as shard {len(layout.shards) - 1} of {index_dir}")


def _shards(index_dir: Path):  # -> list[tuple[ShardEntry, Path]]
    from indexer.shards import ShardLayout

    layout = ShardLayout.read(index_dir)
    if layout is None:
        raise click.UsageError(f"{index_dir} is not a sharded index; make one with: engine index CORPUS --index {index_dir} --shards N")
    return list(zip(layout.shards, layout.paths))


def _counts(path: Path) -> dict[str, int]:
    from engine.errors import IndexNotFoundError
    from indexer.store import IndexStore

    try:
        with IndexStore.open(path) as store:
            info = store.info()
    except IndexNotFoundError:
        return {"images": 0, "regions": 0}
    return {"images": info.images, "regions": info.regions}
