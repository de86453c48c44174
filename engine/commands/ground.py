"""``engine ground IMAGE --text "..."``: localize a phrase with no proposals (``--method attention``, MCB)
or a referring expression among proposals (``--method cm-att``: RPN, Ref-NMS, CM-Att-Erase)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from engine.commands.options import device_option

__all__ = ["ground_command"]


@click.command("ground")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--text", required=True, help="The phrase to localize, e.g. 'the red hexagon'.")
@click.option("--method", type=click.Choice(["attention", "cm-att"]), default="attention", show_default=True, help="attention: the MCB attention map of the phrase, thresholded at a fraction of its maximum; the box of its largest connected component (docs/mcb.md). cm-att: RPN proposals, Ref-NMS with the text, the box CM-Att-Erase scores best (docs/cm-att.md).")
@click.option("--model", "checkpoint", help="Checkpoint file or installed name: mcb / mcb-no-sparsity for attention (default mcb), cm-att / cm-att-erase for cm-att (default cm-att-erase).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG to write: the image with the box (attention: and the map over it; cm-att: and the Ref-NMS candidates in grey).")
@device_option
@click.option("--json", "as_json", is_flag=True, help='Print {"image", "text", "box", "peak", "picture"} as one JSON object.')
def ground_command(image: Path, text: str, method: str, checkpoint: str | None, out: Path | None, device: str, as_json: bool) -> None:
    """Localize the phrase TEXT in IMAGE without proposals and print its box (x1,y1,x2,y2 pixels).

    \b
    Example:
      engine ground photo.jpg --text "the red hexagon" --out grounded.png
    """
    from engine.errors import InvalidInputError
    from indexer.images import load_image
    from query.explain import AttentionGrounder, attention_picture

    if out is not None and out.suffix.lower() != ".png":
        raise InvalidInputError(f"--out {out} must be a .png file")
    pil = load_image(image)
    if method == "cm-att":
        _ground_referring(image, pil, text, checkpoint, out, device, as_json)
        return
    grounder = AttentionGrounder(checkpoint, device=device)
    grounding = grounder.ground(pil, [grounder.check_text(text)])[0]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        attention_picture(pil, grounding).save(out, format="PNG")
    box = [round(float(v), 1) for v in grounding.box]
    if as_json:
        click.echo(json.dumps({"image": str(image), "text": text, "method": method, "box": box, "peak": round(grounding.peak, 4), "picture": str(out) if out else None}))
        return
    click.echo(f"box {','.join(f'{v:.0f}' for v in box)} (attention peak {grounding.peak:.3f})")
    if out is not None:
        click.echo(f"wrote {out} (image with the box | attention map over the image)")


def _ground_referring(image: Path, pil, text: str, checkpoint: str | None, out: Path | None, device: str, as_json: bool) -> None:  # noqa: ANN001
    from query.referring import ReferringGrounder, referring_picture

    grounding = ReferringGrounder(checkpoint, device=device).ground(image, text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        referring_picture(pil, grounding).save(out, format="PNG")
    box = [round(float(v), 1) for v in grounding.box]
    if as_json:
        click.echo(json.dumps({"image": str(image), "text": text, "method": "cm-att", "box": box, "score": round(grounding.score, 4), "candidates": len(grounding.candidates), "picture": str(out) if out else None}))
        return
    click.echo(f"box {','.join(f'{v:.0f}' for v in box)} (CM-Att score {grounding.score:.3f}, {len(grounding.candidates)} Ref-NMS candidates)")
    if out is not None:
        click.echo(f"wrote {out} (grounded box in red, Ref-NMS candidates in grey)")
