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


@pytest.fixture()
def corpus_copy(tiny_corpus: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny corpus."""
    dst = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, dst)
    return dst
