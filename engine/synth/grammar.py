"""Words for meanings: region descriptions, referring expressions and captions.

The grammar only renders; what to say (which attributes, which relation) is decided elsewhere,
so every sentence is true of its image by construction. Variety comes from synonyms, word order
("a dotted red star" / "a red star with dots"), several templates per relation, and count
phrases for identical roles ("two yellow stars next to each other").
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.synth.vocabulary import (
    NUMBER_WORDS,
    PATTERN_ADJECTIVES,
    PATTERN_POSTMODIFIERS,
    SHAPE_WORDS,
    SIZE_WORDS,
)

__all__ = ["noun_phrase", "describe_region", "refer", "captions", "BACKGROUND_PHRASES"]

_REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left_of": ("to the left of", "left of", "on the left of"),
    "right_of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next_to": ("next to", "beside", "by"),
}
_REL_PRONOUN: dict[str, tuple[str, ...]] = {  # "B with A <phrase>" where A rel B
    "left_of": ("to its left", "on its left"),
    "right_of": ("to its right", "on its right"),
    "above": ("above it", "over it"),
    "below": ("below it", "under it"),
    "next_to": ("next to it", "beside it"),
}
_REF_REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left_of": ("left of", "to the left of"),
    "right_of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
    "next_to": ("next to", "beside"),
}
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "photo": ("a photograph", "a photo background", "a blurry photo"),
    "noise": ("a cloudy texture", "a mottled background"),
    "gradient": ("a smooth gradient", "a gradient background"),
    "tiles": ("a checkered background", "a tiled background"),
}


def _choice(rng: np.random.Generator, seq: Sequence[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _bare(attrs: Mapping[str, str], rng: np.random.Generator, *, plural: bool = False) -> str:
    """Adjectives and noun without determiner: ``large striped red circle`` / ``red circle with dots``."""
    words: list[str] = []
    post = ""
    if "size" in attrs:
        words.append(_choice(rng, SIZE_WORDS[attrs["size"]]))
    if "pattern" in attrs:
        if rng.random() < 0.3:
            post = " " + _choice(rng, PATTERN_POSTMODIFIERS[attrs["pattern"]])
        else:
            words.append(_choice(rng, PATTERN_ADJECTIVES[attrs["pattern"]]))
    if "color" in attrs:
        words.append(attrs["color"])
    singular, plural_word = SHAPE_WORDS[attrs["shape"]][0 if rng.random() < 0.75 else int(rng.integers(len(SHAPE_WORDS[attrs["shape"]])))]
    words.append(plural_word if plural else singular)
    return " ".join(words) + post


def noun_phrase(attrs: Mapping[str, str], rng: np.random.Generator, *, definite: bool = False) -> str:
    """``a large red circle`` / ``the striped square`` for the named attributes ``attrs``."""
    bare = _bare(attrs, rng)
    return f"the {bare}" if definite else f"{_article(bare)} {bare}"


def describe_region(meaning: Mapping[str, Any], rng: np.random.Generator) -> str:
    """A Visual Genome–style region description of ``meaning`` (lower case, no final period)."""
    roles = meaning["objects"]
    rel = meaning["relation"]
    if rel == "between":
        a, b, c = (noun_phrase(r, rng) for r in roles)
        template = int(rng.integers(3))
        if template == 0:
            return f"{a} between {b} and {c}"
        if template == 1:
            return f"{a} in between {b} and {c}"
        return f"{b} and {c} with {a} between them"
    first, second = roles
    if dict(first) == dict(second):
        if rel == "next_to":
            plural = _bare(first, rng, plural=True)
            return _choice(rng, (f"two {plural} next to each other", f"a pair of {plural} side by side", f"two {plural} close together"))
        return f"{noun_phrase(first, rng)} {_choice(rng, _REL_PHRASES[rel])} another {_bare(second, rng)}"
    a, b = noun_phrase(first, rng), noun_phrase(second, rng)
    template = rng.random()
    if template < 0.6:
        return f"{a} {_choice(rng, _REL_PHRASES[rel])} {b}"
    if template < 0.85:
        return f"{b} with {a} {_choice(rng, _REL_PRONOUN[rel])}"
    return f"there is {a} {_choice(rng, _REL_PHRASES[rel])} {b}"


def refer(target: Mapping[str, str], relation: str | None, context: Mapping[str, str] | None, rng: np.random.Generator) -> str:
    """A RefCOCO-style referring expression: ``the red circle`` / ``the red circle left of the blue square``."""
    t = noun_phrase(target, rng, definite=True)
    if relation is None or context is None:
        return t
    c = noun_phrase(context, rng, definite=True)
    phrase = _choice(rng, _REF_REL_PHRASES[relation])
    return f"{t} that is {phrase} {c}" if rng.random() < 0.25 else f"{t} {phrase} {c}"


def _count_phrase(n: int, singular: str, plural: str) -> str:
    return f"{_article(singular)} {singular}" if n == 1 else f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {plural}"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def captions(
    objects: Sequence[Mapping[str, str]],
    background: str,
    region_descriptions: Sequence[str],
    rng: np.random.Generator,
) -> list[str]:
    """3–5 captions of the whole scene (counts, a listing, a relation, colours, the background)."""
    n = len(objects)
    bg = _choice(rng, BACKGROUND_PHRASES[background.split(":", 1)[0]])
    candidates: list[str] = []
    count = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    candidates.append(_sentence(_choice(rng, (f"{count} geometric shapes on {bg}", f"{count} colorful shapes over {bg}", f"a picture of {count} shapes on {bg}"))))
    shapes = Counter(o["shape"] for o in objects)
    parts = [_count_phrase(k, *SHAPE_WORDS[s][0]) for s, k in sorted(shapes.items(), key=lambda kv: (-kv[1], kv[0]))]
    candidates.append(_sentence(_choice(rng, (f"the image shows {_join(parts)}", f"a scene with {_join(parts)}"))))
    listed = [noun_phrase({k: o[k] for k in ("shape", "color")} | ({"size": o["size"]} if rng.random() < 0.3 else {}), rng) for o in objects[:4]]
    more = n - len(listed)
    listing = _join(listed) if more == 0 else ", ".join(listed) + f" and {NUMBER_WORDS[more] if more < len(NUMBER_WORDS) else more} more shape{'s' if more > 1 else ''}"
    candidates.append(_sentence(listing))
    colours = sorted({o["color"] for o in objects})
    candidates.append(_sentence(f"shapes in {_join(colours)}" if len(colours) > 1 else f"all the shapes are {colours[0]}"))
    if region_descriptions:
        candidates.append(_sentence(_choice(rng, region_descriptions)))
    k = int(rng.integers(3, min(5, len(candidates)) + 1))
    keep = sorted(rng.choice(len(candidates), size=k, replace=False).tolist())
    return [candidates[i] for i in keep]
