"""The settings of one ``engine serve`` process: where it listens, who may call it, and its limits."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InvalidInputError

__all__ = ["ServerSettings", "is_loopback", "check_exposure", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_K"]

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest request body (an uploaded query image and its fields): 20 MiB."""

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""Largest uploaded query image, width x height: 50 Mpx (a decompression-bomb guard)."""

DEFAULT_MAX_K = 1000
"""Most hits one search may ask for."""


@dataclass(frozen=True)
class ServerSettings:
    """Where the server listens and what it accepts.

    ``token``: every ``/api`` route needs ``Authorization: Bearer <token>`` (``None``: no auth, allowed on
    a loopback address only, or with ``insecure``). ``corpus_root``: ``POST /api/index`` indexes folders
    at or under it only (``None``: the endpoint answers 403).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    insecure: bool = False
    corpus_root: Path | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_k: int = DEFAULT_MAX_K

    def __post_init__(self) -> None:
        if self.token is not None and not self.token.strip():
            raise InvalidInputError("--token is empty; give a secret string (e.g. from `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
        for name in ("max_upload_bytes", "max_image_pixels", "max_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise InvalidInputError(f"--port {self.port} is not a TCP port; use 1 to 65535 (0: any free port)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine: ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(settings: ServerSettings) -> None:
    """Refuse to listen beyond this machine without a token, unless ``insecure`` says so on purpose."""
    if is_loopback(settings.host) or settings.token is not None or settings.insecure:
        return
    raise InvalidInputError(
        f"--host {settings.host} is reachable from other machines and the server has no token; "
        "pass --token SECRET (clients send 'Authorization: Bearer SECRET'), or --insecure to serve without auth on purpose"
    )
