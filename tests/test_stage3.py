"""Query stage 3: Ref-NMS + CM-Att grounding over the best images (query/localize.py)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from engine.boxes import box_iou
from engine.errors import CheckpointError, InvalidInputError
from engine.results import Hit
from query.request import SearchRequest
from query.localize import Stage3Candidates, Stage3Weights, best_images, load_stage3_weights, rank_stage3


def _query(corpus: Path) -> dict:
    lines = (corpus / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0])


def _engine(index_dir: Path, **kwargs):  # noqa: ANN202
    from engine.api import Engine
    from engine.config import EngineConfig

    return Engine(index_dir, config=EngineConfig(device="cpu", **kwargs))


@pytest.fixture(scope="module")
def rpn_index(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny corpus indexed with RPN proposals (stage 3 works on proposals)."""
    from engine.config import IndexConfig

    index_dir = tmp_path_factory.mktemp("stage3") / "idx"
    with _engine(index_dir) as engine:
        engine.index(tiny_corpus, config=IndexConfig(proposals="rpn", batch_size=4))
    return index_dir


class _Row:
    def __init__(self, i: int, image: str) -> None:
        self.id, self.image_path, self.box = i, image, (0.0, 0.0, 10.0 + i, 10.0 + i)


def _candidates(image: str, ids: list[int], s2: list[float], r: list[float], g: list[float]) -> Stage3Candidates:
    arr = lambda v: np.asarray(v, np.float32)  # noqa: E731
    from query.rerank import StageScores

    return Stage3Candidates(rows=[_Row(i, image) for i in ids], visual=arr([0.0] * len(ids)), stage2=StageScores(final=arr(s2)), relatedness=arr(r), grounding=arr(g))


def test_rank_stage3_puts_grounded_images_first_ranked_by_the_fused_score() -> None:
    stage2 = [Hit("a", (0, 0, 11, 11), 0.9, 1), Hit("b", (50, 50, 60, 60), 0.8, 2), Hit("c", (0, 0, 5, 5), 0.7, 3)]
    grounded = {"a": _candidates("a", [10, 11], [0.5, 0.4], [0.1, 0.9], [0.0, 0.0]), "b": _candidates("b", [20], [0.6], [0.0], [0.5])}
    hits = rank_stage3(stage2, grounded, Stage3Weights(images=2, relatedness=1.0, grounding=1.0), k=10)
    # finals: a/10 = 0.6, a/11 = 1.3, b/20 = 1.1: one grounded hit per image, then stage 2's hits
    # less a/1, which repeats a's grounded box (0, 0, 21, 21) with IoU 0.27 -> kept; b/2 does not overlap b/20
    assert [h.region_id for h in hits] == [11, 20, 1, 2, 3]
    repeat = rank_stage3([Hit("a", (0, 0, 20, 20), 0.9, 1)], grounded, Stage3Weights(2, 1.0, 1.0), k=10)
    assert [h.region_id for h in repeat] == [11, 20]  # IoU(a/1, a/11) > 0.5: dropped
    assert hits[0].score == pytest.approx(1.3)
    assert hits[0].scores == pytest.approx({"visual": 0.0, "stage2": 0.4, "relatedness": 0.9, "grounding": 0.0})
    assert [h.region_id for h in rank_stage3(stage2, grounded, Stage3Weights(2, 0.0, 0.0), k=2)] == [20, 10]


def test_best_images_keeps_stage2_order_without_repeats() -> None:
    hits = [Hit(p, (0, 0, 1, 1), 1.0, i) for i, p in enumerate(["x", "y", "x", "z", "y"])]
    assert best_images(hits, 2) == ["x", "y"]
    assert best_images(hits, 0) == []


