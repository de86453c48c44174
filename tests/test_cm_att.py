"""CM-Att / CM-Att-Erase (paper Eq. 1-11): modules, erasing, training and the grounding eval on tiny data; MiniLM
word features (the default) and the vocabulary (the ablation, and the checkpoints written before MiniLM)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.cli import main
from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import PACKAGE_CHECKPOINTS, load_checkpoint
from engine.models.cm_att import CMAttConfig, CMAttNet, GroundingScorer, build_candidates, context_features, erase_context, erase_query, erase_subject
from engine.training.cm_att import CMAttTrainConfig, train_cm_att
from engine.training.options import TrainOptions

CFG = CMAttConfig(visual_dim=12, word_dim=8, hidden=8, dim=8, contexts=2, word_features="vocab")


def _image(n: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((n, 12, 7, 7)).astype(np.float32)
    xy = rng.uniform(0, 60, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 30, (n, 2))], axis=1)
    return maps, boxes


def test_context_is_the_nearest_other_boxes_with_their_offsets() -> None:
    boxes = np.array([[0, 0, 10, 10], [12, 0, 22, 10], [50, 50, 60, 60], [0, 12, 10, 22]], np.float64)
    vectors = np.arange(8, dtype=np.float32).reshape(4, 2)
    loc, loc_mask, rel, rel_mask = context_features(boxes, vectors, (100, 100), k=2)
    assert loc.shape == (4, 3, 6) and rel.shape == (4, 2, 7)
    np.testing.assert_allclose(loc[0, 0], [0, 0, 0.1, 0.1, 0.01, 1.0], atol=1e-6)  # own location, flag 1
    assert {tuple(r) for r in rel[0, :, :2]} == {tuple(vectors[1]), tuple(vectors[3])}  # the far box 2 is not a context of box 0
    np.testing.assert_allclose(loc[0, 1, :5], [(12 - 5) / 10, (0 - 5) / 10, (22 - 5) / 10, (10 - 5) / 10, 1.0])  # box 1 first (equal distance, lower index)
    assert loc_mask.all() and rel_mask.all()
    single = context_features(boxes[:1], vectors[:1], (100, 100), k=2)
    assert single[1].tolist() == [[True, False, False]] and not single[3].any()


def test_scores_module_weights_and_attentions() -> None:
    torch.manual_seed(0)
    net = CMAttNet(CFG, vocab_size=20).eval()
    maps, boxes = _image()
    cand = build_candidates(maps, boxes, (100, 100), k=2)
    ids, lengths = torch.tensor([[3, 4, 5, 0], [6, 7, 8, 9]]), torch.tensor([3, 4])
    s, att = net(cand, torch.tensor([0, 0, 1, 1]), ids, lengths, torch.randn(2, 12))
    assert s.shape == (4,) and (s.abs() <= 1 + 1e-5).all()  # Σ w_m cos_m with Σ w_m = 1
    torch.testing.assert_close(att["w"].sum(1), torch.ones(2))
    torch.testing.assert_close(att["words"].sum(1), torch.ones(2))  # Eq. 7 mixes distributions
    assert att["words"][0, 3] == 0  # padding
    torch.testing.assert_close(att["subj"].sum(1), torch.ones(4))
    assert att["subj"].shape == (4, 49) and att["loc"].shape == (4, 3) and att["rel"].shape == (4, 2)


def test_minilm_word_features_score_like_ids_and_ignore_padding() -> None:
    from engine.models.word_features import MiniLMWords

    torch.manual_seed(0)
    assert CMAttConfig().word_features == "minilm"
    net = CMAttNet(replace(CFG, word_features="minilm"), vocab_size=1).eval()
    maps, boxes = _image()
    cand = build_candidates(maps, boxes, (100, 100), k=2)
    feats, lengths = MiniLMWords().encode_batch(["a capybara", "the zorblax left of grandma's rag doll"])
    assert feats.dtype == torch.float32 and feats.shape[2] == 384 and lengths[0] < feats.shape[1]
    image = torch.randn(2, 12)
    with torch.no_grad():
        s, att = net(cand, torch.tensor([0, 0, 1, 1]), feats, lengths, image)
        alone, _ = net(cand.select(torch.tensor([0, 1])), torch.tensor([0, 0]), feats[:1, : lengths[0]], lengths[:1], image[:1])
        noisy = feats.clone()
        noisy[0, lengths[0] :] = 5.0  # whatever lies past a text's length is never read
        s_noisy, _ = net(cand, torch.tensor([0, 0, 1, 1]), noisy, lengths, image)
    assert s.shape == (4,) and (s.abs() <= 1 + 1e-5).all()
    torch.testing.assert_close(att["words"].sum(1), torch.ones(2))
    assert (att["words"][0, lengths[0] :] == 0).all()  # padding
    torch.testing.assert_close(alone, s[:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s_noisy, s)
    with pytest.raises(InvalidInputError, match="word ids"):
        net(cand, torch.tensor([0, 0, 1, 1]), torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 3]), image)
    with pytest.raises(InvalidInputError, match="text encoder"):
        CMAttConfig(word_features="glove")


def test_query_erasing_zeroes_one_real_word_piece_of_minilm_features() -> None:
    feats = torch.rand(2, 4, 384) + 0.1
    feats[0, 3] = 0.0  # padding
    lengths = torch.tensor([3, 4])
    before = feats.clone()
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    out = erase_query(feats, lengths, weights, unk=1, generator=torch.Generator().manual_seed(0))
    assert out.dtype == feats.dtype and out.shape == feats.shape
    assert (out[0, 1] == 0).all() and torch.equal(out[0, [0, 2, 3]], feats[0, [0, 2, 3]])  # the only attended piece is gone
    erased = (out[1] == 0).all(1)
    assert erased.sum() == 1 and torch.equal(out[1, ~erased], feats[1, ~erased])  # one piece, the others unchanged
    assert torch.equal(feats, before)  # inputs untouched
    for seed in range(20):  # padding is never drawn, whatever its weight
        g = torch.Generator().manual_seed(seed)
        out = erase_query(feats, lengths, torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.25] * 4]), unk=1, generator=g)
        assert (out[0, :3] == 0).all(1).sum() == 1


def test_query_erasing_replaces_one_real_word_by_unk() -> None:
    ids, lengths = torch.tensor([[3, 4, 5, 0], [6, 7, 8, 9]]), torch.tensor([3, 4])
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    out = erase_query(ids, lengths, weights, unk=1, generator=torch.Generator().manual_seed(0))
    assert out[0].tolist() == [3, 1, 5, 0]  # the only attended word is gone
    assert (out[1] == 1).sum() == 1 and (out[1] != ids[1]).sum() == 1
    assert (ids == torch.tensor([[3, 4, 5, 0], [6, 7, 8, 9]])).all()  # inputs untouched


def test_subject_erasing_zeroes_the_most_attended_3x3_window() -> None:
    maps = torch.ones(1, 4, 7, 7)
    att = torch.zeros(1, 49)
    att[0, 5 * 7 + 5] = 1.0  # cell (5, 5): windows with top-left (3..4, 3..4) hold it; the first such is (3, 3)
    out = erase_subject(maps, att, 3)
    assert (out[0, :, 3:6, 3:6] == 0).all() and out.sum() == 4 * (49 - 9)
    assert (maps == 1).all()


def test_context_erasing_drops_the_most_attended_object() -> None:
    mask = torch.tensor([[True, True, True], [True, False, False]])
    att = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    assert erase_context(mask, att).tolist() == [[False, True, True], [False, False, False]]
    assert erase_context(mask, att, keep_first=True).tolist() == [[True, False, True], [True, False, False]]  # own location stays


@pytest.fixture(scope="module")
def ground_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.synth import SynthConfig, generate_corpus

    root = tmp_path_factory.mktemp("cmatt") / "corpus"
    generate_corpus(root, SynthConfig(images=16, seed=4, size=160, split_fractions=(0.5, 0.25, 0.25)), progress=False)
    return root


@pytest.fixture(scope="module", params=["cm-att", "cm-att-erase"])
def trained(request: pytest.FixtureRequest, ground_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / f"{request.param}.pt"
    train_cm_att(request.param, TrainOptions(data=ground_corpus, out=out, epochs=2, progress=False, seed=1), train_config=CMAttTrainConfig(batch_size=4))
    return out


def test_training_writes_a_loadable_checkpoint(trained: Path) -> None:
    scorer = GroundingScorer.from_checkpoint(trained)
    m = scorer.manifest
    assert scorer.name == trained.stem and len(m.metrics["history"]) == 3  # 2 epochs + 1 (erasing stage or its no-erase twin)
    assert m.config["train"]["erasing"] == (trained.stem == "cm-att-erase") and 0 <= m.metrics["test_gt_acc"] <= 100
    _, boxes = _image(seed=2)
    maps = np.random.default_rng(0).standard_normal((4, 112, 7, 7)).astype(np.float32)  # the shipped visual_dim
    s = scorer.score(maps, boxes, (160, 160), np.zeros(112, np.float32), "the red circle left of a zorblax")
    assert s.shape == (4,) and np.isfinite(s).all()
    bad = trained.parent / "bad.pt"
    bad.write_bytes(trained.read_bytes()[:-5])
    bad.with_suffix(".json").write_text(trained.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="corrupt"):
        GroundingScorer.from_checkpoint(bad)


def test_trained_checkpoint_reads_minilm_word_features_by_default(trained: Path) -> None:
    from engine.models.word_features import MiniLMAdapter, MiniLMWords

    _, payload = load_checkpoint(trained)
    assert payload["config"]["word_features"] == "minilm" and payload["vocab"]["kind"] == "minilm"
    scorer = GroundingScorer.from_checkpoint(trained)
    assert scorer.net.config.word_features == "minilm" and isinstance(scorer.vocab, MiniLMWords) and isinstance(scorer.net.embed, MiniLMAdapter)
    assert "MiniLM" in scorer.manifest.config["text"]
    _, boxes = _image(seed=2)
    maps = np.random.default_rng(0).standard_normal((4, 112, 7, 7)).astype(np.float32)
    seen = scorer.score(maps, boxes, (160, 160), np.zeros(112, np.float32), "the red circle left of the blue square")
    unseen = scorer.score(maps, boxes, (160, 160), np.zeros(112, np.float32), "a capybara beside grandma's rag doll")  # no word of it was trained on
    assert unseen.shape == (4,) and np.isfinite(unseen).all() and not np.allclose(seen, unseen)


def test_vocabulary_ablation_trains_through_the_cli(ground_corpus: Path, tmp_path: Path) -> None:
    from engine.models.vocab import Vocabulary

    out = tmp_path / "cm-att-erase.pt"
    result = CliRunner().invoke(main, ["train", "cm-att-erase", "--data", str(ground_corpus), "--out", str(out), "--epochs", "1", "--seed", "1", "--text-encoder", "vocab", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    manifest, payload = load_checkpoint(out)
    assert "--text-encoder vocab" in manifest.command and manifest.config["word_features"] == "vocab" and manifest.config["text"].startswith("Vocabulary(")
    assert manifest.config["train"]["erasing"] is True and len(manifest.metrics["history"]) == 2  # the erasing stage ran on word ids
    assert payload["config"]["word_features"] == "vocab" and isinstance(payload["vocab"], list) and "circle" in payload["vocab"]
    scorer = GroundingScorer.from_checkpoint(out)
    assert isinstance(scorer.vocab, Vocabulary) and isinstance(scorer.net.embed, torch.nn.Embedding) and scorer.net.embed.num_embeddings == len(scorer.vocab)
    _, boxes = _image(seed=2)
    maps = np.random.default_rng(0).standard_normal((4, 112, 7, 7)).astype(np.float32)
    assert scorer.score(maps, boxes, (160, 160), np.zeros(112, np.float32), "a capybara").shape == (4,)  # <unk>


SHIPPED_SCORES = {
    # cm-att-erase.pt (sha256 83dec263cb32…) on _shipped_inputs(), computed before MiniLM (commit 4578a59)
    "83dec263cb32b15e92b119430307cfae50dc331859924bc69c5a440057c71763": [-0.3047205, -0.0929085, -0.1921979, -0.2104921, -0.0399695],
}


def _shipped_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    maps = rng.standard_normal((5, 112, 7, 7)).astype(np.float32)
    xy = rng.uniform(0, 100, (5, 2))
    return maps, np.concatenate([xy, xy + 40], axis=1), rng.standard_normal(112).astype(np.float32)


@pytest.mark.parametrize("name", ["cm-att-erase", "cm-att", "cm-att-erase-region"])
def test_shipped_checkpoints_written_before_minilm_read_their_vocabulary(name: str) -> None:
    from engine.models.vocab import Vocabulary

    manifest, payload = load_checkpoint(PACKAGE_CHECKPOINTS / f"{name}.pt")
    if "word_features" in payload["config"]:
        pytest.skip(f"the shipped {name} was retrained with word_features={payload['config']['word_features']!r}")
    scorer = GroundingScorer.from_checkpoint(name)
    assert scorer.net.config.word_features == "vocab" and isinstance(scorer.vocab, Vocabulary) and isinstance(scorer.net.embed, torch.nn.Embedding)
    assert scorer.vocab.itos[2:] == payload["vocab"]
    state = scorer.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in payload["state_dict"].items())
    maps, boxes, vector = _shipped_inputs()
    s = scorer.score(maps, boxes, (160, 160), vector, "the red circle left of the blue square")
    if manifest.sha256 in SHIPPED_SCORES:  # the same scores as before MiniLM
        np.testing.assert_allclose(s, SHIPPED_SCORES[manifest.sha256], rtol=1e-4, atol=1e-6)


def test_eval_grounding_writes_table2_rows(trained: Path, ground_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "t2.json"
    result = CliRunner().invoke(main, ["eval", "grounding", "--data", str(ground_corpus), "--model", str(trained), "--ref-nms", "none", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r["proposals"]) for r in rows} == {(trained.stem, "gt"), (trained.stem, "det")}
    assert all(0 <= r["acc"] <= 100 for r in rows)


def test_referring_grounder_picks_one_of_the_ref_nms_candidates(trained: Path, ground_corpus: Path, tmp_path: Path) -> None:
    from engine.datasets.annotations import read_annotations
    from engine.training.ref_nms import RefNMSTrainConfig, train_ref_nms
    from indexer.images import load_image
    from query.referring import ReferringGrounder, referring_picture

    ref_nms = tmp_path / "ref-nms-b.pt"
    train_ref_nms("ref-nms-b", TrainOptions(data=ground_corpus, out=ref_nms, epochs=1, progress=False), train_config=RefNMSTrainConfig(batch_size=4))
    ann = next(a for a in read_annotations(ground_corpus) if a.refs)
    grounder = ReferringGrounder(trained, ref_nms=ref_nms)
    g = grounder.ground(ground_corpus / ann.image, ann.refs[0].expression)
    assert len(g.candidates) >= 1 and any(np.allclose(g.box, c) for c in g.candidates)
    x1, y1, x2, y2 = g.box
    assert 0 <= x1 < x2 <= ann.width and 0 <= y1 < y2 <= ann.height
    picture = referring_picture(load_image(ground_corpus / ann.image), g)
    assert picture.size == (ann.width, ann.height)
    with pytest.raises(Exception, match="holds no words"):
        grounder.ground(ground_corpus / ann.image, "?!")


def test_cli_ground_with_cm_att_uses_the_shipped_checkpoints(ground_corpus: Path, tmp_path: Path) -> None:
    from engine.datasets.annotations import read_annotations

    ann = next(a for a in read_annotations(ground_corpus) if a.refs)
    out = tmp_path / "g.png"
    result = CliRunner().invoke(main, ["ground", str(ground_corpus / ann.image), "--text", ann.refs[0].expression, "--method", "cm-att", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    obj = json.loads(result.output)
    assert obj["method"] == "cm-att" and len(obj["box"]) == 4 and obj["candidates"] >= 1 and out.is_file()


class _FakeCache:
    """``region_maps`` / ``get`` of a feature cache: random maps whose first channel encodes the box's x1."""

    class extractor:  # noqa: N801
        class config:  # noqa: N801
            level = 3

    def region_maps(self, image: str, boxes: np.ndarray) -> np.ndarray:
        maps = np.zeros((len(boxes), 112, 7, 7), np.float32)
        maps[:, 0] = np.asarray(boxes, np.float32)[:, :1, None]
        return maps

    def get(self, image: str):  # noqa: ANN201
        from types import SimpleNamespace

        return SimpleNamespace(maps={3: np.ones((112, 5, 5), np.float16)})


