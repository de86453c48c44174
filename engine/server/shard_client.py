"""``engine query --shard-servers URL,URL,...``: a sharded search whose shards are running ``engine serve``
servers, one per shard, called over HTTP (the standard library's urllib) and merged here.

:class:`ServerShards` is a :class:`~query.sharded_search.ShardFanout`: shard ``i`` is the ``i``-th address.
Each server searches its own index with its own region ids; this side turns them into global ids
(``i << 40 | local``, :mod:`indexer.shards`) and back. The query image is read here and sent to the server
that encodes it. :class:`ShardServers` runs :class:`~query.sharded_search.ShardedSearch` over them, as
:meth:`Engine.search` does over a sharded index's folders.
"""
from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from engine.boxes import Box
from engine.config import EngineConfig
from engine.errors import EngineError, ImageReadError, InvalidInputError
from engine.results import Hit
from engine.server import shard_wire
from engine.server.client import post
from indexer.shards import global_id, split_id
from query.filters import HitFilter
from query.localize import Stage3Candidates, Stage3Weights, load_stage3_weights
from query.request import SearchRequest
from query.sharded_search import ShardedSearch, ShardRanking

__all__ = ["ServerShards", "ShardServers", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0
"""How long to wait for one call: a server's first call loads its models."""


def _shard_url(server: str) -> str:
    parts = urllib.parse.urlsplit(server.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInputError(f"shard server {server!r} is not an http(s) address; give e.g. http://10.0.0.5:8000")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/api/shard/", "", ""))


class ServerShards:
    """The shards behind ``servers`` (shard ``i`` = ``servers[i]``), called concurrently."""

    def __init__(self, servers: Sequence[str], *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not servers:
            raise InvalidInputError("--shard-servers needs at least one address, e.g. http://10.0.0.5:8000,http://10.0.0.6:8000")
        self.servers = [s.strip() for s in servers]
        self.urls = [_shard_url(s) for s in self.servers]
        self.token = token
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self.urls)

    def call(self, position: int, method: str, *args: object) -> object:
        """``method`` of shard ``position``'s searcher: ids made local on the way out, global on the way back."""
        if method == "encode":
            (request,) = args
            args = self._encode_args(position, request)  # type: ignore[arg-type]
        answer = self._post(position, method, shard_wire.dumps(tuple(args)))
        return self._globalised(position, answer)

    def call_many(self, calls: Sequence[tuple[int, str, tuple[object, ...]]]) -> list[object]:
        if len(calls) <= 1:
            return [self.call(position, method, *args) for position, method, args in calls]
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(lambda c: self.call(c[0], c[1], *c[2]), calls))

    def _encode_args(self, position: int, request: SearchRequest) -> tuple[object, ...]:
        if request.region_id is not None:
            shard, local = split_id(request.region_id)
            if shard != position:
                raise InvalidInputError(f"region {request.region_id} is not in shard {position}")
            return replace(request, region_id=local), None
        if request.image is None:
            return request, None
        try:
            image = Path(request.image).read_bytes()
        except OSError as exc:
            raise ImageReadError(f"cannot read image {str(request.image)!r}: {exc.strerror or exc}; check the path") from None
        return request, image

    def _globalised(self, position: int, answer: object) -> object:
        if isinstance(answer, ShardRanking):
            return replace(answer, hits=[replace(h, region_id=global_id(position, h.region_id)) for h in answer.hits])
        if isinstance(answer, dict):
            return {path: self._global_candidates(position, c) for path, c in answer.items()}
        return answer

    @staticmethod
    def _global_candidates(position: int, candidates: Stage3Candidates) -> Stage3Candidates:
        rows = [replace(r, id=global_id(position, r.id), image_id=global_id(position, r.image_id)) for r in candidates.rows]
        return replace(candidates, rows=rows)

    def _post(self, position: int, method: str, body: bytes) -> object:
        server = self.servers[position]
        who = f"shard server {server} (shard {position})"
        data = post(self.urls[position] + method, body, content_type=shard_wire.CONTENT_TYPE, accept=shard_wire.CONTENT_TYPE, token=self.token, timeout=self.timeout, who=who, advice="start it with `engine serve --index SHARD_FOLDER`")
        try:
            return shard_wire.loads(data)
        except InvalidInputError:
            raise EngineError(f"{who} did not answer a shard call; is it `engine serve` of this version?") from None


class ShardServers:
    """Search the shards behind ``servers`` as one index: ``ShardServers(urls).search(image=…, text=…)``.

    ``config`` gives the shortlist and stage 3's weights of the merge (the servers rank and ground with
    their own models and settings; keep them the same version)."""

    def __init__(self, servers: Sequence[str], *, token: str | None = None, config: EngineConfig | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.config = config or EngineConfig()
        self.shards = ServerShards(servers, token=token, timeout=timeout)
        self._search = ShardedSearch(self.shards, shortlist=self.config.shortlist, stage3_weights=self._stage3_weights)

    def _stage3_weights(self) -> Stage3Weights | None:
        return (self.config.stage3_weights or load_stage3_weights()) if self.config.stage3 else None

    def search(self, image: Path | str | None = None, region: Box | None = None, text: str | None = None, *, k: int = 10, exclude_self: bool = False, region_id: int | None = None, filters: HitFilter | None = None) -> list[Hit]:
        """The ``k`` best hits over every shard (region ids global), as :meth:`Engine.search`."""
        request = SearchRequest(image=image, region=region, text=text, k=k, exclude_self=exclude_self, region_id=region_id, filters=filters or HitFilter())
        return self._search.run(request)
