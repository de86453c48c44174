"""query/gallery.py: the --html page, also for a query image whose name is not UTF-8."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from engine.results import Hit
from query.gallery import write_gallery


def test_gallery_of_a_query_image_whose_name_is_not_utf8(tmp_path: Path) -> None:
    query = Path(os.fsdecode(os.fsencode(tmp_path) + b"/q\xe9.png"))
    hit = tmp_path / "hit.png"
    Image.new("RGB", (20, 10), (200, 0, 0)).save(query)
    Image.new("RGB", (20, 10), (0, 0, 200)).save(hit)
    page = write_gallery(tmp_path / "g.html", [Hit(image=str(hit), box=(1, 1, 9, 9), score=0.5, region_id=3)], image=query, region=(0, 0, 10, 10))
    text = page.read_text(encoding="utf-8")
    assert "q\\xe9.png" in text and "1 hits" in text
    assert not (tmp_path / "g.html.tmp").exists()
