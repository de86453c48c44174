"""Batched queries: reading a JSONL batch file, encoding its query regions in shared backbone passes,
and writing one JSON line of results per request (``engine query --batch FILE --out FILE``).

A batch line is a JSON object with the keys of :class:`query.request.SearchRequest`: ``image``,
``region`` ([x1, y1, x2, y2]), ``text``, ``region_id``, ``k``, ``exclude_self``, ``id``, and the
filters ``path_glob``, ``min_score``, ``max_per_image``. Relative image paths are resolved against
the batch file's folder. Each output line is ``{"id": …, "hits": [...]}`` or ``{"id": …, "error": "…"}``:
a line that is not valid JSON, has a wrong-typed field or cannot be answered gets its error, and the
other lines run.

:func:`run_batch` streams: it reads the lines lazily and answers them :data:`BATCH_CHUNK` at a time
(the decoded query images of one chunk are alive at once, a file named by several lines of it is
decoded once), writing each chunk's results before it reads the next, so its memory does not grow
with the number of lines.
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, TextIO

from engine.boxes import validate_box
from engine.errors import EngineError, InvalidInputError
from engine.results import Hit
from query.encode import EncodedQuery, QueryRegion, load_query_region
from query.filters import HitFilter
from query.output import writing
from query.request import SearchRequest


__all__ = ["BATCH_CHUNK", "BatchSummary", "BatchSearcher", "iter_batch", "read_batch", "encode_requests", "result_line", "run_batch"]

log = logging.getLogger(__name__)

BATCH_CHUNK = 64
"""Lines of a batch answered together: their query images are decoded and encoded in one go and
dropped before the next chunk (about 1 MB of decoded pixels per 640-pixel line)."""

_REQUEST_KEYS = {"image", "region", "text", "region_id", "k", "exclude_self", "id"}
_FILTER_KEYS = {"path_glob", "min_score", "max_per_image"}

Line = SearchRequest | EngineError
"""One non-empty line of a batch: its request, or the error that line has (naming its number)."""


class QueryEncoder(Protocol):
    """What batches encode with: :class:`query.encode.VisualQueryEncoder`."""

    def encode_batch(self, images: Sequence[Any], queries: Sequence[Sequence[QueryRegion]]) -> list[EncodedQuery]: ...


class BatchSearcher(Protocol):
    """What :func:`run_batch` searches with (:class:`engine.api.Engine`)."""

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[list[Hit] | EngineError]: ...


@dataclass(frozen=True)
class BatchSummary:
    """What :func:`run_batch` did: ``queries`` lines answered, ``errors`` of them with an error."""

    queries: int
    errors: int


def iter_batch(path: Path, *, defaults: dict[str, Any] | None = None) -> Iterator[Line]:
    """One :class:`SearchRequest` per non-empty line (or the error that line has), read lazily.

    A batch file that cannot be opened is an :class:`InvalidInputError` before the first line.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the generator below
    except OSError as exc:
        raise InvalidInputError(f"cannot read batch file {path}: {exc}") from None
    return _lines(handle, path, defaults or {})


