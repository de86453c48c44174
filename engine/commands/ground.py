"""``engine ground IMAGE --text "..."``: localize a phrase with no proposals (``--method attention``, MCB),
a referring expression among proposals (``--method cm-att``: RPN, Ref-NMS, CM-Att-Erase), or any English
phrase among proposals through the open vocabulary (``--method vocabulary``); ``auto`` (the default)
takes MCB's attention for a phrase in the words it was trained on, the vocabulary for any other."""
from __future__ import annotations

import json
from pathlib import Path

import click

from engine.commands.options import device_option

__all__ = ["ground_command"]


@click.command("ground")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--text", required=True, help="The phrase to localize, e.g. 'the red hexagon'.")
@click.option("--method", type=click.Choice(["auto", "attention", "cm-att", "vocabulary"]), default="auto", show_default=True, help="attention: the MCB attention map of the phrase, thresholded at a fraction of its maximum; the box of its largest connected component (docs/mcb.md). cm-att: RPN proposals, Ref-NMS with the text, the box CM-Att-Erase scores best (docs/cm-att.md). vocabulary: RPN proposals scored for the phrase by ConSE + the text projection, as text-only search scores regions (docs/open-vocabulary.md). auto: attention when MCB knows every content word of the phrase, else vocabulary.")
@click.option("--model", "checkpoint", help="Checkpoint file or installed name: mcb / mcb-no-sparsity for attention (default mcb), cm-att / cm-att-erase for cm-att (default cm-att-erase); vocabulary takes none.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG to write: the image with the box (attention: and the map over it; cm-att: and the Ref-NMS candidates in grey).")
@device_option
@click.option("--json", "as_json", is_flag=True, help='Print {"image", "text", "box", "peak", "picture"} as one JSON object.')
def ground_command(image: Path, text: str, method: str, checkpoint: str | None, out: Path | None, device: str, as_json: bool) -> None:
    """Localize the phrase TEXT in IMAGE and print its box (x1,y1,x2,y2 pixels).

    \b
    Example:
      engine ground photo.jpg --text "the red hexagon" --out grounded.png
      engine ground cat.jpg --text "a sleeping kitten" --out kitten.png
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
    if method == "vocabulary" and checkpoint is not None:
        raise InvalidInputError("--model names an MCB or CM-Att checkpoint; --method vocabulary uses the engine's text projection and concept table")
    grounder = AttentionGrounder(checkpoint, device=device) if method in ("auto", "attention") else None
    if grounder is None or (method == "auto" and not grounder.knows(grounder.check_text(text))):
        grounder = _vocabulary_grounder(device)  # the MCB grounder built no backbone: nothing was loaded twice
    grounding = grounder.ground(pil, [grounder.check_text(text)])[0]
    method = grounding.method
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        attention_picture(pil, grounding).save(out, format="PNG")
    box = [round(float(v), 1) for v in grounding.box]
    if as_json:
        click.echo(json.dumps({"image": str(image), "text": text, "method": method, "box": box, "peak": round(grounding.peak, 4), "picture": str(out) if out else None}))
        return
    what = "attention peak" if method == "attention" else "open-vocabulary score"
    click.echo(f"box {','.join(f'{v:.0f}' for v in box)} ({what} {grounding.peak:.3f})")
    if out is not None:
        click.echo(f"wrote {out} (image with the box | {'attention map' if method == 'attention' else 'proposal scores'} over the image)")


def _vocabulary_grounder(device: str):  # -> query.vocabulary_grounding.VocabularyGrounder
    """The open vocabulary's grounder with the engine's default models and weights (no index is opened)."""
    from engine.api import Engine
    from engine.config import EngineConfig, default_index_dir

    return Engine(default_index_dir(), config=EngineConfig(device=device)).vocabulary_grounder()


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
