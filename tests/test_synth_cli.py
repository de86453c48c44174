"""``engine synth`` through click's CliRunner."""
from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner

from engine.commands.synth import synth_command
from engine.errors import EngineError


class _Group(click.Group):  # converts EngineError the way engine.cli does
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EngineError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
def _cli() -> None:
    pass


_cli.add_command(synth_command)


def test_synth_writes_corpus_and_summary(tmp_path: Path) -> None:
    result = CliRunner().invoke(_cli, ["synth", str(tmp_path / "c"), "--images", "3", "--size", "96", "--seed", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("wrote 3 images,") and "images/s" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "c/annotations.jsonl").is_file() and (tmp_path / "c/queries.jsonl").is_file()
    assert len(list((tmp_path / "c/images").glob("*.jpg"))) == 3


def test_synth_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(_cli, ["synth", str(tmp_path / "c"), "--size", "50", "--quiet"])
    assert result.exit_code == 1 and "size=50 is not allowed" in result.output
    result = runner.invoke(_cli, ["synth", str(tmp_path / "c"), "--format", "gif"])
    assert result.exit_code == 2 and "gif" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/x.txt").write_text("x")
    result = runner.invoke(_cli, ["synth", str(tmp_path / "busy"), "--images", "1", "--size", "96"])
    assert result.exit_code == 1 and "not empty" in result.output


def test_help_has_an_example() -> None:
    result = CliRunner().invoke(synth_command, ["--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "engine synth demo" in result.output
