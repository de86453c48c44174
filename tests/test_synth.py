"""The synthetic corpus generator: determinism, scene properties, and the benchmark re-derived independently.

The reference checks below re-implement the documented definitions (docs/synth.md) from scratch
and use only the files on disk: objects' attributes and boxes from ``annotations.jsonl`` and the
structured meaning of each query.
"""
from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.datasets.annotations import read_dataset
from engine.errors import InvalidInputError
from engine.synth import SynthConfig, SynthGenerator, generate_corpus, rle_decode, rle_encode, split_of
from engine.synth.vocabulary import surface_forms

SEED, N, SIZE = 0, 40, 160


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "corpus"
    summary = generate_corpus(root, SynthConfig(images=N, seed=SEED, size=SIZE))
    assert summary.images == N and summary.queries > 0
    return root


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ reference definitions (independent)


def _centre(b):
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def _left(a, b):
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return bx - ax > abs(by - ay)


def _above(a, b):
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return by - ay > abs(bx - ax)


def _holds(rel, boxes, w, h):
    if rel == "left_of":
        return _left(boxes[0], boxes[1])
    if rel == "right_of":
        return _left(boxes[1], boxes[0])
    if rel == "above":
        return _above(boxes[0], boxes[1])
    if rel == "below":
        return _above(boxes[1], boxes[0])
    if rel == "next_to":
        a, b = boxes
        gap = max(0, max(a[0], b[0]) - min(a[2], b[2]), max(a[1], b[1]) - min(a[3], b[3]))
        return gap <= 0.1 * max(w, h)
    if rel == "between":
        a, b, c = boxes
        return any(f(b, a) and f(a, c) or f(c, a) and f(a, b) for f in (_left, _above))
    raise AssertionError(rel)


def _matches(named, attrs):
    return all(attrs.get(k) == v for k, v in named.items())


def _inside(obj_box, region_box):
    iw = max(0, min(obj_box[2], region_box[2]) - max(obj_box[0], region_box[0]))
    ih = max(0, min(obj_box[3], region_box[3]) - max(obj_box[1], region_box[1]))
    return iw * ih >= 0.9 * (obj_box[2] - obj_box[0]) * (obj_box[3] - obj_box[1])


def _satisfied(meaning, objects, w, h):
    roles = meaning["objects"]
    for combo in itertools.permutations(objects, len(roles)):
        if all(_matches(r, o["attributes"]) for r, o in zip(roles, combo)) and _holds(meaning["relation"], [o["box"] for o in combo], w, h):
            return True
    return False


def _region_table(lines):
    """region id -> (split, image line, region, objects inside the region box)."""
    table = {}
    for line in lines:
        for region in line["regions"]:
            inside = [o for o in line["objects"] if _inside(o["box"], region["box"])]
            table[region["id"]] = (line["split"], line, region, inside)
    return table


# ------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    cfg = SynthConfig(images=6, seed=5, size=128)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_corpus(a, cfg)
    generate_corpus(b, cfg)
    generate_corpus(c, SynthConfig(images=6, seed=6, size=128))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert Path("annotations.jsonl") in files and Path("queries.jsonl") in files and len(files) == 8
    assert sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) == files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "annotations.jsonl").read_bytes() != (c / "annotations.jsonl").read_bytes()
    assert (a / "images/000000.jpg").read_bytes() != (c / "images/000000.jpg").read_bytes()
    assert not list(a.rglob("*.tmp"))


def test_any_image_regenerates_alone(corpus: Path) -> None:
    lines = _lines(corpus / "annotations.jsonl")
    gen = SynthGenerator(SynthConfig(images=N, seed=SEED, size=SIZE))
    for index in (N - 1, 3):
        image = gen.generate(index)
        assert image.data == (corpus / lines[index]["image"]).read_bytes()
        assert json.loads(json.dumps(image.line)) == lines[index]


def test_png_format(tmp_path: Path) -> None:
    generate_corpus(tmp_path / "p", SynthConfig(images=2, size=96, format="png", photo_backgrounds=False))
    assert (tmp_path / "p/images/000001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs, word",
    [({"format": "gif"}, "gif"), ({"size": 50}, "50"), ({"images": 0}, "images"), ({"seed": -1}, "seed"), ({"split_fractions": (0.5, 0.1, 0.1)}, "split_fractions")],
)
def test_config_rejects_bad_values(kwargs: dict, word: str) -> None:
    with pytest.raises(InvalidInputError, match=word):
        SynthConfig(**kwargs)


def test_refuses_foreign_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not empty and is not a synthetic corpus .*notes.txt"):
        generate_corpus(tmp_path, SynthConfig(images=1, size=96))


# ------------------------------------------------------------------ scenes


def test_reader_validates_the_corpus(corpus: Path) -> None:
    ds = read_dataset(corpus)
    assert len(ds.images) == N and ds.queries
    ids = [o.id for im in ds.images for o in im.objects]
    rids = [r.id for im in ds.images for r in im.regions]
    assert len(set(ids)) == len(ids) and len(set(rids)) == len(rids)
    assert all(3 <= len(im.captions) <= 5 for im in ds.images)


