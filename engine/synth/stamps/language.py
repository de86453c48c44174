"""English for the stamps world: noun phrases from tuxpaint descriptions, pair descriptions, refs and captions.

Every sentence is built from the stamps' own English descriptions and the relation words of
:mod:`engine.synth.relations` (only relations that hold clearly are described).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.boxes import Box
from engine.synth.relations import relation_holds, relation_is_clear

__all__ = [
    "noun_phrase",
    "short_name",
    "with_article",
    "RELATION_WORDS",
    "pair_phrase",
    "Reference",
    "refer",
    "captions",
]

_ARTICLES = ("a", "an", "the")
_CLAUSE_CUTS = (" called ", " lets ", " that ", " which ", " who ", " is ", " are ", " was ", " were ", " used ", ", ", "; ", " - ")
_MAX_NAME_WORDS = 9
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("to the left of", "on the left of", "left of"),
    "right_of": ("to the right of", "on the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next_to": ("next to", "beside", "near"),
}
_CONSONANT_SOUNDS = ("eu", "uni", "use", "usu", "one", "once", "ur")
_VOWEL_SOUNDS = ("hour", "honest", "honor", "honour", "8", "11", "18")
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _first_sentence(text: str) -> str:
    text = text.strip().strip("“”\"'").strip()
    m = re.search(r"[.!?](\s|$)", text)
    sentence = text[: m.start()] if m else text
    return sentence.strip().strip("“”\"'").strip()


def noun_phrase(description: str) -> str:
    """The description as a phrase: trailing stop removed, a leading article lower-cased.

    ``"A US 25 cent piece ($.25) called a quarter."`` -> ``"a US 25 cent piece ($.25) called a quarter"``.
    """
    text = description.strip().strip("“”\"").strip()
    text = re.sub(r"[.!]+$", "", text).strip()
    first, _, rest = text.partition(" ")
    if first.lower() in _ARTICLES:
        text = f"{first.lower()} {rest}".strip()
    return text


def short_name(description: str, stem: str) -> str:
    """A short name without article: the description's first clause, or the file name when that is long.

    ``"A US 25 cent piece ($.25) called a quarter."`` -> ``"US 25 cent piece"``; ``"A bison."`` -> ``"bison"``.
    """
    text = _first_sentence(description)
    text = re.sub(r"\s*\([^)]*\)", "", text)
    lowered = text.lower()
    cut = min((lowered.find(c) for c in _CLAUSE_CUTS if lowered.find(c) > 0), default=len(text))
    text = text[:cut].strip().strip("“”\"'").strip()
    first, _, rest = text.partition(" ")
    if first.lower() in _ARTICLES and rest:
        text = rest
    elif first and not first[1:].isupper() and first[1:] == first[1:].lower():
        text = first[0].lower() + first[1:] + (f" {rest}" if rest else "")
    words = text.split()
    if not words or len(words) > _MAX_NAME_WORDS:
        words = [w for w in re.split(r"[_\-\s]+", re.sub(r"\d+", " ", stem)) if w and w.lower() != "mirror"]
        text = " ".join(words) or stem
    return text


def with_article(name: str) -> str:
    """``"tiger"`` -> ``"a tiger"``, ``"apple"`` -> ``"an apple"``."""
    word = name.split(" ", 1)[0].lower()
    vowel = word[:1] in ("a", "e", "i", "o", "u") and not word.startswith(_CONSONANT_SOUNDS)
    if word.startswith(_VOWEL_SOUNDS) or (len(word) > 1 and name.split(" ", 1)[0].isupper() and word[0] in "fhlmnrsx"):
        vowel = True
    if name.split(" ", 1)[0] in ("US", "UK", "USA"):
        vowel = False
    return ("an " if vowel else "a ") + name


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def pair_phrase(name_a: str, relation: str, name_b: str, rng: np.random.Generator) -> str:
    """``"a tiger to the left of a red apple"`` (the relation must hold for a, b)."""
    other = "another " + name_b if name_a == name_b else with_article(name_b)
    return f"{with_article(name_a)} {_choice(rng, RELATION_WORDS[relation])} {other}"


@dataclass(frozen=True)
class Reference:
    """A referring expression for object ``target`` (an index), with the context object it mentions."""

    expression: str
    target: int
    context: int | None


def _centre(b: Box) -> tuple[float, float]:
    return ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0)


def _extreme(target: int, group: Sequence[int], boxes: Sequence[Box], axis: int, sign: float, margin: float) -> bool:
    """Whether ``target``'s centre is clearly the smallest (sign 1) / largest (sign -1) along ``axis`` in ``group``."""
    mine = sign * _centre(boxes[target])[axis]
    return all(sign * _centre(boxes[g])[axis] - mine >= margin for g in group if g != target)


