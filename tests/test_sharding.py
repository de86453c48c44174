"""A sharded index (indexer/shards.py, query/sharded_search.py, engine/sharded_index.py): built by
`engine index --shards N`, searched by fanning out in this process, equal to the unsharded index."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.api import Engine
from engine.cli import main
from engine.config import EngineConfig, IndexConfig
from engine.errors import IndexVersionError, InvalidInputError, UnknownIdError
from indexer.shards import SHARD_ID_BITS, ShardLayout, global_id, split_id
from indexer.store import IndexStore
from query.filters import HitFilter


@pytest.fixture(scope="module")
def sharded(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny corpus indexed into 3 shards (GT boxes), CPU."""
    engine = Engine(tmp_path_factory.mktemp("sharded") / "idx", config=EngineConfig(device="cpu"))
    summary = engine.index(tiny_corpus, config=IndexConfig(proposals="gt", shards=3))
    assert summary.processed == 16 and summary.errors == 0
    yield engine
    engine.close()


def _key(hits) -> list[tuple[str, tuple[float, ...], float]]:
    return [(h.image, tuple(round(float(v), 2) for v in h.box), round(h.score, 4)) for h in hits]


def _queries(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "queries.jsonl").read_text().splitlines()]


def _requests(corpus: Path) -> list[dict]:
    out = []
    annotations = [json.loads(line) for line in (corpus / "annotations.jsonl").read_text().splitlines()][:4]
    for ann in annotations:
        image = str(corpus / ann["image"])
        obj = ann["objects"][0]
        box = obj.get("box") or obj.get("bbox")
        out += [
            {"image": image, "region": box},
            {"image": image, "region": box, "text": "a red circle"},  # the shapes models' words: GRN + SAN, stage 3
            {"image": image, "region": box, "text": "a brown horse in a field"},  # through the open vocabulary
            {"image": image},
        ]
    q = _queries(corpus)[0]
    out += [{"text": q["text"]}, {"text": "a red fruit"}, {"text": "a small blue square"}, {"image": str(corpus / q["image"]), "region": q["region"], "text": q["text"]}]
    return out


def test_shards_hold_every_image_once_where_it_hashes(sharded: Engine, tiny_corpus: Path) -> None:
    layout = sharded.sharded.layout
    assert [s.path for s in layout.shards] == ["shard-000", "shard-001", "shard-002"]
    seen = []
    for position, path in enumerate(layout.paths):
        with IndexStore.open(path) as store:
            images = [e.path for e in store.images(limit=100)]
        assert all(layout.shard_of(p) == position for p in images)
        seen += images
    assert sorted(seen) == sorted(str(p.resolve()) for p in (tiny_corpus / "images").iterdir())
    assert len({len(s) for s in (seen,)}) == 1 and len(seen) == 16


@pytest.mark.parametrize("k", [3, 10])
def test_every_query_kind_matches_the_unsharded_index(sharded: Engine, tiny_engine: Engine, tiny_corpus: Path, k: int) -> None:
    for request in _requests(tiny_corpus):
        one = tiny_engine.search(k=k, exclude_self=True, **request)
        many = sharded.search(k=k, exclude_self=True, **request)
        assert _key(many) == _key(one), request
        assert one, request
        for hit in many:  # global ids name the same regions
            row = sharded.region(hit.region_id)
            assert row.image_path == hit.image and np.allclose(row.box, hit.box)


def test_filters_region_ids_and_batches_match(sharded: Engine, tiny_engine: Engine, tiny_corpus: Path) -> None:
    request = _requests(tiny_corpus)[0]
    for filters in (HitFilter(max_per_image=0), HitFilter(max_per_image=2, min_score=0.2), HitFilter(path_glob="*/00000[0-7].*")):
        assert _key(sharded.search(k=12, filters=filters, **request)) == _key(tiny_engine.search(k=12, filters=filters, **request))
    top_one = tiny_engine.search(k=2, **request)[1]
    top_many = sharded.search(k=2, **request)[1]
    assert split_id(top_many.region_id)[0] < 3
    for text in (None, "a red circle"):
        assert _key(sharded.search(region_id=top_many.region_id, text=text, k=5)) == _key(tiny_engine.search(region_id=top_one.region_id, text=text, k=5))
    from query.request import SearchRequest

    requests = [SearchRequest(k=4, **r) for r in _requests(tiny_corpus)[:6]]
    batch = sharded.search_batch(requests)
    assert [_key(h) for h in batch] == [_key(sharded.search(k=4, **r)) for r in _requests(tiny_corpus)[:6]]


