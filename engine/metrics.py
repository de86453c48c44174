"""Evaluation metrics of the papers the engine reproduces (numpy only).

Conventions shared by every function (see ``docs/metrics.md``):

* Recalls and accuracies are **fractions in [0, 1]**; multiply by 100 to compare with the papers' tables.
* Boxes are pixel ``(x1, y1, x2, y2)``. A box **hits** a target when ``IoU > iou_threshold``
  (strictly greater, default 0.5, as GRN, Ref-NMS and CM-Att-Erase state).
* **Ties are pessimistic**: when ``scores`` are given, a positive tied in score with negatives is
  ranked after all of them. Without scores, the given order is the ranking.
* A query whose ranked list contains no positive has rank ``inf``; the median rank is taken over all
  queries, so it is ``inf`` when more than half of the queries miss.
* Empty inputs (no queries, no expressions, no images) raise :class:`InvalidInputError`; the only
  quantity that may be undefined on valid input, the context-object recall when no expression has a
  context object, is ``nan``.
"""
from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.boxes import as_boxes, box_iou
from engine.errors import InvalidInputError

__all__ = [
    "RetrievalResult",
    "ObjectRecallResult",
    "GroundingResult",
    "ImageTextResult",
    "LocalizationResult",
    "first_hit_rank",
    "retrieval_recall_from_hits",
    "retrieval_recall",
    "proposal_retrieval_recall",
    "object_recall",
    "object_recall_curve",
    "grounding_accuracy",
    "image_text_recall",
    "localization_accuracy",
]

ArrayLike = Sequence[float] | np.ndarray
BoxesLike = Sequence[Sequence[float]] | np.ndarray


@dataclass(frozen=True)
class RetrievalResult:
    """R@K (fractions) per K, median rank (1-based, ``inf`` possible), number of queries, per-query ranks."""

    r_at: dict[int, float]
    median_rank: float
    n: int
    ranks: tuple[float, ...] = ()


@dataclass(frozen=True)
class ObjectRecallResult:
    """Recall of referents and of context objects with the top ``top_n`` proposals (``None``: all)."""

    referent: float
    context: float
    n_expressions: int
    n_context_objects: int
    top_n: int | None


@dataclass(frozen=True)
class GroundingResult:
    """Top-1 grounding accuracy (fraction of expressions whose predicted box hits the ground truth)."""

    accuracy: float
    n: int


