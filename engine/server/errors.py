"""Every error the API answers is JSON ``{"error": "<one line>"}`` with a 4xx status (5xx only for the
server's own faults): engine errors by type, FastAPI's validation errors, HTTP errors and the rest."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.errors import (
    CheckpointError,
    DiskFullError,
    EngineError,
    ImageReadError,
    IndexCorruptError,
    IndexLockedError,
    IndexNotFoundError,
    IndexVersionError,
    InvalidInputError,
    ModelWeightsError,
    UnknownIdError,
)

__all__ = ["ForbiddenError", "NotFoundError", "PayloadTooLargeError", "ConflictError", "error_response", "status_of", "install_error_handlers"]

log = logging.getLogger(__name__)


class ForbiddenError(EngineError):
    """The server is not configured to allow this (an indexing folder outside the corpus root)."""


class NotFoundError(EngineError):
    """What the request names does not exist (a folder, an image file gone from the disk)."""


class PayloadTooLargeError(InvalidInputError):
    """A request body or an uploaded image over the server's limits."""


class ConflictError(EngineError):
    """The request clashes with work in progress (an indexing job already running)."""


_STATUS: tuple[tuple[type[EngineError], int], ...] = (
    (PayloadTooLargeError, 413),
    (UnknownIdError, 404),
    (NotFoundError, 404),
    (IndexNotFoundError, 404),
    (ForbiddenError, 403),
    (ConflictError, 409),
    (IndexLockedError, 409),
    (InvalidInputError, 400),
    (ImageReadError, 400),
    (DiskFullError, 507),
    (IndexVersionError, 503),
    (IndexCorruptError, 503),
    (ModelWeightsError, 503),
    (CheckpointError, 503),
)
"""HTTP status of each engine error, most specific first; any other :class:`EngineError` is a 400."""


def status_of(exc: EngineError) -> int:
    """The HTTP status that answers ``exc``."""
    return next((status for kind, status in _STATUS if isinstance(exc, kind)), 400)


def error_response(status: int, message: str, *, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": message}`` (on one line) with ``status``."""
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def _validation_line(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line: the first, where it is and what it says."""
    errors = exc.errors()
    if not errors:
        return "the request is malformed"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",)) or "request body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}; see /docs for the request schema"


def install_error_handlers(app: FastAPI) -> None:
    """Make every failure of ``app`` a one-line JSON error."""

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(status_of(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_line(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404 and exc.detail in (None, "Not Found"):
            message = f"nothing at {request.url.path}; the API is listed at /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}) answering {request.url.path}; the server log has the details")
