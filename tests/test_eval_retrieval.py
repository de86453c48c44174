"""`engine eval retrieval`: GRN Table 2 protocol on a tiny corpus, compared with a brute-force reference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.datasets.annotations import read_dataset
from engine.errors import InvalidInputError
from engine.evaluation.retrieval import evaluate_retrieval, resolve_models, rows_to_markdown
from engine.models.retrieval import RegionRetrievalModel
from engine.protocols.retrieval import Candidates, build_benchmark, gt_candidates, rpn_candidates, score_benchmark

KEYS = {"method", "proposals", "R@1", "R@10", "R@50", "R@100", "med_r"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(grn_corpus: Path) -> Path:
    """The session's GRN corpus (conftest): few meanings and large val/test splits, so that test queries are answerable."""
    return grn_corpus


@pytest.fixture(scope="module")
def checkpoint(grn_fc_checkpoint: Path) -> Path:
    return grn_fc_checkpoint


@pytest.fixture(scope="module")
def cache(corpus: Path):
    from indexer.feature_cache import FeatureCache
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.region_features import RegionFeatureExtractor

    return FeatureCache(corpus, RegionFeatureExtractor(backbone=create_backbone(BackboneConfig(), device="cpu")))


def _reference_ranks(model: RegionRetrievalModel, split, region_maps) -> list[float]:
    """Brute force: per query, score every other-image GT region one by one, rank of the best positive (ties pessimistic)."""
    ranks = []
    for q in split.queries:
        cands = [(im.image, r) for im in split.images if im.image != q.image for r in im.regions]
        pos = {p for p in q.positives}
        if not any(r.id in pos for _, r in cands):
            continue
        qmap = region_maps(q.image, np.asarray([q.region], np.float64))[0]
        scores = np.array([model.score(qmap, q.text, region_maps(img, np.asarray([r.box], np.float64)))[0] for img, r in cands])
        hits = np.array([r.id in pos for _, r in cands])
        best = scores[hits].max()
        ranks.append(float((scores > best).sum() + ((scores == best) & ~hits).sum() + 1))
    return ranks


def test_gt_protocol_matches_brute_force(corpus: Path, checkpoint: Path, cache) -> None:
    split = read_dataset(corpus).split("test")
    bench = build_benchmark(split, cache.region_maps)
    assert len(bench.queries) + bench.skipped == len(split.queries)
    for query, positives in zip(bench.queries, bench.positives):
        assert positives and query.region_id not in positives
    cands = gt_candidates(split.images, cache.region_maps)
    assert len(cands) == sum(len(im.regions) for im in split.images)
    model = RegionRetrievalModel.from_checkpoint(checkpoint)
    result = score_benchmark(model, bench, cands)
    np.testing.assert_allclose(result.ranks, _reference_ranks(model, split, cache.region_maps), atol=0)


def test_rpn_protocol_counts_iou_hits_in_the_positive_image(corpus: Path, cache) -> None:
    split = read_dataset(corpus).split("test")
    bench = build_benchmark(split, cache.region_maps)
    model = RegionRetrievalModel.visual()
    gt = score_benchmark(model, bench, gt_candidates(split.images, cache.region_maps))
    # proposals that are exactly the GT boxes find every GT hit (IoU 1 > 0.5), maybe more (overlapping regions)
    exact = rpn_candidates(split.images, [np.asarray([r.box for r in im.regions]) for im in split.images], cache.region_maps)
    same = score_benchmark(model, bench, exact)
    assert all(a <= b for a, b in zip(same.ranks, gt.ranks))
    # proposals shifted far off every box hit nothing
    far = [np.asarray([[0, 0, 4, 4]] * 3, np.float64) for _ in split.images]
    missed = score_benchmark(model, bench, rpn_candidates(split.images, far, cache.region_maps))
    assert all(np.isinf(missed.ranks)) and missed.r_at[100] == 0.0


def test_query_image_candidates_are_excluded(corpus: Path, cache) -> None:
    split = read_dataset(corpus).split("test")
    bench = build_benchmark(split, cache.region_maps)
    q = bench.queries[0]
    # a candidate set made only of the query image's own regions cannot answer the query
    own = next(im for im in split.images if im.image == q.image)
    cands = gt_candidates([own], cache.region_maps)
    single = type(bench)((q,), bench.query_maps[:1], bench.positives[:1], bench.positive_boxes[:1], bench.positive_images[:1], 0)
    assert np.isinf(score_benchmark(RegionRetrievalModel.visual(), single, cands).ranks[0])
    assert isinstance(cands, Candidates)


def test_evaluate_retrieval_rows_have_the_json_keys(corpus: Path, checkpoint: Path) -> None:
    models = resolve_models(["visual", str(checkpoint)])
    rows = evaluate_retrieval(corpus, models, split="test", proposals=("gt",))
    assert [r.method for r in rows] == ["visual", "grn-fc"]
    for row in rows:
        d = row.to_dict()
        assert KEYS <= set(d) and d["proposals"] == "gt"
        assert all(0.0 <= d[f"R@{k}"] <= 100.0 for k in (1, 10, 50, 100))
        assert d["R@1"] <= d["R@10"] <= d["R@50"] <= d["R@100"]
    table = rows_to_markdown(rows)
    assert table.count("\n") == 2 + len(rows) and "| grn-fc | gt |" in table


