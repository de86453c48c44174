"""Description similarity for the GRN benchmark construction: tokenizer, sentence BLEU-2, METEOR.

Everything here is pure Python and needs no downloaded data.

* :func:`tokenize` lowercases and keeps runs of letters and digits (``"Man's hat."`` → ``man s hat``).
* :func:`sentence_bleu` is standard sentence BLEU (Papineni et al. 2002) without smoothing: the
  geometric mean of the clipped ("modified") n-gram precisions for ``n = 1..max_n`` times the brevity
  penalty ``BP = 1 if c > r else exp(1 - r / c)``. GRN Eq. 7 is garbled in the paper; we read it as
  BLEU with ``N = 2``. A candidate shorter than ``max_n`` tokens, or one with a zero precision, scores 0.
* :func:`meteor` is METEOR as defined by Banerjee & Lavie (2005), with the exact and Porter-stem
  matching stages only: **the WordNet synonym stage is absent** (no WordNet offline).
* :func:`bleu2` and :func:`meteor_symmetric` are the symmetric forms used to pair descriptions:
  the **mean of both directions**, so that neither description plays the reference.
"""
from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

from engine.errors import InvalidInputError

__all__ = [
    "tokenize",
    "ngram_counts",
    "sentence_bleu",
    "bleu2",
    "porter_stem",
    "meteor_alignment",
    "meteor",
    "meteor_symmetric",
]

Tokens = Sequence[str]

_TOKEN_RE = re.compile(r"[^\W_]+")

# Above this many candidate alignments in one METEOR stage the stage falls back to the monotone
# alignment (occurrences paired in order), which minimises crossings within each word.
_MAX_ALIGNMENTS = 1024


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into runs of letters/digits; punctuation is dropped."""
    return _TOKEN_RE.findall(text.lower())


def _as_tokens(x: str | Tokens) -> list[str]:
    return tokenize(x) if isinstance(x, str) else list(x)


def ngram_counts(tokens: Tokens, n: int) -> Counter[tuple[str, ...]]:
    """Counts of the ``n``-grams of ``tokens`` (empty when there are fewer than ``n`` tokens)."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(candidate: str | Tokens, reference: str | Tokens, *, max_n: int = 2) -> float:
    """Sentence BLEU of ``candidate`` against one ``reference``, uniform weights over ``n = 1..max_n``.

    ``p_n = sum_g min(c_cand(g), c_ref(g)) / sum_g c_cand(g)`` over the n-grams ``g`` of the candidate;
    ``BLEU = BP * exp(mean_n log p_n)`` with ``BP = 1`` if ``len(cand) > len(ref)`` else
    ``exp(1 - len(ref) / len(cand))``. Returns 0.0 when the candidate has fewer than ``max_n`` tokens
    or any ``p_n`` is 0 (no smoothing). Strings are tokenized with :func:`tokenize`.
    """
    if max_n < 1:
        raise InvalidInputError(f"max_n must be >= 1, got {max_n}; BLEU-2 uses max_n=2")
    cand, ref = _as_tokens(candidate), _as_tokens(reference)
    c, r = len(cand), len(ref)
    if c < max_n or r == 0:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        cc, rc = ngram_counts(cand, n), ngram_counts(ref, n)
        matched = sum(min(k, rc[g]) for g, k in cc.items())
        if matched == 0:
            return 0.0
        log_sum += math.log(matched / (c - n + 1))
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_sum / max_n)


def bleu2(a: str | Tokens, b: str | Tokens) -> float:
    """Symmetric BLEU-2 of two descriptions: the mean of ``sentence_bleu(a, b)`` and ``sentence_bleu(b, a)``."""
    ta, tb = _as_tokens(a), _as_tokens(b)
    return 0.5 * (sentence_bleu(ta, tb, max_n=2) + sentence_bleu(tb, ta, max_n=2))


# --------------------------------------------------------------------------- Porter stemmer
# M. F. Porter, "An algorithm for suffix stripping", Program 14(3), 1980, implemented as published.

_VOWELS = frozenset("aeiou")


def _is_cons(w: str, i: int) -> bool:
    ch = w[i]
    if ch in _VOWELS:
        return False
    if ch == "y":
        return i == 0 or not _is_cons(w, i - 1)
    return True