def test_stage3_weights_refuse_bad_values_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="images"):
        Stage3Weights(images=-1)
    with pytest.raises(CheckpointError, match="engine eval stage3"):
        load_stage3_weights(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_stage3_weights(tmp_path / "bad.json")


def test_shipped_stage3_weights_load() -> None:
    w = load_stage3_weights()
    assert w.images >= 0 and w.relatedness >= 0 and w.grounding >= 0


def test_indexing_stores_each_images_mean_backbone_feature(rpn_index: Path, tiny_corpus: Path) -> None:
    from indexer.images import load_image

    with _engine(rpn_index) as engine:
        store = engine._open_reader()
        path = store.regions(store.all_region_ids()[:1])[0].image_path
        stored = store.image_vectors([path])[path]
        with __import__("torch").no_grad():
            fmap = engine.extractor.feature_map([load_image(path)])
        expected = fmap[0].float().mean(dim=(1, 2)).numpy()
        assert stored.shape == expected.shape
        np.testing.assert_allclose(stored, expected, rtol=2e-2, atol=2e-3)


def test_candidates_are_ref_nms_survivors_with_every_score_part(rpn_index: Path, tiny_corpus: Path) -> None:
    q = _query(tiny_corpus)
    with _engine(rpn_index) as engine:
        pipeline = engine.pipeline
        query = pipeline.prepare(SearchRequest(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=5, exclude_self=True))
        ranked = pipeline.rank(query, k=100)
        stage = pipeline.grounding_stage()
        path = ranked[0].image
        cand = stage.candidates(path, q["text"], query.rescore, query.query.vector)
        assert cand is not None and cand.rows
        assert set(cand.scores(0)) >= {"visual", "grn", "san", "stage2", "relatedness", "grounding"}
        assert all(len(v) == len(cand.rows) for v in (cand.visual, cand.stage2.final, cand.stage2.grn, cand.stage2.san, cand.relatedness, cand.grounding))
        boxes = np.asarray([r.box for r in cand.rows], np.float32)
        iou = box_iou(boxes, boxes)
        np.fill_diagonal(iou, 0)
        assert iou.max() <= stage.ref_nms.config.nms_iou + 1e-6  # NMS ran
        all_rows = pipeline.store.regions_of_image(path)
        assert len(cand.rows) <= len(all_rows)
        assert ((cand.relatedness > 0) & (cand.relatedness < 1)).all()
        # the stage-2 part is exactly the stage-2 scorer's score of the same regions
        np.testing.assert_allclose(cand.stage2.final, query.rescore(np.asarray([r.row for r in cand.rows])).final, rtol=1e-5)


def test_search_with_zero_images_is_stage2(rpn_index: Path, tiny_corpus: Path) -> None:
    q = _query(tiny_corpus)
    args = dict(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=8, exclude_self=True)
    with _engine(rpn_index, stage3=False) as plain, _engine(rpn_index, stage3_weights=Stage3Weights(images=0)) as zero:
        a, b = plain.search(**args), zero.search(**args)
    assert [h.region_id for h in a] == [h.region_id for h in b]


def test_search_grounds_the_best_images_first(rpn_index: Path, tiny_corpus: Path) -> None:
    q = _query(tiny_corpus)
    args = dict(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=30, exclude_self=True)
    with _engine(rpn_index, stage3=False) as plain:
        stage2 = plain.search(**args)
    weights = Stage3Weights(images=2, relatedness=0.5, grounding=1.0)
    with _engine(rpn_index, stage3_weights=weights) as engine:
        hits = engine.search(**args)
    top2 = best_images(stage2, 2)
    grounded = [h for h in hits if "grounding" in h.scores]
    assert len(grounded) == len(top2) and {h.image for h in grounded} == set(top2)  # one grounded hit per image
    assert hits[: len(grounded)] == grounded  # grounded hits come first
    for h in grounded:
        s = h.scores
        assert h.score == pytest.approx(s["stage2"] + 0.5 * s["relatedness"] + 1.0 * s["grounding"], abs=1e-5)
    assert [h.score for h in grounded] == sorted((h.score for h in grounded), reverse=True)
    for h in hits[len(grounded) :]:  # stage 2's hits follow, none repeating a grounded box
        g = next((x for x in grounded if x.image == h.image), None)
        assert g is None or box_iou([h.box], [g.box])[0, 0] <= 0.5


def test_image_vector_is_recomputed_for_images_indexed_without_one(rpn_index: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    import shutil

    index_dir = tmp_path / "idx"
    shutil.copytree(rpn_index, index_dir)
    with sqlite3.connect(index_dir / "engine.db") as db:  # as an index built before schema revision 0003
        db.execute("UPDATE images SET vector = NULL")
    q = _query(tiny_corpus)
    args = dict(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=5, exclude_self=True)
    with _engine(index_dir) as old, _engine(rpn_index) as new:
        a, b = old.search(**args), new.search(**args)
    assert [h.region_id for h in a] == [h.region_id for h in b]
    assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=2e-2)


def test_cli_query_json_shows_each_part_and_no_ground_turns_it_off(rpn_index: Path, tiny_corpus: Path) -> None:
    from click.testing import CliRunner

    from engine.cli import main

    q = _query(tiny_corpus)
    base = ["query", "--index", str(rpn_index), "--device", "cpu", "--image", str(tiny_corpus / q["image"]), "--region", ",".join(str(v) for v in q["region"]), "--text", q["text"], "-k", "3", "--exclude-self", "--json"]
    out = CliRunner().invoke(main, base)
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)["hits"]
    if load_stage3_weights().images > 0:
        assert {"stage2", "relatedness", "grounding"} <= set(hits[0]["scores"])
    off = CliRunner().invoke(main, [*base, "--no-ground"])
    assert off.exit_code == 0, off.output
    assert "grounding" not in json.loads(off.output)["hits"][0]["scores"]