def test_info_listing_and_ids_cover_every_shard(sharded: Engine, tiny_engine: Engine) -> None:
    info, plain = sharded.info().to_dict(), tiny_engine.info().to_dict()
    for key in ("images", "regions", "vectors", "errors", "dims", "models"):
        assert info[key] == plain[key], key
    assert len(info["shards"]) == 3 and "shards" not in plain
    listed = sharded.images(limit=100)
    assert len(listed) == 16 and len({e.id for e in listed}) == 16
    assert [e.id for e in listed] == sorted(e.id for e in listed)
    assert [e.id for e in sharded.images(offset=5, limit=4)] == [e.id for e in listed[5:9]]
    for entry in listed[::5]:
        assert sharded.image(entry.id).path == entry.path
    with pytest.raises(UnknownIdError, match="not in index"):
        sharded.region(global_id(1, 10**6))
    with pytest.raises(UnknownIdError):
        sharded.image(global_id(7, 1))
    with pytest.raises(InvalidInputError, match="shard 9 of 3"):
        sharded.search(region_id=global_id(9, 1))


def test_ids_are_stable_and_exact_in_json() -> None:
    assert split_id(global_id(5, 123)) == (5, 123)
    assert global_id(0, 77) == 77  # the first shard keeps its own ids
    assert global_id(8191, (1 << SHARD_ID_BITS) - 1) < 2**53


def test_reindex_updates_deletes_and_resumes_in_the_right_shard(corpus_copy: Path, tmp_path: Path) -> None:
    engine = Engine(tmp_path / "idx", config=EngineConfig(device="cpu"))
    first = engine.index(corpus_copy, config=IndexConfig(proposals="gt", shards=2))
    assert first.processed == 16
    again = engine.index(corpus_copy, config=IndexConfig(proposals="gt"))  # an existing sharded index keeps its shards
    assert again.processed == 0 and again.unchanged == 16
    images = sorted((corpus_copy / "images").iterdir())
    images[0].unlink()
    shutil.copy(images[2], images[1])  # a changed file
    third = engine.index(corpus_copy, config=IndexConfig(proposals="gt"))
    assert (third.removed, third.processed, third.unchanged) == (1, 1, 14)
    assert engine.info().images == 15
    with pytest.raises(InvalidInputError, match="has 2 hashed shards, not 3"):
        engine.index(corpus_copy, config=IndexConfig(proposals="gt", shards=3))
    engine.close()


def test_remove_and_compact_cover_every_shard(corpus_copy: Path, tmp_path: Path) -> None:
    engine = Engine(tmp_path / "idx", config=EngineConfig(device="cpu"))
    engine.index(corpus_copy, config=IndexConfig(proposals="gt", shards=3))
    before = engine.info()
    images = sorted((corpus_copy / "images").iterdir())
    removed = engine.remove(images[:5])
    assert removed.images == 5 and engine.info().images == before.images - 5
    with pytest.raises(InvalidInputError, match="nothing was removed"):
        engine.remove([images[6], corpus_copy / "nope.jpg"])
    assert engine.info().images == 11
    summary = engine.compact()
    assert summary.rows_after == engine.info().regions < summary.rows_before
    assert all(str(images[0]) != h.image for h in engine.search(image=str(images[6]), k=20))
    with pytest.raises(InvalidInputError, match="check each shard"):
        engine.check()
    engine.close()


def test_layout_errors_are_one_line(tmp_path: Path, tiny_engine: Engine, tiny_corpus: Path) -> None:
    with pytest.raises(InvalidInputError, match="not sharded"):
        Engine(tiny_engine.index_dir, config=EngineConfig(device="cpu")).index(tiny_corpus, config=IndexConfig(proposals="gt", shards=2))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="not empty"):
        ShardLayout.create(tmp_path / "full", 2)
    with pytest.raises(InvalidInputError, match="1 to 8192"):
        ShardLayout.create(tmp_path / "new", 0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "shards.json").write_text("{not json")
    with pytest.raises(IndexVersionError, match="cannot be read as a shard list"):
        Engine(broken).info()
    empty = ShardLayout.create(tmp_path / "empty", 2)
    with pytest.raises(Exception, match="holds no index yet"):
        Engine(empty.root, config=EngineConfig(device="cpu")).search(text="a dog")


