"""Result pictures: the query with its region, each hit with its box, and a contact sheet of all of them."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from engine.boxes import Box
from engine.results import Hit
from indexer.images import load_image

__all__ = ["draw_box", "render_results"]

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


def render_results(query_image: Image.Image, query_box: Box, hits: Sequence[Hit], out_dir: Path) -> list[Path]:
    """Write ``query.png``, ``hit_NN.png`` per hit and ``contact_sheet.png`` into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    query_pic = draw_box(query_image, query_box, colour=QUERY_COLOUR, label="query")
    written.append(_save(query_pic, out_dir / "query.png"))
    tiles = [(query_pic, "query")]
    for rank, hit in enumerate(hits, start=1):
        pic = draw_box(load_image(Path(hit.image)), hit.box, colour=HIT_COLOUR, label=f"#{rank} {hit.score:.3f}")
        written.append(_save(pic, out_dir / f"hit_{rank:02d}.png"))
        tiles.append((pic, f"#{rank} {Path(hit.image).name}"))
    written.append(_save(_contact_sheet(tiles), out_dir / "contact_sheet.png"))
    return written


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
    image.save(path, format="PNG")
    return path