def _measure(stem: str) -> int:
    """``m`` in ``[C](VC)^m[V]``."""
    m, i, n = 0, 0, len(stem)
    while i < n and _is_cons(stem, i):
        i += 1
    while i < n:
        while i < n and not _is_cons(stem, i):
            i += 1
        if i >= n:
            break
        while i < n and _is_cons(stem, i):
            i += 1
        m += 1
    return m


def _has_vowel(stem: str) -> bool:
    return any(not _is_cons(stem, i) for i in range(len(stem)))


def _ends_double_cons(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _is_cons(w, len(w) - 1)


def _ends_cvc(w: str) -> bool:
    return (
        len(w) >= 3
        and _is_cons(w, len(w) - 3)
        and not _is_cons(w, len(w) - 2)
        and _is_cons(w, len(w) - 1)
        and w[-1] not in "wxy"
    )


def _apply_rules(w: str, rules: Sequence[tuple[str, str]], cond: Callable[[str], bool]) -> str:
    """Apply the rule with the longest matching suffix if ``cond(stem)`` holds; try no other rule."""
    best = None
    for suffix, repl in rules:
        if w.endswith(suffix) and (best is None or len(suffix) > len(best[0])):
            best = (suffix, repl)
    if best is None:
        return w
    stem = w[: len(w) - len(best[0])]
    return stem + best[1] if cond(stem) else w


_STEP2 = [
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
    ("abli", "able"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
    ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
    ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
]  # fmt: skip
_STEP3 = [
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", ""),
]  # fmt: skip
_STEP4 = [
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou",
    "ism", "ate", "iti", "ous", "ive", "ize",
]  # fmt: skip


def _step1ab(w: str) -> str:
    if w.endswith("sses") or w.endswith("ies"):
        w = w[:-2]
    elif w.endswith("ss"):
        pass
    elif w.endswith("s"):
        w = w[:-1]
    if w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
        return w
    for suffix in ("ed", "ing"):
        if w.endswith(suffix) and _has_vowel(w[: -len(suffix)]):
            w = w[: -len(suffix)]
            if w.endswith(("at", "bl", "iz")):
                return w + "e"
            if _ends_double_cons(w) and w[-1] not in "lsz":
                return w[:-1]
            if _measure(w) == 1 and _ends_cvc(w):
                return w + "e"
            return w
    return w


def _step4(w: str) -> str:
    best = max((s for s in _STEP4 if w.endswith(s)), key=len, default=None)
    if best is None:
        return w
    stem = w[: -len(best)]
    if _measure(stem) <= 1:
        return w
    if best == "ion" and not stem.endswith(("s", "t")):
        return w
    return stem


def porter_stem(word: str) -> str:
    """Porter (1980) stem of a lowercase word; words of one or two letters are returned unchanged."""
    w = word.lower()
    if len(w) <= 2:
        return w
    w = _step1ab(w)
    if w.endswith("y") and _has_vowel(w[:-1]):  # step 1c
        w = w[:-1] + "i"
    w = _apply_rules(w, _STEP2, lambda s: _measure(s) > 0)
    w = _apply_rules(w, _STEP3, lambda s: _measure(s) > 0)
    w = _step4(w)
    if w.endswith("e"):  # step 5a
        m = _measure(w[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(w[:-1])):
            w = w[:-1]
    if _measure(w) > 1 and _ends_double_cons(w) and w.endswith("l"):  # step 5b
        w = w[:-1]
    return w


# --------------------------------------------------------------------------- METEOR


def _chunks(alignment: Sequence[tuple[int, int]]) -> int:
    """Number of chunks: maximal runs adjacent in both the hypothesis and the reference."""
    pairs = sorted(alignment)
    if not pairs:
        return 0
    chunks = 1
    for (h0, r0), (h1, r1) in zip(pairs, pairs[1:]):
        if not (h1 == h0 + 1 and r1 == r0 + 1):
            chunks += 1
    return chunks


def _crossings(alignment: Sequence[tuple[int, int]]) -> int:
    return sum(1 for (h0, r0), (h1, r1) in itertools.combinations(alignment, 2) if (h0 - h1) * (r0 - r1) < 0)


def _group_options(hs: list[int], rs: list[int]) -> list[list[tuple[int, int]]]:
    """All maximum one-to-one pairings between equal-key positions ``hs`` (hypothesis) and ``rs`` (reference)."""
    if len(hs) <= len(rs):
        return [list(zip(hs, perm)) for perm in itertools.permutations(rs, len(hs))]
    return [list(zip(perm, rs)) for perm in itertools.permutations(hs, len(rs))]


def meteor_alignment(hypothesis: str | Tokens, reference: str | Tokens) -> list[tuple[int, int]]:
    """METEOR word alignment as ``(hypothesis index, reference index)`` pairs, sorted.

    Stage 1 maps identical words, stage 2 maps still-unmapped words with equal Porter stems. Each stage
    adds a mapping of maximum size (``sum_w min(count_hyp(w), count_ref(w))`` over the stage's keys);
    among those it takes the one giving the fewest chunks over the whole alignment so far, then the
    fewest crossings, then the first enumerated. When a stage has more than 1024 such mappings, it
    pairs each key's occurrences in order instead (fewest crossings within the key).
    """
    hyp, ref = _as_tokens(hypothesis), _as_tokens(reference)
    aligned: list[tuple[int, int]] = []
    used_h: set[int] = set()
    used_r: set[int] = set()
    for key in (lambda t: t, porter_stem):
        groups: dict[str, tuple[list[int], list[int]]] = {}
        for i, t in enumerate(hyp):
            if i not in used_h:
                groups.setdefault(key(t), ([], []))[0].append(i)
        for j, t in enumerate(ref):
            if j not in used_r:
                k = key(t)
                if k in groups:
                    groups[k][1].append(j)
        matched = [(hs, rs) for hs, rs in groups.values() if hs and rs]
        if not matched:
            continue
        n_total = math.prod(math.perm(max(len(hs), len(rs)), min(len(hs), len(rs))) for hs, rs in matched)
        if n_total > _MAX_ALIGNMENTS:
            best = [pair for hs, rs in matched for pair in zip(hs, rs)]
        else:
            options = [_group_options(hs, rs) for hs, rs in matched]
            best, best_chunks, best_cross = None, 0, 0
            for combo in itertools.product(*options):
                new = [pair for part in combo for pair in part]
                candidate = aligned + new
                chunks = _chunks(candidate)
                if best is not None and chunks > best_chunks:
                    continue
                cross = _crossings(candidate)
                if best is None or (chunks, cross) < (best_chunks, best_cross):
                    best, best_chunks, best_cross = new, chunks, cross
            assert best is not None
        aligned.extend(best)
        used_h.update(h for h, _ in best)
        used_r.update(r for _, r in best)
    return sorted(aligned)


def meteor(
    hypothesis: str | Tokens,
    reference: str | Tokens,
    *,
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
) -> float:
    """METEOR (Banerjee & Lavie 2005) of ``hypothesis`` against one ``reference``, without synonyms.

    With ``m`` mapped unigrams (see :func:`meteor_alignment`), ``P = m / len(hyp)``, ``R = m / len(ref)``,
    ``Fmean = P R / (alpha P + (1 - alpha) R)`` (``= 10 P R / (R + 9 P)`` for ``alpha = 0.9``),
    ``penalty = gamma (chunks / m) ** beta`` and ``score = Fmean (1 - penalty)``. Returns 0.0 when
    nothing maps.
    """
    hyp, ref = _as_tokens(hypothesis), _as_tokens(reference)
    if not hyp or not ref:
        return 0.0
    alignment = meteor_alignment(hyp, ref)
    m = len(alignment)
    if m == 0:
        return 0.0
    p, r = m / len(hyp), m / len(ref)
    fmean = p * r / (alpha * p + (1.0 - alpha) * r)
    penalty = gamma * (_chunks(alignment) / m) ** beta
    return fmean * (1.0 - penalty)


def meteor_symmetric(a: str | Tokens, b: str | Tokens) -> float:
    """Symmetric METEOR of two descriptions: the mean of ``meteor(a, b)`` and ``meteor(b, a)``."""
    ta, tb = _as_tokens(a), _as_tokens(b)
    return 0.5 * (meteor(ta, tb) + meteor(tb, ta))
