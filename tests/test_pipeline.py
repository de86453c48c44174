"""The indexing pipeline over a corpus with things it cannot index: each is an error with a reason."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engine.api import Engine
from engine.config import EngineConfig, IndexConfig


def test_unindexable_files_and_unlistable_folder_are_recorded_and_nothing_is_dropped(corpus_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = corpus_copy / "images"
    sub = images / "sub"
    sub.mkdir()
    shutil.move(images / "000000.jpg", sub / "000000.jpg")
    (corpus_copy / "annotations.jsonl").write_text((corpus_copy / "annotations.jsonl").read_text().replace("images/000000.jpg", "images/sub/000000.jpg"))
    with Engine(tmp_path / "idx", config=EngineConfig(device="cpu")) as engine:
        first = engine.index(corpus_copy, config=IndexConfig(proposals="gt"))
        assert first.errors == 0
        regions = engine.info().regions

        Path(os.fsdecode(os.fsencode(images) + b"/caf\xe9.jpg")).write_bytes((images / "000001.jpg").read_bytes())
        os.mkfifo(images / "pipe.jpg")
        os.symlink(images / "missing.jpg", images / "dangling.jpg")
        os.symlink("loop.jpg", images / "loop.jpg")
        real_scandir = os.scandir

        def scandir(path):  # noqa: ANN001, ANN202 - listing sub/ fails (tests run as root: chmod would not stop it)
            if Path(path) == sub.resolve():
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
        second = engine.index(corpus_copy, config=IndexConfig(proposals="gt"))
        assert (second.processed, second.removed, second.errors) == (0, 0, 5)
        assert engine.info().regions == regions  # sub/000000.jpg stays indexed
        errors = dict(engine.errors())
        root = images.resolve()
        assert set(errors) == {str(root / n) for n in ("caf\\xe9.jpg", "pipe.jpg", "dangling.jpg", "loop.jpg", "sub")}
        assert "cannot list folder" in errors[str(root / "sub")]
        assert "not a regular file" in errors[str(root / "pipe.jpg")]

        monkeypatch.setattr(os, "scandir", real_scandir)  # readable again: the folder's error goes, its image stays
        third = engine.index(corpus_copy, config=IndexConfig(proposals="gt"))
        assert (third.processed, third.removed, third.errors) == (0, 1, 4)
        assert engine.info().regions == regions