def test_objects_boxes_and_masks(corpus: Path) -> None:
    shapes, colours = Counter(), Counter()
    for line in _lines(corpus / "annotations.jsonl"):
        w, h = line["width"], line["height"]
        assert 3 <= len(line["objects"]) <= 8
        union = np.zeros((h, w), dtype=bool)
        for o in line["objects"]:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert set(o["attributes"]) == {"shape", "color", "size", "pattern"}
            shapes[o["attributes"]["shape"]] += 1
            colours[o["attributes"]["color"]] += 1
            mask = rle_decode(o["mask"])
            assert mask.shape == (h, w)
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)  # box is the tight box of the mask
            assert mask.sum() == o["area"] >= 0.2 * (x2 - x1) * (y2 - y1)
            assert not (union & mask).any()  # visible masks do not overlap
            union |= mask
        assert np.array_equal(rle_decode(line["saliency"]), union)
    assert len(shapes) >= 8 and len(colours) >= 8


def test_rle_round_trip_and_column_major() -> None:
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (1, 1), (3, 2)]:
        m = rng.random(shape) < 0.5
        assert np.array_equal(rle_decode(rle_encode(m)), m)
    m = np.array([[0, 1], [1, 1]], dtype=bool)  # column-major: 0,1 | 1,1
    assert rle_encode(m) == {"size": [2, 2], "counts": [1, 3]}
    assert rle_encode(np.ones((2, 2), dtype=bool))["counts"] == [0, 4]


def test_regions_are_true_and_language_matters(corpus: Path) -> None:
    regions = extra = 0
    for line in _lines(corpus / "annotations.jsonl"):
        w, h = line["width"], line["height"]
        objects = {o["id"]: o for o in line["objects"]}
        for r in line["regions"]:
            regions += 1
            x1, y1, x2, y2 = r["box"]
            assert 0.1 <= (x2 - x1) * (y2 - y1) / (w * h) <= 0.9
            assert 2 <= len(r["objects"]) <= 3 and r["relation"] == r["meaning"]["relation"]
            members = [objects[i] for i in r["objects"]]
            assert all(_inside(o["box"], r["box"]) for o in members)
            roles = r["meaning"]["objects"]
            assert all(_matches(role, o["attributes"]) for role, o in zip(roles, members))
            assert _holds(r["relation"], [o["box"] for o in members], w, h)
            for role in roles:  # the description names every attribute of the meaning, and only some
                assert "shape" in role
                for attr, value in role.items():
                    assert any(word in r["description"] for word in surface_forms(attr, value)), (attr, value, r["description"])
            if any(_inside(o["box"], r["box"]) and o["id"] not in r["objects"] for o in line["objects"]):
                extra += 1
    named = Counter(len(role) for line in _lines(corpus / "annotations.jsonl") for r in line["regions"] for role in r["meaning"]["objects"])
    assert named[4] < sum(named.values()) / 2  # most roles leave attributes out
    assert extra >= 0.2 * regions  # many regions show objects their description does not mention


def test_refs_pick_out_exactly_their_target(corpus: Path) -> None:
    n_refs = relational = 0
    for line in _lines(corpus / "annotations.jsonl"):
        w, h = line["width"], line["height"]
        objs = line["objects"]
        for ref in line["refs"]:
            n_refs += 1
            m = ref["meaning"]
            selected = set()
            for x in objs:
                if not _matches(m["target"], x["attributes"]):
                    continue
                if m["relation"] is None or any(
                    y is not x and _matches(m["context"], y["attributes"]) and _holds(m["relation"], [x["box"], y["box"]], w, h) for y in objs
                ):
                    selected.add(x["id"])
            assert selected == {ref["object"]}, ref
            if m["relation"] is not None:
                relational += 1
                (ctx,) = ref["context_objects"]
                ctx_obj = next(o for o in objs if o["id"] == ctx)
                assert _matches(m["context"], ctx_obj["attributes"])
            else:
                assert ref["context_objects"] == []
            for part in ("target", "context"):
                for attr, value in (m[part] or {}).items():
                    assert any(word in ref["expression"] for word in surface_forms(attr, value))
    assert n_refs > 2 * N and relational > 0


# ------------------------------------------------------------------ benchmark


def test_positives_rederived_independently(corpus: Path) -> None:
    lines = _lines(corpus / "annotations.jsonl")
    table = _region_table(lines)
    queries = _lines(corpus / "queries.jsonl")
    assert queries
    for q in queries:
        split, qline, qregion, _ = table[q["region_id"]]
        assert q["split"] == split and q["image"] == qline["image"] and q["region"] == qregion["box"]
        expected = {
            rid
            for rid, (s, line, _, inside) in table.items()
            if s == split and rid != q["region_id"] and _satisfied(q["meaning"], inside, line["width"], line["height"])
        }
        assert set(q["positives"]) == expected, q["text"]
        assert q["positives"] and len(q["positives"]) == len(set(q["positives"]))
    # several images share a meaning: some query has positives in two or more other images
    assert any(len({table[p][1]["image"] for p in q["positives"]} - {q["image"]}) >= 2 for q in queries)


