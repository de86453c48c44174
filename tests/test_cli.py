"""The command line through click's CliRunner: output formats, one-line errors, help texts."""
from __future__ import annotations

import builtins
import errno
import io
import json
from pathlib import Path

import PIL.Image
import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.datasets.annotations import read_annotations


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def cli_index(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    index_dir = tmp_path_factory.mktemp("cli") / "idx"
    result = CliRunner().invoke(main, ["index", str(tiny_corpus), "--index", str(index_dir), "--device", "cpu", "--proposals", "gt", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert set(summary) == {"processed", "unchanged", "removed", "regions_added", "errors", "seconds"}
    assert summary["processed"] == len(read_annotations(tiny_corpus)) and summary["errors"] == 0
    return index_dir


def _query_args(corpus: Path) -> tuple[str, str]:
    ann = read_annotations(corpus)[0]
    return str(corpus / ann.image), ",".join(f"{v:g}" for v in ann.regions[0].box)


def test_query_json_and_pictures(runner: CliRunner, cli_index: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    image, region = _query_args(tiny_corpus)
    vis = tmp_path / "vis"
    result = runner.invoke(main, ["query", "--index", str(cli_index), "--image", image, "--region", region, "-k", "3", "--json", "--save-vis", str(vis)])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)["hits"]
    assert len(hits) == 3 and set(hits[0]) == {"image", "box", "score", "region_id", "scores"} and set(hits[0]["scores"]) == {"visual", "layout", "instance"}
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert sorted(p.name for p in vis.iterdir()) == ["contact_sheet.png", "hit_01.png", "hit_02.png", "hit_03.png", "query.png"]


def test_query_table_and_env_var(runner: CliRunner, cli_index: Path, tiny_corpus: Path) -> None:
    image, region = _query_args(tiny_corpus)
    result = runner.invoke(main, ["query", "--image", image, "--region", region, "-k", "2"], env={"ENGINE_INDEX": str(cli_index)})
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:4] == ["rank", "score", "region", "box"] and len(lines) == 3


def test_info_json_and_errors(runner: CliRunner, cli_index: Path) -> None:
    result = runner.invoke(main, ["info", "--index", str(cli_index), "--json", "--errors"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert {"images", "regions", "errors", "index_type", "device"} <= set(info)
    assert info["error_files"] == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{missing}"], "does not exist"),
        (["--image", "{image}", "--region", "0,0,99999,10"], "outside"),
        (["--image", "{image}", "--region", "30,30,10,10"], "empty"),
        (["--image", "{image}", "--region", "1,2,three,4"], "four comma-separated numbers"),
        (["--image", "{image}", "-k", "0"], "0"),
        (["--image", "{image}", "--text", " "], "empty"),
        (["--text", "?! ..."], "holds no words"),
        (["--region", "1,2,3,4"], "--region needs --image"),
        ([], "needs an image"),
        (["--region-id", str(2**63)], "not in the range 0<=x<=9223372036854775807"),
        (["--region-id", str(2**63 - 1)], "is not in index"),
        (["--image", "{image}", "--text", "a red circle", "--weight-text", "nan"], "not a finite weight from 0 to 100"),
        (["--image", "{image}", "--text", "a red circle", "--weight-text", "inf"], "not a finite weight"),
        (["--image", "{image}", "--text", "a red circle", "--weight-image", "1e308"], "not a finite weight"),
        (["--image", "{image}", "--text", "a red circle", "--weight-image", "-1"], "not a finite weight"),
    ],
)
def test_query_errors_are_one_line(runner: CliRunner, cli_index: Path, tiny_corpus: Path, tmp_path: Path, args: list[str], message: str) -> None:
    image, _ = _query_args(tiny_corpus)
    args = [a.format(missing=tmp_path / "nope.jpg", image=image) for a in args]
    result = runner.invoke(main, ["query", "--index", str(cli_index), *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0]  # usage errors also print a usage line and a hint


def test_missing_index_is_a_clear_error(runner: CliRunner, tiny_corpus: Path, tmp_path: Path) -> None:
    image, region = _query_args(tiny_corpus)
    for args in (["info"], ["query", "--image", image]):
        result = runner.invoke(main, [*args, "--index", str(tmp_path / "nowhere")])
        assert result.exit_code == 1
        assert result.output.startswith("Error: no index at") and len(result.output.strip().splitlines()) == 1


def test_index_missing_corpus(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["index", str(tmp_path / "nope"), "--index", str(tmp_path / "idx")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_every_command_has_help_with_an_example(runner: CliRunner) -> None:
    for name, command in main.commands.items():
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert command.help and "Example" in command.help, f"{name} lacks an example in its help"


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


class _FullFile(io.StringIO):
    """A file on a full disk: every write fails."""

    def write(self, text: str) -> int:
        _no_space()
        return 0


@pytest.mark.parametrize("what", ["--save-vis", "--html", "--out", "--explain"])
def test_full_disk_while_writing_results_is_one_line(runner: CliRunner, cli_index: Path, tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    import query.batch

    image, region = _query_args(tiny_corpus)
    if what == "--save-vis":
        monkeypatch.setattr(PIL.Image.Image, "save", _no_space)
        args, target = ["--image", image, "--save-vis", str(tmp_path / "vis")], tmp_path / "vis" / "query.png"
    elif what == "--explain":
        monkeypatch.setattr(PIL.Image.Image, "save", _no_space)
        args = ["--image", image, "--text", "a red circle", "--no-ground", "--explain", str(tmp_path / "ex")]
        target = tmp_path / "ex" / "explain_01.png"
    elif what == "--html":
        monkeypatch.setattr(Path, "write_text", _no_space)
        args, target = ["--image", image, "--html", str(tmp_path / "g.html")], tmp_path / "g.html"
    else:
        batch = tmp_path / "b.jsonl"
        batch.write_text(json.dumps({"image": image}) + "\n", encoding="utf-8")
        monkeypatch.setattr(query.batch, "open", lambda path, mode="r", **k: _FullFile() if "w" in mode else builtins.open(path, mode, **k), raising=False)
        args, target = ["--batch", str(batch), "--out", str(tmp_path / "r.jsonl")], tmp_path / "r.jsonl"
    result = runner.invoke(main, ["query", "--index", str(cli_index), "-k", "2", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: disk full while writing {target}: free space (or write to another disk) and re-run the query"]
    assert not target.exists() and not target.with_name(target.name + ".tmp").exists()
