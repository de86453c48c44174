"""Pictures the API serves besides the image files themselves: the crop of a region."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from engine.boxes import clip_box
from indexer.images import load_image

__all__ = ["crop_jpeg"]


def crop_jpeg(path: Path | str, box: Sequence[float], *, quality: int = 90) -> bytes:
    """The pixels of ``box`` (xyxy, in the upright image as indexed: EXIF orientation applied) as JPEG
    bytes; the box is clipped to the image and is at least one pixel."""
    image = load_image(path)
    width, height = image.size
    x1, y1, x2, y2 = clip_box(box, width, height)
    left, top = min(int(x1), width - 1), min(int(y1), height - 1)
    right, bottom = min(width, max(left + 1, math.ceil(x2))), min(height, max(top + 1, math.ceil(y2)))
    out = io.BytesIO()
    image.crop((left, top, right, bottom)).save(out, format="JPEG", quality=quality)
    return out.getvalue()
