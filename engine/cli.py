"""The ``engine`` command line. Thin: it parses, calls :class:`engine.api.Engine`, renders.

This is the only place where :class:`engine.errors.EngineError` becomes a one-line click error.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import click

from engine.boxes import Box, parse_box
from engine.commands.bench import bench_command
from engine.commands.check import check_command
from engine.commands.data import data_group
from engine.commands.eval import eval_group
from engine.commands.ground import ground_command
from engine.commands.models import models_command
from engine.commands.options import device_option, index_option, json_option
from engine.commands.saliency import saliency_command
from engine.commands.serve import serve_command
from engine.commands.shards import shards_group
from engine.commands.synth import synth_command
from engine.commands.train import train_command
from engine.errors import EngineError
from engine.results import hits_payload
from engine.commands.remove import compact_command, remove_command

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


MAX_REGION_ID = 2**63 - 1
"""Largest region id (SQLite's integer range); kept equal to :data:`query.request.MAX_REGION_ID`."""


class WeightType(click.ParamType):
    """A stage-2 weight: a finite number from 0 to :data:`engine.config.MAX_WEIGHT` (imported when a
    weight is given: ``engine.config`` loads the store, which commands without weights need not)."""

    name = "weight"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from engine.config import MAX_WEIGHT

        try:
            weight = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number; give a weight from 0 to {MAX_WEIGHT:g} (default 1)", param, ctx)
        if not (math.isfinite(weight) and 0.0 <= weight <= MAX_WEIGHT):
            self.fail(f"{value} is not a finite weight from 0 to {MAX_WEIGHT:g}; the default is 1", param, ctx)
        return weight


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


def _engine(index_dir: Path, device: str = "auto", *, stage3: bool = True, text_weight: float | None = None, image_weight: float | None = None, concept_weight: float | None = None, projection_weight: float | None = None, san_weight: float | None = None, ray: str | None = None):
    from engine.api import Engine
    from engine.config import EngineConfig

    weights = {k: v for k, v in (("text_weight", text_weight), ("image_weight", image_weight), ("concept_weight", concept_weight), ("projection_weight", projection_weight), ("san_weight", san_weight)) if v is not None}
    return Engine(index_dir, config=EngineConfig(device=device, stage3=stage3, ray=ray, **weights))


@main.command("index")
@click.argument("corpus", type=click.Path(path_type=Path))
@index_option
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per backbone batch and per commit.")
@click.option("--proposals", type=click.Choice(["auto", "rpn", "gt", "selective-search"]), default="auto", show_default=True, help="Region source: rpn (= auto) the shipped region proposal network, top 100 per image; gt the boxes of CORPUS/annotations.jsonl; selective-search (slow, no model).")
@json_option
@click.option("--maps/--no-maps", default=True, show_default=True, help="A new index keeps each region's 7x7 feature map (11 KB a region: the conv GRN and stage-3 grounding read them). --no-maps: ~1.1 KB a region; stage 2 uses grn-fc, stage 3 recomputes the maps of the images it grounds from their files.")
@click.option("--shards", type=click.IntRange(min=1, max=8192), help="Create a sharded index of N shards in a new --index folder (each image goes to the shard its path hashes to; queries fan out to every shard and merge). An existing sharded index keeps its shards.")
@click.option("--ray", "ray", metavar="CLUSTER", help="Extract the regions on Ray workers: local (this machine's CPUs), local:N (N CPUs) or a running cluster's address; this process commits. Needs the `ray` package.")
@click.option("--ray-workers", type=click.IntRange(min=1), help="With --ray: how many workers (default one per CPU of the cluster).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def index_command(corpus: Path, index_dir: Path, device: str, batch_size: int, proposals: str, maps: bool, shards: int | None, ray: str | None, ray_workers: int | None, as_json: bool, quiet: bool) -> None:
    """Index every image under CORPUS (recursive); re-runs process only new or changed images.

    \b
    Example:
      engine index ./corpus --index my-index --batch-size 16
      engine index ./corpus --index big-index --shards 4 --ray local:4
    """
    from engine.config import IndexConfig

    from engine.diskspace import disk_full_error
    from indexer.pipeline import INDEX_DISK_ADVICE

    if ray_workers is not None and not ray:
        raise click.UsageError("--ray-workers goes with --ray (the workers of a Ray cluster)")
    try:
        config = IndexConfig(proposals=proposals, batch_size=batch_size, maps=maps, shards=shards, ray=ray, ray_workers=ray_workers)
        summary = _engine(index_dir, device).index(corpus, config=config, progress=not (quiet or as_json))
    except Exception as exc:  # a full disk while creating or opening the index: one line, the cause chained
        full = disk_full_error(exc, doing=f"indexing {corpus} into {index_dir}", advice=INDEX_DISK_ADVICE, where=index_dir)
        if full is not None:
            raise full from exc
        raise
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
@click.option("--region-id", type=click.IntRange(min=0, max=MAX_REGION_ID), help="Query with an indexed region (an id from earlier hits, e.g. --json): more like this hit. Instead of --image/--region.")
@click.option("--text", help="Description of the region, in any English. With --image: the region-only ranking plus the weighted ConSE score of each candidate for the text (the open visual vocabulary), counted as far as the text fits the query region; a text whose words the shapes-world models all know is read by them instead (GRN + SAN, stage 3). Alone: text-only search (ConSE over every region, or SAN for such a text).")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Number of hits.")
@click.option("--exclude-self", is_flag=True, help="Drop hits from the query image itself (same content hash).")
@click.option("--weight-text", type=WeightType(), help="Combined queries: weight of SAN's text score in stage 2 (default 1, fitted on val).")
@click.option("--weight-image", type=WeightType(), help="Combined queries: weight of the GRN image similarity in stage 2 (default 1).")
@click.option("--weight-concept", type=WeightType(), help="Combined queries through the open vocabulary: weight of the ConSE text score in stage 2 (default 0.2, fitted on val; 0 ranks by the region alone).")
@click.option("--weight-projection", type=WeightType(), help="Text-only queries through the open vocabulary: weight of the text projection's cosine beside ConSE (default 1.5, fitted on val; 0 ranks by ConSE alone).")
@click.option("--weight-san", type=WeightType(), help="Text-only queries: weight of SAN's text-region score beside ConSE and the projection, as far as SAN is confident (default 2, fitted on val; 0 leaves SAN out).")
@click.option("--ground/--no-ground", default=True, show_default=True, help="Stage 3 of a combined query (image + text): ground the text in the best images with Ref-NMS and CM-Att; their hits are the grounded regions, scored stage2 + w_r*relatedness + w_g*grounding (--json shows each part).")
@click.option("--path-glob", help="Keep only hits whose image path matches this glob (fnmatch on the absolute path; * matches / too), e.g. '*/beach/*'.")
@click.option("--min-score", type=float, help="Keep only hits with at least this score.")
@click.option("--max-per-image", type=click.IntRange(min=0), default=1, show_default=True, help="At most this many hits per image (each image's best boxes); 0: no limit.")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False, path_type=Path), help="Run every query of this JSONL file (one object per line: image, region, text, region_id, k, exclude_self, id, path_glob, min_score, max_per_image); needs --out.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), help="With --batch: write one JSON line per query here ({\"id\", \"hits\"} or {\"id\", \"error\"}).")
@click.option("--save-vis", type=click.Path(file_okay=False, path_type=Path), help="Write query.png (the query region, or a card with the text of a text-only query), hit_NN.png and contact_sheet.png with boxes drawn into this folder.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path), help="Write a self-contained gallery page (query, hits with boxes, every score) to this file.")
@click.option("--explain", type=click.Path(file_okay=False, path_type=Path), help="Needs --text. Write explain_NN.png per hit into this folder: the hit box beside the map of the text over the hit image (MCB attention; for a text read through the open vocabulary, its scores of the image's proposals).")
@click.option("--server", envvar="ENGINE_SERVER", help="Send the query to a running `engine serve` at this address (or set ENGINE_SERVER), e.g. http://127.0.0.1:8000, instead of loading the models here; same output.")
@click.option("--token", envvar="ENGINE_TOKEN", help="With --server: the server's bearer token (or set ENGINE_TOKEN).")
@click.option("--shard-servers", "shard_servers", metavar="URL,URL,...", envvar="ENGINE_SHARD_SERVERS", help="Search a sharded index whose shards are served by running `engine serve --index SHARD_FOLDER` servers, shard i at the i-th address (or set ENGINE_SHARD_SERVERS): the query fans out to them and their hits are merged here; region ids are global. --token goes to every server.")
@click.option("--ray", "ray", metavar="CLUSTER", help="A sharded index: fan the query out to Ray actors, one per shard (local, local:N or a cluster address) instead of searching the shards in this process.")
@json_option
def query_command(index_dir: Path, device: str, image: Path | None, region: Box | None, region_id: int | None, text: str | None, k: int, exclude_self: bool, weight_text: float | None, weight_image: float | None, weight_concept: float | None, weight_projection: float | None, weight_san: float | None, ground: bool, path_glob: str | None, min_score: float | None, max_per_image: int | None, batch_file: Path | None, out_file: Path | None, save_vis: Path | None, html_file: Path | None, explain: Path | None, server: str | None, token: str | None, shard_servers: str | None, ray: str | None, as_json: bool) -> None:
    """Find the indexed regions that show the same thing as REGION of IMAGE, or that TEXT describes.

    \b
    Example:
      engine query --image q.jpg --region 40,60,200,220 -k 5 --save-vis out/
      engine query --text "a red circle left of a blue square" -k 5 --html hits.html
      engine query --region-id 1234 --max-per-image 3
      engine query --batch queries.jsonl --out results.jsonl
      engine query --server http://127.0.0.1:8000 --image q.jpg --region 40,60,200,220 --json
      engine query --shard-servers http://10.0.0.5:8000,http://10.0.0.6:8000 --image q.jpg --text "a dog"
    """
    _check_query_options(image, region, region_id, text, weight_text, weight_image, explain, batch_file, out_file, save_vis, html_file, weight_concept, weight_projection, weight_san)
    if server and shard_servers:
        raise click.UsageError("--server sends the whole query to one server, --shard-servers fans it out to one server per shard: give one of them")
    if shard_servers:
        from engine.server.shard_client import ShardServers
        from query.filters import HitFilter

        _check_remote_options(device=device, weights=(weight_text, weight_image, weight_concept, weight_projection, weight_san), ground=ground, local_only=(batch_file, save_vis, html_file, explain, ray), via="--shard-servers")
        search = ShardServers([s for s in shard_servers.split(",") if s.strip()], token=token)
        hits = search.search(image=image, region=region, text=text, k=k, exclude_self=exclude_self, region_id=region_id, filters=HitFilter(path_glob=path_glob, min_score=min_score, max_per_image=max_per_image))
        if as_json:
            click.echo(json.dumps(hits_payload(hits)))
        else:
            _print_hits(hits)
        return
    if server:
        from engine.server.client import RemoteQuery

        _check_remote_options(device=device, weights=(weight_text, weight_image, weight_concept, weight_projection, weight_san), ground=ground, local_only=(batch_file, save_vis, html_file, explain, ray))
        fields = {"k": k, "exclude_self": exclude_self, "path_glob": path_glob, "min_score": min_score, "max_per_image": max_per_image}
        remote = RemoteQuery(image=image, region=None if region is None else ",".join(repr(float(v)) for v in region), region_id=region_id, text=text, fields={n: v for n, v in fields.items() if v is not None})
        _query_server(server, remote, token=token, as_json=as_json)
        return
    from query.filters import HitFilter

    engine = _engine(index_dir, device, stage3=ground, text_weight=weight_text, image_weight=weight_image, concept_weight=weight_concept, projection_weight=weight_projection, san_weight=weight_san, ray=ray)
    if ray and engine.sharded is None:
        raise click.UsageError(f"--ray fans a query out to the shards of a sharded index; {index_dir} is not sharded (engine index CORPUS --index NEW --shards N makes one)")
    filters = HitFilter(path_glob=path_glob, min_score=min_score, max_per_image=max_per_image)
    if batch_file is not None:
        _run_batch(engine, batch_file, out_file, k=k, exclude_self=exclude_self, filters=filters)
        return
    hits = engine.search(image=image, region=region, text=text, k=k, exclude_self=exclude_self, region_id=region_id, filters=filters)
    if region_id is not None:  # draw the indexed region as the query
        row = engine.region(region_id)
        image, region = Path(row.image_path), row.box
    if save_vis is not None:
        engine.render(hits, image=image, region=region, text=text, out_dir=save_vis)
    if html_file is not None:
        from query.gallery import write_gallery

        write_gallery(html_file, hits, image=image, region=region, text=text)
    if explain is not None and text:
        from query.explain import AttentionGrounder, explain_hits

        # the explanation reads the text as the search did: through the open vocabulary, or with MCB in the first-wave words
        through_vocabulary = any("concept" in h.scores for h in hits)
        explain_hits(engine.vocabulary_grounder() if through_vocabulary else AttentionGrounder(device=device), hits, text, explain)
    if as_json:
        click.echo(json.dumps(hits_payload(hits)))
        return
    _print_hits(hits)
    for path, what in ((save_vis, "pictures written to {}/ (contact_sheet.png shows them all)"), (html_file, "gallery written to {}"), (explain, "explanation pictures written to {}/ (explain_NN.png per hit)")):
        if path is not None:
            click.echo(what.format(path))


def _check_query_options(image, region, region_id, text, weight_text, weight_image, explain, batch_file, out_file, save_vis, html_file, weight_concept=None, weight_projection=None, weight_san=None) -> None:  # noqa: ANN001
    """Usage errors of option combinations, before any model loads."""
    if batch_file is not None:
        if out_file is None:
            raise click.UsageError("--batch needs --out FILE for the results (one JSON line per query)")
        if any(v is not None for v in (image, region, region_id, text, save_vis, html_file, explain)):
            raise click.UsageError("--batch takes its queries from the file: leave out --image, --region, --region-id, --text, --save-vis, --html and --explain")
        return
    if out_file is not None:
        raise click.UsageError("--out goes with --batch; for one query use --json, --save-vis or --html")
    if region is not None and image is None:
        raise click.UsageError("--region needs --image: the region is a box in that image")
    if explain is not None and not text:
        raise click.UsageError("--explain needs --text: it shows where the text is in each hit image")
    if (weight_text is not None or weight_image is not None) and not (text and (image is not None or region_id is not None)):
        raise click.UsageError("--weight-text / --weight-image balance a combined query: give --text and --image (or --region-id)")
    if weight_concept is not None and not (text and (image is not None or region_id is not None)):
        raise click.UsageError("--weight-concept weighs the text of a combined query: give --text and --image (or --region-id)")
    if weight_projection is not None and (not text or image is not None or region_id is not None):
        raise click.UsageError("--weight-projection weighs the text projection in a text-only query: give --text alone")
    if weight_san is not None and (not text or image is not None or region_id is not None):
        raise click.UsageError("--weight-san weighs SAN in a text-only query: give --text alone")


def _check_remote_options(*, device: str, weights: tuple, ground: bool, local_only: tuple, via: str = "--server") -> None:  # noqa: ANN001
    """Usage errors of options that only a local query has (the servers' models and weights are their own)."""
    ctx = click.get_current_context()
    if ctx.get_parameter_source("index_dir") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError(f"--index goes with a local query; with {via} the servers' index answers (leave out one of them)")
    if device != "auto" or any(w is not None for w in weights) or not ground:
        raise click.UsageError(f"--device, --weight-* and --no-ground set up local models; with {via} the servers' settings answer (leave them out)")
    if any(v is not None for v in local_only):
        raise click.UsageError(f"--batch, --save-vis, --html, --explain and --ray work on a local index only; with {via} use --json or the table")


def _query_server(server: str, remote, *, token: str | None, as_json: bool) -> None:  # noqa: ANN001
    """Print a running server's answer to ``remote`` as a local query prints its hits."""
    from engine.results import Hit
    from engine.server.client import search_remote

    payload = search_remote(server, remote, token=token)
    if as_json:
        click.echo(json.dumps(payload))
        return
    _print_hits([Hit.from_dict(h) for h in payload["hits"]])


def _run_batch(engine, batch_file: Path, out_file: Path, *, k: int, exclude_self: bool, filters) -> None:  # noqa: ANN001
    from query.batch import run_batch

    defaults = {"k": k, "exclude_self": exclude_self, **({"filters": filters} if filters.active else {})}
    summary = run_batch(engine, batch_file, out_file, defaults=defaults)
    click.echo(f"{summary.queries} queries, {summary.errors} errors; results written to {out_file}")


def _print_hits(hits: list) -> None:
    if not hits:
        click.echo("no hits")
        return
    width = max(8, *(len(str(hit.region_id)) for hit in hits))  # a sharded index's ids have 13+ digits
    click.echo(f"{'rank':>4}  {'score':>7}  {'region':>{width}}  {'box':<24}  image")
    for rank, hit in enumerate(hits, start=1):
        box = ",".join(f"{v:.0f}" for v in hit.box)
        click.echo(f"{rank:>4}  {hit.score:7.4f}  {hit.region_id:>{width}}  {box:<24}  {hit.image}")


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
main.add_command(remove_command)
main.add_command(compact_command)
main.add_command(bench_command)
main.add_command(check_command)
main.add_command(data_group)
main.add_command(serve_command)
main.add_command(shards_group)
if __name__ == "__main__":
    main()
