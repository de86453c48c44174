"""``engine data fetch`` with a fake apt-get on PATH (and real .deb files built by dpkg-deb when it exists)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine.data_fetch as data_fetch
from engine.cli import main as _cli  # the real CLI, which turns an EngineError into one line
from engine.data_fetch import ensure_stamps, fetch_data, has_stamps, stamps_dir
from engine.errors import DataFetchError


_FAKE_APT = """#!/bin/sh
[ "$1" = download ] || exit 1
shift
for p in "$@"; do
  if [ ! -f "$FAKE_DEBS/${p}_1.0_all.deb" ]; then echo "E: Unable to locate package $p" >&2; exit 100; fi
  cp "$FAKE_DEBS/${p}_1.0_all.deb" .
  echo "$p" >> "$FAKE_LOG"
done
"""


def _build_deb(tmp: Path, package: str, files: dict[str, bytes]) -> None:
    tree = tmp / "tree" / package
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n", encoding="utf-8"
    )
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    out = tmp / "debs" / f"{package}_1.0_all.deb"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(out)], check=True, capture_output=True)


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake apt-get on PATH that copies prebuilt .debs; returns the log file of its downloads."""
    if shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None:
        pytest.skip("dpkg-deb / dpkg are not installed: no real .deb can be built and unpacked here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(_FAKE_APT)
    (bin_dir / "apt-get").chmod(0o755)
    _build_deb(tmp_path, "tuxpaint-stamps-default", {"usr/share/tuxpaint/stamps/animals/cat.txt": b"A cat.\n"})
    _build_deb(tmp_path, "opencv-doc", {"usr/share/doc/opencv-doc/examples/data/readme.txt": b"x\n"})
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DEBS", str(tmp_path / "debs"))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "apt.log"))
    return tmp_path / "apt.log"


def test_fetch_is_idempotent_and_redoes_an_unfinished_package(fake_apt: Path, tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    packages = ("tuxpaint-stamps-default", "opencv-doc")
    messages: list[str] = []
    result = fetch_data(dest, packages, log=messages.append)
    assert result.fetched == packages and result.skipped == ()
    assert (stamps_dir(dest) / "animals/cat.txt").read_text() == "A cat.\n" and has_stamps(dest)
    assert any("downloading tuxpaint-stamps-default" in m for m in messages)
    assert fake_apt.read_text().split() == list(packages)

    again = fetch_data(dest, packages, log=messages.append)
    assert again.fetched == () and again.skipped == packages
    assert fake_apt.read_text().split() == list(packages)  # apt-get was not called again

    (dest / "done/opencv-doc").unlink()  # as if interrupted after the download, before the marker
    shutil.rmtree(dest / "root/usr/share/doc")
    third = fetch_data(dest, packages, log=messages.append)
    assert third.fetched == ("opencv-doc",)
    assert (dest / "root/usr/share/doc/opencv-doc/examples/data/readme.txt").is_file()


def test_failed_download_is_one_line(fake_apt: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFetchError, match="apt-get download no-such-package failed .*Unable to locate package"):
        fetch_data(tmp_path / "cache", ("no-such-package",), log=lambda m: None)
    assert not (tmp_path / "cache/done/no-such-package").exists()


def test_without_apt_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_fetch.shutil, "which", lambda tool: None)
    with pytest.raises(DataFetchError, match="apt-get was not found.*--stamps-dir"):
        fetch_data(tmp_path / "cache", log=lambda m: None)
    result = CliRunner().invoke(_cli, ["data", "fetch", "--dest", str(tmp_path / "cache")])
    assert result.exit_code == 1 and "--stamps-dir" in result.output
    assert len(result.output.strip().splitlines()) == 1

    monkeypatch.setenv("ENGINE_DATA", str(tmp_path / "env-cache"))
    assert data_fetch.data_dir() == tmp_path / "env-cache"
    result = CliRunner().invoke(_cli, ["synth", str(tmp_path / "c"), "--world", "stamps", "--images", "2", "--quiet"])
    assert result.exit_code == 1 and "apt-get was not found" in result.stderr and "--stamps-dir" in result.stderr
    assert "fetching the data packages" in result.stderr  # said before trying


def test_ensure_stamps_uses_the_cache_without_fetching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done/tuxpaint-stamps-default").write_text("x\n")
    monkeypatch.setattr(data_fetch.shutil, "which", lambda tool: None)  # would fail if it fetched
    assert ensure_stamps(tmp_path, log=lambda m: None) == tmp_path / "root/usr/share/tuxpaint/stamps"
