"""SAN (SAN §3, Eq. 1–3, 7–10): the blocks, a tiny training run, checkpoints, ``engine eval matching``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine.errors import CheckpointError
from engine.models.checkpoint import PACKAGE_CHECKPOINTS
from engine.models.san import METHODS, SANet, SANModel, method_config, triplet_loss
from engine.models.vocab import Vocabulary

VOCAB = Vocabulary(["a", "red", "blue", "circle", "square", "left", "of", "big"])


def _net(method: str = "fv+ft") -> SANet:
    torch.manual_seed(0)
    return SANet(method_config(method, visual_dim=6, word_dim=8, embed_dim=10, attn_dim=5, word_features="vocab"), vocab_size=len(VOCAB)).eval()


def _visual(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, 7, 7, generator=g), torch.randn(n, 7, 7, generator=g)


def test_visual_parts_follow_eq1_and_eq7() -> None:
    net = _net()
    maps, sal = _visual()
    v_g, v_s = net.visual_parts(maps, sal)
    assert v_g.shape == v_s.shape == (3, 10)
    torch.testing.assert_close(v_g, net.p_global(maps.flatten(2).mean(2)))  # Eq. 1
    a = torch.sigmoid(sal.flatten(1))
    a = a / a.sum(1, keepdim=True)  # Eq. 7: sigmoid then L1 normalisation
    torch.testing.assert_close(v_s, net.p_salient(torch.einsum("ncm,nm->nc", maps.flatten(2), a)))
    # a uniform saliency makes SVA the plain mean
    v_g2, v_s2 = net.visual_parts(maps, torch.zeros(3, 7, 7))
    torch.testing.assert_close(v_s2, net.p_salient(maps.flatten(2).mean(2)))
    torch.testing.assert_close(net.visual(maps, sal), (v_g + v_s) / 2)  # FV
    assert torch.equal(_net("gv+gt").visual(maps, sal), _net("gv+gt").visual_parts(maps, sal)[0])
    assert torch.equal(_net("sv+gt").visual(maps, sal), _net("sv+gt").visual_parts(maps, sal)[1])


def test_bigru_text_features_ignore_padding() -> None:
    net = _net()
    ids, lengths = VOCAB.encode_batch(["a red circle left of a big blue square", "a circle"])
    t, mask, t_g = net.words(ids, lengths)
    assert t.shape == (2, ids.shape[1], 10) and mask.sum().item() == int(lengths.sum())
    alone_ids, alone_len = VOCAB.encode_batch(["a circle"])
    torch.testing.assert_close(net.words(alone_ids, alone_len)[2][0], t_g[1], atol=1e-6, rtol=1e-5)  # Eq. 3 over real words only


def test_sta_attention_depends_on_the_visual_vector_and_sums_to_one() -> None:
    net = _net()
    maps, sal = _visual()
    v = net.visual(maps, sal)
    ids, lengths = VOCAB.encode_batch(["a red circle left of a blue square", "a big square"])
    attn = net.word_attention(v, ids, lengths)
    assert attn.shape == (3, 2, ids.shape[1])
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2))
    assert (attn[:, 1, 3:] == 0).all()  # padding gets no weight
    assert not torch.allclose(attn[0], attn[1])  # Eq. 8-9: the guidance mixes in the visual vector
    t = net.text_matrix(v, ids, lengths)
    _, _, t_g = net.words(ids, lengths)
    t_s = torch.einsum("vtl,tlk->vtk", attn, net.words(ids, lengths)[0])
    torch.testing.assert_close(t, (t_g[None] + t_s) / 2)  # FT(G-S)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_scores_cosines(method: str) -> None:
    net = _net(method)
    maps, sal = _visual()
    ids, lengths = VOCAB.encode_batch(["a red circle", "a blue square left of a circle"])
    scores = net.score_matrix(net.visual(maps, sal), ids, lengths)
    assert scores.shape == (3, 2) and (scores.abs() <= 1 + 1e-5).all()
    if net.config.text == "gt":
        torch.testing.assert_close(scores, net.global_score_matrix(net.visual(maps, sal), ids, lengths))


def test_triplet_loss_uses_the_hardest_negatives_both_ways() -> None:
    s = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.5, 0.6], [0.0, 0.0, 0.3]])
    same = torch.eye(3, dtype=torch.bool)
    # row 0: 0.2 - 0.9 + 0.8 = 0.1; col 0: 0.2 - 0.9 + 0.2 -> 0; row 1: 0.2 - 0.5 + 0.6 = 0.3; col 1: 0.2 - 0.5 + 0.8 = 0.5
    # row 2: 0.2 - 0.3 + 0.0 -> 0; col 2: 0.2 - 0.3 + 0.6 = 0.5
    assert triplet_loss(s, same, 0.2).item() == pytest.approx((0.1 + 0.3 + 0.5 + 0.5) / 3)
    masked = same.clone()
    masked[1, 2] = masked[2, 1] = True  # sentence 2 also describes item 1: never its negative
    assert triplet_loss(s, masked, 0.2).item() < triplet_loss(s, same, 0.2).item()


@pytest.fixture(scope="module")
def trained(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    from engine.training.options import TrainOptions
    from engine.training.san import SANTrainConfig, train_san

    out = tmp_path_factory.mktemp("san") / "san.pt"
    options = TrainOptions(data=tiny_corpus, out=out, epochs=3, progress=False, cache_dir=tmp_path_factory.mktemp("sancache"))
    manifest = train_san("san", options, train_config=SANTrainConfig(batch_size=16, warmup_epochs=0, lr=3e-3), model_overrides={"embed_dim": 32, "word_dim": 32, "attn_dim": 16})
    return out, manifest


def test_tiny_training_lowers_the_loss_and_writes_a_loadable_checkpoint(trained) -> None:
    out, manifest = trained
    history = manifest.metrics["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert manifest.model == "san" and manifest.config["method"] == "fv+ft" and manifest.config["saliency"].startswith("rrs-1:")
    model = SANModel.from_checkpoint(out)
    assert model.method == "fv+ft" and model.dim == 32
    v = model.visual(*_visual_c(2))
    assert v.shape == (2, 32)
    scores = model.score("a red circle", v)
    assert scores.shape == (2,)
    q = model.text_vector("a red circle")
    assert q.shape == (32,) and abs(float((q**2).sum()) - 1) < 1e-5


def _visual_c(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 112, 7, 7, generator=g), torch.randn(n, 7, 7, generator=g)


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(trained, tmp_path: Path) -> None:
    out, _ = trained
    bad = tmp_path / "san.pt"
    bad.write_bytes(out.read_bytes()[:-4] + b"oops")
    (tmp_path / "san.json").write_text(out.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="corrupt"):
        SANModel.from_checkpoint(bad)
    with pytest.raises(CheckpointError, match="'rpn' model"):
        SANModel.from_checkpoint(PACKAGE_CHECKPOINTS / "rpn.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        SANModel.from_checkpoint(tmp_path / "none.pt")


def test_eval_matching_writes_the_rows_json(trained, tiny_corpus: Path, tmp_path: Path) -> None:
    from engine.cli import main

    out, _ = trained
    split = json.loads((tiny_corpus / "annotations.jsonl").read_text().splitlines()[0]).get("split") or "train"
    js, md = tmp_path / "m.json", tmp_path / "m.md"
    result = CliRunner().invoke(main, ["eval", "matching", "--data", str(tiny_corpus), "--checkpoint", str(out), "--split", split, "--json", str(js), "--markdown", str(md), "-q"])
    assert result.exit_code == 0, result.output
    payload = json.loads(js.read_text())
    rows = payload["rows"]
    assert [r["direction"] for r in rows] == ["image->text", "text->image", "region->text", "text->region"]
    for r in rows:
        assert r["method"] == "fv+ft"
        assert {"method", "direction", "R@1", "R@5", "R@10", "mR"} <= set(r)
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100
    assert rows[0]["mR"] == rows[1]["mR"] == pytest.approx(sum(rows[i][f"R@{k}"] for i in (0, 1) for k in (1, 5, 10)) / 6, abs=0.02)
    assert 0 <= payload["saliency"]["mae"] <= 1 and 0 <= payload["saliency"]["iou"] <= 1
    assert "| fv+ft | image->text |" in md.read_text()
    bad = CliRunner().invoke(main, ["eval", "matching", "--data", str(tiny_corpus), "--checkpoint", str(tmp_path / "no.pt")])
    assert bad.exit_code == 1 and bad.output.startswith("Error:") and len(bad.output.strip().splitlines()) == 1


def test_minilm_word_features_ignore_padding_and_read_any_word() -> None:
    from engine.models.word_features import MiniLMWords

    torch.manual_seed(0)
    net = SANet(method_config("fv+ft", visual_dim=6, word_dim=8, embed_dim=10, attn_dim=5), vocab_size=1).eval()
    assert net.config.word_features == "minilm"
    words = MiniLMWords()
    feats, lengths = words.encode_batch(["a capybara", "grandma's old rag doll next to a tiger"])
    alone, alone_len = words.encode_batch(["a capybara"])
    with torch.no_grad():
        t_g = net.global_text(feats, lengths)
        t_alone = net.global_text(alone, alone_len)
    torch.testing.assert_close(t_g[:1], t_alone)  # padding never changes a sentence's vector
    with pytest.raises(Exception, match="word ids"):
        net.global_text(torch.ones(1, 3, dtype=torch.long), torch.tensor([3]))


def test_trained_minilm_san_reads_words_it_never_saw(trained) -> None:
    from engine.models.word_features import MiniLMWords

    out, manifest = trained
    assert manifest.config["word_features"] == "minilm" and "MiniLM" in manifest.config["text"]
    model = SANModel.from_checkpoint(out)
    assert isinstance(model.vocab, MiniLMWords)
    v = model.visual(*_visual_c(2))
    for text in ("a capybara wearing a propeller hat", "grandma's old rag doll", "zèbre"):
        assert model.score(text, v).shape == (2,)
        assert model.text_vector(text).shape == (32,)


def test_vocabulary_ablation_and_the_checkpoints_written_before_minilm(tiny_corpus: Path, tmp_path: Path) -> None:
    from engine.errors import InvalidInputError
    from engine.training.options import TrainOptions
    from engine.training.san import SANTrainConfig, train_san

    options = TrainOptions(data=tiny_corpus, out=tmp_path / "v.pt", epochs=1, progress=False, cache_dir=tmp_path / "cache", text_encoder="vocab")
    manifest = train_san("san-gv+gt", options, train_config=SANTrainConfig(batch_size=16, warmup_epochs=0), model_overrides={"embed_dim": 16, "word_dim": 16, "attn_dim": 8})
    assert manifest.config["word_features"] == "vocab"
    model = SANModel.from_checkpoint(tmp_path / "v.pt")
    assert isinstance(model.vocab, Vocabulary) and "red" in model.vocab
    with pytest.raises(InvalidInputError, match="none of the words"):
        model.text_vector("capybara zeppelin")  # the ablation reads only its training words
    from engine.models.checkpoint import load_checkpoint

    old = PACKAGE_CHECKPOINTS / "san-fv+it.pt"  # an ablation row, written before MiniLM: its config has no word_features
    _, payload = load_checkpoint(old)
    assert "word_features" not in payload["config"]
    shipped = SANModel.from_checkpoint(old)
    assert shipped.net.config.word_features == "vocab" and isinstance(shipped.vocab, Vocabulary) and "circle" in shipped.vocab
    assert SANModel.from_checkpoint().net.config.word_features == "minilm"  # the shipped SAN reads MiniLM
