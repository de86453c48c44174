"""Query features: filters, query by region id, text/image weights, batched queries, the HTML gallery."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.errors import InvalidInputError
from engine.results import Hit
from query.filters import HitFilter


def _hit(image: str, box, score: float, rid: int, digest: str | None = None) -> Hit:  # noqa: ANN001
    return Hit(image=image, box=tuple(map(float, box)), score=score, region_id=rid, content_hash=digest)


def _first_query(corpus: Path) -> dict:
    return json.loads((corpus / "queries.jsonl").read_text(encoding="utf-8").splitlines()[0])


def _engine(index_dir: Path, **kwargs):  # noqa: ANN202
    from engine.api import Engine
    from engine.config import EngineConfig

    return Engine(index_dir, config=EngineConfig(device="cpu", stage3=False, **kwargs))


def test_filters_glob_min_score_per_image_and_duplicate_pictures() -> None:
    hits = [
        _hit("/a/x.jpg", (0, 0, 10, 10), 0.9, 1, "h1"),
        _hit("/a/x.jpg", (20, 20, 30, 30), 0.8, 2, "h1"),
        _hit("/b/copy.jpg", (0, 0, 10, 11), 0.7, 3, "h1"),  # the same picture, near-identical box
        _hit("/b/copy.jpg", (40, 40, 60, 60), 0.6, 4, "h1"),  # the same picture, another box
        _hit("/b/y.jpg", (0, 0, 10, 10), 0.2, 5, "h2"),
    ]
    assert [h.region_id for h in HitFilter(max_per_image=0).apply(hits)] == [1, 2, 4, 5]
    assert [h.region_id for h in HitFilter(max_per_image=None).apply(hits)] == [1, 2, 4, 5]  # None: no limit either
    assert [h.region_id for h in HitFilter(path_glob="/b/*", max_per_image=0).apply(hits)] == [3, 4, 5]
    assert [h.region_id for h in HitFilter(min_score=0.65, max_per_image=0).apply(hits)] == [1, 2]
    assert [h.region_id for h in HitFilter(max_per_image=1).apply(hits)] == [1, 4, 5]
    assert [h.region_id for h in HitFilter().apply(hits)] == [1, 4, 5]  # the default: one hit per image
    assert [h.region_id for h in HitFilter(max_per_image=2).apply(hits)] == [1, 2, 4, 5]
    for bad in (dict(path_glob=" "), dict(min_score=float("nan")), dict(max_per_image=-1), dict(max_per_image=True), dict(max_per_image=1.5)):
        with pytest.raises(InvalidInputError):
            HitFilter(**bad)


def test_search_applies_filters(tiny_engine) -> None:  # noqa: ANN001
    corpus_image = next(iter(tiny_engine.search(image=_any_image(tiny_engine), k=1))).image
    hits = tiny_engine.search(image=corpus_image, k=10, filters=HitFilter(max_per_image=1, path_glob="*images/00000[0-9].jpg"))
    assert hits and len({h.image for h in hits}) == len(hits)
    assert all(Path(h.image).name < "000010.jpg" for h in hits)
    floor = hits[2].score
    assert all(h.score >= floor for h in tiny_engine.search(image=corpus_image, k=10, filters=HitFilter(min_score=floor)))


def _any_image(engine) -> str:  # noqa: ANN001
    store = engine._open_reader()
    return store.regions(store.all_region_ids()[:1])[0].image_path


def test_query_by_region_id_matches_the_query_by_its_image_and_box(tiny_engine) -> None:  # noqa: ANN001
    store = tiny_engine._open_reader()
    row = store.regions(store.all_region_ids()[5:6])[0]
    by_id = tiny_engine.search(region_id=row.id, k=5)
    by_box = tiny_engine.search(image=row.image_path, region=row.box, k=5)
    assert by_id[0].region_id == row.id and by_id[0].score == pytest.approx(1.0, abs=1e-3)
    assert [h.region_id for h in by_id] == [h.region_id for h in by_box]
    assert all(h.image != row.image_path for h in tiny_engine.search(region_id=row.id, k=5, exclude_self=True))
    with pytest.raises(InvalidInputError, match="not in index"):
        tiny_engine.search(region_id=10**9)
    with pytest.raises(InvalidInputError, match="leave out --image"):
        tiny_engine.search(region_id=row.id, image=row.image_path)


def test_text_and_image_weights_scale_the_stage2_parts(tiny_engine, tiny_corpus: Path) -> None:  # noqa: ANN001
    q = _first_query(tiny_corpus)
    args = dict(image=tiny_corpus / q["image"], region=q["region"], text=q["text"], k=5)
    with _engine(tiny_engine.index_dir, text_weight=2.0, image_weight=0.5) as engine:
        for h in engine.search(**args):
            assert h.score == pytest.approx(0.5 * h.scores["grn"] + 2.0 * h.scores["san"], abs=1e-5)
    with _engine(tiny_engine.index_dir, text_weight=1.0, image_weight=0.0) as engine:
        hits = engine.search(**args)
        assert [h.score for h in hits] == pytest.approx([h.scores["san"] for h in hits], abs=1e-5)
    result = CliRunner().invoke(main, ["query", "--index", str(tiny_engine.index_dir), "--image", str(args["image"]), "--weight-text", "2"])
    assert result.exit_code != 0 and "combined query" in result.output
    result = CliRunner().invoke(main, ["query", "--index", str(tiny_engine.index_dir), "--image", str(args["image"]), "--text", q["text"], "--weight-text", "0", "--weight-image", "0"])
    assert result.exit_code != 0 and "both 0" in result.output


def test_batch_gives_the_same_hits_as_single_queries_and_reports_bad_lines(tiny_engine, tiny_corpus: Path, tmp_path: Path) -> None:  # noqa: ANN001
    queries = [json.loads(line) for line in (tiny_corpus / "queries.jsonl").read_text(encoding="utf-8").splitlines()[:2]]
    assert len(queries) == 2
    # each query twice: region only, then with its text
    lines = [{"id": f"q{i}", "image": str(tiny_corpus / q["image"]), "region": q["region"], **({"text": q["text"]} if i % 2 else {})} for i, q in enumerate(q for q in queries for _ in range(2))]
    lines += [{"id": "bad-box", "image": str(tiny_corpus / queries[0]["image"]), "region": [0, 0, 5000, 5000]}, {"id": "missing", "image": str(tmp_path / "nope.jpg")}, {"id": "glob", "image": str(tiny_corpus / queries[0]["image"]), "path_glob": "*000001.jpg"}]
    batch = tmp_path / "b.jsonl"
    batch.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    result = CliRunner().invoke(main, ["query", "--index", str(tiny_engine.index_dir), "--no-ground", "--batch", str(batch), "--out", str(out), "-k", "4"])
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [g["id"] for g in got] == [x["id"] for x in lines] + [len(lines) + 1]
    with _engine(tiny_engine.index_dir) as engine:
        for line, g in zip(lines[:4], got[:4]):
            single = engine.search(image=line["image"], region=line["region"], text=line.get("text"), k=4)
            assert [h["region_id"] for h in g["hits"]] == [h.region_id for h in single]
            np.testing.assert_allclose([h["score"] for h in g["hits"]], [h.score for h in single], atol=1e-4)
    assert "--region" in got[4]["error"] and "does not exist" in got[5]["error"] and "line 8" in got[7]["error"]
    assert all(Path(h["image"]).name == "000001.jpg" for h in got[6]["hits"])
    assert "8 queries, 3 errors" in result.output


def test_batch_and_out_go_together(tiny_engine, tmp_path: Path) -> None:  # noqa: ANN001
    idx = str(tiny_engine.index_dir)
    assert "--batch needs --out" in CliRunner().invoke(main, ["query", "--index", idx, "--batch", str(tmp_path / "b.jsonl")]).output
    assert "--out goes with --batch" in CliRunner().invoke(main, ["query", "--index", idx, "--text", "a red circle", "--out", str(tmp_path / "r.jsonl")]).output
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["query", "--index", idx, "--batch", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "r.jsonl")])
    assert result.exit_code != 0 and "holds no queries" in result.output


def test_html_gallery_is_self_contained(tiny_engine, tiny_corpus: Path, tmp_path: Path) -> None:  # noqa: ANN001
    q = _first_query(tiny_corpus)
    page = tmp_path / "g.html"
    result = CliRunner().invoke(main, ["query", "--index", str(tiny_engine.index_dir), "--image", str(tiny_corpus / q["image"]), "--region", ",".join(map(str, q["region"])), "--text", q["text"], "--no-ground", "-k", "3", "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    assert text.count("data:image/jpeg;base64,") == 4  # the query and three hits
    assert "3 hits" in text and "grn" in text and "src='http" not in text


def _per_image(hits) -> dict[str, int]:  # noqa: ANN001
    counts: dict[str, int] = {}
    for h in hits:
        image = h["image"] if isinstance(h, dict) else h.image
        counts[image] = counts.get(image, 0) + 1
    return counts


def test_hits_come_from_distinct_images_by_default_and_max_per_image_allows_more(tiny_engine) -> None:  # noqa: ANN001
    """A whole-image query finds several boxes of its own image; by default it shows one (the best),
    ``max_per_image=3`` up to three, ``0`` any number (the order of the kept hits is the ranking's)."""
    image = _any_image(tiny_engine)
    every = tiny_engine.search(image=image, k=12, filters=HitFilter(max_per_image=0))
    assert max(_per_image(every).values()) > 3  # the query's own boxes crowd the unlimited list
    default = tiny_engine.search(image=image, k=8)
    assert len(default) == 8 and max(_per_image(default).values()) == 1
    assert default[0].region_id == every[0].region_id  # each image's best box
    assert [h.region_id for h in default] == [h.region_id for h in tiny_engine.search(image=image, k=8, filters=HitFilter(max_per_image=1))]
    three = tiny_engine.search(image=image, k=8, filters=HitFilter(max_per_image=3))
    assert max(_per_image(three).values()) == 3
    combined = tiny_engine.search(image=image, text="a red circle", k=8)  # stage 2 (and 3) too
    assert max(_per_image(combined).values()) == 1


def test_cli_query_max_per_image_and_batch_lines(tiny_engine, tmp_path: Path) -> None:  # noqa: ANN001
    image = _any_image(tiny_engine)
    base = ["query", "--index", str(tiny_engine.index_dir), "--image", image, "-k", "8", "--json"]
    for extra, most in (([], 1), (["--max-per-image", "3"], 3)):
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 0, result.output
        assert max(_per_image(json.loads(result.output)["hits"]).values()) == most
    unlimited = CliRunner().invoke(main, [*base, "--max-per-image", "0"])
    assert max(_per_image(json.loads(unlimited.output)["hits"]).values()) > 3
    bad = CliRunner().invoke(main, [*base, "--max-per-image", "-1"])
    assert bad.exit_code == 2 and "--max-per-image" in bad.output
    batch = tmp_path / "b.jsonl"
    lines = [{"id": "default", "image": image}, {"id": "three", "image": image, "max_per_image": 3}, {"id": "any", "image": image, "max_per_image": 0}, {"id": "bad", "image": image, "max_per_image": -2}]
    batch.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    result = CliRunner().invoke(main, ["query", "--index", str(tiny_engine.index_dir), "--batch", str(batch), "--out", str(out), "-k", "8"])
    assert result.exit_code == 0, result.output
    got = {g["id"]: g for g in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert max(_per_image(got["default"]["hits"]).values()) == 1
    assert max(_per_image(got["three"]["hits"]).values()) == 3
    assert max(_per_image(got["any"]["hits"]).values()) > 3
    assert any("--max-per-image" in g.get("error", "") for g in got.values())  # the bad line answers an error
    # --max-per-image on the command line is every line's default
    result = CliRunner().invoke(main, ["query", "--index", str(tiny_engine.index_dir), "--batch", str(batch), "--out", str(out), "-k", "8", "--max-per-image", "2"])
    got = {g["id"]: g for g in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert max(_per_image(got["default"]["hits"]).values()) == 2 and max(_per_image(got["three"]["hits"]).values()) == 3
