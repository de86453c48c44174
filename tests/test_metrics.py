"""Metrics against hand-computed cases, ties, empty inputs, and brute-force references."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import InvalidInputError
from engine.metrics import (
    first_hit_rank,
    grounding_accuracy,
    image_text_recall,
    localization_accuracy,
    object_recall,
    object_recall_curve,
    proposal_retrieval_recall,
    retrieval_recall,
    retrieval_recall_from_hits,
)


# ---------------------------------------------------------------- retrieval (GRN)


def test_retrieval_recall_hand_computed():
    ranked = [[5, 3, 9], [1, 2], [4], list(range(150))]
    positives = [{3}, {7}, {4}, {120, 149}]
    res = retrieval_recall(ranked, positives)
    assert res.ranks == (2.0, math.inf, 1.0, 121.0)
    assert res.r_at == {1: 0.25, 10: 0.5, 50: 0.5, 100: 0.5}
    assert res.median_rank == pytest.approx(61.5)  # sorted ranks 1, 2, 121, inf
    assert res.n == 4


def test_median_rank_is_inf_when_most_queries_miss():
    res = retrieval_recall([[1], [2], [3]], [{1}, {9}, {9}])
    assert res.median_rank == math.inf and res.r_at[1] == pytest.approx(1 / 3)


def test_ties_are_pessimistic():
    ids = ["a", "b", "c", "d"]
    scores = [0.9, 0.5, 0.5, 0.5]
    # c ties with negatives b and d: ranked after both
    assert retrieval_recall([ids], [{"c"}], [scores]).ranks == (4.0,)
    # two tied positives: after the one tied negative
    assert retrieval_recall([ids], [{"b", "c"}], [scores]).ranks == (3.0,)
    # a strictly better positive is unaffected by ties below it
    assert retrieval_recall([ids], [{"a", "c"}], [scores]).ranks == (1.0,)
    # all scores equal, one positive among 4: last
    assert first_hit_rank([False, True, False, False], [1.0, 1.0, 1.0, 1.0]) == 4.0


def test_scores_rank_and_order_is_ignored():
    assert retrieval_recall([["x", "y"]], [{"y"}], [[0.1, 0.9]]).ranks == (1.0,)
    assert retrieval_recall([["x", "y"]], [{"y"}]).ranks == (2.0,)  # without scores: the given order


def test_first_hit_rank_matches_brute_force_on_random_lists():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 30))
        scores = rng.integers(0, 5, m).astype(float)  # many ties
        hits = rng.random(m) < 0.2
        # brute force: sort by score desc, negatives before positives on ties
        order = sorted(range(m), key=lambda i: (-scores[i], bool(hits[i])))
        expected = next((k + 1 for k, i in enumerate(order) if hits[i]), math.inf)
        assert first_hit_rank(hits, scores) == expected


def test_retrieval_empty_and_invalid_inputs():
    with pytest.raises(InvalidInputError, match="no queries"):
        retrieval_recall([], [])
    assert retrieval_recall([[]], [{1}]).ranks == (math.inf,)  # nothing retrieved: a miss
    with pytest.raises(InvalidInputError, match="query 0 has no positives"):
        retrieval_recall([[1]], [set()])
    with pytest.raises(InvalidInputError, match="2 ranked lists but 1 positive sets"):
        retrieval_recall([[1], [2]], [{1}])
    with pytest.raises(InvalidInputError, match="one score per item"):
        retrieval_recall([[1, 2]], [{1}], [[0.5]])
    with pytest.raises(InvalidInputError, match="NaN"):
        retrieval_recall([[1, 2]], [{1}], [[0.5, float("nan")]])
    with pytest.raises(InvalidInputError, match="ks must be positive"):
        retrieval_recall_from_hits([[True]], ks=(0,))


def test_proposal_retrieval_same_image_and_strict_iou():
    ranked_boxes = [
        [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 12)],  # same box but wrong image first
        [(0, 0, 10, 20), (0, 0, 10, 11)],  # IoU exactly 0.5 is not a hit; 100/110 is
        np.zeros((0, 4)),  # no proposals: a miss
    ]
    ranked_images = [["A", "B", "B"], [7, 7], []]
    positive_boxes = [[(0, 0, 10, 10)], [(0, 0, 10, 10)], [(0, 0, 10, 10)]]
    positive_images = [["B"], [7], [7]]
    res = proposal_retrieval_recall(ranked_boxes, ranked_images, positive_boxes, positive_images, ks=(1, 2))
    assert res.ranks == (2.0, 2.0, math.inf)
    assert res.r_at == {1: 0.0, 2: pytest.approx(2 / 3)}
    # scores reorder: make the wrong-image box last, the hit first
    res = proposal_retrieval_recall(ranked_boxes[:1], ranked_images[:1], positive_boxes[:1], positive_images[:1], [[0.1, 0.9, 0.9]], ks=(1,))
    assert res.ranks == (1.0,)  # the other tied box (IoU 100/120 > 0.5) is a hit too


def test_proposal_retrieval_invalid_inputs():
    with pytest.raises(InvalidInputError, match="one entry per query"):
        proposal_retrieval_recall([[(0, 0, 1, 1)]], [], [], [])
    with pytest.raises(InvalidInputError, match="one image id per box"):
        proposal_retrieval_recall([[(0, 0, 1, 1)]], [[]], [[(0, 0, 1, 1)]], [["a"]])
    with pytest.raises(InvalidInputError, match="no positive boxes"):
        proposal_retrieval_recall([[(0, 0, 1, 1)]], [["a"]], [np.zeros((0, 4))], [[]])


# ---------------------------------------------------------------- Ref-NMS recall


PROPOSALS = [np.array([(0, 0, 10, 10), (50, 50, 60, 60)], float), np.array([(0, 0, 5, 5)], float)]
REFERENTS = np.array([(50, 50, 60, 60), (0, 0, 10, 10)], float)
CONTEXTS = [np.array([(0, 0, 10, 10), (100, 100, 110, 110)], float), np.zeros((0, 4))]


def test_object_recall_hand_computed():
    res = object_recall(PROPOSALS, REFERENTS, CONTEXTS)
    assert (res.referent, res.context, res.n_expressions, res.n_context_objects, res.top_n) == (0.5, 0.5, 2, 2, None)
    res1 = object_recall(PROPOSALS, REFERENTS, CONTEXTS, top_n=1)
    assert (res1.referent, res1.context) == (0.0, 0.5)
    curve = object_recall_curve(PROPOSALS, REFERENTS, CONTEXTS, ns=(1, 2))
    assert curve[1] == res1 and curve[2].referent == 0.5
    # a looser threshold lets the 0.25-IoU proposal recall the second referent
    assert object_recall(PROPOSALS, REFERENTS, CONTEXTS, iou_threshold=0.2).referent == 1.0


def test_object_recall_without_context_is_nan():
    assert math.isnan(object_recall(PROPOSALS, REFERENTS).context)
    assert math.isnan(object_recall(PROPOSALS, REFERENTS, [np.zeros((0, 4))] * 2).context)


def test_object_recall_invalid_inputs():
    with pytest.raises(InvalidInputError, match="no expressions"):
        object_recall([], np.zeros((0, 4)))
    with pytest.raises(InvalidInputError, match="one per expression"):
        object_recall(PROPOSALS, REFERENTS[:1])
    with pytest.raises(InvalidInputError, match="top_n"):
        object_recall(PROPOSALS, REFERENTS, top_n=0)
    with pytest.raises(InvalidInputError, match="one list per expression"):
        object_recall(PROPOSALS, REFERENTS, CONTEXTS[:1])


# ---------------------------------------------------------------- grounding / localization


def test_grounding_accuracy_strict_threshold():
    pred = [(0, 0, 10, 10), (0, 0, 10, 10), (20, 20, 30, 30)]
    gt = [(0, 0, 10, 11), (0, 0, 10, 20), (0, 0, 10, 10)]  # IoU 0.909, 0.5 (miss), 0
    res = grounding_accuracy(pred, gt)
    assert res.accuracy == pytest.approx(1 / 3) and res.n == 3
    with pytest.raises(InvalidInputError, match="no expressions"):
        grounding_accuracy(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(InvalidInputError, match="2 predicted boxes but 1"):
        grounding_accuracy(pred[:2], gt[:1])


def test_localization_accuracy_hand_computed():
    pred = [(0, 0, 10, 10)] * 3
    gt = [(0, 0, 10, 10), (0, 0, 10, 20), (0, 0, 10, 30)]  # IoU 1, 0.5, 1/3
    res = localization_accuracy(pred, gt)
    assert res.mean_iou == pytest.approx((1 + 0.5 + 1 / 3) / 3)
    assert res.accuracy_at == {0.3: 1.0, 0.4: pytest.approx(2 / 3), 0.5: pytest.approx(1 / 3)}
    assert res.mean_accuracy == pytest.approx(2 / 3)
    with pytest.raises(InvalidInputError, match="thresholds is empty"):
        localization_accuracy(pred, gt, thresholds=())
    with pytest.raises(InvalidInputError, match="no localizations"):
        localization_accuracy([], [])


# ---------------------------------------------------------------- image <-> sentence (SAN)


def test_image_text_recall_hand_computed():
    sim = np.array([[0.9, 0.1, 0.8], [0.2, 0.7, 0.6]])
    res = image_text_recall(sim, [0, 0, 1], ks=(1, 2))
    # image 0: own best 0.9 -> rank 1; image 1: own 0.6 < 0.7 -> rank 2
    assert res.image_to_text == {1: 0.5, 2: 1.0}
    # sentence 0 -> image 0 rank 1; sentence 1: 0.1 < 0.7 -> rank 2; sentence 2: 0.6 < 0.8 -> rank 2
    assert res.text_to_image == {1: pytest.approx(1 / 3), 2: 1.0}
    assert res.mean_recall == pytest.approx((0.5 + 1 + 1 / 3 + 1) / 4)
    assert (res.n_images, res.n_sentences) == (2, 3)


def test_image_text_recall_ties_pessimistic():
    res = image_text_recall(np.ones((2, 3)), [0, 0, 1], ks=(1, 2))
    assert res.image_to_text == {1: 0.0, 2: 0.5}  # image 0 rank 2 (one other sentence), image 1 rank 3
    assert res.text_to_image == {1: 0.0, 2: 1.0}


def test_image_text_recall_matches_brute_force():
    rng = np.random.default_rng(1)
    sim = rng.integers(0, 4, (6, 15)).astype(float)
    owner = np.repeat(np.arange(6), [3, 2, 3, 2, 3, 2])
    res = image_text_recall(sim, owner, ks=(1, 3))
    i2t = []
    for i in range(6):
        order = sorted(range(15), key=lambda s: (-sim[i, s], owner[s] == i))
        i2t.append(next(k + 1 for k, s in enumerate(order) if owner[s] == i))
    t2i = []
    for s in range(15):
        order = sorted(range(6), key=lambda i: (-sim[i, s], owner[s] == i))
        t2i.append(next(k + 1 for k, i in enumerate(order) if owner[s] == i))
    for k in (1, 3):
        assert res.image_to_text[k] == pytest.approx(np.mean(np.array(i2t) <= k))
        assert res.text_to_image[k] == pytest.approx(np.mean(np.array(t2i) <= k))


def test_image_text_recall_invalid_inputs():
    with pytest.raises(InvalidInputError, match="at least one image"):
        image_text_recall(np.zeros((0, 0)), [])
    with pytest.raises(InvalidInputError, match="image row 1 has no sentence"):
        image_text_recall(np.zeros((2, 2)), [0, 0])
    with pytest.raises(InvalidInputError, match="0..1"):
        image_text_recall(np.zeros((2, 2)), [0, 2])
    with pytest.raises(InvalidInputError, match="3 entries"):
        image_text_recall(np.zeros((2, 2)), [0, 1, 1])
    with pytest.raises(InvalidInputError, match="2-D"):
        image_text_recall(np.zeros(3), [0, 1, 1])
