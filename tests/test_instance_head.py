"""The instance head of region-only queries' stage 2: the model and its checkpoint, the loss, the labels
from queries, the layout rescorer's sum with it, and ``engine train instance-head`` on a tiny corpus."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.datasets.types import Dataset, ImageAnn, RegionAnn, RetrievalQuery
from engine.errors import CheckpointError, InvalidInputError
from engine.models.checkpoint import Manifest
from engine.models.instance_head import MODEL_NAME, InstanceHead, InstanceHeadConfig, supervised_contrastive
from engine.training.instance_head import query_labels
from indexer.arrays import MAPS_ARRAY, VECTOR_ARRAY
from query.rerank import LayoutRescorer, layout_similarity

KEY = "efficientnet_lite0:c4+c5:mean:roi7:s2+pcaw:0123456789ab"


def _head(seed: int = 0) -> InstanceHead:
    torch.manual_seed(seed)
    return InstanceHead(InstanceHeadConfig(key_version=KEY, map_shape=(4, 3, 3), key_dim=5, hidden=16, out_dim=6)).eval()


def test_embeddings_are_unit_vectors_and_survive_the_checkpoint(tmp_path: Path) -> None:
    head = _head()
    rng = np.random.default_rng(0)
    maps, keys = rng.normal(size=(7, 4, 3, 3)).astype(np.float16), rng.normal(size=(7, 5)).astype(np.float32)
    out = head.embed(maps, keys)
    assert out.shape == (7, 6) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(head.embed(maps * 2, keys), out, atol=1e-5)  # the map is L2-normalised first
    assert head.embed(maps[:0], keys[:0]).shape == (0, 6)
    path = tmp_path / "ih.pt"
    head.save(path, Manifest(model=MODEL_NAME, version="1", config=head.config.to_dict(), command="test", data="", seed=0, metrics={}))
    loaded = InstanceHead.from_checkpoint(path)
    assert loaded.config == head.config and loaded.config.map_shape == (4, 3, 3)
    np.testing.assert_allclose(loaded.embed(maps, keys), out, atol=1e-6)
    loaded.check_key(KEY)
    with pytest.raises(CheckpointError, match="train one for it with `engine train instance-head"):
        loaded.check_key(KEY.replace("0123", "9999"))
    with pytest.raises(InvalidInputError, match=r"maps \[N, 4, 3, 3\]"):
        loaded.embed(maps[:, :3], keys)
    with pytest.raises(InvalidInputError, match="positive"):
        InstanceHeadConfig(key_version=KEY, map_shape=(4, 3, 0), key_dim=5)


def test_supervised_contrastive_prefers_embeddings_grouped_by_label() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    grouped = torch.nn.functional.normalize(torch.eye(3).repeat_interleave(2, dim=0) + 0.01, dim=1)
    mixed = grouped[torch.tensor([0, 2, 4, 1, 3, 5])]
    assert supervised_contrastive(grouped, labels, 0.1) < supervised_contrastive(mixed, labels, 0.1)
    with pytest.raises(InvalidInputError, match="two boxes of one label"):
        supervised_contrastive(grouped[:3:2], torch.tensor([0, 1]), 0.1)


def test_query_labels_merge_queries_that_share_a_region() -> None:
    regions = lambda *ids: tuple(RegionAnn(id=i, box=(0, 0, 5, 5), description="x") for i in ids)  # noqa: E731
    images = [ImageAnn(image="a.jpg", width=9, height=9, regions=regions(1, 2)), ImageAnn(image="b.jpg", width=9, height=9, regions=regions(3, 4, 5))]
    q = lambda rid, *pos: RetrievalQuery(image="a.jpg", region=(0, 0, 5, 5), text="x", region_id=rid, positives=pos)  # noqa: E731
    labels = query_labels(Dataset(root=Path("."), images=images, queries=[q(1, 3), q(3, 4), q(2, 5, 99)]))
    assert labels[1] == labels[3] == labels[4] != labels[2] == labels[5]
    assert 99 not in labels and set(labels) == {1, 2, 3, 4, 5}


class _Store:
    def __init__(self, maps: np.ndarray, keys: np.ndarray) -> None:
        self.arrays = {MAPS_ARRAY: maps, VECTOR_ARRAY: keys}

    def read_arrays(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self.arrays[name][rows]


def test_layout_rescorer_adds_the_instance_cosine() -> None:
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(5, 4, 3, 3)).astype(np.float16)
    keys = rng.normal(size=(5, 5)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    store, head, rows = _Store(maps, keys), _head(), np.array([4, 0, 2])
    query_map, query_key = maps[1].astype(np.float32), keys[1]
    plain = LayoutRescorer(store=store, vector=query_key, query_map=query_map, weight=2.0)(rows)
    assert plain.instance is None and "instance" not in plain.parts()
    off = LayoutRescorer(store=store, vector=query_key, query_map=query_map, weight=2.0, head=head, head_weight=0.0)(rows)
    np.testing.assert_array_equal(off.final, plain.final)
    scored = LayoutRescorer(store=store, vector=query_key, query_map=query_map, weight=2.0, head=head, head_weight=3.0)(rows)
    instance = head.embed(maps[rows], keys[rows]) @ head.embed(query_map[None], query_key[None])[0]
    np.testing.assert_allclose(scored.instance, instance, atol=1e-6)
    layout = layout_similarity(query_map, maps[rows])
    np.testing.assert_allclose(scored.final, (keys[rows] @ query_key + 2.0 * layout + 3.0 * instance) / 6.0, atol=1e-5)
    assert set(scored.parts()) == {"visual", "layout", "instance"}
    itself = LayoutRescorer(store=store, vector=query_key, query_map=query_map, weight=2.0, head=head, head_weight=3.0)(np.array([1]))
    assert itself.final[0] == pytest.approx(1.0, abs=1e-3)  # a region matched with itself still scores 1


@pytest.mark.slow
def test_engine_train_instance_head_cli(grn_corpus: Path, tmp_path: Path) -> None:
    from engine.cli import main

    out = tmp_path / "ih.pt"
    result = CliRunner().invoke(main, ["train", "instance-head", "--data", str(grn_corpus), "--out", str(out), "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.with_suffix(".json").read_text())
    m = manifest["metrics"]
    assert manifest["model"] == "instance-head" and manifest["config"]["key_version"].startswith("efficientnet_lite0:c4+c5:mean:roi7:s2+pcaw:")
    assert m["train_boxes"] > 0 and m["train_labels"] >= 2 and m["best_epoch"] in (1, 2) and m["val_queries"] > 0
    assert [h["epoch"] for h in manifest["extra"]["history"]] == [1, 2]
    assert max(h["val_r1"] for h in manifest["extra"]["history"]) == round(m["val_r1"], 4)  # the best val epoch is kept
    head = InstanceHead.from_checkpoint(out)
    assert head.config.map_shape == (112, 7, 7) and head.config.key_dim == 432


def test_eval_search_refuses_an_instance_weight_with_another_key(tmp_path: Path) -> None:
    from engine.cli import main

    result = CliRunner().invoke(main, ["eval", "search", "--data", str(tmp_path), "--key-whitening", "none", "--instance-weight", "2"])
    assert result.exit_code == 2 and "--instance-weight needs the default visual key" in result.output and "Traceback" not in result.output
