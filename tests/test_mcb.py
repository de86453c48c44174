"""MCB weakly supervised attention: count sketch / compact bilinear pooling, the map → box rule,
training from image-level labels, checkpoints, ``engine eval attention``, ``engine ground`` and ``--explain``.

Nets fed word ids are built with ``word_features="vocab"``; training uses the default text encoder (MiniLM).
The vocabulary ablation's training and the shipped checkpoints are in ``test_word_features_mcb_grn.py``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from PIL import Image

from engine.cli import main
from engine.errors import CheckpointError, InvalidInputError
from engine.models.mcb import CountSketch, GroundingModel, MCBConfig, MCBGrounder, attention_to_image, compact_bilinear, map_to_box
from engine.training.mcb import MCBTrainConfig, mcb_loss, train_mcb
from engine.models.word_features import MINILM_DIM, MiniLMWords
from engine.training.options import TrainOptions

# --------------------------------------------------------------------------- count sketch and MCB


def test_compact_bilinear_is_the_count_sketch_of_the_outer_product() -> None:
    d, big = 6, 32
    sx, sy = CountSketch(d, big, seed=1), CountSketch(d, big, seed=2)
    x, y = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    got = compact_bilinear(sx(x.float()), sy(y.float()), big).double()
    want = torch.zeros(big, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            want[(sx.h[i] + sy.h[j]) % big] += sx.s[i] * sy.s[j] * x[i] * y[j]
    assert torch.allclose(got, want, atol=1e-4)


def test_compact_bilinear_preserves_inner_products_of_outer_products_on_average() -> None:
    torch.manual_seed(0)
    d, big = 16, 256
    x, x2, y, y2 = (torch.randn(d) for _ in range(4))
    truth = float((x @ x2) * (y @ y2))
    estimates = []
    for seed in range(200):
        sx, sy = CountSketch(d, big, seed=2 * seed), CountSketch(d, big, seed=2 * seed + 1)
        estimates.append(float(compact_bilinear(sx(x), sy(y), big) @ compact_bilinear(sx(x2), sy(y2), big)))
    scale = float(x.norm() * x2.norm() * y.norm() * y2.norm())
    assert abs(np.mean(estimates) - truth) < 0.1 * scale  # unbiased: E<Ψ(x⊗y), Ψ(x'⊗y')> = <x,x'><y,y'>


def test_grounder_shapes_and_valid_mask() -> None:
    net = MCBGrounder(MCBConfig(vocab_size=10, visual_channels=8, visual_dim=8, text_dim=8, mcb_dim=32, hidden=4, word_features="vocab"))
    valid = torch.zeros(2, 5, 6, dtype=torch.bool)
    valid[:, :4, :3] = True
    with torch.no_grad():
        r, z, logit = net(torch.randn(2, 8, 5, 6), torch.tensor([[2, 3], [4, 0]]), torch.tensor([2, 1]), valid)
    assert r.shape == (2, 5, 6) and z.shape == (2, 32) and logit.shape == (2,)
    assert float(r[~valid].abs().max()) == 0.0 and float(r[valid].min()) > 0.0


def test_grounder_reads_minilm_features_and_padding_changes_nothing() -> None:
    torch.manual_seed(0)
    net = MCBGrounder(MCBConfig(vocab_size=1, visual_channels=8, visual_dim=8, text_dim=8, mcb_dim=32, hidden=4)).eval()
    nn.init.normal_(net.att2.weight)  # a non-uniform map, so that the phrase moves it
    assert net.config.word_features == "minilm"
    gen = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 8, 5, 6, generator=gen)
    feats, lengths = torch.randn(2, 4, MINILM_DIM, generator=gen), torch.tensor([4, 2])
    feats[1, 2:] = 0.0
    with torch.no_grad():
        r, z, logit = net(maps, feats, lengths)
        r1, z1, logit1 = net(maps[1:], feats[1:, :2], lengths[1:])  # the second phrase unpadded
    assert r.shape == (2, 5, 6) and z.shape == (2, 32) and logit.shape == (2,)
    torch.testing.assert_close(r[1:], r1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logit[1:], logit1, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(r[0], net(maps[:1], feats[1:], lengths[1:])[0][0])  # another phrase, another map
    with pytest.raises(InvalidInputError, match="word ids"):
        net(maps, torch.tensor([[2, 3], [4, 0]]), torch.tensor([2, 1]))


def test_mcb_config_word_features() -> None:
    config = MCBConfig(vocab_size=1, visual_channels=8)
    assert config.word_features == "minilm" and MCBConfig.from_dict(config.to_dict()) == config
    stored = {k: v for k, v in config.to_dict().items() if k != "word_features"}
    assert MCBConfig.from_dict(stored).word_features == "vocab"  # written before MiniLM: its vocabulary
    with pytest.raises(InvalidInputError, match="minilm, vocab"):
        MCBConfig(vocab_size=1, word_features="glove")


# --------------------------------------------------------------------------- map → box


def test_map_to_box_keeps_the_component_with_most_attention() -> None:
    heat = np.zeros((40, 50), np.float32)
    heat[10:20, 5:15] = 1.0  # strong blob, 100 px
    heat[25:38, 30:48] = 0.8  # weaker but larger blob, 234 px of 0.8: more mass
    heat[0, 49] = 0.9  # isolated speck
    assert map_to_box(heat, threshold=0.5) == (30.0, 25.0, 48.0, 38.0)
    assert map_to_box(heat, threshold=0.85) == (5.0, 10.0, 15.0, 20.0)
    assert map_to_box(np.zeros((4, 6), np.float32)) == (0.0, 0.0, 6.0, 4.0)


def test_attention_to_image_puts_cells_on_their_pixels() -> None:
    grid = np.zeros((4, 4), np.float32)
    grid[1, 2] = 1.0  # cell centred at (15.5 + 32, 15.5 + 16) with stride 16
    heat = attention_to_image(grid, (64, 64), stride=16, offset=15.5, max_size=640)
    assert heat.shape == (64, 64)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(x - 47) <= 1 and abs(y - 31) <= 1


def test_loss_terms_and_sparsity_switch() -> None:
    r = torch.full((4, 3, 3), 0.5)
    z = torch.randn(4, 8)
    logit = torch.zeros(4)
    label = torch.tensor([1.0, 1.0, 0.0, 0.0])
    valid = torch.ones(4, 3, 3)
    with_s = mcb_loss(r, z, logit, label, ["a", "b", "c", "d"], valid, MCBTrainConfig(beta=0.1))
    without = mcb_loss(r, z, logit, label, ["a", "b", "c", "d"], valid, MCBTrainConfig(beta=0.1, sparsity=False))
    assert float(with_s - without) == pytest.approx(0.1 * 0.25, abs=1e-6)  # β · mean(r²)


# --------------------------------------------------------------------------- training, checkpoint, eval, CLI


@pytest.fixture(scope="module")
def mcb_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.synth import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("mcb") / "corpus"
    generate_corpus(root, SynthConfig(images=16, seed=3, size=96, split_fractions=(0.5, 0.25, 0.25)), progress=False)
    return root


@pytest.fixture(scope="module")
def trained(mcb_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "mcb.pt"
    cfg = MCBTrainConfig(images_per_batch=4, lr=5e-3)
    train_mcb("mcb", TrainOptions(data=mcb_corpus, out=out, epochs=2, progress=False, seed=1), train_config=cfg, model_overrides={"mcb_dim": 64, "hidden": 8, "visual_dim": 16, "text_dim": 16})
    return out


def test_training_steps_reduce_the_loss(mcb_corpus: Path) -> None:
    from engine.datasets.annotations import read_dataset
    from engine.protocols.attention import image_phrases
    from engine.models.vocab import Vocabulary
    from indexer.feature_cache import FeatureCache
    from engine.training.mcb import _Batcher, _batches, build_phrase_data
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.region_features import RegionFeatureExtractor

    torch.manual_seed(0)
    images = read_dataset(mcb_corpus).split("train").images
    cache = FeatureCache(mcb_corpus, RegionFeatureExtractor(backbone=create_backbone(BackboneConfig(), device="cpu")), levels=("c3", "c4"))
    vocab = Vocabulary.build([p.text for im in images for p in image_phrases(im)], min_count=1)
    config = MCBConfig(vocab_size=len(vocab), mcb_dim=64, hidden=8, visual_dim=16, text_dim=16, word_features="vocab")
    data = build_phrase_data(list(images), cache.get, config)
    cfg = MCBTrainConfig(images_per_batch=8)
    batch = next(_batches(data, cfg, np.random.default_rng(0)))
    assert set(batch["label"].tolist()) == {0.0, 1.0}
    net = MCBGrounder(config)
    batcher = _Batcher(data, vocab, cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        first = float(batcher.loss(net, batch))
    for _ in range(25):
        opt.zero_grad()
        batcher.loss(net, batch).backward()
        opt.step()
    with torch.no_grad():
        assert float(batcher.loss(net, batch)) < 0.8 * first


def test_training_writes_a_loadable_checkpoint_with_manifest(trained: Path) -> None:
    model = GroundingModel.from_checkpoint(trained)
    metrics = model.manifest.metrics
    assert len(metrics["history"]) == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["test_localization"]["n"] > 0 and metrics["train_seconds"] > 0
    assert model.manifest.seed == 1 and model.manifest.command.startswith("train_mcb(")
    assert model.config.mcb_dim == 64 and model.config.word_features == "minilm" and isinstance(model.vocab, MiniLMWords)
    assert model.manifest.config["text"].startswith("MiniLMWords(")


def test_corrupt_checkpoint_is_a_clear_error(trained: Path, tmp_path: Path) -> None:
    bad = tmp_path / "mcb.pt"
    bad.write_bytes(trained.read_bytes()[:-10] + b"0123456789")
    (tmp_path / "mcb.json").write_text(trained.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="corrupt"):
        GroundingModel.from_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        GroundingModel.from_checkpoint(tmp_path / "missing.pt")


def test_eval_attention_json(trained: Path, mcb_corpus: Path, tmp_path: Path) -> None:
    js, md = tmp_path / "att.json", tmp_path / "att.md"
    result = CliRunner().invoke(main, ["eval", "attention", "--data", str(mcb_corpus), "--model", str(trained), "--json", str(js), "--markdown", str(md), "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads(js.read_text())["rows"]
    assert [r["method"] for r in rows] == ["center-box", "mcb"]
    for r in rows:
        assert {"acc@0.3", "acc@0.4", "acc@0.5", "mean_iou"} <= set(r)
        assert 0 <= r["acc@0.5"] <= r["acc@0.4"] <= r["acc@0.3"] <= 100
    assert "center-box" in md.read_text()


def test_ground_cli(trained: Path, mcb_corpus: Path, tmp_path: Path) -> None:
    image = next((mcb_corpus / "images").iterdir())
    out = tmp_path / "g.png"
    result = CliRunner().invoke(main, ["ground", str(image), "--text", "the red circle", "--method", "attention", "--model", str(trained), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    x1, y1, x2, y2 = payload["box"]
    w, h = Image.open(image).size
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert Image.open(out).size[0] == 2 * w + 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.png", "--text", "the circle"], "does not exist"),
        (["IMAGE", "--text", "  ?! "], "holds no words"),
        (["IMAGE", "--text", "the circle", "--model", "nowhere/none.pt"], "does not exist"),
        (["CORRUPT", "--text", "the circle"], "cannot read image"),
    ],
)
def test_ground_cli_bad_input(args: list[str], message: str, trained: Path, mcb_corpus: Path, tmp_path: Path) -> None:
    image = next((mcb_corpus / "images").iterdir())
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(b"not an image")
    args = [str(image) if a == "IMAGE" else str(corrupt) if a == "CORRUPT" else a for a in args]
    if "--model" not in args:
        args += ["--model", str(trained)]
    result = CliRunner().invoke(main, ["ground", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_explain_writes_pictures(trained: Path, mcb_corpus: Path, tmp_path: Path) -> None:
    from engine.results import Hit
    from query.explain import AttentionGrounder, explain_hits

    images = sorted((mcb_corpus / "images").iterdir())[:2]
    hits = [Hit(image=str(p), box=(2.0, 2.0, 40.0, 40.0), score=0.5, region_id=i) for i, p in enumerate(images)]
    written = explain_hits(AttentionGrounder(trained), hits, "a blue square", tmp_path / "explain")
    assert [p.name for p in written] == ["explain_01.png", "explain_02.png"]
    assert all(Image.open(p).size[1] > 0 for p in written)


def test_query_explain_needs_text(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["query", "--index", str(tmp_path / "idx"), "--image", "x.png", "--explain", str(tmp_path / "e")])
    assert result.exit_code != 0 and "--explain needs --text" in result.output


def test_query_explain_writes_a_picture_per_hit(tiny_engine, tiny_corpus: Path, tmp_path: Path) -> None:  # noqa: ANN001
    image = sorted((tiny_corpus / "images").iterdir())[0]
    out = tmp_path / "explain"
    args = ["query", "--index", str(tiny_engine.index_dir), "--device", "cpu", "--image", str(image), "--text", "a red circle", "-k", "2", "--explain", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["explain_01.png", "explain_02.png"]
    assert "explanation pictures written" in result.output
