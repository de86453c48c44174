"""Image loading: orientation, colour modes and every way a file can be unreadable."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import ImageReadError
from indexer.images import IMAGE_EXTENSIONS, load_image

_ORIENTATION = 274


def _pattern(width: int = 40, height: int = 20) -> np.ndarray:
    """A wide image whose left half is red and right half blue: rotations are easy to tell apart."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return arr


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[_ORIENTATION] = 6  # stored pixels must be rotated 90 degrees clockwise for display
    Image.fromarray(_pattern()).save(path, quality=95, exif=exif)

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (20, 40)  # width and height swapped
    arr = np.asarray(image).astype(int)
    # after a clockwise turn the stored left (red) half is on top
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


def test_plain_jpeg_keeps_its_size(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    Image.fromarray(_pattern()).save(path)
    image = load_image(path)
    assert image.size == (40, 20) and image.mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    base = Image.fromarray(_pattern())
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257))
    elif mode == "CMYK":
        image = base.convert("CMYK")
    else:
        image = base.convert(mode)
    path = tmp_path / ("img.tif" if mode == "CMYK" else "img.png")
    image.save(path)

    loaded = load_image(path)

    assert loaded.mode == "RGB" and loaded.size == (40, 20)
    expected = np.asarray(base.convert("L" if mode in ("L", "LA", "I;16") else "RGB").convert("RGB")).astype(int)
    assert np.abs(np.asarray(loaded).astype(int) - expected).max() <= 3


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 4:, 3] = 255  # left half fully transparent, right half opaque red
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    arr = np.asarray(load_image(path))
    assert (arr[:, :4] == 255).all()
    assert (arr[:, 4:] == (255, 0, 0)).all()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageReadError, match=r"cannot read image .*nope\.jpg: file does not exist"):
        load_image(path)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(tmp_path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageReadError, match=r"empty\.jpg: file is empty"):
        load_image(path)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageReadError, match=r"notes\.jpg: not an image \(cannot identify format\)"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    full = tmp_path / f"full{suffix}"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.(jpg|png): truncated or corrupt: "):
        load_image(path)


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)
    with pytest.raises(ImageReadError, match=r"100x50 = 0.0 MP is more than the 0.001 MP limit .*downscale"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=5000).size == (100, 50)


def test_image_is_detached_from_its_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(_pattern()).save(path)
    image = load_image(path)
    path.unlink()
    assert np.asarray(image).shape == (20, 40, 3)


def test_extensions_are_lower_case_with_dot() -> None:
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert {".jpg", ".png"} <= IMAGE_EXTENSIONS


def test_a_name_that_is_not_utf8_loads_and_errors_show_it_printably(tmp_path: Path) -> None:
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png"))
    Image.new("RGB", (8, 6), (1, 2, 3)).save(path)
    assert load_image(path).size == (8, 6)
    with pytest.raises(ImageReadError) as info:
        load_image(path / "x")
    message = str(info.value)
    message.encode("utf-8")  # printable, loggable, JSON-encodable
    assert "caf\\xe9.png/x" in message