@dataclass(frozen=True)
class ImageTextResult:
    """Image→text and text→image R@K (fractions) and ``mean_recall`` (SAN's mR: mean of all of them)."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    mean_recall: float
    n_images: int
    n_sentences: int


@dataclass(frozen=True)
class LocalizationResult:
    """Mean IoU, accuracy at each IoU threshold (``IoU > t``) and the mean of those accuracies."""

    mean_iou: float
    accuracy_at: dict[float, float]
    mean_accuracy: float
    n: int


# --------------------------------------------------------------------------- retrieval (GRN)


def first_hit_rank(hits: ArrayLike, scores: ArrayLike | None = None) -> float:
    """1-based rank of the first hit of one ranked list, ``inf`` when there is none.

    ``hits``: bool ``[M]``, whether each ranked item is a positive. ``scores``: float ``[M]`` or ``None``.
    Without scores the given order is the ranking. With scores the order is ignored and ties are
    pessimistic: ``rank = #{score > s*} + #{negatives with score == s*} + 1`` where ``s*`` is the
    best positive score.
    """
    h = np.asarray(hits, dtype=bool).reshape(-1)
    if not h.any():
        return float("inf")
    if scores is None:
        return float(np.argmax(h) + 1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != h.shape:
        raise InvalidInputError(f"scores has {s.size} entries but the ranked list has {h.size}; give one score per item")
    if not np.isfinite(s).all():
        raise InvalidInputError("scores hold NaN or infinite values; give finite scores")
    best = s[h].max()
    return float((s > best).sum() + ((s == best) & ~h).sum() + 1)


def retrieval_recall_from_hits(
    hits: Sequence[ArrayLike],
    scores: Sequence[ArrayLike] | None = None,
    *,
    ks: Sequence[int] = (1, 10, 50, 100),
) -> RetrievalResult:
    """R@K and median rank from per-query hit masks.

    ``hits[q]``: bool ``[M_q]`` over query ``q``'s ranked list (``M_q`` may be 0, a miss);
    ``scores[q]``: float ``[M_q]`` (see :func:`first_hit_rank` for ties). ``R@K`` is the fraction of
    queries whose first hit has rank ``<= K``.
    """
    if len(hits) == 0:
        raise InvalidInputError("no queries to evaluate; check that the split holds queries")
    if scores is not None and len(scores) != len(hits):
        raise InvalidInputError(f"got scores for {len(scores)} queries but hits for {len(hits)}; give one list per query")
    _check_ks(ks)
    ranks = np.array(
        [first_hit_rank(h, None if scores is None else scores[q]) for q, h in enumerate(hits)], dtype=np.float64
    )
    r_at = {int(k): float((ranks <= k).mean()) for k in ks}
    return RetrievalResult(r_at=r_at, median_rank=float(np.median(ranks)), n=len(ranks), ranks=tuple(ranks.tolist()))


def retrieval_recall(
    ranked_ids: Sequence[Sequence[Hashable]],
    positives: Sequence[Collection[Hashable]],
    scores: Sequence[ArrayLike] | None = None,
    *,
    ks: Sequence[int] = (1, 10, 50, 100),
) -> RetrievalResult:
    """GRN retrieval with ground-truth boxes: a hit is a ranked region id among the query's positives.

    ``ranked_ids[q]``: region ids ``[M_q]`` best first; ``positives[q]``: the query's positive ids
    (non-empty); ``scores[q]``: optional float ``[M_q]``.
    """
    if len(ranked_ids) != len(positives):
        raise InvalidInputError(f"got {len(ranked_ids)} ranked lists but {len(positives)} positive sets; give one per query")
    hits = []
    for q, (ids, pos) in enumerate(zip(ranked_ids, positives)):
        pos = set(pos)
        if not pos:
            raise InvalidInputError(f"query {q} has no positives; drop it or give its positive region ids")
        hits.append(np.array([i in pos for i in ids], dtype=bool))
    return retrieval_recall_from_hits(hits, scores, ks=ks)


def proposal_retrieval_recall(
    ranked_boxes: Sequence[BoxesLike],
    ranked_images: Sequence[Sequence[Hashable]],
    positive_boxes: Sequence[BoxesLike],
    positive_images: Sequence[Sequence[Hashable]],
    scores: Sequence[ArrayLike] | None = None,
    *,
    iou_threshold: float = 0.5,
    ks: Sequence[int] = (1, 10, 50, 100),
) -> RetrievalResult:
    """GRN retrieval with proposals: a ranked box hits when it lies in the same image as a positive
    box and has ``IoU > iou_threshold`` with it.

    Per query ``q``: ``ranked_boxes[q]`` ``[M_q, 4]`` and ``ranked_images[q]`` ``[M_q]`` (image ids or
    paths), best first; ``positive_boxes[q]`` ``[P_q, 4]`` (``P_q >= 1``) and ``positive_images[q]``
    ``[P_q]``; ``scores[q]`` optional ``[M_q]``.
    """
    n = len(ranked_boxes)
    if not (len(ranked_images) == len(positive_boxes) == len(positive_images) == n):
        raise InvalidInputError(
            f"ranked_boxes, ranked_images, positive_boxes, positive_images have lengths {n}, {len(ranked_images)}, "
            f"{len(positive_boxes)}, {len(positive_images)}; give one entry per query in each"
        )
    hits = []
    for q in range(n):
        rb, pb = as_boxes(ranked_boxes[q]), as_boxes(positive_boxes[q])
        rimg, pimg = list(ranked_images[q]), list(positive_images[q])
        if len(rimg) != len(rb) or len(pimg) != len(pb):
            raise InvalidInputError(
                f"query {q}: give one image id per box (ranked {len(rb)} boxes / {len(rimg)} ids, "
                f"positives {len(pb)} / {len(pimg)})"
            )
        if len(pb) == 0:
            raise InvalidInputError(f"query {q} has no positive boxes; drop it or give its positives")
        iou = box_iou(rb, pb)  # [M, P]
        same = np.array([[a == b for b in pimg] for a in rimg], dtype=bool).reshape(len(rimg), len(pimg))
        hits.append(((iou > iou_threshold) & same).any(axis=1))
    return retrieval_recall_from_hits(hits, scores, ks=ks)


# --------------------------------------------------------------------------- Ref-NMS recall


def object_recall(
    proposals: Sequence[BoxesLike],
    referent_boxes: BoxesLike,
    context_boxes: Sequence[BoxesLike] | None = None,
    *,
    top_n: int | None = None,
    iou_threshold: float = 0.5,
) -> ObjectRecallResult:
    """Ref-NMS Table 1: recall of the referent and of the contextual objects by the top-N proposals.

    ``proposals[e]``: ``[M_e, 4]`` proposals of expression ``e``'s image, best first (only the first
    ``top_n`` count; ``None`` keeps all, the "real case"). ``referent_boxes``: ``[E, 4]``.
    ``context_boxes[e]``: ``[C_e, 4]`` (pseudo) ground-truth boxes of ``e``'s contextual objects.
    Referent recall = fraction of expressions whose referent has ``IoU > iou_threshold`` with some
    kept proposal. Context recall = the same over all ``(expression, context object)`` pairs pooled,
    ``nan`` when there are none.
    """
    ref = as_boxes(referent_boxes)
    e = len(proposals)
    if e == 0:
        raise InvalidInputError("no expressions to evaluate; check that the split holds referring expressions")
    if len(ref) != e:
        raise InvalidInputError(f"got proposals for {e} expressions but {len(ref)} referent boxes; give one per expression")
    if context_boxes is not None and len(context_boxes) != e:
        raise InvalidInputError(
            f"got context boxes for {len(context_boxes)} expressions but {e} expressions; "
            "give one list per expression (may be empty)"
        )
    if top_n is not None and top_n < 1:
        raise InvalidInputError(f"top_n must be a positive number of proposals or None for all, got {top_n}")
    ref_hits = 0
    ctx_hits = ctx_total = 0
    for i in range(e):
        props = as_boxes(proposals[i])
        if top_n is not None:
            props = props[:top_n]
        ref_hits += int(_any_hit(props, ref[i : i + 1], iou_threshold)[0])
        if context_boxes is not None:
            ctx = as_boxes(context_boxes[i])
            ctx_total += len(ctx)
            ctx_hits += int(_any_hit(props, ctx, iou_threshold).sum())
    context = ctx_hits / ctx_total if ctx_total else float("nan")
    return ObjectRecallResult(
        referent=ref_hits / e, context=context, n_expressions=e, n_context_objects=ctx_total, top_n=top_n
    )


def object_recall_curve(
    proposals: Sequence[BoxesLike],
    referent_boxes: BoxesLike,
    context_boxes: Sequence[BoxesLike] | None = None,
    *,
    ns: Sequence[int] = (1, 2, 5, 10, 20, 50, 100),
    iou_threshold: float = 0.5,
) -> dict[int, ObjectRecallResult]:
    """:func:`object_recall` for each number of proposals in ``ns`` (Ref-NMS Figure 2 / Table 1)."""
    return {
        int(n): object_recall(proposals, referent_boxes, context_boxes, top_n=int(n), iou_threshold=iou_threshold)
        for n in ns
    }


def _any_hit(props: np.ndarray, targets: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Bool ``[T]``: whether each target has ``IoU > iou_threshold`` with some proposal."""
    if len(targets) == 0:
        return np.zeros(0, dtype=bool)
    if len(props) == 0:
        return np.zeros(len(targets), dtype=bool)
    return (box_iou(props, targets) > iou_threshold).any(axis=0)


