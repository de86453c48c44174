"""Batched queries: reading a JSONL batch file, encoding its query regions in shared backbone passes,
and writing one JSON line of results per request (``engine query --batch FILE --out FILE``).

A batch line is a JSON object with the keys of :class:`query.request.SearchRequest`: ``image``,
``region`` ([x1, y1, x2, y2]), ``text``, ``region_id``, ``k``, ``exclude_self``, ``id``, and the
filters ``path_glob``, ``min_score``, ``max_per_image``. Relative image paths are resolved against
the batch file's folder. Each output line is ``{"id": …, "hits": [...]}`` or ``{"id": …, "error": "…"}``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError, InvalidInputError
from engine.results import Hit
from query.encode import QueryRegion, load_query_region
from query.filters import HitFilter
from query.request import SearchRequest

__all__ = ["read_batch", "encode_requests", "result_line"]

_REQUEST_KEYS = {"image", "region", "text", "region_id", "k", "exclude_self", "id"}
_FILTER_KEYS = {"path_glob", "min_score", "max_per_image"}


def read_batch(path: Path, *, defaults: dict[str, Any] | None = None) -> list[SearchRequest | EngineError]:
    """One :class:`SearchRequest` per non-empty line (or the error that line has, naming its number)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read batch file {path}: {exc}") from None
    out: list[SearchRequest | EngineError] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                out.append(_request(json.loads(line), path.parent, number, defaults or {}))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                out.append(InvalidInputError(f"{path} line {number}: {exc}".replace("\n", " ")))
    if not out:
        raise InvalidInputError(f"batch file {path} holds no queries; write one JSON object per line, e.g. {{\"image\": \"q.jpg\", \"text\": \"a red circle\"}}")
    return out


def _request(obj: Any, root: Path, number: int, defaults: dict[str, Any]) -> SearchRequest:  # noqa: ANN401
    if not isinstance(obj, dict):
        raise InvalidInputError(f"line {number} is not a JSON object")
    unknown = set(obj) - _REQUEST_KEYS - _FILTER_KEYS
    if unknown:
        raise InvalidInputError(f"line {number} has unknown keys {sorted(unknown)}; use {sorted(_REQUEST_KEYS | _FILTER_KEYS)}")
    fields = {**defaults, **{k: v for k, v in obj.items() if k in _REQUEST_KEYS}}
    fields.setdefault("id", number)
    if fields.get("image") is not None:
        image = Path(str(fields["image"]))
        fields["image"] = image if image.is_absolute() else root / image
    if fields.get("region") is not None:
        region = fields["region"]
        if not isinstance(region, list) or len(region) != 4:
            raise InvalidInputError(f"line {number}: region must be [x1, y1, x2, y2]")
        fields["region"] = tuple(float(v) for v in region)
    filters = {k: obj[k] for k in _FILTER_KEYS if k in obj}
    if filters:
        fields["filters"] = HitFilter(**filters)
    return SearchRequest(**fields)


def encode_requests(extractor, requests: Sequence[SearchRequest], *, batch_size: int) -> dict[int, tuple[QueryRegion, np.ndarray, np.ndarray] | EngineError]:  # noqa: ANN001
    """``(query, map, vector)`` per request with an image (or its :class:`EngineError`): the regions of
    one image share a backbone pass, images of one size go ``batch_size`` at a time."""
    loaded: dict[int, QueryRegion | EngineError] = {}
    for i, r in enumerate(requests):
        if isinstance(r, SearchRequest) and r.image is not None and r.region_id is None:
            try:
                loaded[i] = load_query_region(r.image, r.region)
            except EngineError as exc:
                loaded[i] = exc
    out: dict[int, Any] = {i: q for i, q in loaded.items() if isinstance(q, EngineError)}
    by_size: dict[tuple[int, int], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, q in loaded.items():
        if isinstance(q, QueryRegion):
            by_size[q.image.size][str(q.path)].append(i)
    for groups in by_size.values():
        files = list(groups.values())
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = [loaded[idx[0]].image for idx in chunk]
            boxes = [np.asarray([loaded[i].box for i in idx], np.float32) for idx in chunk]
            for idx, (maps, vectors) in zip(chunk, extractor(images, boxes)):
                for j, i in enumerate(idx):
                    out[i] = (loaded[i], maps[j], vectors[j])
    return out


def result_line(request: SearchRequest | EngineError, result: list[Hit] | EngineError, number: int) -> str:
    """The output JSON line of one request."""
    rid = request.id if isinstance(request, SearchRequest) else number
    if isinstance(result, EngineError):
        return json.dumps({"id": rid, "error": str(result)})
    return json.dumps({"id": rid, "hits": [h.to_dict() for h in result]})