def test_every_query_has_a_positive_in_another_image(corpus: Path) -> None:
    """A query whose positives are all in its own image cannot be answered by search (it excludes itself)."""
    table = _region_table(_lines(corpus / "annotations.jsonl"))
    queries = _lines(corpus / "queries.jsonl")
    assert queries
    for q in queries:
        assert {table[p][1]["image"] for p in q["positives"]} - {q["image"]}, q["text"]


def _forms(meaning):
    """Equivalent spellings of a meaning: converse relation with roles swapped, symmetric role orders."""
    converse = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above", "next_to": "next_to"}
    roles, rel = meaning["objects"], meaning["relation"]
    yield rel, roles
    if rel in converse:
        yield converse[rel], roles[::-1]
    if rel == "between":
        yield rel, [roles[0], roles[2], roles[1]]


def _one_change(query_meaning, region_meaning) -> bool:
    for rel, roles in _forms(region_meaning):
        q_roles = query_meaning["objects"]
        if len(roles) != len(q_roles) or any(set(a) != set(b) for a, b in zip(roles, q_roles)):
            continue
        diffs = sum(a[k] != b[k] for a, b in zip(roles, q_roles) for k in a) + (rel != query_meaning["relation"])
        if diffs == 1:
            return True
    return False


def test_hard_negatives_differ_in_one_thing_and_are_not_positives(corpus: Path) -> None:
    table = _region_table(_lines(corpus / "annotations.jsonl"))
    found = 0
    for q in _lines(corpus / "queries.jsonl"):
        for rid in q["hard_negatives"]:
            split, line, region, inside = table[rid]
            assert split == q["split"] and rid not in q["positives"]
            assert not _satisfied(q["meaning"], inside, line["width"], line["height"])
            assert _one_change(q["meaning"], region["meaning"]), (q["meaning"], region["meaning"])
            found += 1
    assert found > 0


def test_splits_are_seeded_disjoint_and_respected(corpus: Path) -> None:
    lines = _lines(corpus / "annotations.jsonl")
    assert [line["split"] for line in lines] == [split_of(SEED, i) for i in range(N)]
    counts = Counter(split_of(SEED, i) for i in range(2000))
    assert 0.75 < counts["train"] / 2000 < 0.85 and 0.07 < counts["test"] / 2000 < 0.13
    assert [split_of(1, i) for i in range(50)] != [split_of(0, i) for i in range(50)]
    split_of_region = {r["id"]: line["split"] for line in lines for r in line["regions"]}
    for q in _lines(corpus / "queries.jsonl"):
        assert {split_of_region[p] for p in q["positives"]} == {q["split"]}
    ds = read_dataset(corpus)
    parts = [ds.split(s) for s in ("train", "val", "test")]
    assert sum(len(p.images) for p in parts) == N
    assert not set.intersection(*({im.image for im in p.images} for p in parts))
    assert all(q.split == "test" for q in parts[2].queries)


def test_relation_geometry_matches_the_documented_definitions() -> None:
    from engine.synth.meaning import SceneObject, satisfies
    from engine.synth.relations import RELATION_ARITY, relation_holds, relation_is_clear

    rng = np.random.default_rng(1)
    for _ in range(400):
        xy = rng.integers(0, 200, size=(3, 2))
        wh = rng.integers(5, 60, size=(3, 2))
        boxes = [tuple(int(v) for v in (x, y, x + w, y + h)) for (x, y), (w, h) in zip(xy, wh)]
        for rel, arity in RELATION_ARITY.items():
            holds = relation_holds(rel, boxes[:arity], 256, 256)
            assert holds == _holds(rel, boxes[:arity], 256, 256), (rel, boxes)
            assert holds or not relation_is_clear(rel, boxes[:arity], 256, 256)  # clear implies holds
        attrs = [{"shape": str(rng.choice(["circle", "star"])), "color": str(rng.choice(["red", "blue"]))} for _ in range(3)]
        objects = [SceneObject(i, a, b) for i, (a, b) in enumerate(zip(attrs, boxes))]
        meaning = {"objects": [{"shape": "circle"}, {"color": "red", "shape": "star"}], "relation": str(rng.choice(["left_of", "next_to", "above"]))}
        as_dicts = [{"attributes": a, "box": b} for a, b in zip(attrs, boxes)]
        assert satisfies(meaning, objects, 256, 256) == _satisfied(meaning, as_dicts, 256, 256)


def test_regenerating_a_smaller_corpus_replaces_the_old_one(tmp_path: Path) -> None:
    generate_corpus(tmp_path, SynthConfig(images=4, size=96, photo_backgrounds=False))
    (tmp_path / "annotations.jsonl").unlink()  # as if an earlier run had been interrupted
    generate_corpus(tmp_path, SynthConfig(images=2, size=96, photo_backgrounds=False))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000.jpg", "000001.jpg"]
    assert len(read_dataset(tmp_path).images) == 2
