"""ASGI middleware that guards every request before a route sees it: bearer-token auth and the body size limit."""
from __future__ import annotations

import hmac
from typing import Any

from engine.server.errors import PayloadTooLargeError, error_response

__all__ = ["BearerAuth", "BodyLimit", "PUBLIC_PATHS"]

PUBLIC_PATHS = frozenset({"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"})
"""Paths served without the token (the page and the API docs hold no data); ``/static/…`` too. Every other
path, each ``/api`` route above all, needs it."""

Scope = dict[str, Any]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class BearerAuth:
    """Answers 401 unless the request carries ``Authorization: Bearer <token>`` (compared in constant time)."""

    def __init__(self, app: Any, *, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self._public(scope["path"]):
            given = (_header(scope, b"authorization") or "").strip().encode("latin-1", "replace")
            if not hmac.compare_digest(given, self._expected):
                message = "this server needs a token: send 'Authorization: Bearer <token>' (the --token the server was started with)"
                if given:
                    message = "the token is wrong: send 'Authorization: Bearer <token>' with the --token the server was started with"
                await error_response(401, message, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith("/static/")


class BodyLimit:
    """Answers 413 for a request body over ``max_bytes``: at once when ``Content-Length`` says so, else as
    soon as the bytes received pass it (a chunked upload)."""

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.strip().isdigit() else 400
            message = self._message() if status == 413 else f"Content-Length {declared!r} is not a number of bytes"
            await error_response(status, message)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLargeError(self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is over the server's limit of {self.max_bytes:,} bytes; send a smaller image"
