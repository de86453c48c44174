"""Commands that load no model start without importing torch (1–3 s of the start-up here).

Each command runs in a fresh interpreter (``sys.modules`` of this test process already holds torch);
the check is on what gets imported, not on a timing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import json, sys
from click.testing import CliRunner
from engine.cli import main
result = CliRunner().invoke(main, json.loads(sys.argv[1]), catch_exceptions=False)
print(json.dumps({"exit": result.exit_code, "output": result.output, "heavy": sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules), "store": sorted(m for m in ("faiss", "sqlalchemy") if m in sys.modules)}))
"""


def _run(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def index_copy(tiny_engine, tmp_path: Path) -> Path:
    """A copy of the tiny index per test (one test removes an image from it)."""
    tiny_engine.close()
    dst = tmp_path / "idx"
    shutil.copytree(tiny_engine.index_dir, dst)
    return dst


@pytest.mark.slow
def test_commands_without_models_do_not_import_torch(index_copy: Path, tiny_corpus: Path) -> None:
    image = sorted((tiny_corpus / "images").iterdir())[0]
    commands = [
        ["--help"],
        ["info", "--index", str(index_copy), "--errors"],
        ["info", "--index", str(index_copy), "--json"],
        ["models"],
        ["remove", "--index", str(index_copy), str(image)],
        ["compact", "--index", str(index_copy)],
    ]
    for args in commands:
        result = _run(args)
        assert result["exit"] == 0, (args, result["output"])
        assert result["heavy"] == [], f"engine {' '.join(args)} imported {result['heavy']}"
        if args == ["--help"]:  # not even the store's libraries
            assert result["store"] == [], f"engine --help imported {result['store']}"


@pytest.mark.slow
def test_query_imports_torch_only_when_it_runs(index_copy: Path) -> None:
    """The probe itself is sound: a command that loads a model does import torch."""
    result = _run(["query", "--index", str(index_copy), "--region-id", "1", "-k", "1", "--json"])
    assert result["exit"] == 0, result["output"]
    assert "torch" in result["heavy"]
