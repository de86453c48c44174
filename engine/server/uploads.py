"""An uploaded query image: saved to a private temporary folder within the size limit, its pixel count
checked from the header before anything decodes it."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from engine.errors import ImageReadError
from engine.server.errors import PayloadTooLargeError

__all__ = ["saved_upload", "check_pixels"]

_CHUNK = 1 << 20


@contextmanager
def saved_upload(upload: UploadFile, *, max_bytes: int, max_pixels: int) -> Iterator[Path]:
    """The upload's bytes in a file of a new temporary folder (removed afterwards), never named after the
    client's file name; :class:`PayloadTooLargeError` past ``max_bytes`` or ``max_pixels``."""
    with tempfile.TemporaryDirectory(prefix="engine-upload-") as folder:
        path = Path(folder) / "query"
        _copy(upload, path, max_bytes=max_bytes)
        check_pixels(path, max_pixels=max_pixels)
        yield path


def _copy(upload: UploadFile, path: Path, *, max_bytes: int) -> None:
    written = 0
    upload.file.seek(0)
    with path.open("wb") as out:
        while chunk := upload.file.read(_CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise PayloadTooLargeError(f"the uploaded image is over the server's limit of {max_bytes:,} bytes; send a smaller file")
            out.write(chunk)
    if written == 0:
        raise ImageReadError("the uploaded image is empty; send an image file (JPEG, PNG, WebP, ...)")


def check_pixels(path: Path, *, max_pixels: int) -> None:
    """Refuse an image whose header announces more than ``max_pixels`` pixels (nothing is decoded)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ImageReadError("the uploaded file is not an image Pillow can read; send a JPEG, PNG, WebP, BMP or TIFF file") from None
    if width * height > max_pixels:
        raise PayloadTooLargeError(f"the uploaded image is {width}x{height} = {width * height:,} pixels, over the server's limit of {max_pixels:,}; send a smaller image")
