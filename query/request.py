"""One search request: what :meth:`engine.api.Engine.search` takes, and one line of a batch file."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.boxes import Box
from engine.errors import InvalidInputError
from query.filters import HitFilter

__all__ = ["SearchRequest", "MAX_TEXT_CHARS", "MAX_REGION_ID"]

MAX_TEXT_CHARS = 1000
"""Longest accepted query text. The training descriptions have 5–30 words; a 100,000-character text
took 3–9 s to encode (benchmarks/results/fuzz.json) and matched nothing better than its first sentence."""

MAX_REGION_ID = 2**63 - 1
"""Largest region id (SQLite's integer range); a larger one cannot name an indexed region."""


@dataclass(frozen=True)
class SearchRequest:
    """A query: an image (and a region of it), or an indexed region (``region_id``), and/or a text.

    ``k`` hits; ``exclude_self`` drops hits from the query image (same content hash); ``filters``
    restrict the hits; ``id`` names the request in a batch's output.
    """

    image: Path | str | None = None
    region: Box | list[float] | None = None
    text: str | None = None
    k: int = 10
    exclude_self: bool = False
    region_id: int | None = None
    filters: HitFilter | None = None
    id: Any = None

    def validate(self) -> None:
        """A clear one-line error for a request that cannot be answered."""
        if self.text is not None and not isinstance(self.text, str):
            raise InvalidInputError(f"--text must be a string, got {type(self.text).__name__}; describe the region in words")
        if self.image is not None and not isinstance(self.image, (str, Path)):
            raise InvalidInputError(f"--image must be a file path, got {type(self.image).__name__}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {_show(self.k)}; e.g. -k 10")
        if not isinstance(self.exclude_self, bool):
            raise InvalidInputError(f"exclude_self must be true or false, got {_show(self.exclude_self)}")
        if self.filters is not None and not isinstance(self.filters, HitFilter):
            raise InvalidInputError(f"filters must be a HitFilter, got {type(self.filters).__name__}")
        if isinstance(self.id, float) and not math.isfinite(self.id):
            raise InvalidInputError(f"id must be a string, an integer or a finite number, got {self.id!r}; it is echoed in JSON output")
        if self.text is not None and not self.text.strip():
            raise InvalidInputError("--text is empty; describe the region in words, e.g. --text \"a red circle left of a blue square\"")
        if self.text is not None and len(self.text) > MAX_TEXT_CHARS:
            raise InvalidInputError(f"--text is {len(self.text):,} characters long; a description may have at most {MAX_TEXT_CHARS:,} (a sentence or two)")
        if self.region_id is not None:
            if self.image is not None or self.region is not None:
                raise InvalidInputError("--region-id is a query by itself: leave out --image and --region (the indexed region gives both)")
            if isinstance(self.region_id, bool) or not isinstance(self.region_id, int):
                raise InvalidInputError(f"--region-id must be an integer region id, got {_show(self.region_id)}")
            if not 0 <= self.region_id <= MAX_REGION_ID:
                raise InvalidInputError(f"--region-id {_show(self.region_id)} is out of range: region ids are 0 to 2^63-1; take one from earlier hits (engine query --json)")
            return
        if self.image is None:
            if self.text is None:
                raise InvalidInputError("a query needs an image, a region id or a text: pass --image FILE (and optionally --region x1,y1,x2,y2), --region-id N and/or --text \"...\"")
            if self.region is not None:
                raise InvalidInputError("--region needs --image: the region is a box in that image")


def _show(value: object, limit: int = 60) -> str:
    """A short one-line ``repr`` for messages (a 10,000-digit number stays readable)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
