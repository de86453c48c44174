"""``engine eval``: the papers' evaluation protocols on any dataset the engine reads."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from engine.commands.options import data_format_option, device_option

__all__ = ["eval_group"]


def _comma_list(value: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise click.BadParameter(f"{value!r}: give a comma list of {', '.join(allowed)}", param_hint=option)
    return items


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@click.group("eval")
def eval_group() -> None:
    """Evaluate models with the papers' protocols (retrieval: GRN Table 2; rpn: proposal recall; matching: SAN; attention: MCB; search: what a user sees).

    \b
    Example:
      engine eval retrieval --data bench --proposals gt --json results.json
      engine eval rpn --data bench --split test
      engine eval search --data bench --mode region+text --json search.json
    """


@eval_group.command("retrieval")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder (annotations.jsonl, queries.jsonl, images).")
@data_format_option
@click.option("--model", "models", multiple=True, help="A GRN-family checkpoint file, an installed model name (grn, grn-fc, vl-concat, …) or 'visual'; repeatable. Default: visual plus every installed GRN-family checkpoint.")
@click.option("--split", default="test", show_default=True, help="Which split's queries and images to use.")
@click.option("--proposals", default="gt,rpn", show_default=True, help="Candidate boxes: gt (ground-truth regions), rpn (top-100 RPN proposals per image), or both.")
@click.option("--rpn-checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="RPN checkpoint for --proposals rpn (default: the shipped one).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"rows": [{"method", "proposals", "R@1", "R@10", "R@50", "R@100", "med_r", …}]} here (recalls in percent).')
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as markdown here.")
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def retrieval_command(data: Path, models: tuple[str, ...], split: str, proposals: str, rpn_checkpoint: Path | None, json_path: Path | None, markdown_path: Path | None, device: str, quiet: bool) -> None:
    """Expressional region retrieval R@1/10/50/100 and median rank (GRN Table 2), per model and proposal setting.

    Every candidate of the split's other images is scored exhaustively; recalls are percentages.

    \b
    Example:
      engine eval retrieval --data bench --model grn --model vl-concat --proposals gt,rpn --markdown table.md
    """
    from engine.evaluation.retrieval import PROPOSAL_SETTINGS, evaluate_retrieval, resolve_models, rows_to_markdown

    settings = _comma_list(proposals, PROPOSAL_SETTINGS, "--proposals")
    loaded = resolve_models(list(models), device=device)
    rows = evaluate_retrieval(data, loaded, split=split, proposals=settings, rpn_checkpoint=rpn_checkpoint, device=device, progress=not quiet)
    table = rows_to_markdown(rows)
    click.echo(table, nl=False)
    if rows and rows[0].skipped:
        click.echo(f"({rows[0].skipped} queries whose positives all lie in their own image are left out)")
    if json_path is not None:
        _write(json_path, json.dumps({"data": str(data), "split": split, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
    if markdown_path is not None:
        _write(markdown_path, table)


@eval_group.command("rpn")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder (annotations.jsonl, images).")
@data_format_option
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="RPN checkpoint (default: the shipped one).")
@click.option("--split", default="test", show_default=True, help="train, val, test or all.")
@click.option("--ns", default="10,50,100,300", show_default=True, help="Numbers of proposals per image, comma-separated.")
@click.option("--source", type=click.Choice(["rpn", "selective-search", "mix"]), default="rpn", show_default=True, help="Proposals measured: the RPN, selective search (~2 s per 640 px image), or both taken alternately.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the split's first N images (selective search is slow).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"images", "source", "rows": [{"n", "regions", "objects"}]} here (recalls in percent).')
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def rpn_command(data: Path, checkpoint: Path | None, split: str, ns: str, source: str, limit: int | None, json_path: Path | None, device: str, quiet: bool) -> None:
    """Recall (IoU > 0.5) of the split's region and object boxes by the top-N proposals of the RPN
    (or of selective search, or of a mix of both).

    \b
    Example:
      engine eval rpn --data bench --ns 10,100,300 --json rpn.json
      engine eval rpn --data data/stamps --source selective-search --limit 100
    """
    from engine.evaluation.proposals_recall import proposal_recall

    try:
        numbers = tuple(int(n) for n in ns.split(",") if n.strip())
    except ValueError:
        raise click.BadParameter(f"{ns!r}: give positive integers separated by commas, e.g. 10,50,100,300", param_hint="--ns") from None
    table = proposal_recall(data, source=source, checkpoint=checkpoint, split=split, ns=numbers, limit=limit, device=device, progress=not quiet)

    def pct(v: float) -> float | None:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(100.0 * v, 3)

    rows = [{"n": n, "regions": pct(table["regions"][n]), "objects": pct(table["objects"][n])} for n in numbers]
    click.echo(f"{source} proposal recall (IoU > 0.5), {split} split, {table['images']} images")
    click.echo("| proposals | regions % | objects % |\n| ---: | ---: | ---: |")
    for r in rows:
        click.echo(f"| {r['n']} | " + " | ".join("n/a" if r[k] is None else f"{r[k]:.2f}" for k in ("regions", "objects")) + " |")
    if json_path is not None:
        _write(json_path, json.dumps({"data": str(data), "split": split, "source": source, "images": table["images"], "rows": rows}, indent=2) + "\n")


@eval_group.command("matching")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder (annotations.jsonl with captions, region descriptions and saliency masks; images).")
@data_format_option
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False, path_type=Path), help="A SAN checkpoint; repeatable. Default: the installed ablation rows gv+gt, sv+gt, fv+gt, fv+it and the full fv+ft (san.pt).")
@click.option("--saliency-checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="Saliency network (default: the shipped saliency.pt).")
@click.option("--split", default="test", show_default=True, help="Which split's images, captions and regions to use.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"rows": [{"method", "direction", "R@1", "R@5", "R@10", "mR"}, …], "saliency": {"mae", "iou"}} here (percent).')
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as markdown here.")
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def matching_command(data: Path, checkpoints: tuple[Path, ...], saliency_checkpoint: Path | None, split: str, json_path: Path | None, markdown_path: Path | None, device: str, quiet: bool) -> None:
    """Image<->sentence and region<->sentence R@1/5/10 and mR (SAN Tables 3-6), and saliency MAE / IoU.

    \b
    Example:
      engine eval matching --data data/synth --json matching.json --markdown matching.md
    """
    from engine.evaluation.matching import default_checkpoints, evaluate_matching, rows_to_markdown

    paths = list(checkpoints) or default_checkpoints()
    rows, saliency = evaluate_matching(data, paths, split=split, saliency_checkpoint=saliency_checkpoint, device=device, progress=not quiet)
    table = rows_to_markdown(rows, saliency)
    click.echo(table, nl=False)
    if json_path is not None:
        _write(json_path, json.dumps({"data": str(data), "split": split, "rows": rows, "saliency": saliency}, indent=2) + "\n")
    if markdown_path is not None:
        _write(markdown_path, table)


@eval_group.command("attention")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder (annotations.jsonl with region descriptions / referring expressions and boxes; images).")
@data_format_option
@click.option("--model", "models", multiple=True, help="An MCB grounding checkpoint file or installed name (mcb, mcb-no-sparsity); repeatable. Default: every installed one.")
@click.option("--split", default="test", show_default=True, help="Which split's phrases to ground.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"rows": [{"method", "acc@0.3", "acc@0.4", "acc@0.5", "mean_iou"}, …], "by_kind": [...]} here (percent); rows hold center-box and every model over all phrases.')
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as markdown here.")
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def attention_command(data: Path, models: tuple[str, ...], split: str, json_path: Path | None, markdown_path: Path | None, device: str, quiet: bool) -> None:
    """Weakly supervised phrase localization (MCB attention paper, Tables 1-2): accuracy at IoU 0.3/0.4/0.5 and mean IoU.

    Each region description and referring expression of the split is grounded on its image by its
    attention map (threshold + largest connected component); `center-box` is a centred box of the
    training phrases' median size.

    \b
    Example:
      engine eval attention --data data/synth --json attention.json --markdown attention.md
    """
    from engine.device import resolve_device
    from engine.evaluation.attention import evaluate_attention, rows_to_markdown
    from engine.models.registry import family, known_checkpoints, load_model

    target = resolve_device(device)
    names = list(models) or [n for n in family("mcb-attention").names if n in known_checkpoints()]
    loaded = [load_model(n, device=target, family="mcb-attention") for n in names]
    rows = evaluate_attention(data, loaded, split=split, device=target, progress=not quiet)
    table = rows_to_markdown(rows)
    click.echo(table, nl=False)
    if json_path is not None:
        main_rows = [r.to_dict() for r in rows if r.phrases == "all"]
        by_kind = [r.to_dict() for r in rows if r.phrases != "all"]
        _write(json_path, json.dumps({"data": str(data), "split": split, "rows": main_rows, "by_kind": by_kind}, indent=2) + "\n")
    if markdown_path is not None:
        _write(markdown_path, table)


@eval_group.command("fusion")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder (annotations.jsonl, queries.jsonl, images).")
@data_format_option
@click.option("--split", default="val", show_default=True, help="Which split to index and query (fit on val, report on test).")
@click.option("--weights", default="0,0.25,0.5,1,2,4", show_default=True, help="Text weights w to measure (stage 2 ranks by grn + w * san), comma-separated.")
@click.option("--proposals", type=click.Choice(["gt", "rpn"]), default="gt", show_default=True, help="Regions to index: ground-truth boxes or RPN proposals.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"rows": [{"weight", "R@1", "R@10", "R@100", "med_r", "wins", "losses", "queries"}], "best": w} here.')
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def fusion_command(data: Path, split: str, weights: str, proposals: str, json_path: Path | None, device: str, quiet: bool) -> None:
    """Fit the weight of SAN's text score in combined queries: index the split, search its queries end to end.

    Prints R@1/10/100 and median rank per weight, and how often a query's own text ranks its first
    positive earlier (wins) or later (losses) than another query's text.

    \b
    Example:
      engine eval fusion --data data/synth --split val --weights 0,0.5,1,2
    """
    from engine.evaluation.fusion import best_weight, evaluate_fusion, rows_to_markdown

    try:
        values = [float(w) for w in weights.split(",") if w.strip()]
    except ValueError:
        raise click.BadParameter(f"{weights!r} is not a comma-separated list of numbers, e.g. 0,0.5,1", param_hint="--weights") from None
    rows = evaluate_fusion(data, values, split=split, proposals=proposals, device=device, progress=not quiet)
    best = best_weight(rows)
    click.echo(rows_to_markdown(rows), nl=False)
    click.echo(f"best text weight on {split}: {best.weight:g} (R@10 {best.r10:.2f}, R@1 {best.r1:.2f})")
    if json_path is not None:
        _write(json_path, json.dumps({"data": str(data), "split": split, "proposals": proposals, "rows": [r.to_dict() for r in rows], "best": best.weight}, indent=2) + "\n")


def _numbers(text: str, hint: str, cast=float) -> tuple:  # noqa: ANN001
    try:
        values = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1", param_hint=hint) from None
    if not values or min(values) < 0:
        raise click.BadParameter(f"{text!r}: give one or more numbers >= 0", param_hint=hint)
    return values


@eval_group.command("stage3")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder (annotations.jsonl, queries.jsonl, images).")
@data_format_option
@click.option("--split", default="val", show_default=True, help="Which split to index and query (fit on val, report on test).")
@click.option("--proposals", type=click.Choice(["gt", "rpn"]), default="rpn", show_default=True, help="Regions to index: RPN proposals (where localizing matters) or ground-truth boxes.")
@click.option("--images", "images", default="0,1,3,5,10,20", show_default=True, help="Numbers M of best stage-2 images to ground, comma-separated (0 = stage 2 alone).")
@click.option("--relatedness-weights", default="0,0.25,0.5,1,2", show_default=True, help="Weights w_r of Ref-NMS relatedness, comma-separated.")
@click.option("--grounding-weights", default="0,0.25,0.5,1,2", show_default=True, help="Weights w_g of the CM-Att grounding score, comma-separated.")
@click.option("--fitted", "fitted_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Measure this stage3.json setting and its ablations (no relatedness, no grounding, neither, stage 2 alone) instead of the grid.")
@click.option("--write", "write_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the best setting as stage3.json here (e.g. engine/checkpoints/stage3.json).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"rows": [{"images", "relatedness", "grounding", "R@1", "R@10", "R@100", "med_r", "queries"}], "best": {...}} here.')
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), help="Keep the split's corpus copy and index here and reuse them on the next run (default: a temporary folder).")
@click.option("--grounding-model", help="CM-Att checkpoint file or installed name to ground with (default: cm-att-erase-region).")
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def stage3_command(data: Path, split: str, proposals: str, images: str, relatedness_weights: str, grounding_weights: str, fitted_path: Path | None, write_path: Path | None, json_path: Path | None, work_dir: Path | None, grounding_model: str | None, device: str, quiet: bool) -> None:
    """Fit (or measure) query stage 3: Ref-NMS relatedness and CM-Att grounding over the best images.

    Indexes the split, runs every query's stages 1-2 once, then re-ranks with stage 3 for each
    setting; prints R@1/10/100 per setting and the best one.

    \b
    Example:
      engine eval stage3 --data data/synth --split val --write engine/checkpoints/stage3.json
      engine eval stage3 --data data/synth --split test --fitted engine/checkpoints/stage3.json
    """
    from engine.evaluation.stage3 import Stage3Grid, best_row, collect_stage3, grid_rows, rows_to_markdown, write_weights
    from query.localize import Stage3Weights, load_stage3_weights

    if fitted_path is not None:
        f = load_stage3_weights(fitted_path)
        settings = list(dict.fromkeys([Stage3Weights(images=0), Stage3Weights(f.images), Stage3Weights(f.images, f.relatedness, 0.0), Stage3Weights(f.images, 0.0, f.grounding), f]))
    else:
        settings = Stage3Grid(_numbers(images, "--images", int), _numbers(relatedness_weights, "--relatedness-weights"), _numbers(grounding_weights, "--grounding-weights")).settings()
    collected, boxes = collect_stage3(data, split=split, max_images=max(s.images for s in settings), proposals=proposals, device=device, progress=not quiet, work_dir=work_dir, grounding_model=grounding_model)
    rows = grid_rows(collected, boxes, settings)
    best = best_row(rows)
    shown = rows if fitted_path is not None else _stage3_summary(rows, best)
    click.echo(rows_to_markdown(shown), nl=False)
    w = best.weights
    click.echo(f"best on {split}: M={w.images}, w_r={w.relatedness:g}, w_g={w.grounding:g} (R@1 {best.r1:.2f}, R@10 {best.r10:.2f}; stage 2 alone R@1 {rows[0].r1:.2f})")
    if write_path is not None:
        write_weights(write_path, best, data=data, split=split, proposals=proposals, command=f"engine eval stage3 --data {data} --split {split} --proposals {proposals} --images {images} --relatedness-weights {relatedness_weights} --grounding-weights {grounding_weights} --write {write_path}")
        click.echo(f"wrote {write_path}")
    if json_path is not None:
        _write(json_path, json.dumps({"data": str(data), "split": split, "proposals": proposals, "rows": [r.to_dict() for r in rows], "best": best.to_dict()}, indent=2) + "\n")


def _stage3_summary(rows: list, best) -> list:  # noqa: ANN001
    """Stage 2 alone, the best row, and the best row of each ablation (one part left out)."""
    def top(pred) -> list:  # noqa: ANN001
        chosen = [r for r in rows if pred(r.weights)]
        return [max(chosen, key=lambda r: (r.r1, r.r10))] if chosen else []

    picked = [rows[0], *top(lambda w: w.images > 0 and w.relatedness == 0 and w.grounding == 0), *top(lambda w: w.images > 0 and w.grounding == 0 and w.relatedness > 0), *top(lambda w: w.images > 0 and w.relatedness == 0 and w.grounding > 0), best]
    return list(dict.fromkeys(picked))


@eval_group.command("proposals")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder (annotations.jsonl with refs and object boxes; images).")
@data_format_option
@click.option("--model", "models", multiple=True, help="A Ref-NMS checkpoint file or installed name (ref-nms-b, ref-nms-r); repeatable. Default: every installed one.")
@click.option("--split", default="test", show_default=True, help="Which split's referring expressions to use.")
@click.option("--ns", default="1,3,5,10,100", show_default=True, help="Numbers of proposals kept per image, comma-separated (the 'real' setting is always added).")
@click.option("--rpn-checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="RPN checkpoint (default: the shipped one).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"rows": [{"method": "nms" | "ref-nms-b" | "ref-nms-r", "n": N | "real", "referent_recall": x, "context_recall": x}, …]} here (percent).')
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as markdown here.")
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def proposals_command(data: Path, models: tuple[str, ...], split: str, ns: str, rpn_checkpoint: Path | None, json_path: Path | None, markdown_path: Path | None, device: str, quiet: bool) -> None:
    """Recall of the referent and the context objects with few proposals: plain NMS vs Ref-NMS (Ref-NMS Table 1).

    \b
    Example:
      engine eval proposals --data data/synth --ns 1,3,5,10,100 --json table1.json
    """
    from engine.device import resolve_device
    from engine.evaluation.ref_nms import rows_to_markdown
    from engine.models.registry import family, known_checkpoints, load_model
    from engine.protocols.ref_nms import evaluate_ref_proposals

    try:
        counts = sorted({int(n) for n in ns.split(",") if n.strip()})
    except ValueError:
        raise click.BadParameter(f"{ns!r} is not a comma-separated list of integers, e.g. 1,5,10", param_hint="--ns") from None
    if not counts or counts[0] < 1:
        raise click.BadParameter(f"{ns!r}: every N must be >= 1", param_hint="--ns")
    target = resolve_device(device)
    names = list(models) or [n for n in family("ref-nms").names if n in known_checkpoints()]
    loaded = [load_model(m, device=target, family="ref-nms") for m in names]
    part, cache, proposals = _split_with_proposals(data, split, rpn_checkpoint, target, quiet)
    config = loaded[0].config if loaded else None
    rows = evaluate_ref_proposals(part.images, proposals, cache.region_maps, loaded, ns=counts, **({"delta": config.delta, "nms_iou": config.nms_iou} if config else {}), progress=not quiet)
    table = rows_to_markdown(rows)
    click.echo(table, nl=False)
    if json_path is not None:
        _write(json_path, json.dumps({"data": str(data), "split": split, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
    if markdown_path is not None:
        _write(markdown_path, table)


@eval_group.command("grounding")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder (annotations.jsonl with refs and object boxes; images).")
@data_format_option
@click.option("--model", "models", multiple=True, help="A CM-Att checkpoint file or installed name (cm-att, cm-att-erase); repeatable. Default: every installed one.")
@click.option("--ref-nms", "ref_nms_model", default="ref-nms-r", show_default=True, help="Ref-NMS checkpoint file or installed name for the +ref-nms rows; 'none' to leave them out.")
@click.option("--split", default="test", show_default=True, help="Which split's referring expressions to ground.")
@click.option("--rpn-checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="RPN checkpoint for the detected proposals (default: the shipped one).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"rows": [{"method": "cm-att" | "cm-att-erase" | "cm-att+ref-nms" | "cm-att-erase+ref-nms", "proposals": "gt" | "det", "acc": x}, …]} here (percent).')
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as markdown here.")
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def grounding_command(data: Path, models: tuple[str, ...], ref_nms_model: str, split: str, rpn_checkpoint: Path | None, json_path: Path | None, markdown_path: Path | None, device: str, quiet: bool) -> None:
    """Referring-expression grounding top-1 accuracy with ground-truth boxes and detected proposals (Ref-NMS Table 2).

    \b
    Example:
      engine eval grounding --data data/synth --json table2.json
    """
    from engine.device import resolve_device
    from engine.evaluation.grounding import evaluate_grounding, rows_to_markdown
    from engine.models.cm_att import CM_ATT_NAMES
    from engine.models.registry import known_checkpoints, load_model

    target = resolve_device(device)
    names = list(models) or [n for n in CM_ATT_NAMES if n in known_checkpoints()]
    if not names:
        raise click.UsageError("no CM-Att checkpoint is installed; pass --model FILE (train one with `engine train cm-att-erase`)")
    scorers = [load_model(m, device=target, family="cm-att") for m in names]
    ref_nms = None if ref_nms_model.lower() == "none" else load_model(ref_nms_model, device=target, family="ref-nms")
    part, cache, proposals = _split_with_proposals(data, split, rpn_checkpoint, target, quiet)
    rows = evaluate_grounding(part.images, cache, scorers, proposals, ref_nms, progress=not quiet)
    table = rows_to_markdown(rows)
    click.echo(table, nl=False)
    if json_path is not None:
        _write(json_path, json.dumps({"data": str(data), "split": split, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
    if markdown_path is not None:
        _write(markdown_path, table)


def _split_with_proposals(data: Path, split: str, rpn_checkpoint: Path | None, device, quiet: bool):  # noqa: ANN001, ANN202
    """The split's dataset part, the backbone cache of ``data`` and the RPN's boxes of the split's images (models on ``device``)."""
    from engine.models.registry import load_model
    from engine.protocols.proposals import image_proposals
    from engine.training.options import read_splits
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.feature_cache import FeatureCache
    from indexer.region_features import RegionFeatureExtractor

    _, *parts = read_splits(data)
    part = {"train": parts[0], "val": parts[1], "test": parts[2]}.get(split)
    if part is None:
        raise click.BadParameter(f"{split!r} is not a split; choose train, val or test", param_hint="--split")
    backbone = create_backbone(BackboneConfig(), device=device)
    cache = FeatureCache(data, RegionFeatureExtractor(backbone=backbone))
    network = load_model(rpn_checkpoint, device=device, family="rpn")
    network.check_backbone(backbone.version, backbone.max_size)
    return part, cache, image_proposals(network, cache, part.images, progress=not quiet)


