"""The ``engine`` command line. Thin: it parses, calls :class:`engine.api.Engine`, renders.

This is the only place where :class:`engine.errors.EngineError` becomes a one-line click error.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from engine.boxes import Box, parse_box
from engine.commands.eval import eval_group
from engine.commands.ground import ground_command
from engine.commands.models import models_command
from engine.commands.saliency import saliency_command
from engine.commands.synth import synth_command
from engine.commands.train import train_command
from engine.errors import EngineError

__all__ = ["main"]


class EngineGroup(click.Group):
    """Turns every :class:`EngineError` (and Ctrl-C) raised by a command into a clean one-line error."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EngineError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: everything committed so far is kept; run the same command again to resume", err=True)
            sys.exit(130)


class BoxType(click.ParamType):
    """``x1,y1,x2,y2`` in pixels."""

    name = "x1,y1,x2,y2"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Box:
        if isinstance(value, tuple):
            return value
        try:
            return parse_box(str(value))
        except EngineError as exc:
            self.fail(str(exc), param, ctx)


def index_option(func: Any) -> Any:
    return click.option(
        "--index",
        "index_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="ENGINE_INDEX",
        default=Path(".engine"),
        show_default=True,
        help="Index directory (or set ENGINE_INDEX).",
    )(func)


def device_option(func: Any) -> Any:
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where models run; auto picks CUDA when present and logs the choice.")(func)


def json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")(func)


@click.group(cls=EngineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.version_option(package_name="region-retrieval-engine")
def main(verbose: int) -> None:
    """Region retrieval search engine: index a folder of images, find the regions that show the same thing.

    \b
    Example:
      engine synth demo --images 200
      engine index demo
      engine query --image demo/images/000000.jpg --region 10,10,200,200 --save-vis out/
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _engine(index_dir: Path, device: str = "auto"):
    from engine.api import Engine
    from engine.config import EngineConfig

    return Engine(index_dir, config=EngineConfig(device=device))


@main.command("index")
@click.argument("corpus", type=click.Path(path_type=Path))
@index_option
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per backbone batch and per commit.")
@click.option("--proposals", type=click.Choice(["auto", "rpn", "gt", "selective-search"]), default="auto", show_default=True, help="Region source: rpn (= auto) the shipped region proposal network, top 100 per image; gt the boxes of CORPUS/annotations.jsonl; selective-search (slow, no model).")
@json_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def index_command(corpus: Path, index_dir: Path, device: str, batch_size: int, proposals: str, as_json: bool, quiet: bool) -> None:
    """Index every image under CORPUS (recursive); re-runs process only new or changed images.

    \b
    Example:
      engine index ./corpus --index my-index --batch-size 16
    """
    from engine.config import IndexConfig

    engine = _engine(index_dir, device)
    summary = engine.index(corpus, config=IndexConfig(proposals=proposals, batch_size=batch_size), progress=not (quiet or as_json))
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
        return
    rate = summary.processed / summary.seconds if summary.seconds > 0 else 0.0
    click.echo(
        f"indexed {corpus} into {index_dir}: {summary.processed} processed, {summary.unchanged} unchanged, "
        f"{summary.removed} removed, {summary.regions_added} regions added, {summary.errors} errors, "
        f"{summary.seconds:.1f} s ({rate:.1f} images/s)"
    )
    if summary.errors:
        click.echo(f"see the errors with: engine info --index {index_dir} --errors", err=True)


@main.command("query")
@index_option
@device_option
@click.option("--image", type=click.Path(path_type=Path), help="Query image file.")
@click.option("--region", type=BoxType(), help="Query region in the image, pixels x1,y1,x2,y2 (default: the whole image).")
@click.option("--text", help="Description of the region. With --image: the visual shortlist (joined by SAN's matches of the text) is reranked by the GRN similarity (the text gates query and candidates) plus the weighted SAN score of how well each candidate fits the text. Alone: text-only search with SAN.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Number of hits.")
@click.option("--exclude-self", is_flag=True, help="Drop hits from the query image itself (same content hash).")
@click.option("--save-vis", type=click.Path(file_okay=False, path_type=Path), help="Write query.png (the query region, or a card with the text of a text-only query), hit_NN.png and contact_sheet.png with boxes drawn into this folder.")
@click.option("--explain", type=click.Path(file_okay=False, path_type=Path), help="Needs --text. Write explain_NN.png per hit into this folder: the hit box beside the attention map of the text over the hit image (MCB).")
@json_option
def query_command(index_dir: Path, device: str, image: Path | None, region: Box | None, text: str | None, k: int, exclude_self: bool, save_vis: Path | None, explain: Path | None, as_json: bool) -> None:
    """Find the indexed regions that show the same thing as REGION of IMAGE, or that TEXT describes.

    \b
    Example:
      engine query --image q.jpg --region 40,60,200,220 -k 5 --save-vis out/
      engine query --text "a red circle left of a blue square" -k 5
    """
    engine = _engine(index_dir, device)
    if region is not None and image is None:
        raise click.UsageError("--region needs --image: the region is a box in that image")
    if explain is not None and not text:
        raise click.UsageError("--explain needs --text: it shows where the text is in each hit image")
    hits = engine.search(image=image, region=region, text=text, k=k, exclude_self=exclude_self)
    if save_vis is not None:
        engine.render(hits, image=image, region=region, text=text, out_dir=save_vis)
    if explain is not None and text:
        from query.explain import AttentionGrounder, explain_hits

        explain_hits(AttentionGrounder(device=device), hits, text, explain)
    if as_json:
        click.echo(json.dumps({"hits": [h.to_dict() for h in hits]}))
    else:
        _print_hits(hits)
        if save_vis is not None:
            click.echo(f"pictures written to {save_vis}/ (contact_sheet.png shows them all)")
        if explain is not None:
            click.echo(f"attention pictures written to {explain}/ (explain_NN.png per hit)")


def _print_hits(hits: list) -> None:
    if not hits:
        click.echo("no hits")
        return
    click.echo(f"{'rank':>4}  {'score':>7}  {'region':>8}  {'box':<24}  image")
    for rank, hit in enumerate(hits, start=1):
        box = ",".join(f"{v:.0f}" for v in hit.box)
        click.echo(f"{rank:>4}  {hit.score:7.4f}  {hit.region_id:>8}  {box:<24}  {hit.image}")


@main.command("info")
@index_option
@json_option
@click.option("--errors", "show_errors", is_flag=True, help="List the files that could not be indexed, with the reason.")
def info_command(index_dir: Path, as_json: bool, show_errors: bool) -> None:
    """Counts, index type, device and models of an index.

    \b
    Example:
      engine info --index my-index --errors
    """
    engine = _engine(index_dir)
    info = engine.info()
    errors = engine.errors() if show_errors else []
    if as_json:
        payload = info.to_dict()
        if show_errors:
            payload["error_files"] = [{"path": p, "reason": r} for p, r in errors]
        click.echo(json.dumps(payload))
        return
    for key, value in info.to_dict().items():
        click.echo(f"{key:>12}: {value}")
    if show_errors:
        click.echo(f"{len(errors)} files could not be indexed:" if errors else "no errors")
        for path, reason in errors:
            click.echo(f"  {path}: {reason}")


main.add_command(synth_command)
main.add_command(train_command)
main.add_command(models_command)
main.add_command(eval_group)
main.add_command(saliency_command)
main.add_command(ground_command)
if __name__ == "__main__":
    main()
