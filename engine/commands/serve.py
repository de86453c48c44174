"""``engine serve``: the HTTP API (and web page) over one index, models loaded once."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from engine.commands.options import device_option, index_option

__all__ = ["serve_command"]

log = logging.getLogger(__name__)


@click.command("serve")
@index_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on. Anything but a loopback address needs --token (or --insecure).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port (0: any free port).")
@click.option("--token", envvar="ENGINE_TOKEN", help="Bearer token every /api request must carry ('Authorization: Bearer TOKEN'); or set ENGINE_TOKEN.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token (anyone who reaches the port can search and read the indexed images).")
@click.option("--corpus-root", type=click.Path(file_okay=False, exists=True, path_type=Path), help="Allow POST /api/index to index folders at or under this folder (without it, indexing over HTTP is refused with 403).")
@click.option("--max-upload-mb", type=click.FloatRange(min=0.001), default=20.0, show_default=True, help="Largest request body (an uploaded query image), MiB.")
@click.option("--max-image-mpx", type=click.FloatRange(min=0.001), default=50.0, show_default=True, help="Largest uploaded query image, megapixels.")
@device_option
def serve_command(index_dir: Path, host: str, port: int, token: str | None, insecure: bool, corpus_root: Path | None, max_upload_mb: float, max_image_mpx: float, device: str) -> None:
    """Serve the index over HTTP: a JSON API (docs at /docs) and a web page, models loaded once.

    \b
    Example:
      engine serve --index my-index --port 8000
      curl -s localhost:8000/api/search -H 'Content-Type: application/json' -d '{"text": "a red circle", "k": 5}'
      curl -s localhost:8000/api/search -F image=@q.jpg -F region=40,60,200,220 -F k=5
      engine serve --host 0.0.0.0 --token "$SECRET" --corpus-root ./photos
    """
    import uvicorn

    from engine.api import Engine
    from engine.config import EngineConfig
    from engine.errors import IndexNotFoundError
    from engine.server.app import create_app
    from engine.server.settings import ServerSettings, check_exposure, is_loopback

    settings = ServerSettings(host=host, port=port, token=token, insecure=insecure, corpus_root=corpus_root, max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_image_pixels=int(max_image_mpx * 1_000_000))
    check_exposure(settings)
    engine = Engine(index_dir, config=EngineConfig(device=device))
    try:
        info = engine.info()
        click.echo(f"serving {info.path}: {info.images} images, {info.regions} regions (models load on the first query)", err=True)
    except IndexNotFoundError:
        if corpus_root is None:
            raise
        click.echo(f"no index at {index_dir} yet: POST /api/index a folder under {corpus_root} to build it", err=True)
    if not is_loopback(host) and token is None:
        click.echo("warning: --insecure: every client that reaches this port can search and read the indexed images", err=True)
    app = create_app(engine, settings)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