def test_eval_stage3_fits_a_grid_that_starts_with_stage2_alone(tiny_corpus: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from engine.cli import main

    out, weights = tmp_path / "rows.json", tmp_path / "stage3.json"
    args = ["eval", "stage3", "--data", str(tiny_corpus), "--split", "train", "--images", "0,2", "--relatedness-weights", "0,1", "--grounding-weights", "0,1", "--work-dir", str(tmp_path / "work"), "--write", str(weights), "--json", str(out), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert len(rows) == 1 + 2 * 2 and rows[0]["images"] == 0
    assert all({"images", "relatedness", "grounding", "R@1", "R@10", "R@100", "med_r", "queries"} <= set(r) for r in rows)
    fitted = load_stage3_weights(weights)
    best = max(rows, key=lambda r: (r["R@1"], r["R@10"]))
    assert best["R@1"] >= rows[0]["R@1"] and fitted.images in (0, 2)
    # a second run reuses the work folder's index, and --fitted measures the setting and its ablations
    again = CliRunner().invoke(main, ["eval", "stage3", "--data", str(tiny_corpus), "--split", "train", "--work-dir", str(tmp_path / "work"), "--fitted", str(weights), "--json", str(out), "-q"])
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text(encoding="utf-8"))["rows"][0]["images"] == 0


def test_stage3_reads_the_stored_ref_nms_features_and_matches_the_maps(rpn_index: Path, tiny_corpus: Path) -> None:
    from query.localize import GroundingStage

    q = _query(tiny_corpus)
    with _engine(rpn_index) as engine:
        store = engine._open_reader()
        assert store.has_array("refnms") and store.models()["ref_nms"] == engine.ref_nms_model.version
        rows = store.regions(store.all_region_ids()[:40])
        row_ids = np.asarray([r.row for r in rows], np.int64)
        stored = store.read_arrays("refnms", row_ids).astype(np.float32)
        np.testing.assert_allclose(stored, engine.ref_nms_model.visual_features(store.read_arrays("maps", row_ids)), atol=2e-2, rtol=1e-2)
        query = engine.pipeline.prepare(SearchRequest(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=5, exclude_self=True))
        path = engine.pipeline.rank(query, k=50)[0].image
        fast = engine.pipeline.grounding_stage()
        assert fast.stored_relatedness_features
        slow = GroundingStage(store=fast.store, ref_nms=fast.ref_nms, scorer=fast.scorer, image_vector=fast.image_vector, region_maps=fast.region_maps)
        a = fast.candidates(path, q["text"], query.rescore, query.query.vector)
        b = slow.candidates(path, q["text"], query.rescore, query.query.vector)
        assert [r.id for r in a.rows] == [r.id for r in b.rows]
        np.testing.assert_allclose(a.relatedness, b.relatedness, atol=2e-3)


def test_indexing_refuses_features_of_another_ref_nms_model(rpn_index: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    import shutil

    from engine.config import IndexConfig
    from engine.errors import IndexVersionError

    shutil.copytree(rpn_index, tmp_path / "idx")
    with _engine(tmp_path / "idx", ref_nms_checkpoint="ref-nms-b") as other:
        with pytest.raises(IndexVersionError, match="holds Ref-NMS features of .*ref-nms-r"):
            other.index(tiny_corpus, config=IndexConfig(proposals="rpn"))
        assert not other.pipeline.grounding_stage().stored_relatedness_features  # queries compute them from the maps


def test_an_index_without_ref_nms_features_still_grounds(tiny_corpus: Path, tmp_path: Path) -> None:
    from engine.config import IndexConfig

    q = _query(tiny_corpus)
    with _engine(tmp_path / "idx", stage3=False) as builder:  # an engine without stage 3 stores no Ref-NMS features
        builder.index(tiny_corpus, config=IndexConfig(proposals="gt"))
        assert not builder._open_reader().has_array("refnms")
    with _engine(tmp_path / "idx") as engine:
        hits = engine.search(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=5)
        assert any("relatedness" in h.scores for h in hits)


def test_grounding_images_together_scores_each_as_alone(rpn_index: Path, tiny_corpus: Path) -> None:
    """candidates_many (one database read, one Ref-NMS pass, one CM-Att batch, one stage-2 call) gives each
    image the candidates and scores it gets alone, with stored features and without."""
    from query.localize import GroundingStage

    q = _query(tiny_corpus)
    with _engine(rpn_index) as engine:
        query = engine.pipeline.prepare(SearchRequest(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=5, exclude_self=True))
        paths = best_images(engine.pipeline.rank(query, k=200), 6)
        assert len(paths) >= 4
        fast = engine.pipeline.grounding_stage()
        slow = GroundingStage(store=fast.store, ref_nms=fast.ref_nms, scorer=fast.scorer, image_vector=fast.image_vector, region_maps=fast.region_maps)
        for stage in (fast, slow):
            together = stage.candidates_many([*paths, "/no/such/image.jpg"], q["text"], query.rescore, query.query.vector)
            assert list(together) == paths  # in the order asked, unknown paths left out
            for path in paths:
                alone = stage.candidates(path, q["text"], query.rescore, query.query.vector)
                both = together[path]
                assert [r.id for r in both.rows] == [r.id for r in alone.rows]
                for name in ("visual", "relatedness", "grounding"):
                    np.testing.assert_allclose(getattr(both, name), getattr(alone, name), rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(both.stage2.final, alone.stage2.final, rtol=1e-4, atol=1e-5)
        assert fast.candidates_many([], q["text"], query.rescore, query.query.vector) == {}


def test_stage2_depth_covers_k_and_the_grounded_images() -> None:
    from query.localize import stage2_depth

    assert stage2_depth(10, 5, 1, 1000) == 15
    assert stage2_depth(10, 5, 3, 1000) == 25
    assert stage2_depth(10, 5, 0, 1000) == 1000 and stage2_depth(10, 5, None, 1000) == 1000  # no per-image cap
    assert stage2_depth(900, 50, 4, 1000) == 1000  # never past the shortlist


def _over_the_shortlist(engine, request: SearchRequest) -> list[Hit]:  # noqa: ANN001
    """Stage 3 as it was before the depth: the whole shortlist ranked, grounded and merged."""
    pipeline = engine.pipeline
    prepared = pipeline.prepare(request)
    weights = pipeline.models.grounding_models.weights
    ranked = pipeline.rank(prepared, k=pipeline.config.shortlist)
    grounded = pipeline.ground(prepared, ranked, weights.images)
    return prepared.options.filters.apply(rank_stage3(ranked, grounded, weights, len(ranked) + sum(len(c.rows) for c in grounded.values())))[: request.k]


@pytest.mark.parametrize("k,max_per_image", [(1, 1), (3, 1), (5, 2), (8, 0), (4, 3)])
def test_stage3_over_the_needed_depth_equals_the_whole_shortlist(rpn_index: Path, tiny_corpus: Path, k: int, max_per_image: int) -> None:
    from query.filters import HitFilter

    q = _query(tiny_corpus)
    request = SearchRequest(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=k, exclude_self=True, filters=HitFilter(max_per_image=max_per_image))
    with _engine(rpn_index, stage3_weights=Stage3Weights(images=2, relatedness=0.5, grounding=1.0)) as engine:
        hits = engine.pipeline.run(request)
        assert any("grounding" in h.scores for h in hits)
        assert [(h.region_id, h.score) for h in hits] == [(h.region_id, h.score) for h in _over_the_shortlist(engine, request)]


def test_stage3_ranks_the_whole_shortlist_when_the_depth_leaves_fewer_than_k(rpn_index: Path, tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import query.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "stage2_depth", lambda k, images, m, shortlist: 2)  # as if duplicates had emptied the depth
    q = _query(tiny_corpus)
    request = SearchRequest(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=6, exclude_self=True)
    with _engine(rpn_index, stage3_weights=Stage3Weights(images=2, relatedness=0.5, grounding=1.0)) as engine:
        hits = engine.pipeline.run(request)
        assert len(hits) == 6
        assert [h.region_id for h in hits] == [h.region_id for h in _over_the_shortlist(engine, request)]
