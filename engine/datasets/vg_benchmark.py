"""The GRN expressional-region retrieval benchmark (GRN paper §4.1), built from Visual Genome–format data.

Steps, in the paper's order (all thresholds are arguments of :func:`build_grn_benchmark`):

1. **Relational descriptions only** (optional, on by default): the paper drops regions "only
   describing a single object or with no object" (``"A bag"``, ``"The blue sky"``). Without a
   parser we keep a description when it has at least two content words (not stopwords or relation
   words) *and* at least one relation word: a preposition, ``and``, a common relation verb
   (``has``, ``wearing``, ``parked``, …) or an ``-ing`` word that is not a common ``-ing`` noun
   (``building``, ``ceiling``, …). See :func:`is_relational`.
2. **Area filter**: drop regions covering less than 1/10 or more than 9/10 of their image.
3. **De-duplication**: within an image, of two regions with IoU > 0.9 keep the larger (greedy, in
   order of decreasing area, ties by region id).
4. **Splits by image**: the images that still have regions are shuffled with ``seed`` and cut into
   ``split_fractions`` (default 7/9 train, 1/9 val, 1/9 test — the paper's 35K/5K/5K).
5. **Pairing**, within each split ("we apply this process to training set, validation set and test
   set respectively"), of regions of *different* images: symmetric BLEU-2 > 0.7, then symmetric
   METEOR > 0.6 (:mod:`engine.datasets.text_similarity`). So no set spans two splits.
6. **Sets** are the connected components of the pair graph (union-find); from each set one region is
   drawn as the query (``seed``), the others are its positives (:class:`RetrievalQuery`).
7. The output keeps the images holding at least one region of a set ("each image we used contains
   at least one positive region"), each with all its regions that survived steps 1–3: those are the
   retrieval candidates.

Pairing is not done over all ``n^2`` pairs. :func:`candidate_pairs` is a prefix-filtered inverted
index over bigram occurrences that returns a superset of the pairs whose BLEU-2 can exceed the
threshold (proof in its docstring); only those are scored exactly.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import sparse

from engine.boxes import box_area, box_iou
from engine.datasets.text_similarity import meteor_symmetric, tokenize
from engine.datasets.types import Dataset, ImageAnn, RegionAnn, RetrievalQuery
from engine.errors import InvalidInputError

__all__ = [
    "DEFAULT_SPLIT_FRACTIONS",
    "GrnBenchmarkStats",
    "GrnBenchmark",
    "is_relational",
    "filter_regions",
    "split_images",
    "candidate_pairs",
    "bleu2_pairs",
    "similar_pairs",
    "group_pairs",
    "build_grn_benchmark",
]

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_FRACTIONS: Mapping[str, float] = {"train": 7 / 9, "val": 1 / 9, "test": 1 / 9}

_RELATION_WORDS = frozenset(
    """
    on in at near by with under over above below behind beside besides next to along across against
    around between inside outside of from into onto through toward towards beneath underneath atop
    among amongst alongside past off out up down upon within without during and while
    has have having holds holding held wears wearing wore carries carrying carried rides riding
    sits sitting sat stands standing stood lies lying laying eats eating looks looking watching
    parked covered surrounded filled attached hanging hangs leaning leans topped made full
    """.split()
)
_ING_NOUNS = frozenset(
    """
    building buildings ceiling ceilings clothing railing railings painting paintings ring rings thing
    things king string strings wing wings spring evening morning icing frosting topping toppings
    stuffing writing lettering awning awnings siding lightning bedding pudding dressing wedding
    opening landing wiring tiling molding moulding sibling stocking stockings clearing sing bring
    swing swings sling
    """.split()
)
_STOPWORDS = frozenset(
    """
    a an the this that these those some any its it his her their my your our one two is are was were
    be been being there here very s
    """.split()
)


def is_relational(description: str | Sequence[str]) -> bool:
    """Whether a description plausibly names several objects in a relation (step 1 above).

    True when it has at least two content words and one relation word; ``"a bag"`` and
    ``"the blue sky"`` are False, ``"man riding a horse"`` and ``"tall buildings surrounded by trees"`` True.
    """
    tokens = tokenize(description) if isinstance(description, str) else list(description)
    relation = any(_is_relation_word(t) for t in tokens)
    content = sum(1 for t in tokens if t not in _STOPWORDS and not _is_relation_word(t))
    return relation and content >= 2


def _is_relation_word(t: str) -> bool:
    return t in _RELATION_WORDS or (len(t) >= 5 and t.endswith("ing") and t not in _ING_NOUNS)


def filter_regions(
    image: ImageAnn,
    *,
    min_area_frac: float = 0.1,
    max_area_frac: float = 0.9,
    dedup_iou: float = 0.9,
    require_relation: bool = True,
) -> list[RegionAnn]:
    """Steps 1–3 on one image: relational filter, area filter, IoU de-duplication (keep the larger).

    Returns the surviving regions in their original order.
    """
    return _filter_regions(image, min_area_frac, max_area_frac, dedup_iou, require_relation)[0]


def _filter_regions(
    image: ImageAnn, min_area_frac: float, max_area_frac: float, dedup_iou: float, require_relation: bool
) -> tuple[list[RegionAnn], int, int]:
    """:func:`filter_regions` and the number of regions left after steps 1 and 2."""
    regions = [r for r in image.regions if not require_relation or is_relational(r.description)]
    n_relation = len(regions)
    img_area = float(image.width) * float(image.height)
    if not regions or img_area <= 0:
        return [], n_relation, 0
    areas = box_area([r.box for r in regions]) / img_area
    regions = [r for r, a in zip(regions, areas) if min_area_frac <= a <= max_area_frac]
    n_area = len(regions)
    if n_area < 2:
        return regions, n_relation, n_area
    boxes = np.array([r.box for r in regions], dtype=np.float64)
    areas = box_area(boxes)
    order = sorted(range(len(regions)), key=lambda i: (-areas[i], regions[i].id))
    iou = box_iou(boxes, boxes)
    kept: list[int] = []
    for i in order:
        if all(iou[i, k] <= dedup_iou for k in kept):
            kept.append(i)
    keep = set(kept)
    return [r for i, r in enumerate(regions) if i in keep], n_relation, n_area


def split_images(keys: Sequence[Hashable], fractions: Mapping[str, float], *, seed: int) -> dict[Hashable, str]:
    """Assign each key a split: shuffle the sorted keys with ``seed``, cut at the rounded cumulative fractions."""
    names = list(fractions)
    fr = np.array([fractions[n] for n in names], dtype=np.float64)
    if not names or (fr < 0).any() or not math.isclose(fr.sum(), 1.0, abs_tol=1e-6):
        raise InvalidInputError(
            f"split_fractions must be non-negative and sum to 1, got {dict(fractions)}; e.g. train=0.8 val=0.1 test=0.1"
        )
    ordered = sorted(keys, key=lambda k: (str(type(k)), k))
    perm = np.random.default_rng(seed).permutation(len(ordered))
    bounds = np.rint(np.cumsum(fr) * len(ordered)).astype(int)
    bounds[-1] = len(ordered)
    out: dict[Hashable, str] = {}
    start = 0
    for name, end in zip(names, bounds):
        for p in perm[start:end]:
            out[ordered[p]] = name
        start = max(start, end)
    return out


def _length_ratio_bound(tau: float) -> float:
    """``rho`` such that BLEU-2 > ``tau`` in some direction implies ``max_len / min_len < rho``."""
    return max(1.0 - math.log(tau), 1.0 / tau)


def candidate_pairs(tokens: Sequence[Sequence[str]], *, bleu_threshold: float = 0.7) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, that may have symmetric BLEU-2 > ``bleu_threshold``: a superset.

    Why it is lossless. The symmetric score is a mean of two directions, so one direction, with
    candidate ``c`` and reference ``r``, has ``BLEU = BP sqrt(p1 p2) > tau``. Then (a) ``p2 > tau^2``, i.e.
    the clipped bigram overlap ``m2 > tau^2 (len_c - 1) >= tau^2 (min_len - 1)``; (b) if ``c`` is the
    shorter, ``BP = exp(1 - len_r/len_c) > tau`` gives ``len_r/len_c < 1 - ln tau``; if longer,
    ``p1, p2 <= len_r/len_c`` gives ``len_c/len_r < 1/tau``: so ``max_len/min_len < rho``.
    With bigram *occurrences* as tokens (``(g, k)`` = the k-th occurrence of bigram ``g``), ``m2`` is
    the size of a set intersection and every record ``x`` needs overlap ``>= t_x`` with any partner,
    ``t_x = floor(tau^2 (len_x / rho - 1)) + 1``. Ordering tokens rarest first, two sets overlapping
    in ``t`` tokens share a token among their first ``|X| - t + 1`` (prefix filtering, Chaudhuri et
    al. 2006), so only prefixes are indexed (a sparse inverted index, joined with a sparse product
    in blocks of rows); the rare prefixes keep the posting lists short. Pairs found are then checked
    against the length bound and the exact ``m2`` bound.
    """
    ii, jj, _ = _candidate_arrays(tokens, _check_tau(bleu_threshold))
    return list(zip(ii.tolist(), jj.tolist()))


