"""``engine serve`` as one shard of a sharded search: the :class:`~query.sharded_search.ShardSearcher`
calls (``encode``, ``san_confidence``, ``rank``, ``ground``) of the server's index, for a caller that fans a
query out to several servers and merges (:mod:`engine.server.shard_client`).

The server searches its index as shard 0 (its own region ids); the caller turns them into global ids. The
query image of ``encode`` comes as bytes (the caller's file is not on this machine) and is checked like an
upload. Calls share the search lock of :class:`~engine.server.service.SearchService`.
"""
from __future__ import annotations

import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from engine.api import Engine
from engine.errors import InvalidInputError
from engine.server import shard_wire
from engine.server.errors import PayloadTooLargeError
from engine.server.settings import ServerSettings
from engine.server.uploads import check_pixels
from query.request import SearchRequest

__all__ = ["ShardService", "SHARD_METHODS"]

SHARD_METHODS = ("encode", "san_confidence", "rank", "ground")
"""The :class:`ShardSearcher` methods a caller may call."""


class ShardService:
    """Answers shard calls over ``engine``'s index (a plain index: one shard's folder)."""

    def __init__(self, engine: Engine, settings: ServerSettings, lock: threading.Lock) -> None:
        self.engine = engine
        self.settings = settings
        self.lock = lock
        self._searcher = None  # query.sharded_search.ShardSearcher, built on the first call

    def call(self, method: str, body: bytes) -> bytes:
        """The answer (a body) of ``method`` called with the arguments in ``body``."""
        if method not in SHARD_METHODS:
            raise InvalidInputError(f"no shard call {method!r}; the calls are {', '.join(SHARD_METHODS)}")
        args = shard_wire.loads(body)
        if not isinstance(args, tuple):
            raise InvalidInputError("a shard call's body holds a tuple of arguments")
        with self.lock:
            searcher = self._shard_searcher()
            if method == "encode":
                return shard_wire.dumps(self._encode(searcher, *args))
            return shard_wire.dumps(getattr(searcher, method)(*args))

    def _encode(self, searcher, request: SearchRequest, image: bytes | None):  # -> query.encode.EncodedQuery
        """Encode ``request`` with its query image's ``image`` bytes written to a private temporary file."""
        if not isinstance(request, SearchRequest):
            raise InvalidInputError("encode takes a search request")
        if image is None:  # a region id, or a text alone
            return searcher.encode(request)
        if not isinstance(image, bytes):
            raise InvalidInputError("encode takes the query image's bytes")
        if len(image) > self.settings.max_upload_bytes:
            raise PayloadTooLargeError(f"the query image is over the server's limit of {self.settings.max_upload_bytes:,} bytes; send a smaller file")
        with tempfile.TemporaryDirectory(prefix="engine-shard-") as folder:
            path = Path(folder) / "query"
            path.write_bytes(image)
            check_pixels(path, max_pixels=self.settings.max_image_pixels)
            return searcher.encode(replace(request, image=path))

    def _shard_searcher(self):  # -> query.sharded_search.ShardSearcher
        if self._searcher is None:
            from query.sharded_search import ShardSearcher

            if self.engine.sharded is not None:
                raise InvalidInputError(f"index {self.engine.index_dir} is sharded: serve each shard's folder (engine shards list) as a shard server, not the whole index")
            self._searcher = ShardSearcher(self.engine.pipeline, 0)
        return self._searcher
