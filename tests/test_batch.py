"""query/batch.py: batch lines are validated one by one (a bad line answers {"id", "error"}, the rest
run) and answered in bounded chunks, streamed to the output file, with results equal to one pass."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import query.batch as batch_module
from engine.errors import EngineError, InvalidInputError
from engine.results import Hit
from query.encode import EncodedQuery
from query.batch import encode_requests, iter_batch, read_batch, run_batch
from query.request import SearchRequest


class FakeSearcher:
    """Answers each request with one hit naming it; records what each ``search_batch`` call saw."""

    def __init__(self, out_file: Path | None = None) -> None:
        self.calls: list[int] = []
        self.written_before_call: list[int] = []
        self.out_file = out_file

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[list[Hit] | EngineError]:
        self.calls.append(len(requests))
        tmp = self.out_file.with_name(self.out_file.name + ".tmp") if self.out_file else None
        if tmp is not None and tmp.exists():
            tmp_lines = tmp.read_text(encoding="utf-8").splitlines()
            self.written_before_call.append(len(tmp_lines))
        out: list[list[Hit] | EngineError] = []
        for r in requests:
            try:
                r.validate()
            except EngineError as exc:
                out.append(exc)
                continue
            out.append([Hit(image=str(r.image or "/t.jpg"), box=(0, 0, 1, 1), score=float(r.k), region_id=int(r.region_id or 0))])
        return out


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BAD_LINES = [
    '{"text": "red", "path_glob": 5}',
    '{"text": "red", "path_glob": ["*"]}',
    '{"region_id": 9223372036854775808}',
    '{"region_id": 100000000000000000000000000000}',
    '{"text": "red", "min_score": "abc"}',
    '{"text": "red", "min_score": true}',
    '{"text": "red", "max_per_image": 2.5}',
    '{"text": "red", "k": "3"}',
    '{"text": "red", "exclude_self": "yes"}',
    '{"image": 5}',
    '{"image": ["a.jpg"]}',
    '{"image": "a.jpg", "region": [0, 0, "a", 5]}',
    '{"image": "a.jpg", "region": [0, 0, 1e999999, 5]}',
    '{"image": "a.jpg", "region": {"x": 1}}',
    '{"text": ["red"]}',
    '{"text": "red", "id": NaN}',
    '{"text": "red", "min_score": Infinity}',
    '[1, 2]',
    '{broken',
]


def test_every_wrong_typed_line_answers_its_error_and_the_rest_run(tmp_path: Path) -> None:
    lines = ['{"id": "first", "text": "red"}', *BAD_LINES, '{"id": "last", "text": "red", "k": 3}']
    batch = _write(tmp_path / "b.jsonl", lines)
    out = tmp_path / "r.jsonl"
    summary = run_batch(FakeSearcher(), batch, out, defaults={"k": 2, "exclude_self": False})
    text = out.read_text(encoding="utf-8")
    got = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in output")) for line in text.splitlines()]
    assert len(got) == len(lines) and (summary.queries, summary.errors) == (len(lines), len(BAD_LINES))
    assert got[0]["id"] == "first" and got[0]["hits"][0]["score"] == 2
    assert got[-1]["id"] == "last" and got[-1]["hits"][0]["score"] == 3
    for line, answer in zip(BAD_LINES, got[1:-1]):
        assert set(answer) == {"id", "error"}, line
        assert "\n" not in answer["error"] and len(answer["error"]) < 400, answer
    errors = [a["error"] for a in got[1:-1]]
    assert "--path-glob must be a string" in errors[0] and "out of range" in errors[2] and "out of range" in errors[3]
    assert "--min-score must be a finite number, got 'abc'" in errors[4] and "NaN is not a JSON number" in errors[15]


def test_nan_id_is_refused_not_echoed(tmp_path: Path) -> None:
    batch = _write(tmp_path / "b.jsonl", ['{"id": NaN, "text": "red"}', '{"id": -Infinity, "text": "red"}'])
    requests = read_batch(batch)
    assert all(isinstance(r, InvalidInputError) for r in requests)
    run_batch(FakeSearcher(), batch, tmp_path / "r.jsonl")
    assert [json.loads(line)["id"] for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [1, 2]
    assert "NaN" not in (tmp_path / "r.jsonl").read_text().replace("NaN is not", "")


def test_batch_is_answered_chunk_by_chunk_and_streamed(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "text": f"red {i}", "k": 1 + i % 3}) for i in range(11)]
    lines.insert(4, "")  # blank lines are skipped
    lines.insert(6, "{broken")
    batch = _write(tmp_path / "b.jsonl", lines)
    chunked, whole = tmp_path / "chunked.jsonl", tmp_path / "whole.jsonl"
    searcher = FakeSearcher(chunked)
    summary = run_batch(searcher, batch, chunked, chunk_size=3)
    assert summary.queries == 12 and summary.errors == 1
    assert max(searcher.calls) <= 3 and len(searcher.calls) == 4  # 12 lines, 3 at a time
    assert searcher.written_before_call == [0, 3, 6, 9]  # each chunk's results are written before the next runs
    run_batch(FakeSearcher(), batch, whole, chunk_size=1000)
    assert chunked.read_text() == whole.read_text()
    assert not chunked.with_name(chunked.name + ".tmp").exists()


def test_lines_are_read_lazily(tmp_path: Path) -> None:
    batch = _write(tmp_path / "b.jsonl", ['{"text": "a"}', '{"text": "b"}', "\xff".encode("latin-1").decode("latin-1")])
    batch.write_bytes(batch.read_bytes().replace("ÿ".encode(), b"\xff"))
    lines = iter_batch(batch)
    assert isinstance(next(lines), SearchRequest)  # the bad third line is not read yet
    rest = list(lines)
    assert isinstance(rest[0], SearchRequest) and isinstance(rest[1], InvalidInputError) and "not UTF-8" in str(rest[1])


def test_empty_batch_leaves_no_output(tmp_path: Path) -> None:
    batch = _write(tmp_path / "b.jsonl", ["", "  "])
    with pytest.raises(InvalidInputError, match="holds no queries"):
        run_batch(FakeSearcher(), batch, tmp_path / "r.jsonl")
    assert list(tmp_path.iterdir()) == [batch]


def test_a_repeated_image_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(a)
    Image.new("RGB", (40, 30), (10, 10, 200)).save(b)
    loads: list[str] = []
    real = batch_module.load_query_region

    def counting(path, region):  # noqa: ANN001, ANN202
        loads.append(Path(path).name)
        return real(path, region)

    monkeypatch.setattr(batch_module, "load_query_region", counting)

    class BoxEncoder:  # one "map" and "vector" per region: its box itself
        def encode_batch(self, images, queries):  # noqa: ANN001, ANN202
            return [EncodedQuery.of_region(q, np.asarray(q.box), np.asarray(q.box)) for qs in queries for q in qs]

    requests = [
        SearchRequest(image=a, region=(0, 0, 10, 10)),
        SearchRequest(image=b),
        SearchRequest(image=a, region=(5, 5, 20, 30)),
        SearchRequest(image=a, region=(0, 0, 99, 99)),  # outside the image: this request's error only
        SearchRequest(image=a),
    ]
    encoded = encode_requests(BoxEncoder(), requests, batch_size=4)
    assert sorted(loads) == ["a.png", "b.png"]
    assert isinstance(encoded[3], InvalidInputError) and "--region" in str(encoded[3])
    boxes = {i: tuple(encoded[i].vector) for i in (0, 1, 2, 4)}
    assert boxes == {0: (0, 0, 10, 10), 1: (0, 0, 40, 30), 2: (5, 5, 20, 30), 4: (0, 0, 40, 30)}
    assert encoded[0].content_hash == encoded[2].content_hash != encoded[1].content_hash


@pytest.mark.slow
def test_chunked_batch_equals_one_pass_on_a_real_index(tiny_engine, tiny_corpus: Path, tmp_path: Path) -> None:  # noqa: ANN001
    images = sorted((tiny_corpus / "images").glob("*.jpg"))[:3]
    lines = [json.dumps({"id": f"q{i}", "image": str(images[i % 3]), **({"region": [10, 10, 90, 90]} if i % 2 else {}), "k": 3}) for i in range(7)]
    lines.insert(3, '{"region_id": 18446744073709551616}')
    batch = _write(tmp_path / "b.jsonl", lines)
    run_batch(tiny_engine, batch, tmp_path / "chunked.jsonl", chunk_size=2)
    run_batch(tiny_engine, batch, tmp_path / "whole.jsonl", chunk_size=100)
    chunked = [json.loads(line) for line in (tmp_path / "chunked.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text().splitlines()]
    assert [c["id"] for c in chunked] == [w["id"] for w in whole] == [json.loads(line).get("id", 4) for line in lines]
    assert "out of range" in chunked[3]["error"]
    for c, w in zip(chunked, whole):
        if "hits" in w:
            assert [h["region_id"] for h in c["hits"]] == [h["region_id"] for h in w["hits"]]
            np.testing.assert_allclose([h["score"] for h in c["hits"]], [h["score"] for h in w["hits"]], atol=1e-5)