def bleu2_pairs(tokens: Sequence[Sequence[str]], *, bleu_threshold: float = 0.7) -> list[tuple[int, int]]:
    """All pairs ``(i, j)``, ``i < j``, with symmetric BLEU-2 (:func:`~engine.datasets.text_similarity.bleu2`)
    > ``bleu_threshold``: exact, computed in bulk from clipped n-gram overlaps of the :func:`candidate_pairs`."""
    tau = _check_tau(bleu_threshold)
    ii, jj, m2 = _candidate_arrays(tokens, tau)
    if len(ii) == 0:
        return []
    lengths = np.array([len(t) for t in tokens], dtype=np.float64)
    m1 = _overlap(_occurrence_matrix([[(t,) for t in toks] for toks in tokens]), ii, jj).astype(np.float64)
    m2 = m2.astype(np.float64)
    la, lb = lengths[ii], lengths[jj]
    score = 0.5 * (_bleu2_directed(m1, m2, la, lb) + _bleu2_directed(m1, m2, lb, la))
    keep = score > tau
    return list(zip(ii[keep].tolist(), jj[keep].tolist()))


def _bleu2_directed(m1: np.ndarray, m2: np.ndarray, lc: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """Vectorized :func:`sentence_bleu` with ``max_n = 2`` from clipped overlaps and lengths."""
    ok = (lc >= 2) & (lr >= 1) & (m1 > 0) & (m2 > 0)
    out = np.zeros(len(m1), dtype=np.float64)
    c, r = lc[ok], lr[ok]
    log_p = (np.log(m1[ok] / c) + np.log(m2[ok] / (c - 1))) / 2
    bp = np.where(c > r, 1.0, np.exp(1.0 - r / c))
    out[ok] = bp * np.exp(log_p)
    return out


def _check_tau(bleu_threshold: float) -> float:
    tau = float(bleu_threshold)
    if not 0.0 < tau <= 1.0:
        raise InvalidInputError(f"bleu_threshold must be in (0, 1], got {bleu_threshold}; the paper uses 0.7")
    return tau


def _occurrences(grams: Sequence[Hashable]) -> list[tuple[Hashable, int]]:
    """``[(g, k)]``: each n-gram with its occurrence number, so that set overlap = clipped count overlap."""
    seen: dict[Hashable, int] = {}
    out = []
    for g in grams:
        k = seen.get(g, 0)
        seen[g] = k + 1
        out.append((g, k))
    return out


def _occurrence_matrix(grams: Sequence[Sequence[Hashable]]) -> sparse.csr_matrix:
    """Binary ``[n, V]`` matrix of n-gram occurrences per record."""
    vocab: dict[tuple[Hashable, int], int] = {}
    rows, cols = [], []
    for i, gs in enumerate(grams):
        for occ in _occurrences(gs):
            rows.append(i)
            cols.append(vocab.setdefault(occ, len(vocab)))
    return sparse.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(len(grams), max(len(vocab), 1)))


