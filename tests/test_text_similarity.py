"""Tokenizer, BLEU-2, Porter stemmer and METEOR against hand-computed values."""
from __future__ import annotations

import math

import pytest

from engine.datasets.text_similarity import (
    bleu2,
    meteor,
    meteor_alignment,
    meteor_symmetric,
    ngram_counts,
    porter_stem,
    sentence_bleu,
    tokenize,
)
from engine.errors import InvalidInputError


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A man's hat, on the TABLE.") == ["a", "man", "s", "hat", "on", "the", "table"]
    assert tokenize("  ") == []
    assert tokenize("under_score") == ["under", "score"]


def test_ngram_counts():
    assert ngram_counts(["a", "b", "a", "b"], 2) == {("a", "b"): 2, ("b", "a"): 1}
    assert ngram_counts(["a"], 2) == {}


def test_bleu_identical_is_one():
    assert sentence_bleu("a man riding a horse", "a man riding a horse") == pytest.approx(1.0)
    assert bleu2("a man riding a horse", "a man riding a horse") == pytest.approx(1.0)


def test_bleu_hand_computed_shorter_candidate():
    # cand "man riding a horse" (4) vs ref "a man riding a horse" (5):
    # p1 = 4/4, p2 = 3/3, BP = exp(1 - 5/4)
    assert sentence_bleu("man riding a horse", "a man riding a horse") == pytest.approx(math.exp(-0.25))
    # reverse: p1 = 4/5 ("a" clipped to 1), p2 = 3/4, BP = 1
    assert sentence_bleu("a man riding a horse", "man riding a horse") == pytest.approx(math.sqrt(0.8 * 0.75))
    assert bleu2("man riding a horse", "a man riding a horse") == pytest.approx(0.5 * (math.exp(-0.25) + math.sqrt(0.6)))


def test_bleu_clipping():
    # cand "the the the" vs ref "the cat": p1 = 1/3 (clipped), p2 = 0/2 -> 0
    assert sentence_bleu("the the the", "the cat") == 0.0
    # cand "the cat the cat" vs ref "the cat sat": p1 = 2/4, p2 = 1/3, c > r so BP = 1
    assert sentence_bleu("the cat the cat", "the cat sat") == pytest.approx(math.sqrt(0.5 / 3))


def test_bleu_degenerate_inputs():
    assert sentence_bleu("dog", "dog") == 0.0  # fewer than 2 tokens: no bigram precision
    assert sentence_bleu("", "a dog") == 0.0
    assert sentence_bleu("a dog", "") == 0.0
    assert sentence_bleu("a cat", "a dog") == 0.0  # no bigram match
    assert sentence_bleu("dog", "dog", max_n=1) == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match="max_n"):
        sentence_bleu("a", "b", max_n=0)


def test_bleu_accepts_token_lists():
    assert sentence_bleu(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "word,stem",
    [
        ("caresses", "caress"), ("ponies", "poni"), ("ties", "ti"), ("caress", "caress"), ("cats", "cat"),
        ("feed", "feed"), ("agreed", "agre"), ("plastered", "plaster"), ("bled", "bled"), ("motoring", "motor"),
        ("sing", "sing"), ("conflated", "conflat"), ("troubled", "troubl"), ("sized", "size"), ("hopping", "hop"),
        ("tanned", "tan"), ("falling", "fall"), ("hissing", "hiss"), ("fizzed", "fizz"), ("failing", "fail"),
        ("filing", "file"), ("happy", "happi"), ("sky", "sky"), ("relational", "relat"), ("conditional", "condit"),
        ("rational", "ration"), ("valenci", "valenc"), ("digitizer", "digit"), ("vietnamization", "vietnam"),
        ("operator", "oper"), ("hopefulness", "hope"), ("sensibiliti", "sensibl"), ("triplicate", "triplic"),
        ("formative", "form"), ("electrical", "electr"), ("goodness", "good"), ("revival", "reviv"),
        ("allowance", "allow"), ("airliner", "airlin"), ("adjustable", "adjust"), ("irritant", "irrit"),
        ("replacement", "replac"), ("adoption", "adopt"), ("communism", "commun"), ("effective", "effect"),
        ("bowdlerize", "bowdler"), ("probate", "probat"), ("rate", "rate"), ("cease", "ceas"),
        ("controll", "control"), ("roll", "roll"), ("generalization", "gener"), ("oscillators", "oscil"),
        ("running", "run"), ("horses", "hors"), ("sitting", "sit"), ("is", "is"), ("a", "a"),
    ],
)  # fmt: skip
def test_porter_stem_matches_porter_1980(word, stem):
    assert porter_stem(word) == stem


def test_meteor_banerjee_lavie_example():
    # 6 matches, P = 6/6, R = 6/7, Fmean = 10PR/(R+9P) = 60/69; chunks "the president" | "spoke to the audience"
    hyp, ref = "the president spoke to the audience", "the president then spoke to the audience"
    assert meteor_alignment(hyp, ref) == [(0, 0), (1, 1), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert meteor(hyp, ref) == pytest.approx(60 / 69 * (1 - 0.5 * (2 / 6) ** 3))


def test_meteor_identical_and_disjoint():
    assert meteor("a b c d", "a b c d") == pytest.approx(1 - 0.5 * (1 / 4) ** 3)
    assert meteor("dog", "dog") == pytest.approx(0.5)  # one chunk over one match: the original penalty
    assert meteor("a b", "c d") == 0.0
    assert meteor("", "c d") == 0.0


def test_meteor_stem_stage_matches_inflections():
    # exact: "man", "horse"; stem: "riding"~"rides"; 3 matches, 1 chunk
    hyp, ref = "man riding horse", "man rides horse"
    assert meteor_alignment(hyp, ref) == [(0, 0), (1, 1), (2, 2)]
    assert meteor(hyp, ref) == pytest.approx(1 - 0.5 * (1 / 3) ** 3)


def test_meteor_alignment_minimises_chunks():
    # "a" appears twice in the reference; aligning hyp "a" to ref position 2 gives one chunk "a cat"
    hyp, ref = "a cat", "a dog a cat"
    assert meteor_alignment(hyp, ref) == [(0, 2), (1, 3)]
    p, r = 1.0, 0.5
    assert meteor(hyp, ref) == pytest.approx(10 * p * r / (r + 9 * p) * (1 - 0.5 * (1 / 2) ** 3))


def test_meteor_reordering_hand_computed():
    # hyp "cat the" vs ref "the cat": 2 matches, 2 chunks, P = R = 1
    assert meteor("cat the", "the cat") == pytest.approx(1 - 0.5 * 1.0)


def test_meteor_symmetric_is_mean_of_directions():
    a, b = "the president spoke to the audience", "the president then spoke to the audience"
    assert meteor_symmetric(a, b) == pytest.approx(0.5 * (meteor(a, b) + meteor(b, a)))
    assert meteor_symmetric(a, b) == pytest.approx(meteor_symmetric(b, a))


def test_meteor_long_repetitive_input_falls_back_without_blowing_up():
    hyp = " ".join(["a", "b"] * 12)
    ref = " ".join(["b", "a"] * 12)
    score = meteor(hyp, ref)
    assert 0.0 < score <= 1.0
