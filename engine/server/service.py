"""The one reader :class:`~engine.api.Engine` of a server, shared by every request, one call at a time.

Its models load once (on the first query) and stay; its index reader catches up with what an indexing
job commits (:mod:`engine.server.jobs` writes through its own ``Engine``). Calls are serialised by a lock:
the models are not meant to be entered by several threads at once, and a query already uses every core.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

from engine.api import Engine
from engine.boxes import Box, parse_box, validate_box
from engine.errors import InvalidInputError
from engine.results import Hit
from engine.server.errors import NotFoundError
from engine.server.schemas import SearchBody
from query.filters import HitFilter

__all__ = ["SearchService", "parse_region"]


def parse_region(region: list[float] | str | None) -> Box | None:
    """``[x1, y1, x2, y2]`` or ``"x1,y1,x2,y2"`` as a box (checked against the image later, by the search)."""
    if region is None:
        return None
    if isinstance(region, str):
        return parse_box(region, what="region")
    return validate_box(region, what="region")


class SearchService:
    """Searches, lookups and index facts of one :class:`Engine`, one at a time."""

    def __init__(self, engine: Engine, *, max_k: int) -> None:
        self.engine = engine
        self.max_k = max_k
        self.lock = threading.Lock()
        self._attention: Any = None  # query.explain.AttentionGrounder, built on the first explanation by MCB

    def search(self, body: SearchBody, *, upload: Path | None = None) -> list[Hit]:
        """The hits of ``body``; ``upload`` is an uploaded query image (instead of ``body.image``)."""
        if body.k > self.max_k:
            raise InvalidInputError(f"k = {body.k} is over the server's limit of {self.max_k}; ask for fewer hits")
        if upload is not None and body.image is not None:
            raise InvalidInputError("give the query image once: an uploaded file or an indexed image id, not both")
        region = parse_region(body.region)
        filters = HitFilter(path_glob=body.path_glob, min_score=body.min_score, max_per_image=body.max_per_image)
        with self.lock:
            if body.region_id is not None:
                self.engine.region(body.region_id)  # an unknown id is a 404, not a failed search
            image: Path | str | None = upload
            if body.image is not None:
                image = self.engine.image(body.image).path
            return self.engine.search(image=image, region=region, text=body.text, k=body.k, exclude_self=body.exclude_self, region_id=body.region_id, filters=filters)

    def info(self) -> dict[str, Any]:
        """What ``engine info --json`` prints."""
        with self.lock:
            return self.engine.info().to_dict()

    def image(self, image_id: int):  # -> indexer.store.ImageEntry
        with self.lock:
            return self.engine.image(image_id)

    def images(self, *, offset: int, limit: int) -> list[dict[str, object]]:
        with self.lock:
            return [entry.to_dict() for entry in self.engine.images(offset=offset, limit=limit)]

    def region(self, region_id: int):  # -> indexer.store.RegionRow
        with self.lock:
            return self.engine.region(region_id)

    def explain(self, region_id: int, text: str, *, via: str = "auto") -> bytes:
        """PNG: the region's image with its box beside the map of ``text`` over it (``engine query --explain``).

        ``via``: ``vocabulary`` (the open vocabulary's proposal scores, as a search through it reads the
        text), ``attention`` (MCB), or ``auto``: MCB when it knows every content word, else the vocabulary."""
        from indexer.images import load_image
        from query.explain import attention_picture

        with self.lock:
            row = self.engine.region(region_id)
            if not Path(row.image_path).is_file():
                raise NotFoundError(f"the image file of region {row.id} is gone from the disk; re-run `engine index` on its folder")
            grounder = self._grounder(text, via)
            image = load_image(row.image_path)
            grounding = grounder.ground(image, [grounder.check_text(text)])[0]
        out = io.BytesIO()
        attention_picture(image, grounding, box=row.box).save(out, format="PNG")
        return out.getvalue()

    def _grounder(self, text: str, via: str):  # -> query.explain.Grounder
        """The grounder for ``via`` (the MCB one built once); call under the lock."""
        if via != "vocabulary":
            if self._attention is None:
                from query.explain import AttentionGrounder

                self._attention = AttentionGrounder(device=self.engine.config.device)
            if via == "attention" or self._attention.knows(self._attention.check_text(text)):
                return self._attention
        return self.engine.vocabulary_grounder()

    def close(self) -> None:
        with self.lock:
            self.engine.close()
