"""Ref-NMS (paper Eq. 1-4): relatedness module, fused NMS against a brute-force reference, training, Table 1 eval."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.boxes import box_iou
from engine.cli import main
from engine.errors import CheckpointError
from engine.models.ref_nms import RefNMSConfig, RefNMSModel, RelatednessModule, fused_nms
from engine.training.options import TrainOptions
from engine.training.ref_nms import RefNMSTrainConfig, rank_pairs, train_ref_nms


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Textbook greedy NMS: take the best remaining box, drop every box overlapping it by IoU > iou."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    while order:
        best = order.pop(0)
        keep.append(best)
        order = [j for j in order if box_iou(boxes[[best]], boxes[[j]])[0, 0] <= iou]
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_nms_equals_greedy_nms_over_r_times_c(seed: int) -> None:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 80, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (60, 2))], axis=1).astype(np.float32)
    c, r = rng.uniform(0.05, 1, 60).astype(np.float32), rng.uniform(0, 1, 60).astype(np.float32)
    assert fused_nms(boxes, c, r, iou=0.5).tolist() == _greedy_nms(boxes, r * c, 0.5)
    assert fused_nms(boxes, c, None, iou=0.3).tolist() == _greedy_nms(boxes, c, 0.3)
    # relatedness changes which boxes survive: a related box hidden behind a more confident neighbour
    pair = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], np.float32)
    assert fused_nms(pair, np.array([0.9, 0.8]), None, iou=0.5).tolist() == [0]
    assert fused_nms(pair, np.array([0.9, 0.8]), np.array([0.1, 0.9]), iou=0.5).tolist() == [1]


def test_relatedness_module_attends_over_the_words_of_each_box_text() -> None:
    torch.manual_seed(0)
    net = RelatednessModule(RefNMSConfig(visual_dim=12, dim=16, word_dim=8), vocab_size=20).eval()
    maps = torch.randn(5, 12, 7, 7)
    ids = torch.tensor([[3, 4, 5, 0], [6, 7, 8, 9]])
    lengths = torch.tensor([3, 4])
    text_index = torch.tensor([0, 0, 1, 1, 1])
    logits, alpha = net(maps, text_index, ids, lengths)
    assert logits.shape == (5,) and alpha.shape == (5, 4)
    torch.testing.assert_close(alpha.sum(1), torch.ones(5))
    assert (alpha[:2, 3] == 0).all()  # padding gets no attention
    # a box's score depends on its own text only
    alone, _ = net(maps[:2], torch.tensor([0, 0]), ids[:1, :3], lengths[:1])
    torch.testing.assert_close(alone, logits[:2], atol=1e-5, rtol=1e-4)


def test_rank_pairs_split_by_q_value_and_take_the_hardest_negatives() -> None:
    rho = np.array([0.95, 0.72, 0.55, 0.3, 0.1, 0.0])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.5, 0.4])
    pairs = rank_pairs(rho, scores, top_h=2)
    q = np.ceil(np.maximum(0, rho - 0.5) / 0.1 - 1e-9)
    for neg, pos in pairs:
        assert rho[pos] > 0.5 and q[neg] < q[pos]
    assert {p for _, p in pairs} == {0, 1, 2}
    assert [n for n, p in pairs if p == 2] == [3, 4]  # q=1 positive: the two highest-scoring boxes of q=0
    assert [n for n, p in pairs if p == 0] == [3, 4]  # q=5 positive: the two highest-scoring boxes of all lower q-values
    assert [n for n, p in pairs if p == 1] == [3, 4]  # q=3: boxes 2 (q=1) and 3-5 (q=0) compete by score


@pytest.fixture(scope="module")
def ref_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.synth import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("refnms") / "corpus"
    generate_corpus(root, SynthConfig(images=16, seed=3, size=160, split_fractions=(0.5, 0.25, 0.25)), progress=False)
    return root


@pytest.fixture(scope="module", params=["ref-nms-b", "ref-nms-r"])
def trained(request: pytest.FixtureRequest, ref_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / f"{request.param}.pt"
    train_ref_nms(request.param, TrainOptions(data=ref_corpus, out=out, epochs=1, progress=False, seed=1), train_config=RefNMSTrainConfig(batch_size=4))
    return out


def test_trained_checkpoint_loads_and_suppresses_with_the_text(trained: Path) -> None:
    model = RefNMSModel.from_checkpoint(trained)
    assert model.name == trained.stem and model.config.loss == ("bce" if trained.stem == "ref-nms-b" else "rank")
    manifest = model.manifest
    assert manifest.metrics["best_epoch"] == 1 and {"referent@real", "context@real"} <= set(manifest.metrics["val"])
    assert {r["method"] for r in manifest.metrics["test"]} == {"nms", trained.stem}
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((30, model.config.visual_dim, 7, 7)).astype(np.float32)
    xy = rng.uniform(0, 100, (30, 2))
    boxes = np.concatenate([xy, xy + 30], axis=1)
    c = rng.uniform(0, 1, 30).astype(np.float32)
    keep, scores = model.suppress(boxes, c, maps, "the red circle left of the blue square")
    assert len(keep) and (c[keep] >= model.config.delta).all() and np.all(np.diff(scores) <= 1e-6)
    r = model.relatedness(maps, "a zorblax")  # unknown words never crash
    assert r.shape == (30,) and ((r > 0) & (r < 1)).all()


def test_a_damaged_checkpoint_is_a_clear_error(trained: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(trained.read_bytes()[:-10])
    bad.with_suffix(".json").write_text(trained.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="corrupt"):
        RefNMSModel.from_checkpoint(bad)


def test_eval_proposals_writes_table1_rows(trained: Path, ref_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "t1.json"
    result = CliRunner().invoke(main, ["eval", "proposals", "--data", str(ref_corpus), "--model", str(trained), "--ns", "1,5", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r["n"]) for r in rows} == {(m, n) for m in ("nms", trained.stem) for n in (1, 5, "real")}
    for r in rows:
        assert 0 <= r["referent_recall"] <= 100 and 0 <= r["context_recall"] <= 100
    by = {(r["method"], r["n"]): r for r in rows}
    assert by[("nms", 5)]["referent_recall"] >= by[("nms", 1)]["referent_recall"]  # more boxes, never less recall
    bad = CliRunner().invoke(main, ["eval", "proposals", "--data", str(ref_corpus), "--ns", "0"])
    assert bad.exit_code == 2 and "--ns" in bad.output


def test_ref_targets_hold_the_referent_and_the_mentioned_objects(ref_corpus: Path) -> None:
    from engine.datasets.annotations import read_annotations
    from engine.protocols.ref_nms import ref_targets

    anns = read_annotations(ref_corpus)
    targets = ref_targets(anns)
    assert targets
    ann = anns[0]
    boxes = {o.id: o.box for o in ann.objects}
    for ref, t in zip(ann.refs, [t for t in targets if t.image == ann.image]):
        assert t.expression == ref.expression
        np.testing.assert_allclose(t.referent, boxes[ref.object])
        np.testing.assert_allclose(t.context.reshape(-1, 4), np.asarray([boxes[c] for c in ref.context_objects]).reshape(-1, 4))


def test_checkpoints_load_by_installed_name_or_path_and_a_missing_name_is_a_clear_error(tmp_path: Path) -> None:
    from engine.models.checkpoint import PACKAGE_CHECKPOINTS, checkpoint_path

    assert checkpoint_path(None, default="ref-nms-r") == PACKAGE_CHECKPOINTS / "ref-nms-r.pt"
    assert checkpoint_path("ref-nms-b", default="ref-nms-r") == PACKAGE_CHECKPOINTS / "ref-nms-b.pt"
    assert checkpoint_path(str(tmp_path / "x.pt"), default="ref-nms-r") == tmp_path / "x.pt"
    assert RefNMSModel.from_checkpoint("ref-nms-b").name == "ref-nms-b"
    with pytest.raises(CheckpointError, match="no-such-model"):
        RefNMSModel.from_checkpoint("no-such-model")
    result = CliRunner().invoke(main, ["eval", "grounding", "--data", str(tmp_path), "--model", "no-such-model"])
    assert result.exit_code == 1 and "no-such-model" in result.output and "Traceback" not in result.output
