"""Result pictures: the query with its region, each hit with its box, and a contact sheet of all of them."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from engine.boxes import Box
from engine.results import Hit
from indexer.images import load_image
from query.output import writing

__all__ = ["draw_box", "render_results", "text_card"]

QUERY_COLOUR = (40, 220, 60)
HIT_COLOUR = (255, 40, 40)
_THUMB = 256


def draw_box(image: Image.Image, box: Box, *, colour: tuple[int, int, int], label: str | None = None) -> Image.Image:
    """A copy of ``image`` with ``box`` (xyxy pixels) outlined and an optional label above it."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 160))
    draw.rectangle([float(v) for v in box], outline=colour, width=width)
    if label:
        font = ImageFont.load_default()
        x, y = float(box[0]), max(0.0, float(box[1]) - 12)
        tb = draw.textbbox((x, y), label, font=font)
        draw.rectangle(tb, fill=colour)
        draw.text((x, y), label, fill=(0, 0, 0), font=font)
    return out


def render_results(
    query_image: Image.Image | None, query_box: Box | None, hits: Sequence[Hit], out_dir: Path, *, text: str | None = None
) -> list[Path]:
    """Write ``query.png``, ``hit_NN.png`` per hit and ``contact_sheet.png`` into ``out_dir``; return the paths.

    ``query.png`` is the query image with its region, captioned with ``text`` when given; a text-only
    query (no image) gets a card with the text instead.
    """
    if query_image is None and not text:
        raise ValueError("render_results needs a query image or a query text")
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if query_image is None:
        query_pic = text_card(str(text))
    else:
        query_pic = draw_box(query_image, query_box, colour=QUERY_COLOUR, label="query")
        if text:
            query_pic = _captioned(query_pic, text)
    written.append(_save(query_pic, out_dir / "query.png"))
    tiles = [(query_pic, "query")]
    for rank, hit in enumerate(hits, start=1):
        pic = draw_box(load_image(Path(hit.image)), hit.box, colour=HIT_COLOUR, label=f"#{rank} {hit.score:.3f}")
        written.append(_save(pic, out_dir / f"hit_{rank:02d}.png"))
        tiles.append((pic, f"#{rank} {Path(hit.image).name}"))
    written.append(_save(_contact_sheet(tiles), out_dir / "contact_sheet.png"))
    return written


def text_card(text: str, width: int = _THUMB * 2) -> Image.Image:
    """A white picture with ``text`` wrapped on it in a green frame: the query tile of a text-only query."""
    lines = _wrap(f'query: "{text}"', chars=width // 7)
    card = Image.new("RGB", (width, max(width // 2, 16 * len(lines) + 24)), (255, 255, 255))
    draw = ImageDraw.Draw(card)
    draw.rectangle([0, 0, card.width - 1, card.height - 1], outline=QUERY_COLOUR, width=4)
    for i, line in enumerate(lines):
        draw.text((12, 12 + 16 * i), line, fill=(0, 0, 0), font=ImageFont.load_default())
    return card


def _captioned(pic: Image.Image, text: str) -> Image.Image:
    """``pic`` with a white band under it holding ``text``."""
    lines = _wrap(f'"{text}"', chars=max(20, pic.width // 7))
    out = Image.new("RGB", (pic.width, pic.height + 16 * len(lines) + 8), (255, 255, 255))
    out.paste(pic, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, pic.height + 4 + 16 * i), line, fill=(0, 0, 0), font=ImageFont.load_default())
    return out


def _wrap(text: str, *, chars: int) -> list[str]:
    return textwrap.wrap(text, width=chars) or [text]


def _contact_sheet(tiles: list[tuple[Image.Image, str]], columns: int = 4) -> Image.Image:
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * _THUMB, rows * (_THUMB + 14)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (pic, caption) in enumerate(tiles):
        thumb = pic.copy()
        thumb.thumbnail((_THUMB, _THUMB))
        x, y = (i % columns) * _THUMB, (i // columns) * (_THUMB + 14)
        sheet.paste(thumb, (x + (_THUMB - thumb.width) // 2, y))
        draw.text((x + 4, y + _THUMB), caption[:40], fill=(0, 0, 0), font=ImageFont.load_default())
    return sheet


def _save(image: Image.Image, path: Path) -> Path:
    with writing(path, partial=path):
        image.save(path, format="PNG")
    return path