# --------------------------------------------------------------------------- grounding / localization


def grounding_accuracy(pred_boxes: BoxesLike, gt_boxes: BoxesLike, *, iou_threshold: float = 0.5) -> GroundingResult:
    """CM-Att-Erase top-1 accuracy: fraction of expressions whose top-1 box ``[E, 4]`` has
    ``IoU > iou_threshold`` with the ground-truth box ``[E, 4]`` (same row)."""
    ious = _paired_iou(pred_boxes, gt_boxes, what="expressions")
    return GroundingResult(accuracy=float((ious > iou_threshold).mean()), n=len(ious))


def localization_accuracy(
    pred_boxes: BoxesLike, gt_boxes: BoxesLike, *, thresholds: Sequence[float] = (0.3, 0.4, 0.5)
) -> LocalizationResult:
    """Weakly supervised grounding (MCB attention paper, Tables 1–2): mean IoU between predicted and
    ground-truth boxes (``[N, 4]`` each, paired by row), accuracy ``IoU > t`` at each threshold, and
    the mean of those accuracies (the paper's "Avg")."""
    ious = _paired_iou(pred_boxes, gt_boxes, what="localizations")
    if len(thresholds) == 0:
        raise InvalidInputError("thresholds is empty; give at least one IoU threshold, e.g. 0.3 0.4 0.5")
    acc = {float(t): float((ious > t).mean()) for t in thresholds}
    return LocalizationResult(
        mean_iou=float(ious.mean()), accuracy_at=acc, mean_accuracy=float(np.mean(list(acc.values()))), n=len(ious)
    )


