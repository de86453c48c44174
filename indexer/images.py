"""Reading image files: RGB, EXIF orientation applied, fully decoded, with clear errors.

Every failure (missing file, empty file, not an image, truncated or corrupt data, an image too large
to decode safely) raises :class:`~engine.errors.ImageReadError` with a one-line reason, so the indexer
can record it and skip the file instead of crashing.
"""
from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import ImageReadError

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "load_image"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
"""File suffixes (lower case) that the corpus scan treats as images."""

MAX_IMAGE_PIXELS = 100_000_000
"""Largest image (width x height) :func:`load_image` decodes by default: a guard against decompression bombs."""

_WHITE = (255, 255, 255)


def load_image(path: Path | str, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read an image file as a fully decoded RGB :class:`PIL.Image.Image`.

    The EXIF orientation tag is applied (the returned pixels are upright as a viewer shows them, and
    ``image.size`` is the size boxes refer to). Images with transparency are composited over white;
    16-bit greyscale is scaled to 8 bits; every other mode is converted to RGB.

    Raises :class:`ImageReadError` when the file does not exist, is empty, is not an image, is
    truncated or corrupt, or has more than ``max_pixels`` pixels (decompression-bomb guard).
    """
    path, shown = _as_path(path)
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageReadError(f"cannot read image {shown}: file does not exist; check the path") from None
    except ValueError:  # an embedded NUL byte
        raise ImageReadError(f"cannot read image {shown}: not a valid file path (it holds a NUL byte)") from None
    except OSError as exc:  # a name too long, a loop of links, a folder without search permission, ...
        raise ImageReadError(f"cannot read image {shown}: {exc.strerror or exc}; check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"cannot read image {shown}: not a regular file; pass an image file")
    if st.st_size == 0:
        raise ImageReadError(f"cannot read image {shown}: file is empty")

    with warnings.catch_warnings():
        # Our own pixel limit replaces Pillow's (about 89 MP, which only warns); Pillow's hard error
        # at twice its limit is still turned into an ImageReadError below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as raw:
                width, height = raw.size
                if width * height > max_pixels:
                    raise ImageReadError(_too_large(shown, width, height, max_pixels))
                raw.load()
                image = _upright(raw, shown)
        except ImageReadError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageReadError(f"cannot read image {shown}: too large to decode safely ({_reason(exc)}); downscale it") from None
        except UnidentifiedImageError:
            raise ImageReadError(f"cannot read image {shown}: not an image (cannot identify format)") from None
        except PermissionError as exc:
            raise ImageReadError(f"cannot read image {shown}: {exc.strerror or exc}; check the file's permissions") from None
        except Exception as exc:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, struct.error, ...)
            raise ImageReadError(f"cannot read image {shown}: truncated or corrupt: {_reason(exc)}") from None
    return _to_rgb(image, shown)


def _as_path(path: Path | str) -> tuple[Path, str]:
    """``(Path, how messages show it)``: the path as is when printable, else its ``repr`` (a name
    with a newline or a control character stays on one line); bytes that are not UTF-8 show as
    ``\\xNN`` (the message must stay printable and encodable)."""
    try:
        path = Path(path)
    except TypeError:
        raise ImageReadError(f"cannot read image {path!r:.80}: not a file path; pass a str or pathlib.Path") from None
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return path, text if text.isprintable() else repr(text)


def _upright(image: Image.Image, path: str) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block is logged and the pixels are kept as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - a malformed EXIF block must not make a decodable image unreadable
        log.warning("ignoring unreadable EXIF orientation of %s: %s", path, _reason(exc))
        return image.copy()


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if mode.startswith("I;16") or mode in ("I", "F"):
            values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
            if values.size and values.max() > 255:
                values = values / 257.0  # 16-bit range -> 8-bit
            grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
            return grey.convert("RGB")
        if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, _WHITE + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"cannot read image {path}: cannot convert mode {mode} to RGB: {_reason(exc)}") from None


def _too_large(path: str, width: int, height: int, max_pixels: int) -> str:
    return (
        f"cannot read image {path}: {width}x{height} = {width * height / 1e6:.1f} MP is more than the "
        f"{max_pixels / 1e6:g} MP limit (decompression-bomb guard); downscale the image"
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
