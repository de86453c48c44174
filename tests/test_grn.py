"""GRN (paper §3.2–3.4) and its baselines: layer maths against literal references, training, checkpoints.

Nets fed word ids are built with ``word_features="vocab"``; training uses the default text encoder (MiniLM).
The vocabulary ablation's training and the shipped checkpoints are in ``test_word_features_mcb_grn.py``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.errors import CheckpointError, InvalidInputError
from engine.models.grn import (
    METHODS,
    GRNConfig,
    GatedResidualNetwork,
    LanguageGating,
    conv_mean,
    create_retrieval_net,
    grn_loss,
    method_config,
)
from engine.models.retrieval import RegionRetrievalModel
from engine.models.word_features import MINILM_DIM, MiniLMWords
from engine.training.grn import GRN_METHODS, GRNTrainConfig, build_training_pairs, train_grn
from engine.training.options import TrainOptions

C, D, H = 12, 6, 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _maps(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, C, 7, 7, generator=torch.Generator().manual_seed(seed))


def test_method_names_are_the_paper_rows_and_ablations() -> None:
    assert GRN_METHODS == ("visual", "vl-lstm", "vl-concat", "grn-no-residual", "grn", "grn-lstm", "grn-visual-residual", "grn-fc")
    assert set(METHODS) == set(GRN_METHODS)
    grn = METHODS["grn"]
    assert (grn.text_encoder, grn.residual, grn.variant) == ("attention", "compose", "conv")
    assert METHODS["grn-lstm"].text_encoder == "lstm" and METHODS["grn-visual-residual"].residual == "visual"
    assert METHODS["grn-fc"].variant == "fc" and METHODS["grn-no-residual"].residual == "none"
    with pytest.raises(InvalidInputError, match="not known"):
        method_config("grn-xl")
    with pytest.raises(InvalidInputError):
        method_config("grn", residual="sideways")


@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize("residual", ["compose", "visual", "none"])
def test_grn_shapes_and_pooled_equals_mean_of_full_output(spatial: bool, residual: str) -> None:
    torch.manual_seed(0)
    grn = GatedResidualNetwork(visual_dim=C, text_dim=D, hidden=H, residual=residual, spatial=spatial)
    x = _maps(4) if spatial else _maps(4).mean((2, 3))
    text = torch.randn(3, D)
    mi, ti = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([0, 0, 1, 2, 2])
    full = grn(x[mi], text[ti])
    assert full.shape == ((5, C, 7, 7) if spatial else (5, C))
    size = (7, 7) if spatial else None
    pooled = grn.pooled(grn.visual_terms(x), grn.text_terms(text, size), mi, ti)
    assert pooled.shape == (5, C)
    torch.testing.assert_close(pooled, full.mean((2, 3)) if spatial else full, atol=1e-5, rtol=1e-4)


def test_w_g_and_w_r_start_at_one_and_learn() -> None:
    grn = GatedResidualNetwork(visual_dim=C, text_dim=D, hidden=H, residual="compose")
    assert grn.w_g.item() == 1.0 and grn.w_r.item() == 1.0
    assert grn.w_g.requires_grad and grn.w_r.requires_grad
    grn(_maps(2), torch.randn(2, D)).square().sum().backward()
    assert grn.w_g.grad is not None and grn.w_g.grad.abs() > 0
    assert grn.w_r.grad is not None and grn.w_r.grad.abs() > 0
    assert GatedResidualNetwork(visual_dim=C, text_dim=D, hidden=H, residual="none").w_r is None


@pytest.mark.parametrize("spatial", [True, False])
def test_gating_output_is_x_times_the_gate(spatial: bool) -> None:
    gating = LanguageGating(visual_dim=C, text_dim=D, hidden=H, spatial=spatial)
    bias = torch.linspace(-3, 3, C)
    with torch.no_grad():  # hand-set gate: W_g2 = 0, so the gate is sigmoid(bias) whatever X and L are
        gating.second.weight.zero_()
        gating.second.bias.copy_(bias)
    x = _maps(3) if spatial else _maps(3).mean((2, 3))
    gate = torch.sigmoid(bias)[None, :, None, None] if spatial else torch.sigmoid(bias)[None, :]
    torch.testing.assert_close(gating(x, torch.randn(3, D)), x * gate)


def test_split_first_layer_equals_the_convolution_over_the_concatenation() -> None:
    torch.manual_seed(0)
    gating = LanguageGating(visual_dim=C, text_dim=D, hidden=H, spatial=True)
    x, text = _maps(2), torch.randn(2, D)
    concat = torch.cat([x, text[:, :, None, None].expand(-1, -1, 7, 7)], dim=1)  # [X, L] with L tiled (§3.2)
    first = gating.first
    reference = F.conv2d(concat, first.concat_weight(), first.visual.bias, padding=1)
    torch.testing.assert_close(first.visual_term(x) + first.text_term(text, (7, 7)), reference, atol=1e-5, rtol=1e-4)
    # Eq. 1 literally
    literal = torch.sigmoid(gating.second(F.relu(reference))) * x
    torch.testing.assert_close(gating(x, text), literal, atol=1e-5, rtol=1e-4)


def test_conv_mean_equals_mean_of_the_convolution() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(H, C, 3, padding=1)
    z = torch.randn(4, H, 7, 7)
    torch.testing.assert_close(conv_mean(z, conv), conv(z).mean((2, 3)), atol=1e-5, rtol=1e-4)


def test_loss_is_eq6_and_reduces_to_soft_triplet_for_one_negative() -> None:
    q = F.normalize(torch.randn(3, 8), dim=1)
    c = F.normalize(torch.randn(3, 2, 8), dim=2)
    valid = torch.ones(3, 2, dtype=torch.bool)
    s = torch.einsum("be,bke->bk", q, c) / 0.5
    soft_triplet = F.softplus(s[:, 1] - s[:, 0]).mean()
    torch.testing.assert_close(grn_loss(q, c, valid, temperature=0.5), soft_triplet)
    # a masked-out negative does not count
    valid[:, 1] = False
    assert grn_loss(q, c, valid, temperature=0.5).abs() < 1e-6


def test_an_extra_negative_adds_one_term_to_the_denominator() -> None:
    q = F.normalize(torch.randn(3, 8), dim=1)
    c = F.normalize(torch.randn(3, 2, 8), dim=2)
    valid = torch.ones(3, 2, dtype=torch.bool)
    extra = torch.tensor([0.3, float("-inf"), -0.2])
    s = torch.einsum("be,bke->bk", q, c) / 0.5
    full = torch.cat([s, (extra / 0.5)[:, None]], dim=1)
    expected = -(s[:, 0] - torch.logsumexp(full, dim=1)).mean()
    torch.testing.assert_close(grn_loss(q, c, valid, temperature=0.5, extra_negatives=extra), expected)
    assert grn_loss(q, c, valid, temperature=0.5, extra_negatives=extra) > grn_loss(q, c, valid, temperature=0.5)


@pytest.mark.parametrize("method", [m for m in GRN_METHODS])
def test_every_method_embeds_normalised_vectors(method: str) -> None:
    torch.manual_seed(0)
    config = method_config(method, visual_dim=C, text_dim=D, hidden=H, embed_dim=10, word_features="vocab")
    net = create_retrieval_net(config, vocab_size=9)
    ids, lengths = torch.tensor([[2, 3, 4], [5, 6, 0]]), torch.tensor([3, 2])
    text = net.text_features(ids, lengths)
    emb = net.embed(_maps(4), text, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]))
    assert emb.shape == (4, net.embed_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("method", [m for m in GRN_METHODS])
def test_every_method_embeds_minilm_features_and_padding_changes_nothing(method: str) -> None:
    torch.manual_seed(0)
    net = create_retrieval_net(method_config(method, visual_dim=C, text_dim=D, hidden=H, embed_dim=10), vocab_size=1).eval()
    assert net.config.word_features == "minilm"
    gen = torch.Generator().manual_seed(2)
    feats, lengths = torch.randn(2, 5, MINILM_DIM, generator=gen), torch.tensor([5, 3])
    feats[1, 3:] = 0.0  # the second text is 3 words long, zero-padded
    with torch.no_grad():
        text = net.text_features(feats, lengths)
        emb = net.embed(_maps(4), text, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]))
        alone = net.embed(_maps(4), net.text_features(feats[1:, :3], lengths[1:]))  # the second text unpadded
        noisy = feats.clone()
        noisy[1, 3:] = 7.0  # garbage where the lengths say padding
        again = net.embed(_maps(4), net.text_features(noisy, lengths), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1]))
    assert emb.shape == (4, net.embed_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(emb[2:], alone[2:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, emb, atol=1e-5, rtol=1e-4)


def test_grn_config_word_features() -> None:
    assert METHODS["grn"].word_features == "minilm" and METHODS["grn"].text_encoder == "attention"
    stored = {k: v for k, v in method_config("grn-lstm").to_dict().items() if k != "word_features"}
    assert GRNConfig.from_dict(stored).word_features == "vocab"  # written before MiniLM: its vocabulary
    assert GRNConfig.from_dict(method_config("grn-lstm").to_dict()) == method_config("grn-lstm")
    with pytest.raises(InvalidInputError, match="minilm, vocab"):
        method_config("grn", word_features="glove")


@pytest.mark.parametrize("method", ["grn", "grn-fc", "vl-concat", "vl-lstm"])
def test_loss_decreases_on_a_tiny_separable_problem(method: str) -> None:
    """Two kinds of region (signal in different channels), each with its text: the loss must fall."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = create_retrieval_net(method_config(method, visual_dim=C, text_dim=D, hidden=H, embed_dim=8, temperature=0.2, word_features="vocab"), vocab_size=6)
    kinds = torch.tensor([0, 1] * 8)
    maps = torch.randn(16, C, 7, 7, generator=gen) * 0.5
    maps[kinds == 0, :3] += 2.0
    maps[kinds == 1, 3:6] += 2.0
    ids = torch.where(kinds[:, None] == 0, torch.tensor([[2, 3]]), torch.tensor([[4, 5]]))
    lengths = torch.full((16,), 2)
    anchors, positives = torch.arange(0, 16, 2), torch.arange(2, 18, 2) % 16  # same kind, another region
    anchors = torch.cat([anchors, anchors + 1])
    positives = torch.cat([positives, (positives + 1) % 16])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        text = net.text_features(ids[anchors], lengths[anchors])
        b = len(anchors)
        query = net.embed(maps[anchors], text)
        cand_idx = positives[None, :].expand(b, b)  # column i of row i is the positive; others are negatives
        order = torch.cat([torch.arange(b)[:, None], torch.tensor([[j for j in range(b) if j != i] for i in range(b)])], dim=1)
        cols = torch.gather(cand_idx, 1, order)
        cands = net.embed(maps, text, cols.reshape(-1), torch.arange(b).repeat_interleave(b)).reshape(b, b, -1)
        valid = kinds[cols] != kinds[anchors][:, None]
        valid[:, 0] = True
        return grn_loss(query, cands, valid, temperature=0.2)

    first = loss().item()
    for _ in range(40):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < 0.5 * first


