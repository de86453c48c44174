"""MCB and the GRN family on either text encoding (:mod:`engine.models.word_features`): ``engine train mcb`` /
``engine train grn-fc`` with MiniLM (the default) and with ``--text-encoder vocab``, and the shipped
checkpoints (written with vocabularies, before MiniLM) loading as ``vocab`` with the scores they gave before."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from engine.cli import main
from engine.models.checkpoint import PACKAGE_CHECKPOINTS, load_checkpoint, read_manifest
from engine.models.mcb import GroundingModel
from engine.models.retrieval import RegionRetrievalModel
from engine.models.vocab import Vocabulary, tokenize
from engine.models.word_features import MiniLMAdapter, MiniLMWords


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(model: str, data: Path, out: Path, *extra: str) -> Path:
    args = ["train", model, "--data", str(data), "--out", str(out), "--epochs", "1", "--seed", "0", "--device", "cpu", "--quiet", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out} (")
    return out


def _training_words(data: Path) -> set[str]:
    from engine.datasets.annotations import read_dataset

    train = read_dataset(data).split("train")
    texts = [r.description for im in train.images for r in im.regions] + [q.text for q in train.queries]
    texts += [p.text for im in train.images for p in _phrases(im)]
    return {w for t in texts for w in tokenize(t)}


def _phrases(image):  # noqa: ANN001, ANN202
    from engine.protocols.attention import image_phrases

    return image_phrases(image)


UNSEEN = ("a red zebra", "a red giraffe")
"""Two texts that differ only in a word no synthetic corpus holds: MiniLM reads them apart, a vocabulary as ``<unk>``."""


def _maps(n: int = 12) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 112, 7, 7)).astype(np.float32)


# --------------------------------------------------------------------------- GRN family: engine train grn-fc


@pytest.fixture(scope="module")
def grn_minilm(grn_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train("grn-fc", grn_corpus, tmp_path_factory.mktemp("grn-minilm") / "grn-fc.pt")


@pytest.fixture(scope="module")
def grn_vocab(grn_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train("grn-fc", grn_corpus, tmp_path_factory.mktemp("grn-vocab") / "grn-fc.pt", "--text-encoder", "vocab")


def test_train_grn_fc_with_minilm_by_default(grn_minilm: Path, grn_corpus: Path) -> None:
    _, payload = load_checkpoint(grn_minilm)
    assert payload["vocab"]["kind"] == "minilm" and payload["config"]["word_features"] == "minilm"
    manifest = json.loads(grn_minilm.with_suffix(".json").read_text())
    assert manifest["config"]["text"].startswith("MiniLMWords(") and "--text-encoder" not in manifest["command"]
    model = RegionRetrievalModel.from_checkpoint(grn_minilm)
    assert isinstance(model.vocab, MiniLMWords) and isinstance(model.net.text_encoder.embedding, MiniLMAdapter)
    assert not {"zebra", "giraffe"} & _training_words(grn_corpus)
    maps = _maps()
    scores = model.score(maps[0], UNSEEN[0], maps)
    assert scores.shape == (len(maps),) and np.isfinite(scores).all()
    # words never seen in training still mean something: "zebra" and "giraffe" are read apart
    assert not torch.allclose(model.encode_text(UNSEEN[0]), model.encode_text(UNSEEN[1]))


def test_train_grn_fc_with_the_vocabulary_ablation(grn_vocab: Path, grn_corpus: Path) -> None:
    from engine.datasets.annotations import read_dataset

    _, payload = load_checkpoint(grn_vocab)
    assert isinstance(payload["vocab"], list) and payload["config"]["word_features"] == "vocab"
    manifest = json.loads(grn_vocab.with_suffix(".json").read_text())
    assert "--text-encoder vocab" in manifest["command"] and manifest["config"]["text"].startswith("Vocabulary(")
    model = RegionRetrievalModel.from_checkpoint(grn_vocab)
    train = read_dataset(grn_corpus).split("train")
    assert model.vocab == Vocabulary.build([r.description for im in train.images for r in im.regions] + [q.text for q in train.queries])
    assert isinstance(model.net.text_encoder.embedding, nn.Embedding)
    assert np.isfinite(model.score(_maps()[0], UNSEEN[0], _maps())).all()
    # both unknown words are <unk>: the two texts are one
    torch.testing.assert_close(model.encode_text(UNSEEN[0]), model.encode_text(UNSEEN[1]))


@pytest.mark.parametrize("which", ["grn_minilm", "grn_vocab"])
def test_a_text_without_words_is_refused_by_either_encoding(which: str, request: pytest.FixtureRequest) -> None:
    from engine.errors import InvalidInputError

    model = RegionRetrievalModel.from_checkpoint(request.getfixturevalue(which))
    for text in ("", "?!"):
        with pytest.raises(InvalidInputError, match="holds no words"):
            model.encode_text(text)


@pytest.mark.parametrize("method", ["visual", "vl-lstm", "grn-lstm"])
def test_other_grn_methods_train_on_minilm(method: str, grn_corpus: Path, tmp_path: Path) -> None:
    """The text paths unlike grn-fc's: none (``visual``: no text encoding stored), the words themselves
    (``vl-lstm``), the LSTM sentence encoder (``grn-lstm``)."""
    from engine.training.grn import GRNTrainConfig, train_grn
    from engine.training.options import TrainOptions

    out = tmp_path / f"{method}.pt"
    manifest = train_grn(method, TrainOptions(data=grn_corpus, out=out, epochs=1, progress=False, seed=1), train_config=GRNTrainConfig(batch_size=8, proposals=False))
    _, payload = load_checkpoint(out)
    model = RegionRetrievalModel.from_checkpoint(out)
    maps = _maps(6)
    assert np.isfinite(model.score(maps[0], UNSEEN[0], maps)).all()
    if method == "visual":
        assert payload["vocab"] is None and model.vocab is None and manifest.config["text"] is None
    else:
        assert payload["vocab"]["kind"] == "minilm" and isinstance(model.vocab, MiniLMWords)
        a, b = (model.embed(maps, model.encode_text(t)) for t in UNSEEN)
        assert not np.allclose(a, b)  # the unseen words gate the regions differently


def test_vl_lstm_reads_minilm_features_end_to_end() -> None:
    """The Visual-Language LSTM keeps the words themselves as its text representation: MiniLM features ``[T, 384]``."""
    from engine.models.grn import create_retrieval_net, method_config

    torch.manual_seed(0)
    words = MiniLMWords()
    model = RegionRetrievalModel(net=create_retrieval_net(method_config("vl-lstm", text_dim=8, embed_dim=8), vocab_size=len(words)), vocab=words)
    text = model.encode_text(UNSEEN[0])
    assert text.ndim == 2 and text.shape[1] == 384
    maps = _maps(5)
    scores = model.score(maps[0], UNSEEN[0], maps)
    assert np.isfinite(scores).all() and scores[0] == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- MCB: engine train mcb


@pytest.fixture(scope="module")
def mcb_minilm(split_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train("mcb", split_corpus, tmp_path_factory.mktemp("mcb-minilm") / "mcb.pt")


@pytest.fixture(scope="module")
def mcb_vocab(split_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train("mcb", split_corpus, tmp_path_factory.mktemp("mcb-vocab") / "mcb.pt", "--text-encoder", "vocab")


def _levels() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"c3": torch.randn(40, 8, 8, generator=gen), "c4": torch.randn(112, 4, 4, generator=gen)}


def test_train_mcb_with_minilm_by_default(mcb_minilm: Path, split_corpus: Path) -> None:
    _, payload = load_checkpoint(mcb_minilm)
    assert payload["vocab"]["kind"] == "minilm" and payload["config"]["word_features"] == "minilm"
    model = GroundingModel.from_checkpoint(mcb_minilm)
    assert isinstance(model.vocab, MiniLMWords) and isinstance(model.net.text.embedding, MiniLMAdapter)
    assert model.manifest.config["text"].startswith("MiniLMWords(")
    assert not {"zebra", "giraffe"} & _training_words(split_corpus)
    grids = model.attention(_levels(), (64, 64), list(UNSEEN))
    assert grids.shape == (2, 4, 4) and np.isfinite(grids).all()
    box = model.boxes(_levels(), (64, 64), [UNSEEN[0]])[0]
    assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64


def test_train_mcb_with_the_vocabulary_ablation(mcb_vocab: Path, split_corpus: Path) -> None:
    from engine.datasets.annotations import read_dataset

    _, payload = load_checkpoint(mcb_vocab)
    assert isinstance(payload["vocab"], list) and payload["config"]["word_features"] == "vocab"
    model = GroundingModel.from_checkpoint(mcb_vocab)
    assert "--text-encoder vocab" in model.manifest.command
    train = read_dataset(split_corpus).split("train")
    assert model.vocab == Vocabulary.build([p.text for im in train.images for p in _phrases(im)])
    assert isinstance(model.net.text.embedding, nn.Embedding)
    grids = model.attention(_levels(), (64, 64), list(UNSEEN))
    np.testing.assert_array_equal(grids[0], grids[1])  # "zebra" and "giraffe" are both <unk>


# --------------------------------------------------------------------------- the shipped checkpoints (vocabularies)

SHIPPED_GRN = {
    # name: (sha256 the values were taken from, scores of the two texts below on _shipped_maps(), encode_text(...)[:4])
    "grn": (
        "c86d77c9705f0c7adeec082450fa875f0e9a00e0189eb1c591e3a54e7132861a",
        [1.0000001192092896, 0.9892862439155579, 0.9965898990631104, 0.9877616763114929, 0.9823732972145081, 0.9945739507675171],
        [1.0, 0.9950026273727417, 0.9970365762710571, 0.9878184795379639, 0.9908716678619385, 0.9970102310180664],
        [0.4627680778503418, 0.3223709762096405, 0.14864784479141235, 0.3991883397102356],
    ),
    "vl-lstm": (
        "535c41d7d1a3b4cc731800b79b5b86272b7529912701300a9417bb567d2b49b5",
        [0.9999998807907104, 0.9996684193611145, 0.9996975660324097, 0.9990140795707703, 0.9998152852058411, 0.999960720539093],
        [0.9999998807907104, 0.9995393753051758, 0.9996675848960876, 0.9984394311904907, 0.9996917247772217, 0.9999474883079529],
        [2, 9, 29, 23],
    ),
    "grn-lstm": (
        "a5eb83b989673cb68b6a203afda4231d6d9c28e15aafa5a33b38fa7b77cb5488",
        [0.9999999403953552, 0.9948210716247559, 0.9890649914741516, 0.9899998307228088, 0.9904669523239136, 0.9924909472465515],
        [1.0, 0.9675890207290649, 0.9708771705627441, 0.9698879718780518, 0.9457454681396484, 0.979444682598114],
        [-0.2182379961013794, -0.08313669264316559, 0.19460038840770721, -0.2620764374732971],
    ),
}
"""Scores the shipped checkpoints gave with the engine before MiniLM (commit 4578a59, vocabulary models only)."""

SHIPPED_MCB = (
    "bc30e38d8341159154d7ff96899ac0641384769c1c6646c242642c92024a06fc",
    [0.0005837440257892013, 0.005209575407207012, 0.33798718452453613, 7.301391178771155e-06, 0.0023378836922347546, 0.0028080972842872143, 0.45984065532684326, 6.244951578082691e-07],
)
"""``mcb.pt``'s attention (the top-left 2x2 cells of two phrases on :func:`_levels`) before MiniLM."""