def _paired_iou(pred_boxes: BoxesLike, gt_boxes: BoxesLike, *, what: str) -> np.ndarray:
    p, g = as_boxes(pred_boxes), as_boxes(gt_boxes)
    if len(p) != len(g):
        raise InvalidInputError(f"got {len(p)} predicted boxes but {len(g)} ground-truth boxes; give one of each per item")
    if len(p) == 0:
        raise InvalidInputError(f"no {what} to evaluate; give at least one predicted and ground-truth box")
    lt = np.maximum(p[:, :2], g[:, :2])
    rb = np.minimum(p[:, 2:], g[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    union = area(p) + area(g) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# --------------------------------------------------------------------------- image <-> sentence (SAN)


def image_text_recall(
    similarity: np.ndarray, sentence_image: ArrayLike, *, ks: Sequence[int] = (1, 5, 10)
) -> ImageTextResult:
    """SAN Table 1: image→sentence and sentence→image R@K and mR.

    ``similarity``: float ``[I, S]`` (higher is more similar); ``sentence_image``: int ``[S]``, the
    image row ``0..I-1`` each sentence describes (every image needs at least one sentence).
    Image→text: image ``i`` hits at K when one of its sentences ranks in its top K among all ``S``
    sentences. Text→image: sentence ``s`` hits at K when its image ranks in its top K among all ``I``
    images. Ties are pessimistic. ``mean_recall`` (mR) is the mean of the ``2 * len(ks)`` recalls.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    owner = np.asarray(sentence_image).reshape(-1)
    if sim.ndim != 2:
        raise InvalidInputError(f"similarity must be a 2-D [images, sentences] matrix, got shape {sim.shape}")
    n_img, n_sent = sim.shape
    if n_img == 0 or n_sent == 0:
        raise InvalidInputError(f"similarity has shape {sim.shape}; give at least one image and one sentence")
    if owner.shape[0] != n_sent:
        raise InvalidInputError(f"sentence_image has {owner.shape[0]} entries but similarity has {n_sent} sentence columns")
    if not np.issubdtype(owner.dtype, np.integer) or owner.min() < 0 or owner.max() >= n_img:
        raise InvalidInputError(f"sentence_image must hold image rows in 0..{n_img - 1}; got values {owner.min()}..{owner.max()}")
    if not np.isfinite(sim).all():
        raise InvalidInputError("similarity holds NaN or infinite values; give finite scores")
    _check_ks(ks)
    pos = owner[None, :] == np.arange(n_img)[:, None]  # [I, S]
    if not pos.any(axis=1).all():
        missing = int(np.flatnonzero(~pos.any(axis=1))[0])
        raise InvalidInputError(f"image row {missing} has no sentence; drop it or give its sentences")
    # image -> text: rank of the best own sentence among all sentences, pessimistic ties
    best = np.where(pos, sim, -np.inf).max(axis=1, keepdims=True)
    i2t_rank = (sim > best).sum(axis=1) + ((sim == best) & ~pos).sum(axis=1) + 1
    # text -> image: rank of the sentence's image among all images, pessimistic ties
    own = sim[owner, np.arange(n_sent)][None, :]
    t2i_rank = (sim > own).sum(axis=0) + ((sim == own) & ~pos).sum(axis=0) + 1
    i2t = {int(k): float((i2t_rank <= k).mean()) for k in ks}
    t2i = {int(k): float((t2i_rank <= k).mean()) for k in ks}
    mr = float(np.mean(list(i2t.values()) + list(t2i.values())))
    return ImageTextResult(image_to_text=i2t, text_to_image=t2i, mean_recall=mr, n_images=n_img, n_sentences=n_sent)


def _check_ks(ks: Sequence[int]) -> None:
    if len(ks) == 0 or any(int(k) != k or k < 1 for k in ks):
        raise InvalidInputError(f"ks must be positive integers, got {list(ks)}; e.g. 1 10 50 100")