# --------------------------------------------------------------------------- training on a tiny corpus


@pytest.fixture(scope="module")
def trained(grn_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "grn.pt"
    train_grn("grn", TrainOptions(data=grn_corpus, out=out, epochs=1, progress=False, seed=3), train_config=GRNTrainConfig(batch_size=8))
    return out


def test_training_pairs_are_true_positives(grn_corpus: Path) -> None:
    from engine.datasets.annotations import read_dataset

    dataset = read_dataset(grn_corpus)
    train = dataset.split("train")
    pairs = build_training_pairs(train)
    assert pairs.source == "meanings" and len(pairs) > 0
    positives_of = {q.region_id: set(q.positives) for q in train.queries}
    for a, pos in zip(pairs.anchors, pairs.pair_positives):
        rid = int(pairs.region_ids[a])
        assert all(pairs.images[p] != pairs.images[a] for p in pos)  # other images only
        if rid in positives_of:  # the benchmark's own queries: the derived positives are exactly its positives
            assert {int(pairs.region_ids[p]) for p in pos} <= positives_of[rid]


def test_train_grn_writes_a_loadable_checkpoint(trained: Path) -> None:
    model = RegionRetrievalModel.from_checkpoint(trained)
    assert model.method == "grn" and model.version.startswith("grn:1:")
    metrics = model.manifest.metrics
    assert metrics["best_epoch"] == 1 and len(metrics["history"]) == 1
    assert {"R@1", "R@10", "R@50", "R@100", "med_r"} <= set(metrics["test_gt"])
    assert model.manifest.seed == 3 and trained.with_suffix(".json").is_file()
    maps = _real_maps(model)
    scores = model.score(maps[0], "a red circle", maps)
    assert scores.shape == (len(maps),) and np.isfinite(scores).all()
    emb = model.embed(maps.astype(np.float16), model.encode_text("a red circle"))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(scores, emb @ emb[0], atol=1e-5)  # the query text gates the query and the candidates


def test_training_is_reproducible(grn_corpus: Path, tmp_path: Path) -> None:
    states = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.pt"
        train_grn("grn-fc", TrainOptions(data=grn_corpus, out=out, epochs=2, progress=False, seed=5), train_config=GRNTrainConfig(batch_size=8))
        states.append(RegionRetrievalModel.from_checkpoint(out).net.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=0, rtol=0)


def _real_maps(model: RegionRetrievalModel) -> np.ndarray:
    gen = np.random.default_rng(0)
    return gen.standard_normal((40, model.net.config.visual_dim, 7, 7)).astype(np.float32)


def test_the_model_is_text_sensitive(trained: Path) -> None:
    model = RegionRetrievalModel.from_checkpoint(trained)
    maps = _real_maps(model)
    a = model.score(maps[0], "a red circle to the left of a blue square", maps[1:])
    b = model.score(maps[0], "a large green star above a small yellow heart", maps[1:])
    assert not np.array_equal(np.argsort(-a), np.argsort(-b))


def test_unknown_words_never_crash_and_empty_text_is_a_clear_error(trained: Path) -> None:
    model = RegionRetrievalModel.from_checkpoint(trained)
    maps = _real_maps(model)
    assert np.isfinite(model.score(maps[0], "a quizzical zebra juggling", maps)).all()
    with pytest.raises(InvalidInputError, match="holds no words"):
        model.encode_text("?!")
    with pytest.raises(InvalidInputError, match="holds no words"):
        model.score(maps[0], "", maps)
    with pytest.raises(InvalidInputError, match="shape"):
        model.embed(np.zeros((2, 5, 7, 7), np.float32), model.encode_text("a red circle"))


def test_visual_method_ignores_text_and_is_the_faiss_vector() -> None:
    from indexer.region_features import pool_vectors

    model = RegionRetrievalModel.visual()
    maps = np.random.default_rng(0).standard_normal((5, 112, 7, 7)).astype(np.float32)
    emb = model.embed(maps, model.encode_text(None))
    np.testing.assert_allclose(emb, pool_vectors(maps), atol=1e-6)
    np.testing.assert_allclose(model.score(maps[0], "anything", maps), model.score(maps[0], None, maps))


def test_a_damaged_or_foreign_checkpoint_is_refused(trained: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(trained.read_bytes()[:-10])
    bad.with_suffix(".json").write_text(trained.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="corrupt"):
        RegionRetrievalModel.from_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        RegionRetrievalModel.from_checkpoint(tmp_path / "missing.pt")


def test_text_encoding_is_stored_with_the_checkpoint(trained: Path) -> None:
    from engine.models.checkpoint import load_checkpoint

    model = RegionRetrievalModel.from_checkpoint(trained)
    assert isinstance(model.vocab, MiniLMWords) and model.net.config.word_features == "minilm"
    _, payload = load_checkpoint(trained)
    assert payload["vocab"]["kind"] == "minilm" and payload["config"]["word_features"] == "minilm"
    assert model.manifest.config["text"].startswith("MiniLMWords(")


class _StubRPN(torch.nn.Module):
    """Proposes each region box shifted by 1 px (IoU > 0.7) and a corner box that overlaps nothing much."""

    class config:  # noqa: N801 - mimics ProposalNetwork.config
        levels = ("c4",)

    def __init__(self, boxes_by_size: list[np.ndarray]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.queue = list(boxes_by_size)
        self.version = "stub"

    def propose(self, maps, sizes, *, max_proposals: int = 300):
        out = []
        for _ in sizes:
            boxes = self.queue.pop(0)
            shifted = np.clip(boxes + 1.0, 0, 127)
            corner = np.array([[0, 0, 6, 6]], np.float64)
            out.append((np.concatenate([shifted, corner]).astype(np.float32), np.ones(len(boxes) + 1, np.float32)))
        return out


def test_proposal_pool_positives_overlap_and_negatives_do_not(grn_corpus: Path) -> None:
    from engine.boxes import box_iou
    from engine.datasets.annotations import read_dataset
    from indexer.feature_cache import FeatureCache
    from engine.training.grn import _batches, _is_negative, build_proposal_pool
    from indexer.backbone import BackboneConfig, create_backbone
    from indexer.region_features import RegionFeatureExtractor

    train = read_dataset(grn_corpus).split("train")
    pairs = build_training_pairs(train)
    cache = FeatureCache(grn_corpus, RegionFeatureExtractor(backbone=create_backbone(BackboneConfig(), device="cpu")))
    images = [im for im in train.images if im.regions]
    stub = _StubRPN([np.asarray([r.box for r in im.regions], np.float64) for im in images])
    cfg = GRNTrainConfig(batch_size=4, jitter_per_region=2, other_proposals=100, proposal_positive_prob=1.0)  # keeps all
    pool = build_proposal_pool(pairs, images, cache, stub, cfg, np.random.default_rng(0))
    assert pool.start == len(pairs.region_ids) and len(pool.maps) == len(pool.overlaps) > 0
    proposal_boxes, proposal_image = {}, {}
    for im in images:
        boxes = np.concatenate([np.clip(np.asarray([r.box for r in im.regions]) + 1.0, 0, 127), [[0, 0, 6, 6]]])
        assert len(pool.by_image[im.image]) == len(boxes)
        for k, b in zip(pool.by_image[im.image], boxes):
            proposal_boxes[int(k)], proposal_image[int(k)] = b, im.image
    seen = {"positive": 0, "negative": 0}
    for batch in _batches(pairs, cfg, np.random.default_rng(1), pool):
        for b, a in enumerate(batch["pairs"]):
            allp = pairs.all_positives[a]
            p = int(batch["positive"][b])
            if p >= pool.start:  # a positive replaced by one of its proposals: IoU > 0.7 with a positive region
                seen["positive"] += 1
                assert any(box_iou(proposal_boxes[p][None], pairs.boxes[[r]])[0, 0] > 0.7 for r in allp)
            for n in batch["hard"][b, cfg.hard_negatives :]:
                if n >= 0:  # false-positive proposals: no IoU > 0.5 with any positive of the query
                    seen["negative"] += 1
                    assert _is_negative(int(n), allp, pool)
                    same_image = [r for r in allp if pairs.images[r] == proposal_image[int(n)]]
                    assert all(box_iou(proposal_boxes[int(n)][None], pairs.boxes[[r]])[0, 0] <= 0.5 for r in same_image)
    assert seen["positive"] > 0 and seen["negative"] > 0


def test_wrong_texts_are_texts_that_neither_region_satisfies(grn_corpus: Path) -> None:
    from engine.datasets.annotations import read_dataset
    from engine.training.grn import _batches

    pairs = build_training_pairs(read_dataset(grn_corpus).split("train"))
    cfg = GRNTrainConfig(batch_size=8, text_swap=True)
    checked = 0
    for batch in _batches(pairs, cfg, np.random.default_rng(0)):
        for b, j in enumerate(batch["swap"]):
            if j < 0:
                continue
            other = pairs.all_positives[batch["pairs"][j]]
            assert j != b and int(batch["anchor"][b]) not in other and int(batch["positive"][b]) not in other
            checked += 1
    assert checked > 0
    off = next(iter(_batches(pairs, GRNTrainConfig(batch_size=8), np.random.default_rng(0))))
    assert (off["swap"] == -1).all()


def test_training_with_wrong_text_negatives_runs(grn_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "swap.pt"
    train_grn("grn-fc", TrainOptions(data=grn_corpus, out=out, epochs=1, progress=False, seed=2), train_config=GRNTrainConfig(batch_size=8, text_swap=True))
    model = RegionRetrievalModel.from_checkpoint(out)
    assert model.manifest.config["train"]["text_swap"] is True
