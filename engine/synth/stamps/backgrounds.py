"""Photographic backgrounds for the stamps world: real photos found on disk, loaded once, cropped per image.

Sources, in order (every photo is kept only if it is at least ``MIN_PHOTO_SIDE`` pixels on its short
side and colourful, see :func:`is_photo`):

* the colour photographs that scikit-image and scikit-learn ship (``chelsea``, ``coffee``,
  ``astronaut``, ``rocket``, the two ``motorcycle`` views, ``china``, ``flower``);
* given ``unpack_root`` (the folder Debian packages were unpacked into, e.g. the data cache of
  ``engine data fetch``): the sample photos of ``opencv-doc`` and the photographic wallpapers of
  ``mate-backgrounds`` (nature) and ``plasma-workspace-wallpapers`` (the photo ones, listed below);
* every ``.jpg`` / ``.jpeg`` / ``.png`` below each folder of ``extra_dirs`` (``--backgrounds-dir``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import DataNotFoundError
from engine.synth.backgrounds import load_package_photo

__all__ = ["Photo", "PhotoLibrary", "find_photo_files", "is_photo", "MIN_PHOTO_SIDE", "PACKAGE_PHOTOS"]

logger = logging.getLogger(__name__)

MIN_PHOTO_SIDE = 256
PACKAGE_PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left", "motorcycle_right", "china", "flower")
OPENCV_DATA = Path("usr/share/doc/opencv-doc/examples/data")
#: opencv-doc samples that pass the colour test but are not photographs
_OPENCV_NOT_PHOTOS = frozenset({"pic2.png", "pic4.png", "pic5.png", "starry_night.jpg", "smarties.png", "WindowsLogo.jpg", "detect_blob.png"})
MATE_NATURE = Path("usr/share/backgrounds/mate/nature")
PLASMA_WALLPAPERS = Path("usr/share/wallpapers")
#: the plasma-workspace-wallpapers that are photographs (the others are illustrations)
PLASMA_PHOTOS: tuple[str, ...] = (
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
    "Grey", "Kite", "OneStandsOut", "Path", "Volna", "summer_1am",
)
_SUFFIXES = (".jpg", ".jpeg", ".png")
_MAX_LOADED_SIDE = 1024  # photos are kept at most this long (JPEGs decoded at reduced scale)


@dataclass(frozen=True)
class Photo:
    """One background photograph: a name for ``background`` in annotations, and its RGB pixels."""

    name: str
    image: Image.Image


def is_photo(img: Image.Image) -> bool:
    """Large and colourful enough: short side >= MIN_PHOTO_SIDE, mean channel spread >= 20 and >= 150
    distinct colours (4 bits per channel) in a 64 x 64 thumbnail (rejects greyscale, logos, charts)."""
    if min(img.size) < MIN_PHOTO_SIDE:
        return False
    thumb = np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)).astype(np.int32)
    spread = float((thumb.max(axis=2) - thumb.min(axis=2)).mean())
    colours = len(np.unique(((thumb // 16) * np.array([256, 16, 1])).sum(axis=2)))
    return spread >= 20.0 and colours >= 150


def _plasma_file(folder: Path) -> Path | None:
    files = sorted(p for p in (folder / "contents/images").glob("*") if p.suffix.lower() in _SUFFIXES)
    return max(files, key=lambda p: (p.stat().st_size, p.name)) if files else None


def find_photo_files(unpack_root: Path | None, extra_dirs: Sequence[Path] = ()) -> list[tuple[str, Path]]:
    """``(name, path)`` of the candidate photo files on disk (see the module doc), sorted within each source."""
    found: list[tuple[str, Path]] = []
    if unpack_root is not None:
        opencv = unpack_root / OPENCV_DATA
        if opencv.is_dir():
            found += [
                (f"opencv:{p.stem}", p)
                for p in sorted(opencv.iterdir())
                if p.suffix.lower() in _SUFFIXES and p.name not in _OPENCV_NOT_PHOTOS
            ]
        mate = unpack_root / MATE_NATURE
        if mate.is_dir():
            found += [(f"mate:{p.stem}", p) for p in sorted(mate.iterdir()) if p.suffix.lower() in _SUFFIXES]
        for name in PLASMA_PHOTOS:
            f = _plasma_file(unpack_root / PLASMA_WALLPAPERS / name)
            if f is not None:
                found.append((f"plasma:{name}", f))
    for d in extra_dirs:
        d = Path(d)
        if not d.is_dir():
            raise DataNotFoundError(f"backgrounds folder {d} does not exist; pass --backgrounds-dir a folder of .jpg/.png photographs")
        found += [(f"dir:{p.relative_to(d).with_suffix('').as_posix()}", p) for p in sorted(d.rglob("*")) if p.suffix.lower() in _SUFFIXES]
    return found


def _open_reduced(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.draft("RGB", (_MAX_LOADED_SIDE, _MAX_LOADED_SIDE))  # JPEG: decode at 1/2, 1/4 ... scale
        rgb = img.convert("RGB")
    if max(rgb.size) > _MAX_LOADED_SIDE:
        rgb.thumbnail((_MAX_LOADED_SIDE, _MAX_LOADED_SIDE), Image.Resampling.BILINEAR)
    return rgb


class PhotoLibrary:
    """The background photographs of one generator, loaded on construction, cropped per image."""

    def __init__(self, unpack_root: Path | None, extra_dirs: Sequence[Path] = (), *, package_photos: bool = True) -> None:
        photos: list[Photo] = []
        if package_photos:
            for name in PACKAGE_PHOTOS:
                try:
                    arr = np.ascontiguousarray(load_package_photo(name)[..., :3], dtype=np.uint8)
                except Exception as exc:  # a package without its sample data: say so, keep the rest
                    logger.warning("background photo %s could not be loaded (%s); corpora will differ from ones made with it", name, exc)
                    continue
                photos.append(Photo(f"skimage:{name}" if name not in ("china", "flower") else f"sklearn:{name}", Image.fromarray(arr)))
        rejected = 0
        for name, path in find_photo_files(unpack_root, extra_dirs):
            try:
                img = _open_reduced(path)
            except OSError as exc:
                logger.warning("background %s is not a readable image (%s); skipped", path, exc)
                continue
            if is_photo(img):
                photos.append(Photo(name, img))
            else:
                rejected += 1
        if not photos:
            raise DataNotFoundError(
                "no background photograph found (scikit-image / scikit-learn samples, the opencv-doc and wallpaper "
                "packages, --backgrounds-dir); run `engine data fetch` or pass --backgrounds-dir DIR"
            )
        logger.info("%d background photographs (%d files rejected as not photographs)", len(photos), rejected)
        self.photos: tuple[Photo, ...] = tuple(photos)

    def crop(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
        """A random square crop (40-100 % of the short side, maybe mirrored) resized to ``size``, and its photo's name."""
        photo = self.photos[int(rng.integers(len(self.photos)))]
        w, h = photo.image.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        crop = photo.image.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side), reducing_gap=2.0)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(crop), photo.name
