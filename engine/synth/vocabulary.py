"""The closed world of the synthetic scenes: shapes, colours, sizes, patterns and their words.

Attribute values are the canonical names stored in ``annotations.jsonl``; the surface forms are
the words the grammar may use for them (synonyms make the language side less trivial).
"""
from __future__ import annotations

__all__ = [
    "ATTRIBUTES",
    "SHAPES",
    "COLORS",
    "SIZES",
    "PATTERNS",
    "COLOR_RGB",
    "SIZE_FRACTION",
    "SHAPE_WORDS",
    "COLOR_WORDS",
    "SIZE_WORDS",
    "PATTERN_ADJECTIVES",
    "PATTERN_POSTMODIFIERS",
    "NUMBER_WORDS",
    "surface_forms",
]

#: Attribute names in the order adjectives are spoken ("a large striped red circle").
ATTRIBUTES: tuple[str, ...] = ("size", "pattern", "color", "shape")

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "pentagon",
    "hexagon",
    "diamond",
    "cross",
    "heart",
    "crescent",
)

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "purple": (135, 60, 190),
    "pink": (245, 125, 185),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (22, 22, 22),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)

#: Longer side of the object box as a fraction of the image side, ``(low, high)``.
SIZE_FRACTION: dict[str, tuple[float, float]] = {
    "small": (0.10, 0.14),
    "medium": (0.17, 0.22),
    "large": (0.26, 0.32),
}
SIZES: tuple[str, ...] = tuple(SIZE_FRACTION)

PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")

#: shape -> ((singular, plural), ...); the first pair is the canonical word.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disk", "disks")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "pentagon": (("pentagon", "pentagons"),),
    "hexagon": (("hexagon", "hexagons"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombi")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "heart": (("heart", "hearts"),),
    "crescent": (("crescent", "crescents"), ("crescent moon", "crescent moons")),
}
COLOR_WORDS: dict[str, tuple[str, ...]] = {c: (c,) for c in COLORS}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium-sized", "mid-sized", "medium"),
    "large": ("large", "big"),
}
PATTERN_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain"),
    "striped": ("striped",),
    "dotted": ("dotted", "polka-dot", "spotted"),
}
PATTERN_POSTMODIFIERS: dict[str, tuple[str, ...]] = {
    "solid": ("without a pattern",),
    "striped": ("with stripes",),
    "dotted": ("with dots", "with polka dots"),
}
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)

for _shape in SHAPES:  # import-time consistency of the tables
    assert _shape in SHAPE_WORDS, _shape


def surface_forms(attribute: str, value: str) -> tuple[str, ...]:
    """Every word or phrase the grammar may use for ``attribute = value`` (for consistency checks)."""
    if attribute == "shape":
        return tuple(w for pair in SHAPE_WORDS[value] for w in pair)
    if attribute == "color":
        return COLOR_WORDS[value]
    if attribute == "size":
        return SIZE_WORDS[value]
    if attribute == "pattern":
        return PATTERN_ADJECTIVES[value] + PATTERN_POSTMODIFIERS[value]
    raise KeyError(f"unknown attribute {attribute!r}; known: {', '.join(ATTRIBUTES)}")