@eval_group.command("search")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder (annotations.jsonl, queries.jsonl, images).")
@data_format_option
@click.option("--split", default="test", show_default=True, help="Which split's images to index and queries to run; several joined by + (val+test) are indexed together, for a held-out corpus none of whose splits anything was fitted on.")
@click.option("--mode", type=click.Choice(["region", "region+text", "text"]), default="region", show_default=True, help="What each query gives the engine: its image and region, plus its text, or its text alone.")
@click.option("--index", "index_dir", type=click.Path(file_okay=False, path_type=Path), help="Build the split's index here (when missing or empty) and reuse it on later runs (when it holds exactly the split's images). Default: a temporary folder, removed afterwards.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help='Write {"metrics": {"box@1": {"value", "low", "high", "n"}, …}, "mode", "split", "queries", "index", "command", …} here (fractions in [0, 1]; rank; milliseconds).')
@click.option("--limit", type=click.IntRange(min=1), help="Run only the first N queries of the split.")
@click.option("--key-whitening", "key_whitening", default="key-whitening", show_default=True, help="The visual key's learned whitening: an installed name, a .pt file of `engine train key-whitening`, or 'none' (the un-whitened key; an ablation).")
@click.option("--layout-weight", "layout_weight", type=click.FloatRange(min=0, max=100), help="Weight of the 7x7 layout in region-only queries' stage 2 (default: the engine's; 0 ranks by the visual key alone, an ablation).")
@click.option("--layout-shortlist", "layout_shortlist", type=click.IntRange(min=1, max=100000), help="Stage-1 candidates that region-only and combined queries through the open vocabulary rescore in stage 2 (default: the engine's).")
@click.option("--instance-shortlist", "instance_shortlist", type=click.IntRange(min=1, max=100000), help="Stage-1 candidates that region-only queries rank by key and stored instance embedding before the layout stage takes the best --layout-shortlist, on an index that stores them (default: the engine's).")
@click.option("--instance-weight", "instance_weight", type=click.FloatRange(min=0, max=100), help="Weight of the instance head's cosine in region-only queries' stage 2 (default: the engine's; 0 leaves it out, an ablation). Only with the default visual key.")
@click.option("--san-gate", "san_gate", type=click.FloatRange(min=-1, max=1), help="SAN score of the query region for its text from which a combined query in the shapes words keeps the first-wave models (default: the engine's; -1 sends every such query to them, as before the open vocabulary).")
@click.option("--concept-weight", "concept_weight", type=click.FloatRange(min=0, max=100), help="Weight of the open vocabulary's ConSE score in combined queries' stage 2 (default: the engine's; 0 ranks them by the region alone, an ablation).")
@click.option("--proposal-weight", "proposal_weight", type=click.FloatRange(min=0, max=100), help="Weight of the log of each region's stored proposal score in text-only queries through the open vocabulary (default: the engine's; 0 leaves it out, an ablation).")
@click.option("--projection-weight", "projection_weight", type=click.FloatRange(min=0, max=100), help="Weight of the text projection's cosine in text-only queries through the open vocabulary (default: the engine's; 0 ranks them by ConSE alone, an ablation).")
@click.option("--san-weight", "san_weight", type=click.FloatRange(min=0, max=100), help="Weight of SAN's score in text-only queries through the open vocabulary when SAN reads MiniLM word features (default: the engine's; 0 leaves SAN out).")
@click.option("--combined-san-weight", "combined_san_weight", type=click.FloatRange(min=0, max=100), help="Weight of SAN's score in combined queries through the open vocabulary when SAN reads MiniLM word features (default: the engine's; 0 leaves SAN out).")
@click.option("--san-text-gate", "san_text_gate", type=(float, float), help="FLOOR CEILING: the range of SAN's confidence (its best FAISS match's cosine) over which its weight in a text-only query goes from 0 to --san-weight (default: the engine's).")
@click.option("--san", "san_checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A SAN checkpoint (.pt of `engine train san`) to index and query with instead of the shipped one.")
@click.option("--grn", "grn_checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A GRN-family checkpoint (.pt of `engine train grn`, …) for stage 2 of combined queries instead of the engine's (the shipped grn.pt; grn-fc.pt on the CPU for a large index).")
@device_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def search_command(ctx: click.Context, data: Path, split: str, mode: str, index_dir: Path | None, json_path: Path | None, limit: int | None, key_whitening: str, layout_weight: float | None, layout_shortlist: int | None, instance_shortlist: int | None, instance_weight: float | None, san_gate: float | None, concept_weight: float | None, projection_weight: float | None, proposal_weight: float | None, san_weight: float | None, combined_san_weight: float | None, san_text_gate: tuple[float, float] | None, san_checkpoint: Path | None, grn_checkpoint: Path | None, device: str, quiet: bool) -> None:
    """What a user sees: box@1/10, img@1/10, median rank and latency of Engine.search with the default index.

    Indexes the split's images as `engine index` would (RPN proposals, the shipped models), runs each
    query of the split through Engine.search (its own image excluded, k = 10, one hit per image as by
    default) and prints each figure with a 95 % bootstrap interval over queries. The protocol:
    docs/eval-search.md.

    \b
    Example:
      engine eval search --data data/synth --mode region+text --json search.json
    """
    from engine.evaluation.search import SearchEvalConfig, evaluate_search, metrics_table
    from indexer.component_configs import RegionFeatureConfig

    features = RegionFeatureConfig(key_whitening=None if key_whitening.lower() == "none" else key_whitening)
    if instance_weight and features.key_version != RegionFeatureConfig().key_version:
        raise click.UsageError("--instance-weight needs the default visual key: the shipped instance head reads it, so another --key-whitening leaves the head out")
    config = SearchEvalConfig(data=data, split=split, mode=mode, index_dir=index_dir, limit=limit, device=device, progress=not quiet, features=features, layout_weight=layout_weight, layout_shortlist=layout_shortlist, instance_shortlist=instance_shortlist, instance_weight=instance_weight, concept_weight=concept_weight, san_gate=san_gate, projection_weight=projection_weight, proposal_weight=proposal_weight, san_weight=san_weight, combined_san_weight=combined_san_weight, san_text_gate=san_text_gate, san_checkpoint=san_checkpoint, grn_checkpoint=grn_checkpoint)
    result = evaluate_search(config)
    indexed = f"index of {result.images} images reused (checked in {result.index_seconds:.1f} s)" if result.index_reused else f"{result.images} images indexed in {result.index_seconds:.1f} s"
    click.echo(f"engine eval search: {mode} queries, {split} split of {data}: {result.queries} queries ({result.skipped} without a positive in another image left out; {result.refused} refused by the engine, counted as misses), {indexed}, queries {result.query_seconds:.1f} s")
    click.echo(metrics_table(result), nl=False)
    click.echo(f"k = {config.k}, one hit per image (the engine default); rank: first right box among {config.depth} hits ('> {config.depth}': none)")
    if json_path is not None:
        _write(json_path, json.dumps(result.to_dict(command=_command_line(ctx)), indent=2) + "\n")


def _command_line(ctx: click.Context) -> str:
    """The command as it was given (``engine eval search --data …``), from the parsed parameters."""
    import shlex

    parts = ["engine", "eval", ctx.info_name or "search"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value is False or not isinstance(param, click.Option):
            continue
        flag = max(param.opts, key=len)
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)
