"""A sharded search whose shards are `engine serve` servers (engine/server/shard_service.py,
shard_client.py, shard_wire.py): equal to the same index searched in this process."""
from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.api import Engine  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.config import EngineConfig, IndexConfig  # noqa: E402
from engine.errors import EngineError, InvalidInputError  # noqa: E402
from engine.server import shard_wire  # noqa: E402
from engine.server.app import create_app  # noqa: E402
from engine.server.background import free_port, running_server  # noqa: E402
from engine.server.settings import ServerSettings  # noqa: E402
from engine.server.shard_client import ShardServers  # noqa: E402
from query.filters import HitFilter  # noqa: E402


@pytest.fixture(scope="module")
def sharded(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = Engine(tmp_path_factory.mktemp("served-shards") / "idx", config=EngineConfig(device="cpu"))
    engine.index(tiny_corpus, config=IndexConfig(proposals="gt", shards=3))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def servers(sharded: Engine) -> Iterator[list[str]]:
    """One real uvicorn server per shard folder, with a token."""
    with ExitStack() as stack:
        engines = [stack.enter_context(Engine(path, config=EngineConfig(device="cpu"))) for path in sharded.sharded.layout.paths]
        yield [stack.enter_context(running_server(create_app(e, ServerSettings(token="tok")))) for e in engines]


def _key(hits) -> list[tuple[str, int, tuple[float, ...], float]]:
    return [(h.image, h.region_id, tuple(round(float(v), 2) for v in h.box), round(h.score, 4)) for h in hits]


def _requests(corpus: Path) -> list[dict]:
    ann = json.loads((corpus / "annotations.jsonl").read_text().splitlines()[0])
    image, box = str(corpus / ann["image"]), ann["objects"][0].get("box") or ann["objects"][0].get("bbox")
    q = json.loads((corpus / "queries.jsonl").read_text().splitlines()[0])
    return [
        {"image": image, "region": box},
        {"image": image, "region": box, "text": "a red circle"},  # GRN + SAN, stage 3 grounded on the servers
        {"image": image, "region": box, "text": "a brown horse in a field"},  # the open vocabulary
        {"text": q["text"]},
        {"text": "a red fruit"},
        {"image": str(corpus / q["image"]), "region": q["region"], "text": q["text"]},
    ]


def test_shard_servers_answer_as_the_index_in_this_process(sharded: Engine, servers: list[str], tiny_corpus: Path) -> None:
    remote = ShardServers(servers, token="tok")
    for request in _requests(tiny_corpus):
        for k in (3, 10):
            here = sharded.search(k=k, exclude_self=True, **request)
            assert here, request
            assert _key(remote.search(k=k, exclude_self=True, **request)) == _key(here), request
    grounded = [r for r in _requests(tiny_corpus) if any("grounding" in h.scores for h in sharded.search(k=5, **r))]
    assert grounded  # stage 3 ran on the servers for these
    request = grounded[0]
    assert any("grounding" in h.scores for h in remote.search(k=5, **request))
    filters = HitFilter(max_per_image=2, min_score=0.1)
    assert _key(remote.search(k=8, filters=filters, **request)) == _key(sharded.search(k=8, filters=filters, **request))
    top = sharded.search(k=3, **request)[2]  # a region id of some shard: encoded by its own server
    assert _key(remote.search(region_id=top.region_id, text="a red circle", k=5)) == _key(sharded.search(region_id=top.region_id, text="a red circle", k=5))


def test_cli_shard_servers_and_their_errors(sharded: Engine, servers: list[str], tiny_corpus: Path) -> None:
    request = _requests(tiny_corpus)[1]
    runner = CliRunner()
    args = ["query", "--image", request["image"], "--region", ",".join(str(v) for v in request["region"]), "--text", request["text"], "-k", "4", "--json"]
    out = runner.invoke(main, [*args, "--shard-servers", ",".join(servers), "--token", "tok"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    local = runner.invoke(main, [*args, "--index", str(sharded.index_dir), "--device", "cpu"], catch_exceptions=False)
    assert json.loads(out.output) == json.loads(local.output)
    wrong = runner.invoke(main, ["query", "--text", "a red circle", "--shard-servers", ",".join(servers), "--token", "bad"])
    assert wrong.exit_code == 1 and "401" in wrong.output and "shard 0" in wrong.output and len(wrong.output.strip().splitlines()) == 1, wrong.output
    gone = runner.invoke(main, ["query", "--text", "a red circle", "--shard-servers", f"{servers[0]},http://127.0.0.1:{free_port()}", "--token", "tok"])
    assert gone.exit_code == 1 and "cannot reach shard server" in gone.output and "(shard 1)" in gone.output, gone.output
    both = runner.invoke(main, ["query", "--text", "x", "--shard-servers", servers[0], "--server", servers[0]])
    assert both.exit_code == 2 and "one of them" in both.output
    local_only = runner.invoke(main, ["query", "--text", "x", "--shard-servers", servers[0], "--html", "h.html"])
    assert local_only.exit_code == 2 and "local index" in local_only.output
    scheme = runner.invoke(main, ["query", "--text", "x", "--shard-servers", "ftp://host"])
    assert scheme.exit_code == 1 and "http(s)" in scheme.output


def test_a_sharded_index_is_not_a_shard_server(sharded: Engine) -> None:
    from engine.server.shard_service import ShardService
    import threading

    service = ShardService(sharded, ServerSettings(), threading.Lock())
    with pytest.raises(InvalidInputError, match="serve each shard's folder"):
        service.call("san_confidence", shard_wire.dumps(("a cat",)))
    with pytest.raises(InvalidInputError, match="no shard call"):
        service.call("__init__", shard_wire.dumps(()))


def test_the_wire_carries_query_values_and_refuses_anything_else() -> None:
    from engine.results import Hit
    from query.encode import EncodedQuery

    value = (EncodedQuery(vector=np.arange(4, dtype=np.float32), query_map=np.ones((2, 7, 7), np.float32), content_hash="ab"), [Hit(image="a.jpg", box=(1.0, 2.0, 3.0, 4.0), score=0.5, region_id=7)])
    back = shard_wire.loads(shard_wire.dumps(value))
    np.testing.assert_array_equal(back[0].vector, value[0].vector)
    assert back[1] == value[1] and back[0].content_hash == "ab"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (shutil.rmtree, ("/no/such/folder",))  # a global that would run: refused before it is looked up

    with pytest.raises(InvalidInputError, match="may not carry shutil.rmtree"):
        shard_wire.loads(pickle.dumps(Payload()))
    with pytest.raises(InvalidInputError, match="not one this engine sends"):
        shard_wire.loads(b"\x80\x05garbage")


def test_bad_shard_calls_get_one_line_errors(servers: list[str]) -> None:
    import urllib.error
    import urllib.request

    def post(path: str, body: bytes, kind: str) -> tuple[int, str]:
        request = urllib.request.Request(servers[0] + path, data=body, headers={"Content-Type": kind, "Authorization": "Bearer tok"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, ""
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())["error"]

    code, error = post("/api/shard/rank", pickle.dumps((shutil.rmtree,)), shard_wire.CONTENT_TYPE)
    assert code == 400 and "may not carry shutil.rmtree" in error
    code, error = post("/api/shard/rank", b"{}", "application/json")
    assert code == 400 and shard_wire.CONTENT_TYPE in error
    code, error = post("/api/shard/drop_tables", shard_wire.dumps(()), shard_wire.CONTENT_TYPE)
    assert code == 400 and "no shard call" in error
    with pytest.raises(InvalidInputError, match="--text is empty"):  # checked here, before any call
        ShardServers([servers[0]], token="tok").search(text="")
    with pytest.raises(EngineError, match=r"shard server .* \(shard 0\) answered 4[0-9][0-9]: region 987654 is not in index"):
        ShardServers([servers[0]], token="tok").search(region_id=987654)