def test_bad_arguments_are_clear_errors(corpus: Path) -> None:
    with pytest.raises(InvalidInputError, match="neither a checkpoint"):
        resolve_models(["no-such-model"])
    with pytest.raises(InvalidInputError, match="proposals"):
        evaluate_retrieval(corpus, [RegionRetrievalModel.visual()], proposals=("boxes",))
    with pytest.raises(InvalidInputError, match="split 'nope'"):
        evaluate_retrieval(corpus, [RegionRetrievalModel.visual()], split="nope", proposals=("gt",))


def test_cli_writes_json_and_markdown(corpus: Path, checkpoint: Path, tmp_path: Path) -> None:
    from engine.cli import main

    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    result = CliRunner().invoke(
        main,
        ["eval", "retrieval", "--data", str(corpus), "--model", "visual", "--model", str(checkpoint), "--proposals", "gt", "--json", str(out_json), "--markdown", str(out_md), "-q"],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["method"] for r in rows] == ["visual", "grn-fc"] and all(KEYS <= set(r) for r in rows)
    assert "| visual | gt |" in out_md.read_text() and "| grn-fc | gt |" in result.output
    bad = CliRunner().invoke(main, ["eval", "retrieval", "--data", str(corpus), "--model", "nope.pt", "--proposals", "gt"])
    assert bad.exit_code != 0 and "does not exist" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(main, ["eval", "retrieval", "--data", str(corpus), "--proposals", "gt,boxes"])
    assert bad.exit_code == 2 and "--proposals" in bad.output


def test_cli_eval_commands_have_help() -> None:
    from engine.cli import main

    for args in (["eval", "--help"], ["eval", "retrieval", "--help"], ["eval", "rpn", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Example" in result.output


def test_rpn_setting_uses_at_most_100_proposals_per_image(corpus: Path) -> None:
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS

    if not (PACKAGE_CHECKPOINTS / "rpn.pt").is_file():
        pytest.skip("no shipped RPN checkpoint (engine/checkpoints/rpn.pt)")
    rows = evaluate_retrieval(corpus, [RegionRetrievalModel.visual()], split="test", proposals=("rpn",))
    images = len(read_dataset(corpus).split("test").images)
    assert len(rows) == 1 and rows[0].proposals == "rpn"
    assert 0 < rows[0].candidates <= 100 * images
    assert KEYS <= set(rows[0].to_dict())


def test_cli_eval_rpn_prints_a_table_and_writes_json(corpus: Path, tmp_path: Path) -> None:
    from engine.cli import main
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS

    if not (PACKAGE_CHECKPOINTS / "rpn.pt").is_file():
        pytest.skip("no shipped RPN checkpoint (engine/checkpoints/rpn.pt)")
    out = tmp_path / "rpn.json"
    result = CliRunner().invoke(main, ["eval", "rpn", "--data", str(corpus), "--ns", "10,100", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["n"] for r in data["rows"]] == [10, 100] and data["images"] > 0
    assert "| 100 |" in result.output
    bad = CliRunner().invoke(main, ["eval", "rpn", "--data", str(corpus), "--ns", "ten"])
    assert bad.exit_code == 2 and "--ns" in bad.output


def test_mix_proposals_alternates_and_drops_duplicates() -> None:
    from engine.evaluation.proposals_recall import mix_proposals

    rpn = (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32), np.ones(3))
    selective = (np.array([[0, 0, 10, 11], [60, 60, 70, 70]], np.float32), np.ones(2))
    mixed = mix_proposals(rpn, selective, 10)
    # [0,0,10,11] overlaps the RPN's first box (IoU 0.91) and is dropped; the rest alternate RPN first
    assert mixed.tolist() == [[0, 0, 10, 10], [20, 20, 30, 30], [60, 60, 70, 70], [40, 40, 50, 50]]
    assert mix_proposals(rpn, selective, 2).tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]]


def test_cli_eval_rpn_measures_selective_search_and_the_mix(corpus: Path, tmp_path: Path) -> None:
    from engine.cli import main

    pytest.importorskip("cv2")
    for source in ("selective-search", "mix"):
        out = tmp_path / f"{source}.json"
        result = CliRunner().invoke(main, ["eval", "rpn", "--data", str(corpus), "--source", source, "--limit", "2", "--ns", "10,100", "--json", str(out), "-q"])
        assert result.exit_code == 0, result.output
        data = json.loads(out.read_text())
        assert data["source"] == source and data["images"] == 2 and result.output.startswith(f"{source} proposal recall")
        recalls = [r["objects"] for r in data["rows"]]
        assert all(0 <= v <= 100 for v in recalls) and recalls == sorted(recalls)