SHIPPED_TEXTS = ("a red circle left of a blue square", "a quizzical zebra juggling")


def _shipped(name: str, sha: str) -> Path:
    path = PACKAGE_CHECKPOINTS / f"{name}.pt"
    if not path.is_file():
        pytest.skip(f"{name}.pt is not installed")
    if read_manifest(path).sha256 != sha:
        pytest.skip(f"{name}.pt was retrained since its reference scores were taken")
    return path


@pytest.mark.parametrize("name", sorted(SHIPPED_GRN))
def test_shipped_grn_checkpoints_read_their_vocabulary_and_score_as_before(name: str) -> None:
    sha, first, second, text_head = SHIPPED_GRN[name]
    path = _shipped(name, sha)
    _, payload = load_checkpoint(path)
    assert "word_features" not in payload["config"]  # written before MiniLM
    model = RegionRetrievalModel.from_checkpoint(path)
    assert model.net.config.word_features == "vocab" and isinstance(model.vocab, Vocabulary)
    maps = _maps(6)
    np.testing.assert_allclose(model.score(maps[0], SHIPPED_TEXTS[0], maps), first, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.score(maps[0], SHIPPED_TEXTS[1], maps), second, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.encode_text(SHIPPED_TEXTS[0])[:4].tolist(), text_head, rtol=0, atol=1e-6)


def test_shipped_mcb_checkpoint_reads_its_vocabulary_and_attends_as_before() -> None:
    sha, head = SHIPPED_MCB
    path = _shipped("mcb", sha)
    _, payload = load_checkpoint(path)
    assert "word_features" not in payload["config"]
    model = GroundingModel.from_checkpoint(path)
    assert model.config.word_features == "vocab" and isinstance(model.vocab, Vocabulary)
    assert isinstance(model.net.text.embedding, nn.Embedding)
    grids = model.attention(_levels(), (64, 64), ["the red circle", "a blue square above a zebra"])
    np.testing.assert_allclose(grids[:, :2, :2].reshape(-1), head, rtol=0, atol=1e-6)