def _lines(handle: Any, path: Path, defaults: dict[str, Any]) -> Iterator[Line]:  # noqa: ANN401
    with handle:
        for number, raw in enumerate(_read_lines(handle, path), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield InvalidInputError(f"{path} line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                yield _request(json.loads(line, parse_constant=_no_constant), path.parent, number, defaults)
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                yield InvalidInputError(f"{path} line {number}: {exc}".replace("\n", " "))


def _read_lines(handle: Any, path: Path) -> Iterator[bytes]:  # noqa: ANN401
    try:
        yield from handle
    except OSError as exc:
        raise InvalidInputError(f"cannot read batch file {path}: {exc}") from None


def read_batch(path: Path, *, defaults: dict[str, Any] | None = None) -> list[Line]:
    """Every line of :func:`iter_batch` at once (a small batch); an empty batch is an error."""
    out = list(iter_batch(path, defaults=defaults))
    if not out:
        raise _empty(Path(path))
    return out


def _empty(path: Path) -> InvalidInputError:
    return InvalidInputError(f"batch file {path} holds no queries; write one JSON object per line, e.g. {{\"image\": \"q.jpg\", \"text\": \"a red circle\"}}")


def _no_constant(name: str) -> float:
    raise InvalidInputError(f"{name} is not a JSON number; write finite numbers (ids as strings or integers)")


def _request(obj: Any, root: Path, number: int, defaults: dict[str, Any]) -> SearchRequest:  # noqa: ANN401
    """The request of one parsed line; a wrong-typed field is an :class:`InvalidInputError` naming it."""
    if not isinstance(obj, dict):
        raise InvalidInputError("not a JSON object; write one object per line, e.g. {\"image\": \"q.jpg\"}")
    unknown = set(obj) - _REQUEST_KEYS - _FILTER_KEYS
    if unknown:
        raise InvalidInputError(f"unknown keys {sorted(unknown)}; use {sorted(_REQUEST_KEYS | _FILTER_KEYS)}")
    fields = {**defaults, **{k: v for k, v in obj.items() if k in _REQUEST_KEYS}}
    fields.setdefault("id", number)
    if fields.get("image") is not None:
        if not isinstance(fields["image"], str) or not fields["image"]:
            raise InvalidInputError(f"image must be a file path string, got {_show(fields['image'])}")
        image = Path(fields["image"])
        fields["image"] = image if image.is_absolute() else root / image
    if fields.get("region") is not None:
        region = fields["region"]
        if not isinstance(region, list) or len(region) != 4 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in region):
            raise InvalidInputError(f"region must be [x1, y1, x2, y2] (4 numbers), got {_show(region)}")
        try:
            box = tuple(float(v) for v in region)
        except OverflowError:
            box = (math.inf,)
        if not all(math.isfinite(v) for v in box):
            raise InvalidInputError(f"region {_show(region)} holds a number too large for a pixel coordinate")
        fields["region"] = box
    filters = {k: obj[k] for k in _FILTER_KEYS if k in obj}
    if filters:
        fields["filters"] = HitFilter(**filters)
    # Every other field is checked by SearchRequest.validate when the request runs (its answer then
    # carries the request's own id).
    return SearchRequest(**fields)


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_requests(encoder: QueryEncoder, requests: Sequence[Line], *, batch_size: int) -> dict[int, EncodedQuery | EngineError]:
    """The encoded query region per request with an image (or its :class:`EngineError`): an image
    file named by several requests is decoded once, the regions of one image share a backbone pass
    (``encoder``: a :class:`~query.encode.VisualQueryEncoder`), images of one size go ``batch_size`` at a time."""
    loaded = _load_queries(requests)
    out: dict[int, EncodedQuery | EngineError] = {i: q for i, q in loaded.items() if isinstance(q, EngineError)}
    by_size: dict[tuple[int, int], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, q in loaded.items():
        if isinstance(q, QueryRegion):
            by_size[q.image.size][str(q.path)].append(i)
    for groups in by_size.values():
        files = list(groups.values())
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = [loaded[idx[0]].image for idx in chunk]
            encoded = encoder.encode_batch(images, [[loaded[i] for i in idx] for idx in chunk])
            out.update(zip((i for idx in chunk for i in idx), encoded))
    return out


def _load_queries(requests: Sequence[Line]) -> dict[int, QueryRegion | EngineError]:
    """The loaded query of every request with an image (not a region id): each file decoded once."""
    files: dict[str, QueryRegion | EngineError] = {}
    loaded: dict[int, QueryRegion | EngineError] = {}
    for i, r in enumerate(requests):
        if not (isinstance(r, SearchRequest) and r.image is not None and r.region_id is None):
            continue
        key = str(r.image)
        if key not in files:
            try:
                files[key] = load_query_region(r.image, None)
            except EngineError as exc:
                files[key] = exc
        whole = files[key]
        if isinstance(whole, EngineError) or r.region is None:
            loaded[i] = whole
            continue
        try:
            box = validate_box(r.region, *whole.image.size, what="--region")
        except EngineError as exc:
            loaded[i] = exc
            continue
        loaded[i] = QueryRegion(path=whole.path, image=whole.image, content_hash=whole.content_hash, box=box)
    return loaded


def result_line(request: Line, result: list[Hit] | EngineError, number: int) -> str:
    """The output JSON line of one request (strict JSON: a non-finite number in a result becomes
    that request's error)."""
    rid = request.id if isinstance(request, SearchRequest) else number
    if isinstance(result, EngineError):
        return json.dumps({"id": rid, "error": str(result)})
    try:
        return json.dumps({"id": rid, "hits": [h.to_dict() for h in result]}, allow_nan=False)
    except ValueError:
        return json.dumps({"id": rid, "error": "a hit's score is not a finite number: the index may be damaged; rebuild it (engine index into a new folder)"})


def run_batch(searcher: BatchSearcher, batch_file: Path, out_file: Path, *, defaults: dict[str, Any] | None = None, chunk_size: int = BATCH_CHUNK) -> BatchSummary:
    """Answer every line of ``batch_file`` into ``out_file`` (one JSON line each, in line order),
    ``chunk_size`` lines at a time; ``out_file`` appears complete or not at all (a temp file
    beside it is renamed into place)."""
    if chunk_size <= 0:
        raise InvalidInputError(f"chunk_size must be a positive integer, got {chunk_size}")
    lines = iter_batch(batch_file, defaults=defaults)
    tmp = out_file.with_name(out_file.name + ".tmp")
    with writing(out_file, partial=tmp):
        out_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed below, on every path
    try:
        queries = errors = 0
        for chunk in _chunks(lines, chunk_size):
            results = _results(searcher, chunk)
            errors += sum(isinstance(r, EngineError) for r in results)
            text = "".join(result_line(r, res, n) + "\n" for n, (r, res) in enumerate(zip(chunk, results), start=queries + 1))
            queries += len(chunk)
            with writing(out_file, partial=tmp):
                handle.write(text)
                handle.flush()  # this chunk's results are out before the next chunk runs
        if queries == 0:
            raise _empty(Path(batch_file))
        with writing(out_file, partial=tmp):
            handle.close()
            tmp.replace(out_file)
    except BaseException:
        _close_quietly(handle)
        tmp.unlink(missing_ok=True)
        raise
    return BatchSummary(queries=queries, errors=errors)


def _results(searcher: BatchSearcher, chunk: list[Line]) -> list[list[Hit] | EngineError]:
    """Each line's hits or error, in the chunk's order."""
    answers = iter(searcher.search_batch([r for r in chunk if isinstance(r, SearchRequest)]))
    return [r if isinstance(r, EngineError) else next(answers) for r in chunk]


def _close_quietly(handle: TextIO) -> None:
    try:
        handle.close()
    except OSError:  # the disk is full, say: the error being raised already tells
        pass


def _chunks(lines: Iterable[Line], size: int) -> Iterator[list[Line]]:
    it = iter(lines)
    while chunk := list(islice(it, size)):
        yield chunk