def refer(
    target: int,
    names: Sequence[str],
    categories: Sequence[str],
    boxes: Sequence[Box],
    width: int,
    height: int,
    rng: np.random.Generator,
) -> Reference | None:
    """An expression that singles out ``target`` among the objects, or ``None`` when none is clear.

    Look-alikes are the objects with the target's name or category; without any, ``"the <name>"``;
    with some, a position among them (``"the tiger on the left"``) or a relation to an object whose
    name is unique (``"the tiger above the kettle"``) that holds for no look-alike.
    """
    name = names[target]
    group = [i for i in range(len(names)) if names[i] == name or categories[i] == categories[target]]
    same_name = [i for i in range(len(names)) if names[i] == name]
    if len(group) == 1:
        return Reference(f"the {name}", target, None)
    margin = 0.05 * max(width, height)
    if len(same_name) > 1:  # several of the same name: superlatives among them
        positions = (
            (0, 1.0, ("the {n} on the left", "the leftmost {n}", "the {n} furthest to the left")),
            (0, -1.0, ("the {n} on the right", "the rightmost {n}", "the {n} furthest to the right")),
            (1, 1.0, ("the {n} at the top", "the topmost {n}", "the upper {n}" if len(group) == 2 else "the highest {n}")),
            (1, -1.0, ("the {n} at the bottom", "the lowest {n}", "the lower {n}" if len(group) == 2 else "the bottom {n}")),
        )
    else:  # one of its name among look-alikes of its category: where it is
        positions = (
            (0, 1.0, ("the {n} on the left", "the {n} on the left side")),
            (0, -1.0, ("the {n} on the right", "the {n} on the right side")),
            (1, 1.0, ("the {n} at the top", "the {n} near the top")),
            (1, -1.0, ("the {n} at the bottom", "the {n} near the bottom")),
        )
    options = [forms for axis, sign, forms in positions if _extreme(target, group, boxes, axis, sign, margin)]
    if options and (len(same_name) == len(group) or rng.random() < 0.7):
        forms = options[int(rng.integers(len(options)))]
        return Reference(_choice(rng, forms).format(n=name), target, None)
    unique = [i for i in range(len(names)) if i not in group and sum(n == names[i] for n in names) == 1]
    relations = [
        (rel, c)
        for c in unique
        for rel in ("left_of", "right_of", "above", "below")
        if relation_is_clear(rel, [boxes[target], boxes[c]], width, height)
        and not any(relation_holds(rel, [boxes[g], boxes[c]], width, height) for g in group if g != target)
    ]
    if relations:
        rel, c = relations[int(rng.integers(len(relations)))]
        return Reference(f"the {name} {_choice(rng, RELATION_WORDS[rel])} the {names[c]}", target, c)
    if options:
        forms = options[int(rng.integers(len(options)))]
        return Reference(_choice(rng, forms).format(n=name), target, None)
    return None


def _listing(names: Sequence[str]) -> str:
    """``"a tiger, another tiger and an apple"``."""
    seen: set[str] = set()
    parts = []
    for n in names:
        parts.append(f"another {n}" if n in seen else with_article(n))
        seen.add(n)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(names: Sequence[str], pair_descriptions: Sequence[str], rng: np.random.Generator) -> list[str]:
    """2-3 sentences about the whole image: a listing, the object count, and one pair description."""
    listing = _listing(names)
    count = _NUMBERS[len(names)] if len(names) < len(_NUMBERS) else str(len(names))
    opener = _choice(rng, ("A photo of", "A photograph showing", "A picture of"))
    out = [
        f"{opener} {listing}.",
        _choice(rng, (f"{count.capitalize()} objects on a photograph.", f"{count.capitalize()} objects pasted onto a real photo.")),
    ]
    if pair_descriptions:
        desc = pair_descriptions[int(rng.integers(len(pair_descriptions)))]
        out.append(f"There is {desc}.")
    return out
