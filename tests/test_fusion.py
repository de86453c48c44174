"""``engine eval fusion``: the text weight of combined queries, measured end to end on a split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.evaluation.fusion import FusionRow, best_weight, evaluate_fusion
from query.rerank import FusedRescorer, StageScores


@pytest.fixture(scope="module")
def fusion_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 scenes of 160 px with few meanings, so that the val split has queries with positives in other images."""
    from engine.synth import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("fusion") / "corpus"
    generate_corpus(root, SynthConfig(images=24, seed=5, size=160, meaning_pool=4, split_fractions=(0.25, 0.5, 0.25)), progress=False)
    return root


class _Fixed:
    def __init__(self, name: str, values: list[float]) -> None:
        self.name, self.values = name, np.asarray(values, np.float32)

    def __call__(self, rows):  # noqa: ANN001
        return StageScores(final=self.values, **{self.name: self.values})


def test_fused_score_is_grn_plus_weighted_san() -> None:
    fused = FusedRescorer(_Fixed("grn", [0.9, 0.5, 0.1]), _Fixed("san", [0.0, 0.4, 0.8]), text_weight=2.0)
    out = fused(np.arange(3))
    np.testing.assert_allclose(out.final, [0.9, 1.3, 1.7])
    np.testing.assert_allclose(out.grn, [0.9, 0.5, 0.1])
    np.testing.assert_allclose(out.san, [0.0, 0.4, 0.8])
    weighted = FusedRescorer(_Fixed("grn", [0.9, 0.5, 0.1]), _Fixed("san", [0.0, 0.4, 0.8]), text_weight=2.0, image_weight=0.5)(np.arange(3))
    np.testing.assert_allclose(weighted.final, [0.45, 1.05, 1.65], rtol=1e-6)
    assert list(weighted.parts()) == ["grn", "san"]


def test_best_weight_prefers_r10_then_r1_then_the_smaller_weight() -> None:
    def row(w: float, r1: float, r10: float) -> FusionRow:
        return FusionRow(weight=w, r1=r1, r10=r10, r100=100.0, med_r=2.0, wins=0, losses=0, queries=10)

    assert best_weight([row(0, 50, 60), row(1, 40, 70), row(2, 30, 70)]).weight == 1
    assert best_weight([row(0, 50, 70), row(1, 50, 70)]).weight == 0


@pytest.mark.slow
def test_eval_fusion_measures_each_weight_through_the_engine(fusion_corpus: Path, tmp_path: Path) -> None:
    rows = evaluate_fusion(fusion_corpus, [0.0, 1.0], split="val", progress=False)
    assert [r.weight for r in rows] == [0.0, 1.0]
    for r in rows:
        assert r.queries > 0 and 0 <= r.r1 <= r.r10 <= r.r100 <= 100
        assert r.wins + r.losses <= r.queries
    out = tmp_path / "fusion.json"
    result = CliRunner().invoke(main, ["eval", "fusion", "--data", str(fusion_corpus), "--split", "val", "--weights", "0,1", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "best text weight on val" in result.output
    written = json.loads(out.read_text())
    assert [r["weight"] for r in written["rows"]] == [0.0, 1.0] and written["best"] in (0.0, 1.0)
    assert written["rows"][0]["R@10"] == pytest.approx(rows[0].r10)


def test_eval_fusion_refuses_bad_weights(fusion_corpus: Path) -> None:
    result = CliRunner().invoke(main, ["eval", "fusion", "--data", str(fusion_corpus), "--weights", "one,two"])
    assert result.exit_code == 2 and "--weights" in result.output
    result = CliRunner().invoke(main, ["eval", "fusion", "--data", str(fusion_corpus), "--weights", "-1"])
    assert result.exit_code == 1 and "--weights" in result.output and "Traceback" not in result.output