def _overlap(m: sparse.csr_matrix, ii: np.ndarray, jj: np.ndarray, block: int = 200_000) -> np.ndarray:
    """Row-wise dot products ``m[ii[k]] . m[jj[k]]`` (clipped overlap counts), in blocks."""
    out = np.empty(len(ii), dtype=np.int64)
    for s in range(0, len(ii), block):
        a, b = ii[s : s + block], jj[s : s + block]
        out[s : s + block] = np.asarray(m[a].multiply(m[b]).sum(axis=1)).reshape(-1)
    return out


def _candidate_arrays(tokens: Sequence[Sequence[str]], tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs as sorted arrays ``ii < jj`` with their clipped bigram overlaps ``m2``."""
    rho = _length_ratio_bound(tau)
    n = len(tokens)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    empty = (np.zeros(0, dtype=np.int64),) * 3
    bigrams = [list(zip(t, t[1:])) for t in tokens]
    vocab: dict[tuple[Hashable, int], int] = {}
    rows = [[vocab.setdefault(occ, len(vocab)) for occ in _occurrences(bg)] for bg in bigrams]
    if n < 2 or not vocab:
        return empty
    df = np.zeros(len(vocab), dtype=np.int64)
    for row in rows:
        df[row] += 1
    rank = np.empty(len(vocab), dtype=np.int64)
    rank[np.lexsort((np.arange(len(vocab)), df))] = np.arange(len(vocab))

    p_rows, p_cols, x_rows, x_cols = [], [], [], []
    for i, row in enumerate(rows):
        if not row:
            continue
        v = tau * tau * (lengths[i] / rho - 1.0)
        t = max(1, math.floor(v - 1e-6) + 1)
        plen = len(row) - t + 1
        x_rows.extend([i] * len(row))
        x_cols.extend(row)
        if plen <= 0:
            continue
        prefix = sorted(row, key=lambda c: rank[c])[:plen]
        p_rows.extend([i] * len(prefix))
        p_cols.extend(prefix)
    shape = (n, len(vocab))
    prefix_m = sparse.csr_matrix((np.ones(len(p_rows), dtype=np.int32), (p_rows, p_cols)), shape=shape)
    full_m = sparse.csr_matrix((np.ones(len(x_rows), dtype=np.int32), (x_rows, x_cols)), shape=shape)
    prefix_t = prefix_m.T.tocsr()

    out_i, out_j, out_m = [], [], []
    chunk = 2048
    for start in range(0, n, chunk):
        block = (prefix_m[start : start + chunk] @ prefix_t).tocoo()
        ii = block.row.astype(np.int64) + start
        jj = block.col.astype(np.int64)
        keep = jj > ii
        ii, jj = ii[keep], jj[keep]
        lo, hi = np.minimum(lengths[ii], lengths[jj]), np.maximum(lengths[ii], lengths[jj])
        keep = hi < rho * lo + 1e-9
        ii, jj, lo = ii[keep], jj[keep], lo[keep]
        if len(ii) == 0:
            continue
        m2 = _overlap(full_m, ii, jj)
        keep = m2 > tau * tau * (lo - 1) - 1e-9
        out_i.append(ii[keep])
        out_j.append(jj[keep])
        out_m.append(m2[keep])
    if not out_i:
        return empty
    ii, jj, m2 = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_m)
    order = np.lexsort((jj, ii))
    return ii[order], jj[order], m2[order]


def similar_pairs(
    texts: Sequence[str],
    groups: Sequence[Hashable],
    *,
    bleu_threshold: float = 0.7,
    meteor_threshold: float = 0.6,
) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of descriptions from different ``groups`` (images) with symmetric
    BLEU-2 > ``bleu_threshold`` and then symmetric METEOR > ``meteor_threshold`` (step 5)."""
    return _similar_pairs(texts, groups, bleu_threshold=bleu_threshold, meteor_threshold=meteor_threshold)[0]


def _similar_pairs(
    texts: Sequence[str], groups: Sequence[Hashable], *, bleu_threshold: float, meteor_threshold: float
) -> tuple[list[tuple[int, int]], int]:
    """:func:`similar_pairs` and the number of candidate pairs scored."""
    if len(texts) != len(groups):
        raise InvalidInputError(f"got {len(texts)} texts but {len(groups)} group keys; give one image key per text")
    tokens = [tokenize(t) for t in texts]
    by_bleu = [(i, j) for i, j in bleu2_pairs(tokens, bleu_threshold=bleu_threshold) if groups[i] != groups[j]]
    pairs = [(i, j) for i, j in by_bleu if meteor_symmetric(tokens[i], tokens[j]) > meteor_threshold]
    logger.debug("pairing %d descriptions: %d pairs over BLEU-2, %d kept by METEOR", len(texts), len(by_bleu), len(pairs))
    return pairs, len(by_bleu)


def group_pairs(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components (union-find) of the graph on ``0..n-1`` with edges ``pairs``, size >= 2.

    Each component is sorted; components are ordered by their smallest member.
    """
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return sorted((c for c in comps.values() if len(c) >= 2), key=lambda c: c[0])


@dataclass(frozen=True)
class GrnBenchmarkStats:
    """Counts after each step of the construction (regions unless said otherwise).

    ``bleu_pairs``: pairs of regions of different images over the BLEU-2 threshold; ``pairs``: those
    also over the METEOR threshold.
    """

    regions_in: int = 0
    after_relation_filter: int = 0
    after_area_filter: int = 0
    after_dedup: int = 0
    bleu_pairs: int = 0
    pairs: int = 0
    sets: int = 0
    images_out: dict[str, int] = field(default_factory=dict)
    regions_out: dict[str, int] = field(default_factory=dict)
    queries_out: dict[str, int] = field(default_factory=dict)


@dataclass
class GrnBenchmark:
    """The built benchmark (images with their candidate regions, split; queries) and its statistics."""

    dataset: Dataset
    stats: GrnBenchmarkStats


def build_grn_benchmark(
    dataset: Dataset,
    *,
    min_area_frac: float = 0.1,
    max_area_frac: float = 0.9,
    dedup_iou: float = 0.9,
    bleu_threshold: float = 0.7,
    meteor_threshold: float = 0.6,
    require_relation: bool = True,
    split_fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    name: str | None = None,
) -> GrnBenchmark:
    """Build the GRN §4.1 benchmark from a dataset of images with described regions (e.g.
    :func:`engine.datasets.visual_genome.read_visual_genome`). Deterministic for a given ``seed``.

    Returns a :class:`GrnBenchmark` whose dataset holds the kept images (``split`` set, ``regions``
    = their filtered regions) and one :class:`RetrievalQuery` per set of similar regions.
    """
    if not 0 <= min_area_frac <= max_area_frac <= 1:
        raise InvalidInputError(
            f"need 0 <= min_area_frac <= max_area_frac <= 1, got {min_area_frac}, {max_area_frac}; the paper uses 0.1 and 0.9"
        )
    regions_in = sum(len(im.regions) for im in dataset.images)
    n_rel = n_area = 0
    filtered: list[tuple[ImageAnn, list[RegionAnn]]] = []
    for im in dataset.images:
        regs, n_relation, n_in_area = _filter_regions(im, min_area_frac, max_area_frac, dedup_iou, require_relation)
        n_rel += n_relation
        n_area += n_in_area
        if regs:
            filtered.append((im, regs))
    n_dedup = sum(len(r) for _, r in filtered)

    keys = [_image_key(im) for im, _ in filtered]
    if len(set(keys)) != len(keys):
        raise InvalidInputError(
            "the dataset holds two images with the same image_id/path; de-duplicate it before building the benchmark"
        )
    split_of = split_images(keys, split_fractions, seed=seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])

    n_bleu = n_pairs = n_sets = 0
    queries: list[RetrievalQuery] = []
    used_images: set[Hashable] = set()
    for split in split_fractions:
        members = [(im, r) for im, regs in filtered if split_of[_image_key(im)] == split for r in regs]
        if not members:
            continue
        texts = [r.description for _, r in members]
        groups = [_image_key(im) for im, _ in members]
        pairs, n_by_bleu = _similar_pairs(texts, groups, bleu_threshold=bleu_threshold, meteor_threshold=meteor_threshold)
        n_bleu += n_by_bleu
        n_pairs += len(pairs)
        for comp in group_pairs(len(members), pairs):
            n_sets += 1
            q = comp[int(rng.integers(len(comp)))]
            qim, qreg = members[q]
            queries.append(
                RetrievalQuery(
                    image=qim.image,
                    region=qreg.box,
                    text=qreg.description,
                    region_id=qreg.id,
                    positives=tuple(sorted(members[k][1].id for k in comp if k != q)),
                    split=split,
                )
            )
            used_images.update(groups[k] for k in comp)

    images = [
        replace(im, regions=tuple(regs), split=split_of[_image_key(im)])
        for im, regs in filtered
        if _image_key(im) in used_images
    ]
    stats = GrnBenchmarkStats(
        regions_in=regions_in,
        after_relation_filter=n_rel,
        after_area_filter=n_area,
        after_dedup=n_dedup,
        bleu_pairs=n_bleu,
        pairs=n_pairs,
        sets=n_sets,
        images_out={s: sum(1 for im in images if im.split == s) for s in split_fractions},
        regions_out={s: sum(len(im.regions) for im in images if im.split == s) for s in split_fractions},
        queries_out={s: sum(1 for q in queries if q.split == s) for s in split_fractions},
    )
    logger.info("GRN benchmark: %s", stats)
    out = Dataset(root=dataset.root, images=images, queries=queries, name=name or f"{dataset.name}-grn")
    return GrnBenchmark(dataset=out, stats=stats)


def _image_key(im: ImageAnn) -> Hashable:
    return im.image_id if im.image_id is not None else im.image
