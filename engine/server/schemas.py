"""Request bodies of the HTTP API (pydantic): a search, and an indexing job."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from query.request import MAX_REGION_ID

__all__ = ["SearchBody", "IndexBody", "SEARCH_FIELDS"]


class SearchBody(BaseModel):
    """A search: ``region_id`` (more like this indexed region), or ``image`` (an indexed image's id) with an
    optional ``region``, and/or ``text``; ``k`` and the filters of ``engine query``. An uploaded image (a
    multipart request) takes the place of ``image``."""

    model_config = ConfigDict(extra="forbid")

    region_id: int | None = Field(default=None, ge=0, le=MAX_REGION_ID, description="Query with an indexed region (a region_id from earlier hits).")
    image: int | None = Field(default=None, ge=0, description="Query image: the id of an indexed image (GET /api/images). In a multipart request, an uploaded file instead.")
    region: list[float] | str | None = Field(default=None, description="Query region in the image, pixels: [x1, y1, x2, y2] or \"x1,y1,x2,y2\" (default: the whole image).", examples=[[10, 10, 80, 80]])
    text: str | None = Field(default=None, description="Description of the region, in any English; alone: text-only search.")
    k: int = Field(default=10, ge=1, description="Number of hits (at most the server's limit, 1000 by default).")
    exclude_self: bool = Field(default=False, description="Drop hits from the query image itself (same content hash).")
    path_glob: str | None = Field(default=None, description="Keep only hits whose image path matches this glob.")
    min_score: float | None = Field(default=None, description="Keep only hits with at least this score.")
    max_per_image: int = Field(default=1, ge=0, description="At most this many hits per image; 0: no limit.")


SEARCH_FIELDS = tuple(SearchBody.model_fields)
"""The field names a multipart search may carry besides the uploaded ``image`` file."""


class IndexBody(BaseModel):
    """Start indexing ``folder`` (relative to the server's corpus root, or an absolute path under it)."""

    model_config = ConfigDict(extra="forbid")

    folder: str = Field(min_length=1, description="Folder of images, relative to --corpus-root (or absolute, under it).")
    proposals: str = Field(default="auto", pattern="^(auto|rpn|gt|selective-search)$", description="Region source, as `engine index --proposals`.")
    batch_size: int = Field(default=8, ge=1, le=256, description="Images per backbone batch and per commit.")
