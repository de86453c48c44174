"""``engine query --server URL``: send one query to a running ``engine serve`` with the standard library's
urllib (no FastAPI, no torch), and get back its ``{"hits": [...]}``."""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import EngineError, ImageReadError, InvalidInputError

__all__ = ["RemoteQuery", "search_remote", "post"]

DEFAULT_TIMEOUT_S = 300.0
"""How long to wait for an answer: the server's first query loads its models."""


@dataclass(frozen=True)
class RemoteQuery:
    """What ``engine query`` sends: a local ``image`` file (uploaded) with its ``region`` ("x1,y1,x2,y2"), or a
    ``region_id``, and/or ``text``; ``fields`` holds ``k`` and the filters, as the API names them."""

    image: Path | None = None
    region: str | None = None
    region_id: int | None = None
    text: str | None = None
    fields: dict[str, Any] | None = None


def search_remote(server: str, query: RemoteQuery, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """POST ``query`` to ``server``'s ``/api/search``; the answer's JSON object. Errors are one
    :class:`EngineError` line: the server's own ``error``, or why the server could not be reached."""
    url = _search_url(server)
    fields = {k: v for k, v in {**(query.fields or {}), "region": query.region, "region_id": query.region_id, "text": query.text}.items() if v is not None}
    if query.image is not None:
        data, content_type = _multipart(fields, query.image)
    else:
        data, content_type = json.dumps(fields).encode(), "application/json"
    try:
        answer = json.loads(post(url, data, content_type=content_type, accept="application/json", token=token, timeout=timeout, who=f"server {server}", advice="start one with `engine serve`, or check --server / ENGINE_SERVER").decode("utf-8"))
    except ValueError:
        raise EngineError(f"server {server} did not answer JSON; is --server the address of `engine serve`?") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("hits"), list):
        raise EngineError(f"server {server} answered without a list of hits; is --server the address of `engine serve`?")
    return answer


def post(url: str, data: bytes, *, content_type: str, accept: str, token: str | None, timeout: float, who: str, advice: str) -> bytes:
    """POST ``data`` to ``url`` and return the answer's body; a failure is one :class:`EngineError` line
    naming ``who`` (e.g. "server http://…"): the server's own ``error``, or why it could not be reached
    (then ``advice``)."""
    headers = {"Content-Type": content_type, "Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise EngineError(f"{who} answered {exc.code}: {_error_line(exc)}") from None
    except urllib.error.URLError as exc:
        raise EngineError(f"cannot reach {who}: {exc.reason}; {advice}") from None
    except (TimeoutError, ConnectionError) as exc:
        raise EngineError(f"{who} did not answer: {exc}; {advice}") from None


def _search_url(server: str) -> str:
    parts = urllib.parse.urlsplit(server.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInputError(f"--server {server!r} is not an http(s) address; give e.g. http://127.0.0.1:8000")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/api/search", "", ""))


def _error_line(exc: urllib.error.HTTPError) -> str:
    """The ``error`` of the server's JSON answer, else the HTTP reason."""
    try:
        body = json.loads(exc.read().decode("utf-8"))
        return str(body["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


def _multipart(fields: dict[str, Any], image: Path) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of ``fields`` and the file ``image`` (field ``image``)."""
    try:
        content = Path(image).read_bytes()
    except OSError as exc:
        raise ImageReadError(f"cannot read image {str(image)!r}: {exc.strerror or exc}; check the path") from None
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for name, value in fields.items():
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{text}\r\n'.encode())
    chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode())
    chunks.append(content)
    chunks.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