def test_cli_builds_lists_attaches_and_queries_a_sharded_index(tiny_corpus: Path, tiny_engine: Engine, tmp_path: Path) -> None:
    runner = CliRunner()
    index_dir = tmp_path / "sharded"
    # half the corpus hashed into 2 shards, the other half indexed elsewhere and attached
    half_a, half_b = tmp_path / "a", tmp_path / "b"
    for half in (half_a, half_b):
        (half / "images").mkdir(parents=True)
    for i, path in enumerate(sorted((tiny_corpus / "images").iterdir())):
        shutil.copy(path, (half_a if i % 2 else half_b) / "images" / path.name)
    result = runner.invoke(main, ["index", str(half_a), "--index", str(index_dir), "--shards", "2", "--device", "cpu", "--proposals", "rpn", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["processed"] == 8
    elsewhere = tmp_path / "elsewhere"
    assert runner.invoke(main, ["index", str(half_b), "--index", str(elsewhere), "--device", "cpu", "--proposals", "rpn", "-q"]).exit_code == 0
    no_maps = tmp_path / "no-maps"
    assert runner.invoke(main, ["index", str(half_b), "--index", str(no_maps), "--device", "cpu", "--proposals", "rpn", "--no-maps", "-q"]).exit_code == 0
    bad = runner.invoke(main, ["shards", "add", "--index", str(index_dir), str(no_maps)])
    assert bad.exit_code != 0 and "same options" in bad.output
    added = runner.invoke(main, ["shards", "add", "--index", str(index_dir), str(elsewhere)])
    assert added.exit_code == 0 and "as shard 2" in added.output, added.output
    again = runner.invoke(main, ["shards", "add", "--index", str(index_dir), str(elsewhere)])
    assert again.exit_code != 0 and "already a shard" in again.output
    listed = json.loads(runner.invoke(main, ["shards", "list", "--index", str(index_dir), "--json"]).output)
    assert [r["hashed"] for r in listed] == [True, True, False] and sum(r["images"] for r in listed) == 16
    info = json.loads(runner.invoke(main, ["info", "--index", str(index_dir), "--json"]).output)
    assert info["images"] == 16 and len(info["shards"]) == 3
    # re-indexing the first half leaves the attached shard alone
    assert json.loads(runner.invoke(main, ["index", str(half_a), "--index", str(index_dir), "--device", "cpu", "--proposals", "rpn", "--json"]).output)["unchanged"] == 8
    # a query finds hits from the hashed and the attached shards alike, and by their global ids
    query = sorted((half_b / "images").iterdir())[0]
    out = runner.invoke(main, ["query", "--index", str(index_dir), "--device", "cpu", "--image", str(query), "-k", "16", "--json"])
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)["hits"] if isinstance(json.loads(out.output), dict) else json.loads(out.output)
    shards = {split_id(h["region_id"])[0] for h in hits}
    assert shards == {0, 1, 2}
    region = runner.invoke(main, ["query", "--index", str(index_dir), "--device", "cpu", "--region-id", str(hits[0]["region_id"]), "-k", "3", "--json"])
    assert region.exit_code == 0, region.output
    not_sharded = runner.invoke(main, ["shards", "list", "--index", str(elsewhere)])
    assert not_sharded.exit_code != 0 and "not a sharded index" in not_sharded.output
    ray_on_plain = runner.invoke(main, ["query", "--index", str(elsewhere), "--device", "cpu", "--text", "a dog", "--ray", "local"])
    assert ray_on_plain.exit_code != 0 and "not sharded" in ray_on_plain.output


def test_engine_serve_answers_over_a_sharded_index(sharded: Engine, tiny_engine: Engine) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from engine.server.app import create_app
    from engine.server.settings import ServerSettings

    with TestClient(create_app(sharded, ServerSettings())) as client:
        info = client.get("/api/info").json()
        assert info["images"] == 16 and len(info["shards"]) == 3
        images = client.get("/api/images", params={"limit": 100}).json()
        listed = images["images"] if isinstance(images, dict) else images
        assert len(listed) == 16
        far = max(listed, key=lambda e: e["id"])
        assert split_id(far["id"])[0] > 0 and client.get(f"/api/images/{far['id']}").status_code == 200
        hits = client.post("/api/search", json={"image": far["id"], "text": "a red circle", "k": 5}).json()["hits"]
        assert hits == [h.to_dict() for h in sharded.search(image=far["path"], text="a red circle", k=5)]
        crop = client.get(f"/api/regions/{hits[-1]['region_id']}/crop")
        assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
        assert client.get(f"/api/regions/{global_id(5, 1)}").status_code == 404
