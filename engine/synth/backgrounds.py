"""Scene backgrounds: crops of real photographs, value-noise textures, gradients and tiles.

The photographs are the sample images that scikit-image and scikit-learn ship inside their
packages (no download); :class:`BackgroundMaker` loads them on first use and keeps them for its
own lifetime, so one generator loads them once.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import EngineError

__all__ = ["BackgroundMaker", "BACKGROUND_KINDS", "PHOTO_NAMES", "load_package_photo"]

logger = logging.getLogger(__name__)

BACKGROUND_KINDS: tuple[str, ...] = ("photo", "noise", "gradient", "tiles")
#: name -> (package, file inside the package)
_PHOTO_FILES: dict[str, tuple[str, str]] = {
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    # grey textures, tinted when used
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
}
PHOTO_NAMES: tuple[str, ...] = tuple(_PHOTO_FILES)
_KIND_WEIGHTS = np.array([0.45, 0.25, 0.20, 0.10])
_NO_PHOTO_WEIGHTS = np.array([0.0, 0.45, 0.35, 0.20])


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _load_photo(name: str) -> np.ndarray:
    """Decode a sample photograph straight from its package file (fast: no scikit-image/-learn import).

    Falls back to the package's own loader (``skimage.data.chelsea()`` ...) if the file moved.
    """
    package, relpath = _PHOTO_FILES[name]
    root = _package_dir(package)
    if root is not None and (root / relpath).is_file():
        with Image.open(root / relpath) as img:
            return np.asarray(img.convert("RGB"))
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    if name.startswith("motorcycle_"):
        return skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1]
    arr = getattr(skimage.data, name)()
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


load_package_photo = _load_photo  # the stamps world's backgrounds load the same sample photographs


def _two_colour_lut(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """``uint8 [256, 3]``: a ramp between two random colours, indexed by a uint8 field."""
    c1, c2 = rng.uniform(low, high, size=(2, 3))
    t = np.linspace(0.0, 1.0, 256)[:, None]
    return (c1 + (c2 - c1) * t).astype(np.uint8)


class BackgroundMaker:
    """Makes ``size x size`` RGB backgrounds from a per-image random generator.

    ``photos=False`` leaves out photograph crops (no scikit-image / scikit-learn import).
    """

    def __init__(self, *, photos: bool = True, loader: Callable[[str], np.ndarray] = _load_photo) -> None:
        self._use_photos = photos
        self._loader = loader
        self._photos: list[tuple[str, Image.Image]] | None = None

    def photos(self) -> list[tuple[str, Image.Image]]:
        """The photographs as ``(name, RGB PIL image)``, loaded on first call."""
        if self._photos is None:
            loaded: list[tuple[str, Image.Image]] = []
            for name in PHOTO_NAMES:
                try:
                    arr = np.ascontiguousarray(self._loader(name)[..., :3], dtype=np.uint8)
                except Exception as exc:  # a package without its sample data: say so, keep the rest
                    logger.warning("background photo %s could not be loaded (%s); corpora will differ from ones made with it", name, exc)
                    continue
                loaded.append((name, Image.fromarray(arr)))
            if not loaded:
                raise EngineError(
                    "no background photograph could be loaded from scikit-image / scikit-learn; "
                    "reinstall them, or generate without photo backgrounds (SynthConfig(photo_backgrounds=False))"
                )
            logger.debug("loaded %d background photographs", len(loaded))
            self._photos = loaded
        return self._photos

    def make(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
        """A background ``uint8 [size, size, 3]`` and its kind (``photo:<name>``, ``noise``, ``gradient``, ``tiles``)."""
        weights = _KIND_WEIGHTS if self._use_photos else _NO_PHOTO_WEIGHTS
        kind = BACKGROUND_KINDS[int(rng.choice(len(BACKGROUND_KINDS), p=weights))]
        if kind == "photo":
            img, name = self._photo(rng, size)
            kind = f"photo:{name}"
        elif kind == "noise":
            img = self._noise(rng, size)
        elif kind == "gradient":
            img = self._gradient(rng, size)
        else:
            img = self._tiles(rng, size)
        if rng.random() < 0.35:  # sensor-like grain
            grain = rng.integers(-6, 7, size=(size, size, 1), dtype=np.int8)
            img = np.clip(np.add(img, grain, dtype=np.int16), 0, 255).astype(np.uint8)
        return img, kind

    def _photo(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
        photos = self.photos()
        name, photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        crop = photo.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # soften clutter so the shapes stay the salient things: blend towards a flat tone, change the light;
        # one lookup table per channel: v -> clip((v * (1 - alpha) + tone * alpha) * gain)
        alpha = rng.uniform(0.0, 0.4)
        tone = rng.uniform(60, 200, size=3)
        gain = rng.uniform(0.8, 1.15)
        v = np.arange(256, dtype=np.float64)
        lut = np.concatenate([np.clip((v * (1 - alpha) + t * alpha) * gain, 0, 255) for t in tone]).astype(np.uint8)
        return np.asarray(crop.point(lut.tolist())), name

    def _noise(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Value noise: octaves of bicubic-upsampled random grids, summed at 1/4 resolution, mapped to two colours."""
        small = max(size // 4, 16)
        field = np.zeros((small, small), dtype=np.float32)
        for octave, cells in enumerate((3, 6, 12, 24)):
            grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
            up = Image.fromarray(grid).resize((small, small), Image.Resampling.BICUBIC)
            field += np.asarray(up, dtype=np.float32) * np.float32(0.55**octave)
        lo, hi = float(field.min()), float(field.max())
        field = (field - lo) * (255.0 / max(hi - lo, 1e-6))
        t = np.asarray(Image.fromarray(field.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR))
        return _two_colour_lut(rng, 20, 235)[t]

    def _gradient(self, rng: np.random.Generator, size: int) -> np.ndarray:
        axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
        if rng.random() < 0.7:
            theta = rng.uniform(0, 2 * np.pi)
            t = axis[None, :] * np.float32(np.cos(theta)) + axis[:, None] * np.float32(np.sin(theta))
        else:
            cx, cy = rng.uniform(0, 1, size=2).astype(np.float32)
            t = np.sqrt((axis[None, :] - cx) ** 2 + (axis[:, None] - cy) ** 2)
        lo, hi = float(t.min()), float(t.max())
        t = ((t - lo) * np.float32(255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
        return _two_colour_lut(rng, 10, 245)[t]

    def _tiles(self, rng: np.random.Generator, size: int) -> np.ndarray:
        cell = int(rng.integers(max(size // 16, 4), max(size // 5, 6)))
        idx = np.arange(size) // cell
        checker = ((idx[None, :] + idx[:, None]) % 2).astype(bool)
        base = rng.uniform(40, 215, size=3)
        other = np.clip(base + rng.uniform(-35, 35, size=3), 0, 255)
        out = np.empty((size, size, 3), dtype=np.uint8)
        out[...] = base.astype(np.uint8)
        out[checker] = other.astype(np.uint8)
        return out
