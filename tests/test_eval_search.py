"""``engine eval search``: the hit -> box@k / img@k / rank logic on hand-made cases, the bootstrap
interval, one end-to-end run (then a text-mode run reusing its index) and the bad-input errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.config import INSTANCE_SHORTLIST, LAYOUT_SHORTLIST, LAYOUT_WEIGHT
from engine.datasets.types import Dataset, ImageAnn, ObjectAnn, RegionAnn, RetrievalQuery
from engine.evaluation.bootstrap import bootstrap_interval
from engine.evaluation.search import QueryOutcome, Target, first_right_rank, query_targets, score_hits, summarize

A, B, C = "images/a.jpg", "images/b.jpg", "images/c.jpg"
TARGETS = [Target(B, (10.0, 10.0, 50.0, 50.0)), Target(C, (0.0, 0.0, 20.0, 20.0))]


def test_score_hits_right_box_needs_the_positive_image_and_iou_above_half() -> None:
    right = (B, (12.0, 12.0, 50.0, 50.0))  # IoU 0.9 with B's positive
    same_box_wrong_image = (A, (10.0, 10.0, 50.0, 50.0))
    right_image_wrong_box = (C, (60.0, 60.0, 90.0, 90.0))
    half = (B, (10.0, 10.0, 50.0, 30.0))  # IoU exactly 0.5: not right
    assert score_hits([right, same_box_wrong_image], TARGETS, 10) == (True, True, True, True)
    assert score_hits([same_box_wrong_image, right], TARGETS, 10) == (False, True, False, True)
    assert score_hits([right_image_wrong_box, same_box_wrong_image], TARGETS, 10) == (False, False, True, True)
    assert score_hits([same_box_wrong_image, right_image_wrong_box], TARGETS, 1) == (False, False, False, False)
    assert score_hits([half], TARGETS, 10) == (False, False, True, True)
    assert score_hits([], TARGETS, 10) == (False, False, False, False)
    assert first_right_rank([same_box_wrong_image, half, right_image_wrong_box, right], TARGETS) == 4.0
    assert first_right_rank([same_box_wrong_image, half], TARGETS) == float("inf")


def test_query_targets_resolve_regions_then_objects_and_leave_out_the_query_image() -> None:
    images = [
        ImageAnn(A, 100, 100, regions=(RegionAnn(1, (0, 0, 10, 10), "x"),)),
        ImageAnn(B, 100, 100, regions=(RegionAnn(2, (10, 10, 50, 50), "x"),), objects=(ObjectAnn(7, (5, 5, 9, 9), "circle"),)),
    ]
    query = RetrievalQuery(image=A, region=(0, 0, 10, 10), text="x", region_id=1, positives=(1, 2, 7, 99))
    got = query_targets(query, Dataset(root=Path("."), images=images))
    assert got == [Target(B, (10, 10, 50, 50)), Target(B, (5, 5, 9, 9))]


def test_summarize_known_values_and_bootstrap() -> None:
    outcomes = [
        QueryOutcome(True, True, True, True, 1.0, 0.010),
        QueryOutcome(False, True, True, True, 3.0, 0.020),
        QueryOutcome(False, False, False, True, float("inf"), 0.030),
        QueryOutcome(False, False, False, False, float("inf"), 0.040),
    ]
    m = summarize(outcomes, resamples=2000)
    assert (m["box@1"].value, m["box@10"].value, m["img@1"].value, m["img@10"].value) == (0.25, 0.5, 0.5, 0.75)
    assert m["median rank"].value == float("inf") and m["median rank"].low >= 1.0
    assert m["latency p50 ms"].value == pytest.approx(25.0)
    for iv in m.values():
        assert iv.low <= iv.value <= iv.high and iv.n == 4


def test_bootstrap_interval_is_seeded_and_percentile() -> None:
    values = np.random.default_rng(1).normal(10.0, 2.0, 400)
    one, two = bootstrap_interval(values), bootstrap_interval(values)
    assert one == two
    assert one.value == pytest.approx(values.mean()) and one.low < one.value < one.high
    assert one.high - one.low == pytest.approx(2 * 1.96 * 2.0 / 20.0, rel=0.15)  # ~ the normal interval
    assert bootstrap_interval([1.0, 1.0, 1.0]) == bootstrap_interval([1.0, 1.0, 1.0], resamples=10)
    assert bootstrap_interval([0.0, 0.0]).high == 0.0
    with pytest.raises(ValueError):
        bootstrap_interval([])


def _check_json(path: Path, mode: str) -> dict:
    out = json.loads(path.read_text())
    for key in ("command", "data", "split", "mode", "k", "rank_depth", "max_per_image", "queries", "images", "metrics", "bootstrap", "index", "index_settings", "index_reused"):
        assert key in out, key
    assert out["mode"] == mode and out["split"] == "test" and out["k"] == 10 and out["max_per_image"] == 1
    assert out["command"].startswith("engine eval search --data ")
    assert out["index_settings"]["proposals"] == "auto" and out["index"]["models"]["proposals"].startswith("rpn")
    assert set(out["metrics"]) == {"box@1", "box@10", "img@1", "img@10", "median rank", "latency p50 ms"}
    for name, m in out["metrics"].items():
        assert m["n"] == out["queries"] == 2
        if name.startswith(("box@", "img@")):
            assert 0.0 <= m["low"] <= m["value"] <= m["high"] <= 1.0
    assert out["metrics"]["box@1"]["value"] <= out["metrics"]["box@10"]["value"] <= out["metrics"]["img@10"]["value"]
    return out


def test_cli_end_to_end_then_text_mode_reusing_the_index(grn_corpus: Path, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    runner = CliRunner()
    first = runner.invoke(main, ["eval", "search", "--data", str(grn_corpus), "--index", str(index), "--limit", "2", "--device", "cpu", "-q", "--json", str(tmp_path / "region.json")])
    assert first.exit_code == 0, first.output
    assert "box@10" in first.output and "95 % CI" in first.output
    region = _check_json(tmp_path / "region.json", "region")
    assert region["index_reused"] is False and region["index"]["images"] == region["images"]

    second = runner.invoke(main, ["eval", "search", "--data", str(grn_corpus), "--index", str(index), "--mode", "text", "--limit", "2", "--device", "cpu", "-q", "--json", str(tmp_path / "text.json")])
    assert second.exit_code == 0, second.output
    text = _check_json(tmp_path / "text.json", "text")
    assert text["index_reused"] is True and text["index"]["images"] == region["images"]
    assert "+pcaw:" in region["visual_key"]

    # the un-whitened key (an ablation): the index of the whitened key is not reused, nor changed
    third = runner.invoke(main, ["eval", "search", "--data", str(grn_corpus), "--index", str(index), "--key-whitening", "none", "--limit", "2", "--device", "cpu", "-q", "--json", str(tmp_path / "raw.json")])
    assert third.exit_code == 0, third.output
    raw = _check_json(tmp_path / "raw.json", "region")
    assert raw["index_reused"] is False and raw["visual_key"] == "efficientnet_lite0/640:c4+c5:mean:roi7:s2"
    assert region["layout_weight"] == LAYOUT_WEIGHT and region["layout_shortlist"] == LAYOUT_SHORTLIST

    # stage 1 alone (an ablation) reuses the index: the layout is a query-time setting
    fourth = runner.invoke(main, ["eval", "search", "--data", str(grn_corpus), "--index", str(index), "--layout-weight", "0", "--limit", "2", "--device", "cpu", "-q", "--json", str(tmp_path / "plain.json")])
    assert fourth.exit_code == 0, fourth.output
    plain = _check_json(tmp_path / "plain.json", "region")
    assert plain["index_reused"] is True and plain["layout_weight"] == 0.0

    # a shortlist of one candidate: one hit a query, so the top 10 is the top 1
    fifth = runner.invoke(main, ["eval", "search", "--data", str(grn_corpus), "--index", str(index), "--layout-shortlist", "1", "--limit", "2", "--device", "cpu", "-q", "--json", str(tmp_path / "one.json")])
    assert fifth.exit_code == 0, fifth.output
    one = _check_json(tmp_path / "one.json", "region")
    assert one["instance_shortlist"] == INSTANCE_SHORTLIST and one["layout_shortlist"] == 1 and one["metrics"]["img@10"]["value"] == one["metrics"]["img@1"]["value"]

    # --grn: stage 2 of combined queries with another GRN-family checkpoint (query time: the index is reused)
    checkpoints = Path(__file__).resolve().parents[1] / "engine" / "checkpoints"
    sixth = runner.invoke(main, ["eval", "search", "--data", str(grn_corpus), "--index", str(index), "--mode", "region+text", "--grn", str(checkpoints / "grn-fc.pt"), "--limit", "2", "--device", "cpu", "-q", "--json", str(tmp_path / "fc.json")])
    assert sixth.exit_code == 0, sixth.output
    fc = _check_json(tmp_path / "fc.json", "region+text")
    assert fc["index_reused"] is True and fc["grn_checkpoint"].endswith("grn-fc.pt") and region["grn_checkpoint"] == "default"
    wrong = runner.invoke(main, ["eval", "search", "--data", str(grn_corpus), "--index", str(index), "--mode", "region+text", "--grn", str(checkpoints / "san.pt"), "--limit", "2", "--device", "cpu", "-q"])
    assert wrong.exit_code != 0 and "Traceback" not in wrong.output and "model is needed here" in wrong.output, wrong.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "val"], "no query"),  # the tiny corpus has val images but no val queries
        (["--split", "nope"], "name train, val or test"),
        (["--split", "val+val"], "several joined by +"),
        (["--mode", "image"], "'image' is not one of"),
    ],
)
def test_bad_input_is_one_line(tiny_corpus: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["eval", "search", "--data", str(tiny_corpus), "-q", *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


def test_missing_annotations_and_queries(tiny_corpus: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_corpus / "queries.jsonl", empty / "queries.jsonl")
    result = CliRunner().invoke(main, ["eval", "search", "--data", str(empty), "-q"])
    assert result.exit_code == 1 and "annotations.jsonl" in result.output and isinstance(result.exception, SystemExit)
    (empty / "queries.jsonl").unlink()
    shutil.copy(tiny_corpus / "annotations.jsonl", empty / "annotations.jsonl")
    result = CliRunner().invoke(main, ["eval", "search", "--data", str(empty), "-q"])
    assert result.exit_code == 1 and "queries.jsonl" in result.output and isinstance(result.exception, SystemExit)


def test_a_refused_query_counts_as_a_miss() -> None:
    """A query the engine refuses (e.g. a text it cannot read) gives the user no hit: every figure a miss."""
    from engine.datasets.types import RetrievalQuery
    from engine.errors import InvalidInputError
    from engine.evaluation.search import Target, _measure

    query = RetrievalQuery(image="a.jpg", region=(0, 0, 10, 10), text="grandma's rag doll", region_id=1, positives=(2,))

    def refuse(q):  # noqa: ANN001, ANN202
        raise InvalidInputError("none of the words of 'grandma's rag doll' is known")

    outcome = _measure(refuse, query, [Target("b.jpg", (0, 0, 10, 10))], 10)
    assert outcome.refused and not (outcome.box_at_1 or outcome.box_at_k or outcome.img_at_1 or outcome.img_at_k)
    assert outcome.rank == float("inf")
    answered = _measure(lambda q: ([("b.jpg", (0, 0, 10, 10))], [("b.jpg", (0, 0, 10, 10))], 0.01), query, [Target("b.jpg", (0, 0, 10, 10))], 10)
    assert not answered.refused and answered.box_at_1 and answered.rank == 1.0


def test_several_splits_are_evaluated_together(grn_corpus: Path) -> None:
    from engine.datasets.annotations import read_dataset
    from engine.evaluation.search import SearchEvalConfig, split_queries

    whole = read_dataset(grn_corpus)
    dataset, chosen, _ = split_queries(SearchEvalConfig(data=grn_corpus, split="val+test"))
    assert len(dataset.images) == len(whole.split("val").images) + len(whole.split("test").images)
    assert {q.split for q, _ in chosen} <= {"val", "test"}
    alone = [split_queries(SearchEvalConfig(data=grn_corpus, split=s))[1] for s in ("val", "test")]
    assert len(chosen) >= sum(len(a) for a in alone)  # each query is answered from both splits' images
