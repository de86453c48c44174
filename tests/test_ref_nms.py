"""Ref-NMS (paper Eq. 1-4): relatedness module, fused NMS against a brute-force reference, training, Table 1 eval;
MiniLM word features (the default) and the vocabulary (the ablation, and the checkpoints written before MiniLM)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.boxes import box_iou
from engine.cli import main
from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import PACKAGE_CHECKPOINTS, load_checkpoint
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
    net = RelatednessModule(RefNMSConfig(visual_dim=12, dim=16, word_dim=8, word_features="vocab"), vocab_size=20).eval()
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


def test_relatedness_module_reads_minilm_word_features_and_ignores_padding() -> None:
    from engine.models.word_features import MiniLMWords

    torch.manual_seed(0)
    config = RefNMSConfig(visual_dim=12, dim=16, word_dim=8)
    assert config.word_features == "minilm"
    net = RelatednessModule(config, vocab_size=1).eval()
    maps = torch.randn(5, 12, 7, 7)
    feats, lengths = MiniLMWords().encode_batch(["a capybara", "the zorblax left of grandma's rag doll"])
    assert feats.dtype == torch.float32 and feats.shape[2] == 384 and lengths[0] < feats.shape[1]
    text_index = torch.tensor([0, 0, 1, 1, 1])
    with torch.no_grad():
        logits, alpha = net(maps, text_index, feats, lengths)
        alone, _ = net(maps[:2], torch.tensor([0, 0]), feats[:1, : lengths[0]], lengths[:1])
        noisy = feats.clone()
        noisy[0, lengths[0] :] = 5.0  # whatever lies past a text's length is never read
        logits_noisy, _ = net(maps, text_index, noisy, lengths)
    assert logits.shape == (5,) and alpha.shape == (5, feats.shape[1]) and (alpha[:2, lengths[0] :] == 0).all()
    torch.testing.assert_close(alone, logits[:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits_noisy, logits)
    with pytest.raises(InvalidInputError, match="word ids"):
        net(maps, text_index, torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 3]))
    with pytest.raises(InvalidInputError, match="text encoder"):
        RefNMSConfig(word_features="glove")


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


def test_trained_checkpoint_reads_minilm_word_features_by_default(trained: Path) -> None:
    from engine.models.word_features import MiniLMAdapter, MiniLMWords

    _, payload = load_checkpoint(trained)
    assert payload["config"]["word_features"] == "minilm" and payload["vocab"]["kind"] == "minilm"
    model = RefNMSModel.from_checkpoint(trained)
    assert model.config.word_features == "minilm" and isinstance(model.vocab, MiniLMWords) and isinstance(model.net.embed, MiniLMAdapter)
    assert "MiniLM" in model.manifest.config["text"]
    maps = np.random.default_rng(1).standard_normal((6, model.config.visual_dim, 7, 7)).astype(np.float32)
    seen = model.relatedness(maps, "the red circle left of the blue square")
    unseen = model.relatedness(maps, "a capybara beside grandma's rag doll")  # no word of it is in the synthetic corpus
    assert unseen.shape == (6,) and ((unseen > 0) & (unseen < 1)).all() and not np.allclose(seen, unseen)


def test_vocabulary_ablation_trains_through_the_cli(ref_corpus: Path, tmp_path: Path) -> None:
    from engine.models.vocab import Vocabulary

    out = tmp_path / "ref-nms-b.pt"
    result = CliRunner().invoke(main, ["train", "ref-nms-b", "--data", str(ref_corpus), "--out", str(out), "--epochs", "1", "--seed", "1", "--text-encoder", "vocab", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    manifest, payload = load_checkpoint(out)
    assert "--text-encoder vocab" in manifest.command and manifest.config["word_features"] == "vocab" and manifest.config["text"].startswith("Vocabulary(")
    assert payload["config"]["word_features"] == "vocab" and isinstance(payload["vocab"], list) and "circle" in payload["vocab"]
    model = RefNMSModel.from_checkpoint(out)
    assert isinstance(model.vocab, Vocabulary) and isinstance(model.net.embed, torch.nn.Embedding) and model.net.embed.num_embeddings == len(model.vocab)
    maps = np.random.default_rng(1).standard_normal((4, model.config.visual_dim, 7, 7)).astype(np.float32)
    assert model.relatedness(maps, "a capybara").shape == (4,)  # words outside the vocabulary read as <unk>


SHIPPED_RELATEDNESS = {
    # ref-nms-r.pt (sha256 82f27a00f84e…) on _shipped_inputs(), computed before MiniLM (commit 4578a59)
    "82f27a00f84e478e471f2492ca10d56729746dd66e1c3263ef3e8621b5a4a86c": [0.1317564, 0.1324985, 0.1289026, 0.1328176, 0.130238],
}


def _shipped_inputs() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((5, 112, 7, 7)).astype(np.float32)


@pytest.mark.parametrize("name", ["ref-nms-r", "ref-nms-b"])
def test_shipped_checkpoints_written_before_minilm_read_their_vocabulary(name: str) -> None:
    from engine.models.vocab import Vocabulary

    manifest, payload = load_checkpoint(PACKAGE_CHECKPOINTS / f"{name}.pt")
    if "word_features" in payload["config"]:
        pytest.skip(f"the shipped {name} was retrained with word_features={payload['config']['word_features']!r}")
    model = RefNMSModel.from_checkpoint(name)
    assert model.config.word_features == "vocab" and isinstance(model.vocab, Vocabulary) and isinstance(model.net.embed, torch.nn.Embedding)
    assert model.vocab.itos[2:] == payload["vocab"]
    state = model.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in payload["state_dict"].items())
    r = model.relatedness(_shipped_inputs(), "the red circle left of the blue square")
    if manifest.sha256 in SHIPPED_RELATEDNESS:  # the same scores as before MiniLM
        np.testing.assert_allclose(r, SHIPPED_RELATEDNESS[manifest.sha256], rtol=1e-4, atol=1e-6)


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
