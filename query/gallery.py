"""``--html FILE``: one self-contained page (images inlined as data URIs) with the query and its hits."""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from engine.boxes import Box
from engine.errors import EngineError
from engine.results import Hit
from indexer.images import load_image
from indexer.scan import printable_path
from query.output import writing
from query.render import HIT_COLOUR, QUERY_COLOUR, draw_box

__all__ = ["write_gallery"]

THUMB = 320

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em} .query{display:flex;gap:1em;align-items:flex-start;margin-bottom:1.5em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1em}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:.5em;border-radius:4px}
figure img{width:100%;height:auto;display:block} figcaption{font-size:.8em;word-break:break-all}
table{border-collapse:collapse;font-size:.8em} td{padding:0 .4em 0 0}
"""


def write_gallery(path: Path, hits: Sequence[Hit], *, image: Path | str | None = None, region: Box | None = None, text: str | None = None) -> Path:
    """Write the gallery page to ``path`` (a temp file renamed into place) and return ``path``."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>engine query results</title>", f"<style>{_STYLE}</style></head><body>"]
    parts.append("<h1>Query</h1><div class='query'>")
    if image is not None:
        query = load_image(image)
        box = region or (0, 0, query.width, query.height)
        parts.append(f"<figure style='max-width:{THUMB}px'><img alt='query' src='{_data_uri(draw_box(query, box, colour=QUERY_COLOUR))}'><figcaption>{html.escape(printable_path(image))}<br>region {_box(box)}</figcaption></figure>")
    if text:
        parts.append(f"<p><b>text:</b> {html.escape(text)}</p>")
    parts.append(f"</div><h1>{len(hits)} hits</h1><div class='grid'>")
    for rank, hit in enumerate(hits, start=1):
        parts.append(_hit_figure(rank, hit))
    parts.append("</div></body></html>\n")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, partial=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(parts), encoding="utf-8")
        tmp.replace(path)
    return path


def _hit_figure(rank: int, hit: Hit) -> str:
    try:
        src = _data_uri(draw_box(load_image(hit.image), hit.box, colour=HIT_COLOUR, label=f"#{rank}"))
        img = f"<img alt='hit {rank}' src='{src}'>"
    except EngineError as exc:  # the indexed file is gone or changed since: say so, keep the rest
        img = f"<p>(image unavailable: {html.escape(str(exc))})</p>"
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in hit.scores.items())
    return (
        f"<figure>{img}<figcaption><b>#{rank}</b> score {hit.score:.4f} · region {hit.region_id} · box {_box(hit.box)}<br>"
        f"{html.escape(hit.image)}<table>{rows}</table></figcaption></figure>"
    )


def _data_uri(image: Image.Image) -> str:
    image = image.copy()
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _box(box: Box) -> str:
    return ",".join(f"{float(v):.0f}" for v in box)