def test_region_targets_add_the_regions_as_candidates_and_point_at_them(ground_corpus: Path) -> None:
    from engine.datasets.annotations import read_dataset
    from engine.protocols.grounding import build_grounding_data
    from engine.models.cm_att import CMAttConfig

    images = [im for im in read_dataset(ground_corpus).images if im.regions][:3]
    data = build_grounding_data(images, _FakeCache(), CMAttConfig(), targets="regions")
    assert list(data.counts) == [len(im.objects) + len(im.regions) for im in images]
    assert data.texts == [r.description for im in images for r in im.regions]
    expected = [(g, r.box) for g, im in enumerate(images) for r in im.regions]
    for i, (g, box) in enumerate(expected):
        row = int(data.ref_row[i])
        assert data.ref_image[i] == g and data.offsets[g] <= row < data.offsets[g] + data.counts[g]
        assert row - data.offsets[g] >= len(images[g].objects)  # a region row, not an object row
        assert float(data.candidates.maps[row, 0, 0, 0]) == pytest.approx(box[0])
    with pytest.raises(InvalidInputError, match="targets"):
        build_grounding_data(images, _FakeCache(), CMAttConfig(), targets="words")


def test_region_grounding_model_trains_on_region_descriptions(ground_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cm-att-erase-region.pt"
    train_cm_att("cm-att-erase-region", TrainOptions(data=ground_corpus, out=out, epochs=1, progress=False, seed=1), train_config=CMAttTrainConfig(batch_size=4))
    m = GroundingScorer.from_checkpoint(out).manifest
    assert m.config["train"]["targets"] == "regions" and m.config["train"]["erasing"] is True
    assert 0 <= m.metrics["test_gt_acc"] <= 100


def test_grounding_one_image_needs_no_temporary_feature_cache(ground_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine ground --method cm-att`` computes the image's maps in memory (ImageMaps): no temporary folder, no file."""
    import tempfile

    from engine.datasets.annotations import read_annotations
    from query.referring import ReferringGrounder

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("grounding one image must not write a temporary feature cache")

    for name in ("TemporaryDirectory", "mkdtemp", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    ann = next(a for a in read_annotations(ground_corpus) if a.refs)
    before = sorted(ground_corpus.rglob("*"))
    g = ReferringGrounder(device="cpu").ground(ground_corpus / ann.image, ann.refs[0].expression)
    assert len(g.box) == 4 and len(g.candidates) >= 1
    assert sorted(ground_corpus.rglob("*")) == before


def test_scoring_several_images_at_once_equals_one_by_one() -> None:
    from engine.models.cm_att import GroundingImage
    from engine.models.vocab import Vocabulary

    torch.manual_seed(0)
    vocab = Vocabulary.build(["the red circle left of the blue square"], min_count=1)
    net = CMAttNet(replace(CFG, visual_dim=8), vocab_size=len(vocab))
    scorer = GroundingScorer(net, vocab)
    rng = np.random.default_rng(0)
    images = []
    for n in (5, 0, 3, 7):
        corner = rng.uniform(0, 100, size=(n, 2)).astype(np.float32)
        boxes = np.concatenate([corner, corner + rng.uniform(5, 50, size=(n, 2)).astype(np.float32)], axis=1)
        images.append(GroundingImage(maps=rng.standard_normal((n, 8, 7, 7)).astype(np.float32), boxes=boxes, size=(160, 160), image_vector=rng.standard_normal(8).astype(np.float32)))
    text = "the red circle left of the blue square"
    together = scorer.score_images(images, text)
    for im, scores in zip(images, together):
        assert scores.shape == (len(im.maps),)
        np.testing.assert_allclose(scores, scorer.score(im.maps, im.boxes, im.size, im.image_vector, text), rtol=1e-5, atol=1e-6)
    assert scorer.score_images([], text) == []


def _context_reference(boxes: np.ndarray, vectors: np.ndarray, size: tuple[int, int], k: int) -> tuple[np.ndarray, ...]:
    """The box-by-box definition of the context (MAttNet): the k nearest other boxes by centre distance, ties in box order."""
    from engine.models.cm_att import LOC_DIM, location_features

    b = np.asarray(boxes, np.float64)
    n, c = len(b), vectors.shape[1]
    loc, rel = np.zeros((n, k + 1, LOC_DIM + 1), np.float32), np.zeros((n, k, c + LOC_DIM), np.float32)
    loc_mask, rel_mask = np.zeros((n, k + 1), bool), np.zeros((n, k), bool)
    own = location_features(b, size)
    centres = (b[:, :2] + b[:, 2:]) / 2
    for i in range(n):
        loc[i, 0, :LOC_DIM], loc[i, 0, LOC_DIM], loc_mask[i, 0] = own[i], 1.0, True
        dist = np.linalg.norm(centres - centres[i], axis=1)
        dist[i] = np.inf
        near = [j for j in np.argsort(dist, kind="stable")[:k] if np.isfinite(dist[j])]
        for slot, j in enumerate(near):
            w, h = max(b[i, 2] - b[i, 0], 1.0), max(b[i, 3] - b[i, 1], 1.0)
            cx, cy = (b[i, 0] + b[i, 2]) / 2, (b[i, 1] + b[i, 3]) / 2
            o = b[j]
            off = np.clip([(o[0] - cx) / w, (o[1] - cy) / h, (o[2] - cx) / w, (o[3] - cy) / h, (o[2] - o[0]) * (o[3] - o[1]) / (w * h)], -4, 4).astype(np.float32)
            loc[i, 1 + slot, :LOC_DIM], loc_mask[i, 1 + slot] = off, True
            rel[i, slot, :c], rel[i, slot, c:], rel_mask[i, slot] = vectors[j], off, True
    return loc, loc_mask, rel, rel_mask


@pytest.mark.parametrize("n", [0, 1, 2, 4, 9])
def test_context_features_equal_the_box_by_box_definition(n: int) -> None:
    rng = np.random.default_rng(n)
    corner = rng.integers(0, 80, size=(n, 2)).astype(np.float32)
    boxes = np.concatenate([corner, corner + rng.integers(1, 40, size=(n, 2))], axis=1).astype(np.float32)
    if n >= 4:
        boxes[3] = boxes[1]  # a tie: equal centres keep box order
    vectors = rng.standard_normal((n, 6)).astype(np.float32)
    for got, want in zip(context_features(boxes, vectors, (120, 90), k=3), _context_reference(boxes, vectors, (120, 90), k=3)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
