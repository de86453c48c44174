"""``python -m engine.demo``: the demo corpus's world (real photos when the data can be had) and its query."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine import data_fetch, demo
from engine.errors import DataFetchError


def test_demo_uses_the_stamps_world_when_the_data_is_there(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data_fetch, "ensure_stamps", lambda log=None: tmp_path)
    assert demo.demo_world_args() == demo.STAMPS_DEMO


def test_demo_falls_back_to_shapes_with_the_reason(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(log=None):  # noqa: ANN001, ANN202
        raise DataFetchError("apt-get is not on this machine")

    monkeypatch.setattr(data_fetch, "ensure_stamps", fail)
    assert demo.main(["--world"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == " ".join(demo.SHAPES_DEMO)
    assert "apt-get is not on this machine" in err and "shapes world" in err


def test_demo_usage_error() -> None:
    assert demo.main([]) == 2


def test_demo_query_is_the_one_with_the_most_positives(tmp_path: Path) -> None:
    import json

    lines = [{"image": f"{i}.jpg", "region": [0, 0, 5 + i, 5], "text": "x", "region_id": i, "positives": list(range(10, 10 + n))} for i, n in enumerate((1, 3, 3, 2))]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert demo.demo_query_args(tmp_path) == ["--image", str(tmp_path / "1.jpg"), "--region", "0,0,6,5"]
