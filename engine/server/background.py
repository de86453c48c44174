"""Run an app on a real uvicorn server in a background thread, on a free loopback port (tests, benchmarks)."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["free_port", "running_server"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` just now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(app: Any, *, host: str = "127.0.0.1", start_timeout_s: float = 30.0) -> Iterator[str]:
    """``app`` served by uvicorn in a daemon thread while the block runs; yields its ``http://host:port``."""
    import uvicorn

    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
