"""Shared fixtures: a tiny synthetic corpus and an index of it, built once per test session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.synth import SynthConfig, generate_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic 160x160 scenes with annotations and queries (read-only: copy before changing it)."""
    root = tmp_path_factory.mktemp("corpus") / "corpus"
    generate_corpus(root, SynthConfig(images=16, seed=7, size=160))
    return root


@pytest.fixture(scope="session")
def tiny_engine(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """An :class:`Engine` over an index of :func:`tiny_corpus` (GT boxes), CPU."""
    from engine.api import Engine
    from engine.config import EngineConfig, IndexConfig

    index_dir = tmp_path_factory.mktemp("index") / "idx"
    engine = Engine(index_dir, config=EngineConfig(device="cpu"))
    engine.index(tiny_corpus, config=IndexConfig(proposals="gt"))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def split_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 scenes of 128x128; seed 2 gives 8 train, 2 val and 2 test images (training commands; read-only)."""
    root = tmp_path_factory.mktemp("train") / "corpus"
    generate_corpus(root, SynthConfig(images=12, size=128, seed=2))
    return root


@pytest.fixture(scope="session")
def grn_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 scenes of 128 px with few meanings and half of them training, so that val and test queries are
    answerable (GRN training and retrieval evaluation; read-only: its backbone cache fills as tests run)."""
    root = tmp_path_factory.mktemp("grn") / "corpus"
    generate_corpus(root, SynthConfig(images=32, seed=1, size=128, meaning_pool=4, split_fractions=(0.5, 0.25, 0.25)), progress=False)
    return root


@pytest.fixture(scope="session")
def grn_fc_checkpoint(grn_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``grn-fc`` trained one epoch on :func:`grn_corpus`."""
    from engine.training.grn import GRNTrainConfig, train_grn
    from engine.training.options import TrainOptions

    out = tmp_path_factory.mktemp("ckpt") / "grn-fc.pt"
    train_grn("grn-fc", TrainOptions(data=grn_corpus, out=out, epochs=1, progress=False), train_config=GRNTrainConfig(batch_size=8))
    return out


@pytest.fixture()
def corpus_copy(tiny_corpus: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny corpus."""
    dst = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, dst)
    return dst


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny tensors, where extra threads only spin (CI cores are shared)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
