"""The region proposal network: anchor placement on the backbone's true cell centres, mapping back to
original pixels, output contract, recall computation, indexing with ``--proposals rpn``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.errors import InvalidInputError
from engine.protocols.proposals import recall_table
from engine.models.rpn import ProposalNetwork, RpnConfig

# A 1280x960 image resized to 640x480 (max_size 640): the padded frame is 640x480, scale 2 back to original.
ORIGINAL = (1280, 960)
FRAME = (640, 480)
GRIDS = {"c3": (60, 80), "c4": (30, 40), "c5": (15, 20)}


def _maps(batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = RpnConfig()
    return {lvl: torch.randn(batch, ch, *GRIDS[lvl], generator=g) for lvl, ch in zip(cfg.levels, cfg.in_channels)}


class _OneHotHead(nn.Module):
    """Objectness logit +5 at one (level, cell, anchor), -20 elsewhere; zero box deltas (proposals = anchors)."""

    def __init__(self, level: int, y: int, x: int, anchor: int, anchors_per_cell: int) -> None:
        super().__init__()
        self.where = (level, y, x, anchor)
        self.a = anchors_per_cell

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = [], []
        for i, f in enumerate(feats):
            b, _, h, w = f.shape
            lg = torch.full((b, self.a, h, w), -20.0)
            if i == self.where[0]:
                lg[:, self.where[3], self.where[1], self.where[2]] = 5.0
            logits.append(lg)
            deltas.append(torch.zeros((b, 4 * self.a, h, w)))
        return logits, deltas


def test_anchors_sit_on_the_backbone_cell_centres() -> None:
    net = ProposalNetwork()
    cfg = net.config
    anchors = net.anchors(_maps(), [FRAME])[0]
    a = cfg.anchors_per_cell
    start = 0
    for lvl, stride, offset in zip(cfg.levels, cfg.strides, cfg.offsets):
        h, w = GRIDS[lvl]
        block = anchors[start : start + h * w * a].view(h, w, a, 4)
        cx = (block[..., 0] + block[..., 2]) / 2
        cy = (block[..., 1] + block[..., 3]) / 2
        expect_x = offset + torch.arange(w, dtype=torch.float32) * stride
        expect_y = offset + torch.arange(h, dtype=torch.float32) * stride
        assert torch.allclose(cx, expect_x.view(1, w, 1).expand(h, w, a)), lvl
        assert torch.allclose(cy, expect_y.view(h, 1, 1).expand(h, w, a)), lvl
        start += h * w * a
    assert start == len(anchors)
    assert cfg.offsets == (7.5, 15.5, 31.5)  # EfficientNet-Lite0's TF "same" padding, not stride / 2


def test_a_proposal_on_the_grid_maps_back_to_original_pixels() -> None:
    net = ProposalNetwork()
    cfg = net.config
    level, y, x = 1, 7, 11  # c4, stride 16, offset 15.5
    ratio_index, size_index = cfg.aspect_ratios.index(1.0), 1  # size 128, square
    anchor = ratio_index * len(cfg.anchor_sizes[level]) + size_index
    net.rpn.head = _OneHotHead(level, y, x, anchor, cfg.anchors_per_cell)
    (boxes, scores), = net.propose(_maps(), [ORIGINAL], max_proposals=50)
    centre = np.array([15.5 + 16 * x, 15.5 + 16 * y])
    half = cfg.anchor_sizes[level][size_index] / 2
    expected = np.concatenate([centre - half, centre + half]) * 2  # frame -> original pixels
    np.testing.assert_allclose(boxes[0], expected, atol=1e-3)
    assert scores[0] == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-5)
    assert len(boxes) <= 50


def test_a_ground_truth_box_on_an_anchor_is_matched_with_zero_regression() -> None:
    net = ProposalNetwork()
    anchors = net.anchors(_maps(), [FRAME])
    # c5 cell (y=3, x=4), size 256, square: centre (31.5 + 128, 31.5 + 96)
    gt = torch.tensor([[159.5 - 128, 127.5 - 128, 159.5 + 128, 127.5 + 128]])
    labels, matched = net.rpn.assign_targets_to_anchors(anchors, [{"boxes": gt}])
    exact = (anchors[0] == gt).all(dim=1)
    assert exact.sum() == 1
    assert labels[0][exact].item() == 1.0
    regression = net.rpn.box_coder.encode(matched, anchors)[0][exact]
    assert torch.allclose(regression, torch.zeros_like(regression), atol=1e-6)


def test_proposals_contract() -> None:
    torch.manual_seed(0)
    net = ProposalNetwork()
    sizes = [ORIGINAL, (1200, 960)]  # the second is narrower than the padded frame
    out = net.propose(_maps(batch=2), sizes, max_proposals=37)
    assert len(out) == 2
    for (boxes, scores), (w, h) in zip(out, sizes):
        assert boxes.dtype == np.float32 and scores.dtype == np.float32
        assert 0 < len(boxes) <= 37 and boxes.shape == (len(scores), 4)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (scores > 0).all() and (scores <= 1).all() and (np.diff(scores) <= 0).all()
    with pytest.raises(InvalidInputError, match="2 images but 1 sizes"):
        net.propose(_maps(batch=2), [ORIGINAL])
    with pytest.raises(InvalidInputError, match="lack"):
        net.propose({"c3": _maps()["c3"]}, [ORIGINAL])
    with pytest.raises(InvalidInputError, match="max_proposals"):
        net.propose(_maps(), [ORIGINAL], max_proposals=0)


def test_config_round_trip_through_plain_data() -> None:
    cfg = RpnConfig(width=32)
    raw = {k: (list(map(list, v)) if k == "anchor_sizes" else list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()}
    assert RpnConfig.from_dict(raw) == cfg
    with pytest.raises(InvalidInputError, match="same number of anchor sizes"):
        RpnConfig(anchor_sizes=((32.0,), (64.0, 90.0), (128.0,)))


def test_recall_table_against_brute_force() -> None:
    from engine.datasets.types import ImageAnn, ObjectAnn, RegionAnn

    images = [
        ImageAnn(image="a", width=100, height=100, objects=(ObjectAnn(1, (0, 0, 10, 10), "x"), ObjectAnn(2, (50, 50, 90, 90), "x")), regions=(RegionAnn(3, (0, 0, 90, 90), "r"),)),
        ImageAnn(image="b", width=100, height=100, objects=(ObjectAnn(4, (10, 10, 30, 30), "x"),), regions=()),
    ]
    proposals = [
        np.array([[50, 50, 90, 90], [0, 0, 85, 85], [0, 0, 10, 10]], np.float32),  # hits object 2, region (IoU 0.89), object 1 third
        np.array([[10, 10, 20, 30]], np.float32),  # IoU exactly 0.5 with object 4: not a hit (strictly greater)
    ]
    table = recall_table(proposals, images, ns=(1, 2, 3))
    assert table["images"] == 2
    assert table["objects"] == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}
    assert table["regions"] == {1: 0.0, 2: 1.0, 3: 1.0}


@pytest.fixture(scope="module")
def shipped_provider():
    from indexer.proposal_sources import RpnProposals

    return RpnProposals.load(None, device="cpu", max_proposals=20)


def test_rpn_provider_maps_serve_the_region_features(shipped_provider, tiny_corpus: Path) -> None:
    from indexer.images import load_image
    from indexer.region_features import RegionFeatureExtractor

    image = load_image(sorted((tiny_corpus / "images").iterdir())[0])
    boxes, scores = shipped_provider(Path("x.jpg"), image)
    w, h = image.size
    assert 0 < len(boxes) <= 20 and (np.diff(scores) <= 0).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    # one backbone pass serves proposals and region features: pooling its map equals the extractor's own pass
    extractor = RegionFeatureExtractor(backbone=shipped_provider.backbone)
    images = [image, load_image(sorted((tiny_corpus / "images").iterdir())[1])]
    maps, proposals = shipped_provider.propose_batch(images)
    # batching two images reorders float sums: the same boxes to well under a pixel
    np.testing.assert_allclose(proposals[0][0], boxes, atol=1e-2)
    boxes_per_image = [b for b, _ in proposals]
    assert set(extractor.levels) <= set(maps)  # the RPN's c3..c5 pass holds the key's c4 and c5
    pooled = extractor.from_feature_map(maps, [im.size for im in images], boxes_per_image)
    direct = extractor(images, boxes_per_image)
    for (maps_pooled, vectors_pooled), (maps_direct, vectors_direct), b in zip(pooled, direct, boxes_per_image):
        assert len(maps_pooled) == len(b)
        np.testing.assert_allclose(maps_pooled, maps_direct, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(vectors_pooled, vectors_direct, rtol=1e-5, atol=1e-5)


def test_index_with_rpn_proposals_records_the_source(tiny_corpus: Path, tmp_path: Path) -> None:
    from engine.api import Engine
    from engine.config import EngineConfig, IndexConfig
    from indexer.store import IndexStore

    with Engine(tmp_path / "idx", config=EngineConfig(device="cpu")) as engine:
        summary = engine.index(tiny_corpus, config=IndexConfig(proposals="rpn", batch_size=8))
    assert summary.errors == 0 and summary.processed == 16
    assert summary.regions_added <= 16 * 100
    with IndexStore.open(tmp_path / "idx") as store:
        path = str(sorted((tiny_corpus / "images").iterdir())[0].resolve())
        regions = store.regions_of_image(path)
    assert regions and {r.source for r in regions} == {"rpn"}
    scores = [r.objectness for r in regions]
    assert all(0 < s <= 1 for s in scores)


def test_unknown_proposal_source_is_refused(tmp_path: Path) -> None:
    from indexer.proposal_sources import PROPOSAL_CHOICES, create_proposal_provider

    assert PROPOSAL_CHOICES == ("auto", "rpn", "gt", "selective-search")
    with pytest.raises(InvalidInputError, match="choose one of auto, rpn, gt, selective-search"):
        create_proposal_provider("nope", tmp_path)


def test_rpn_provider_refuses_another_backbone(shipped_provider) -> None:
    from engine.errors import CheckpointError
    from indexer.proposal_sources import RpnProposals

    class _Other:
        version, max_size = "resnet18@torchvision-imagenet-x", 640

    with pytest.raises(CheckpointError, match="trained on efficientnet_lite0"):
        RpnProposals(network=shipped_provider.network, backbone=_Other())  # type: ignore[arg-type]


def _fixed_box_head(net: ProposalNetwork, quality_logit: float, deltas: tuple[float, float, float, float]) -> None:
    """Make the box head predict the same quality logit and deltas for every box."""
    assert net.box_head is not None
    with torch.no_grad():
        for layer in (net.box_head.fc1, net.box_head.fc2, net.box_head.out):
            layer.weight.zero_()
            layer.bias.zero_()
        net.box_head.out.bias.copy_(torch.tensor([quality_logit, *deltas]))


def test_the_box_head_refines_and_rescores_the_proposals() -> None:
    """A box head predicting fixed deltas moves the one confident anchor by them (Fast R-CNN Eq. 3 decoding) and
    its score becomes sqrt(predicted IoU x objectness) (quality_weight 0.5)."""
    net = ProposalNetwork(config=RpnConfig(box_head=16))
    cfg = net.config
    level, y, x = 1, 7, 11
    anchor = cfg.aspect_ratios.index(1.0) * len(cfg.anchor_sizes[level]) + 1  # 128 px square
    net.rpn.head = _OneHotHead(level, y, x, anchor, cfg.anchors_per_cell)
    _fixed_box_head(net, quality_logit=2.0, deltas=(1.0, -0.5, 0.0, 0.0))  # dx = 1.0 / 10 of the width, dy = -0.05
    (boxes, scores), = net.propose(_maps(), [ORIGINAL], max_proposals=50)
    centre = np.array([15.5 + 16 * x + 12.8, 15.5 + 16 * y - 6.4])
    expected = np.concatenate([centre - 64, centre + 64]) * 2
    np.testing.assert_allclose(boxes[0], expected, atol=1e-3)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    assert scores[0] == pytest.approx(np.sqrt(sig(2.0) * sig(5.0)), rel=1e-5)
    assert (np.diff(scores) <= 0).all() and (boxes[:, 2] <= ORIGINAL[0]).all() and (boxes[:, 3] <= ORIGINAL[1]).all()


def test_a_box_head_predicting_nothing_leaves_the_proposals_as_they_are() -> None:
    """Zero deltas and one quality for every box: the same boxes in the same order as without a box head."""
    net = ProposalNetwork(config=RpnConfig(box_head=8))
    _fixed_box_head(net, quality_logit=0.0, deltas=(0.0, 0.0, 0.0, 0.0))
    plain = ProposalNetwork(config=RpnConfig())
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("box_head.")})
    (refined, _), = net.propose(_maps(), [ORIGINAL], max_proposals=1000)
    (unrefined, _), = plain.propose(_maps(), [ORIGINAL], max_proposals=1000)
    np.testing.assert_allclose(refined, unrefined, atol=1e-3)


def test_box_head_training_samples_cover_every_iou_range() -> None:
    from engine.models.rpn_box_head import IOU_BINS, sample_training_boxes

    target = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    widths = torch.linspace(101, 1000, 400)  # IoU 100 / w, from ~0.99 down to 0.1
    boxes = torch.stack([torch.zeros_like(widths), torch.zeros_like(widths), widths, torch.full_like(widths, 100.0)], 1)
    g = torch.Generator().manual_seed(0)
    picked, iou, matched = sample_training_boxes(boxes, target, per_bin=5, generator=g)
    np.testing.assert_allclose(iou.numpy(), (100.0 / picked[:, 2]).numpy(), rtol=1e-5)
    counts = np.bincount(np.digitize(iou.numpy(), IOU_BINS), minlength=4)
    assert counts.tolist() == [5, 5, 5, 5]
    assert (matched == target).all()
    none, iou0, same = sample_training_boxes(boxes, torch.zeros((0, 4)), per_bin=3, generator=g)
    assert len(none) == 3 and (iou0 == 0).all() and torch.equal(same, none)


def test_the_box_head_loss_trains_only_the_box_head() -> None:
    net = ProposalNetwork(config=RpnConfig(box_head=8))
    targets = [torch.tensor([[100.0, 80.0, 300.0, 260.0], [400.0, 300.0, 480.0, 380.0]])]
    losses = net.box_head_loss(_maps(), [FRAME], targets, torch.Generator().manual_seed(0))
    assert set(losses) == {"quality", "box"} and all(torch.isfinite(v) for v in losses.values())
    (losses["quality"] + losses["box"]).backward()
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith("box_head."))
    assert all(p.grad is not None for p in net.box_head.parameters())
    assert net.training  # left in the mode it was in
    with pytest.raises(InvalidInputError, match="no box head"):
        ProposalNetwork().box_head_loss(_maps(), [FRAME], targets, torch.Generator())


def test_a_config_written_before_the_box_head_loads_without_one() -> None:
    raw = RpnConfig().to_dict()
    del raw["box_head"], raw["quality_weight"]
    cfg = RpnConfig.from_dict(raw)
    assert cfg.box_head == 0 and ProposalNetwork(config=cfg).box_head is None
    with pytest.raises(InvalidInputError, match="quality_weight"):
        RpnConfig(box_head=8, quality_weight=1.5)


def test_a_low_rank_box_head_is_the_full_head_with_the_product_of_its_first_two_layers() -> None:
    """``box_rank`` factors the first layer through a bottleneck: the same function as a full head whose first
    layer is the product, and fewer weights; a config without ``box_rank`` (before it) has none."""
    low = ProposalNetwork(config=RpnConfig(box_head=8, box_rank=3))
    full = ProposalNetwork(config=RpnConfig(box_head=8))
    assert low.box_head is not None and full.box_head is not None
    state = {k: v for k, v in low.state_dict().items() if not k.startswith("box_head.")}
    head = {k.removeprefix("box_head."): v for k, v in low.state_dict().items() if k.startswith("box_head.")}
    head["fc1.weight"] = head.pop("fc1.weight") @ head.pop("reduce.weight")
    full.load_state_dict(state, strict=False)
    full.box_head.load_state_dict(head)
    (a, sa), = low.propose(_maps(), [ORIGINAL], max_proposals=100)
    (b, sb), = full.propose(_maps(), [ORIGINAL], max_proposals=100)
    np.testing.assert_allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-6)
    assert sum(p.numel() for p in low.box_head.parameters()) < sum(p.numel() for p in full.box_head.parameters()) / 2
    raw = RpnConfig(box_head=8).to_dict()
    del raw["box_rank"]
    assert RpnConfig.from_dict(raw).box_rank == 0
    with pytest.raises(InvalidInputError, match="box_rank"):
        RpnConfig(box_head=8, box_rank=-1)
