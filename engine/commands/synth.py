"""``engine synth``: write a synthetic expressional-region benchmark corpus (shapes or stamps world)."""
from __future__ import annotations

from pathlib import Path

import click

from engine.synth import SynthConfig, generate_corpus

__all__ = ["synth_command"]

_DEFAULT_SIZE = {"shapes": 320, "stamps": 512}


def _stamps(
    out_dir: Path, images: int, seed: int, size: int, fmt: str, quiet: bool,
    stamps_dir: Path | None, backgrounds_dirs: tuple[Path, ...], queries_per_stamp: int,
) -> None:
    from engine.data_fetch import ensure_stamps
    from engine.synth.stamps import StampsConfig, generate_stamps_corpus

    if stamps_dir is None:
        stamps_dir = ensure_stamps(log=lambda msg: click.echo(msg, err=True))
    config = StampsConfig(
        stamps_dir=stamps_dir, images=images, seed=seed, size=size, format=fmt,
        backgrounds_dirs=backgrounds_dirs, queries_per_stamp=queries_per_stamp,
    )
    summary = generate_stamps_corpus(out_dir, config, progress=not quiet)
    rate = summary.images / summary.seconds if summary.seconds > 0 else float("inf")
    per_split = ", ".join(f"{s} {n}" for s, n in summary.queries_per_split.items())
    click.echo(
        f"wrote {summary.images} images, {summary.objects} objects, {summary.regions} regions, {summary.refs} refs, "
        f"{summary.queries} queries ({per_split}) to {summary.out_dir} in {summary.seconds:.1f} s ({rate:.1f} images/s)"
    )


@click.command("synth")
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--world", type=click.Choice(["shapes", "stamps"]), default="shapes", show_default=True,
              help="shapes: attributed coloured shapes; stamps: tuxpaint stamps (real objects) on real photographs.")
@click.option("--images", type=click.IntRange(min=1), default=200, show_default=True, help="Number of images.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed; the same seed gives the same bytes.")
@click.option("--size", type=int, default=None, help="Image side in pixels (square images; default 320 for shapes, 512 for stamps).")
@click.option("--format", "fmt", type=click.Choice(["jpg", "png"]), default="jpg", show_default=True, help="Image file format.")
@click.option("--stamps-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="stamps world: the usr/share/tuxpaint/stamps folder (default: the `engine data fetch` cache, fetched if missing).")
@click.option("--backgrounds-dir", "backgrounds_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="stamps world: a folder of background photographs (repeatable), on top of the ones found.")
@click.option("--queries-per-stamp", type=click.IntRange(min=1), default=4, show_default=True,
              help="stamps world: queries per stamp and split.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth_command(
    out_dir: Path, world: str, images: int, seed: int, size: int | None, fmt: str,
    stamps_dir: Path | None, backgrounds_dirs: tuple[Path, ...], queries_per_stamp: int, quiet: bool,
) -> None:
    """Generate a synthetic benchmark in DIR: images/, annotations.jsonl and queries.jsonl.

    shapes (default): scenes of 3-8 attributed shapes (shape, colour, size, pattern) on photo and
    texture backgrounds. stamps: 2-6 tuxpaint stamps (real objects with English descriptions) on
    real photographs, split by stamp. Both have region descriptions, referring expressions,
    captions, masks, a train/val/test split and retrieval queries with their positive regions.
    The format is described in docs/synth.md.

    \b
    Example:
      engine synth demo --images 200 --seed 0
      engine synth bench --images 2000 --size 320 --format png --quiet
      engine synth photos --world stamps --images 3000 --size 512
    """
    size = _DEFAULT_SIZE[world] if size is None else size
    if world == "stamps":
        _stamps(out_dir, images, seed, size, fmt, quiet, stamps_dir, backgrounds_dirs, queries_per_stamp)
        return
    config = SynthConfig(images=images, seed=seed, size=size, format=fmt)
    summary = generate_corpus(out_dir, config, progress=not quiet)
    rate = summary.images / summary.seconds if summary.seconds > 0 else float("inf")
    click.echo(
        f"wrote {summary.images} images, {summary.regions} regions, {summary.refs} refs, {summary.queries} queries "
        f"to {summary.out_dir} in {summary.seconds:.1f} s ({rate:.1f} images/s)"
    )
