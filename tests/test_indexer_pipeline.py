"""The indexing pipeline over a corpus with things it cannot index: each is an error with a reason."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.api import Engine
from engine.cli import main
from engine.config import EngineConfig, IndexConfig
from engine.diskspace import is_disk_full
from engine.errors import DiskFullError
from indexer.pipeline import INDEX_DISK_ADVICE


@pytest.mark.slow
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


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of feature rows and every fsync fails with ENOSPC, as on a full disk."""

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    monkeypatch.setattr(os, "fsync", full)


def _small_corpus(corpus: Path, keep: int = 3) -> Path:
    for path in sorted((corpus / "images").glob("*.jpg"))[keep:]:
        path.unlink()
    return corpus


@pytest.mark.slow
def test_disk_full_while_indexing_is_one_line_and_a_rerun_completes(corpus_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus, index_dir = _small_corpus(corpus_copy), tmp_path / "idx"
    args = ["index", str(corpus), "--index", str(index_dir), "--device", "cpu", "--proposals", "gt", "-q"]
    with Engine(index_dir, config=EngineConfig(device="cpu")) as engine:  # the index exists; the disk fills up later
        engine.index(_one_image_corpus(corpus, tmp_path / "one"), config=IndexConfig(proposals="gt"))
    with monkeypatch.context() as patch:
        _disk_full(patch)
        result = CliRunner().invoke(main, args)
        with pytest.raises(DiskFullError) as info, Engine(index_dir, config=EngineConfig(device="cpu")) as engine:
            engine.index(corpus, config=IndexConfig(proposals="gt"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: disk full while indexing {corpus.resolve()} into {index_dir.resolve()}: {INDEX_DISK_ADVICE}"]
    assert is_disk_full(info.value.__cause__)  # chained for logging
    rerun = CliRunner().invoke(main, [*args, "--json"])
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.output)["processed"] == 3
    with Engine(index_dir, config=EngineConfig(device="cpu")) as engine:
        assert engine.info().images == 4


def _one_image_corpus(corpus: Path, root: Path) -> Path:
    """Another corpus (one image of ``corpus``, with its annotation line)."""
    (root / "images").mkdir(parents=True)
    first = sorted((corpus / "images").glob("*.jpg"))[0]
    shutil.copy(first, root / "images" / first.name)
    lines = [line for line in (corpus / "annotations.jsonl").read_text().splitlines() if first.name in line]
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_disk_full_while_compacting_names_engine_compact(corpus_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus, index_dir = _small_corpus(corpus_copy), tmp_path / "idx"
    with Engine(index_dir, config=EngineConfig(device="cpu")) as engine:
        engine.index(corpus, config=IndexConfig(proposals="gt"))
        engine.remove([sorted((corpus / "images").glob("*.jpg"))[0]])
    with monkeypatch.context() as patch:
        _disk_full(patch)
        result = CliRunner().invoke(main, ["compact", "--index", str(index_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: disk full while compacting {index_dir}:") and "re-run `engine compact`" in line and "engine index" not in line
    result = CliRunner().invoke(main, ["compact", "--index", str(index_dir)])  # with space again
    assert result.exit_code == 0 and result.output.startswith("compacted")
