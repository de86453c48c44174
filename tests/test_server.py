"""``engine serve``: the HTTP API over the tiny index (FastAPI's TestClient), its safety rules, indexing
over HTTP while queries are answered, and ``engine query --server`` against a real uvicorn server."""
from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from engine.cli import main  # noqa: E402
from engine.results import hits_payload  # noqa: E402
from engine.server.app import create_app  # noqa: E402
from engine.server.background import free_port, running_server  # noqa: E402
from engine.server.settings import ServerSettings  # noqa: E402

REGION = [10.0, 10.0, 80.0, 80.0]


@pytest.fixture(scope="module")
def client(tiny_engine) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_engine, ServerSettings())) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def first_image(client: TestClient) -> dict:
    images = client.get("/api/images").json()["images"]
    assert images, "the tiny index lists no images"
    return images[0]


def _one_line_error(response, status: int | tuple[int, ...]) -> str:
    """The response is ``{"error": "<one line>"}`` with ``status``; returns the line."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"] and "\n" not in body["error"], body
    return body["error"]


def _cli_json(args: list[str]) -> dict:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# -- reading -------------------------------------------------------------------------------------
def test_health_and_info_are_engine_info_json(client: TestClient, tiny_engine) -> None:
    assert client.get("/api/health").json() == {"status": "ok"}
    info = client.get("/api/info")
    assert info.status_code == 200
    assert info.json() == _cli_json(["info", "--index", str(tiny_engine.index_dir), "--json"])


def test_image_listing_pages_by_id(client: TestClient, tiny_engine) -> None:
    listed = client.get("/api/images", params={"limit": 1000}).json()["images"]
    assert len(listed) == tiny_engine.info().images
    assert [e["id"] for e in listed] == sorted(e["id"] for e in listed)
    assert client.get("/api/images", params={"offset": 2, "limit": 3}).json()["images"] == listed[2:5]


def test_image_file_and_region_crop_are_served(client: TestClient, first_image: dict) -> None:
    served = client.get(f"/api/images/{first_image['id']}")
    assert served.status_code == 200
    assert served.content == Path(first_image["path"]).read_bytes()
    hit = client.post("/api/search", json={"image": first_image["id"], "region": REGION, "k": 1}).json()["hits"][0]
    crop = client.get(f"/api/regions/{hit['region_id']}/crop")
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
    x1, y1, x2, y2 = hit["box"]
    with Image.open(io.BytesIO(crop.content)) as picture:
        assert abs(picture.width - (x2 - x1)) <= 2 and abs(picture.height - (y2 - y1)) <= 2


@pytest.mark.parametrize("via", ["auto", "vocabulary", "attention"])
def test_region_explanation_is_a_png(client: TestClient, first_image: dict, via: str) -> None:
    hit = client.post("/api/search", json={"image": first_image["id"], "region": REGION, "k": 1}).json()["hits"][0]
    answer = client.get(f"/api/regions/{hit['region_id']}/explain", params={"text": "a red circle", "via": via})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
    with Image.open(io.BytesIO(answer.content)) as picture:
        assert picture.width > 2 * first_image["width"]  # the hit beside the map


def test_region_explanation_errors(client: TestClient) -> None:
    _one_line_error(client.get("/api/regions/987654321/explain", params={"text": "a red circle"}), 404)
    _one_line_error(client.get("/api/regions/1/explain"), 422)
    _one_line_error(client.get("/api/regions/1/explain", params={"text": "x", "via": "magic"}), 422)
    _one_line_error(client.get("/api/regions/1/explain", params={"text": "   "}), 400)


# -- searching: the same hits as the engine and the CLI ---------------------------------------------
def test_search_by_region_id_equals_engine_query_json(client: TestClient, tiny_engine, first_image: dict) -> None:
    region_id = client.post("/api/search", json={"image": first_image["id"], "k": 1}).json()["hits"][0]["region_id"]
    answer = client.post("/api/search", json={"region_id": region_id, "k": 5, "exclude_self": True, "max_per_image": 2})
    assert answer.status_code == 200
    local = _cli_json(["query", "--index", str(tiny_engine.index_dir), "--device", "cpu", "--region-id", str(region_id), "-k", "5", "--exclude-self", "--max-per-image", "2", "--json"])
    assert answer.json() == local
    assert answer.json()["hits"], "no hits to compare"


def test_search_by_indexed_image_and_region(client: TestClient, tiny_engine, first_image: dict) -> None:
    expected = hits_payload(tiny_engine.search(image=first_image["path"], region=REGION, k=5))
    as_list = client.post("/api/search", json={"image": first_image["id"], "region": REGION, "k": 5})
    as_text = client.post("/api/search", json={"image": first_image["id"], "region": "10,10,80,80", "k": 5})
    assert as_list.json() == expected == as_text.json()
    assert expected["hits"]


def test_text_only_search_and_filters(client: TestClient, tiny_engine) -> None:
    from query.filters import HitFilter

    expected = hits_payload(tiny_engine.search(text="a red circle", k=4, filters=HitFilter(min_score=-10.0, max_per_image=0)))
    answer = client.post("/api/search", json={"text": "a red circle", "k": 4, "min_score": -10, "max_per_image": 0})
    assert answer.status_code == 200 and answer.json() == expected
    none = client.post("/api/search", json={"text": "a red circle", "k": 4, "path_glob": "*/no-such-folder/*"})
    assert none.json() == {"hits": []}


def test_multipart_upload_search_equals_local_search(client: TestClient, tiny_engine, first_image: dict) -> None:
    path = Path(first_image["path"])
    expected = hits_payload(tiny_engine.search(image=path, region=REGION, k=5, exclude_self=True))
    answer = client.post("/api/search", files={"image": ("q.png", path.read_bytes(), "application/octet-stream")}, data={"region": "10,10,80,80", "k": "5", "exclude_self": "true"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == expected
    assert all(h["image"] != str(path) for h in answer.json()["hits"])  # the upload's own content hash is excluded


# -- errors: one line, never a 500 ---------------------------------------------------------------
def test_unknown_ids_are_404(client: TestClient) -> None:
    assert "image" in _one_line_error(client.get("/api/images/987654321"), 404)
    assert "region" in _one_line_error(client.get("/api/regions/987654321/crop"), 404)
    assert "region" in _one_line_error(client.post("/api/search", json={"region_id": 987654321}), 404)
    assert "image" in _one_line_error(client.post("/api/search", json={"image": 987654321}), 404)
    _one_line_error(client.get("/api/images/99999999999999999999999"), 404)


@pytest.mark.parametrize(
    "url",
    [
        "/api/images/../../etc/passwd",
        "/api/images/%2e%2e/%2e%2e/etc/passwd",
        "/api/images/%2e%2e",
        "/api/images/..%2f..%2fetc%2fpasswd",
        "/api/images/%2Fetc%2Fpasswd",
        "/api/regions/..%2f..%2fetc%2fpasswd/crop",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    ],
)
def test_path_traversal_is_404(client: TestClient, url: str) -> None:
    response = client.get(url)
    _one_line_error(response, 404)
    assert "root:" not in response.text


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"image": "IMAGE", "region": "1,2,3"}, 400, "four comma-separated"),
        ({"image": "IMAGE", "region": [0, 0, 500, 500]}, 400, "outside"),
        ({"image": "IMAGE", "region": [50, 50, 10, 10]}, 400, "empty"),
        ({"image": "IMAGE", "region": [0, 0, "x", 4]}, 422, "region"),
        ({"text": "a red circle", "k": 0}, 422, "k"),
        ({"text": "a red circle", "k": 100000}, 400, "limit"),
        ({"text": "   "}, 400, "empty"),
        ({"text": "x", "colour": "red"}, 422, "colour"),
        ({"region_id": 1, "image": "IMAGE"}, 400, "region-id"),
        ({}, 400, "needs an image"),
        ({"region": "1,1,5,5"}, 400, "needs an image"),
    ],
)
def test_malformed_search_is_one_line_4xx(client: TestClient, first_image: dict, body: dict, status: int, words: str) -> None:
    body = {k: first_image["id"] if v == "IMAGE" else v for k, v in body.items()}
    assert words in _one_line_error(client.post("/api/search", json=body), status)


def test_malformed_bodies_are_one_line_4xx(client: TestClient) -> None:
    _one_line_error(client.post("/api/search", content=b"{not json", headers={"Content-Type": "application/json"}), 422)
    _one_line_error(client.post("/api/search", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 422)
    _one_line_error(client.post("/api/search", content=b"text=x", headers={"Content-Type": "text/plain"}), 400)
    not_image = client.post("/api/search", files={"image": ("q.jpg", b"this is no picture", "image/jpeg")}, data={"k": "3"})
    assert "not an image" in _one_line_error(not_image, 400)
    _one_line_error(client.post("/api/search", files={"image": ("q.jpg", b"", "image/jpeg")}), 400)
    _one_line_error(client.post("/api/search", files={"image": ("q.png", b"x", "image/png")}, data={"k": "many"}), 422)
    _one_line_error(client.delete("/api/search"), 405)
    _one_line_error(client.get("/api/nothing-here"), 404)
    _one_line_error(client.get("/api/images", params={"limit": 0}), 422)


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def test_upload_and_pixel_limits_are_413(tiny_engine) -> None:
    app = create_app(tiny_engine, ServerSettings(max_upload_bytes=4000, max_image_pixels=50 * 50))
    with TestClient(app) as small:
        big = small.post("/api/search", files={"image": ("q.bin", b"\0" * 10_000, "application/octet-stream")})
        assert "limit" in _one_line_error(big, 413)
        assert "pixels" in _one_line_error(small.post("/api/search", files={"image": ("q.png", _png(60, 60), "image/png")}), 413)
        chunked = small.post("/api/search", content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]), headers={"Content-Type": "application/json"})
        _one_line_error(chunked, 413)


# -- auth and exposure ------------------------------------------------------------------------------
def test_token_is_required_on_every_api_route(tiny_engine, first_image: dict) -> None:
    with TestClient(create_app(tiny_engine, ServerSettings(token="s3cret"))) as guarded:
        for method, url in (("GET", "/api/info"), ("GET", "/api/health"), ("GET", f"/api/images/{first_image['id']}"), ("POST", "/api/search"), ("GET", "/api/index/status"), ("GET", "/api/nothing")):
            assert "token" in _one_line_error(guarded.request(method, url), 401)
            assert "wrong" in _one_line_error(guarded.request(method, url, headers={"Authorization": "Bearer nope"}), 401)
        assert guarded.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert guarded.get("/api/info").headers["www-authenticate"] == "Bearer"
        assert guarded.get("/docs").status_code == 200 and guarded.get("/openapi.json").status_code == 200


def test_serve_refuses_a_public_host_without_token_or_insecure(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--index", str(tmp_path / "idx"), "--host", "0.0.0.0"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "--token" in lines[0] and "--insecure" in lines[0], result.output


def test_serve_wires_settings_into_uvicorn(tiny_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    args = ["serve", "--index", str(tiny_engine.index_dir), "--host", "0.0.0.0", "--port", "8123", "--corpus-root", str(tmp_path), "--max-upload-mb", "1", "--max-image-mpx", "2", "--device", "cpu"]
    result = CliRunner().invoke(main, args, env={"ENGINE_TOKEN": "from-env"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (seen["host"], seen["port"]) == ("0.0.0.0", 8123)
    settings = seen["app"].state.settings
    assert settings.token == "from-env" and settings.corpus_root == tmp_path
    assert (settings.max_upload_bytes, settings.max_image_pixels) == (1024 * 1024, 2_000_000)
    with TestClient(seen["app"]) as api:
        assert api.get("/api/info").status_code == 401
        assert api.get("/api/info", headers={"Authorization": "Bearer from-env"}).json()["images"] == tiny_engine.info().images


def test_serve_without_an_index_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--index", str(tmp_path / "none")])
    assert result.exit_code == 1 and result.output.startswith("Error: no index at") and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("192.168.1.2", False), ("example.org", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    from engine.server.settings import is_loopback

    assert is_loopback(host) is loopback


def test_docs_and_openapi_load(client: TestClient) -> None:
    assert "swagger" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    for path in ("/api/search", "/api/info", "/api/health", "/api/images", "/api/images/{image_id}", "/api/regions/{region_id}", "/api/regions/{region_id}/crop", "/api/regions/{region_id}/explain", "/api/index", "/api/index/status"):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/api/search"]["post"]["requestBody"]["content"]) == {"application/json", "multipart/form-data"}


def test_page_is_served_and_loads_nothing_from_outside(client: TestClient) -> None:
    from engine.server.app import STATIC_DIR

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<canvas id="canvas"' in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200, name
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f"{path.name} refers to another host"


# -- indexing over HTTP ----------------------------------------------------------------------------
def test_indexing_refused_without_corpus_root(client: TestClient, tmp_path: Path) -> None:
    assert "--corpus-root" in _one_line_error(client.post("/api/index", json={"folder": str(tmp_path)}), 403)
    assert client.get("/api/index/status").json()["state"] == "idle"


def test_indexing_progresses_to_done_while_searches_are_answered(tmp_path: Path) -> None:
    from engine.api import Engine
    from engine.config import EngineConfig, IndexConfig
    from engine.synth import SynthConfig, generate_corpus

    root = tmp_path / "root"
    generate_corpus(root / "first", SynthConfig(images=3, size=96, seed=11), progress=False)
    generate_corpus(root / "second", SynthConfig(images=6, size=96, seed=12), progress=False)
    (tmp_path / "outside").mkdir()
    engine = Engine(tmp_path / "idx", config=EngineConfig(device="cpu"))
    engine.index(root / "first", config=IndexConfig(proposals="gt"))
    with TestClient(create_app(engine, ServerSettings(corpus_root=root))) as api:
        _one_line_error(api.post("/api/index", json={"folder": "../outside"}), 403)
        _one_line_error(api.post("/api/index", json={"folder": str(tmp_path / "outside")}), 403)
        _one_line_error(api.post("/api/index", json={"folder": "missing"}), 404)
        _one_line_error(api.post("/api/index", json={"folder": "second", "proposals": "magic"}), 422)
        started = api.post("/api/index", json={"folder": "second", "proposals": "gt", "batch_size": 1})
        assert started.status_code == 202 and started.json()["state"] == "running"
        _one_line_error(api.post("/api/index", json={"folder": "second"}), (409, 202))
        answered_while_running, states, deadline = 0, [], time.monotonic() + 600
        while True:
            status = api.get("/api/index/status").json()
            states.append(status)
            if status["state"] != "running":
                break
            search = api.post("/api/search", json={"text": "a red circle", "k": 3})
            assert search.status_code == 200, search.text
            answered_while_running += api.get("/api/index/status").json()["state"] == "running"
            assert time.monotonic() < deadline, states[-1]
            time.sleep(0.05)
        app_jobs = api.app.state.jobs
        app_jobs.wait(60)
        final = api.get("/api/index/status").json()
        assert final["state"] == "done", final
        assert final["done"] == final["total"] == 6 and final["summary"]["processed"] == 6
        assert answered_while_running >= 1, states
        assert api.get("/api/info").json()["images"] == 9
        hits = api.post("/api/search", json={"text": "a red circle", "k": 9, "max_per_image": 1}).json()["hits"]
        assert any("/second/" in h["image"] for h in hits)
    engine.close()


# -- engine query --server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_server(tiny_engine) -> Iterator[str]:
    """A real uvicorn server over the tiny index, in a thread, on a free loopback port, with a token."""
    with running_server(create_app(tiny_engine, ServerSettings(token="tok"))) as url:
        yield url


def test_query_server_gives_the_local_json(live_server: str, tiny_engine, first_image: dict) -> None:
    args = ["--image", first_image["path"], "--region", "10,10,80,80", "-k", "5", "--exclude-self", "--json"]
    local = CliRunner().invoke(main, ["query", "--index", str(tiny_engine.index_dir), "--device", "cpu", *args], catch_exceptions=False)
    remote = CliRunner().invoke(main, ["query", "--server", live_server, "--token", "tok", *args], catch_exceptions=False)
    assert remote.exit_code == 0, remote.output
    assert remote.output == local.output
    assert json.loads(remote.output)["hits"]


def test_query_server_text_table_and_env(live_server: str, tiny_engine) -> None:
    expected = hits_payload(tiny_engine.search(text="a blue square", k=3))
    remote = CliRunner().invoke(main, ["query", "--text", "a blue square", "-k", "3"], env={"ENGINE_SERVER": live_server, "ENGINE_TOKEN": "tok"})
    assert remote.exit_code == 0, remote.output
    lines = remote.output.splitlines()
    assert lines[0].split() == ["rank", "score", "region", "box", "image"]
    assert [line.split()[2] for line in lines[1:]] == [str(h["region_id"]) for h in expected["hits"]]


def test_query_server_errors_are_one_line(live_server: str, tmp_path: Path) -> None:
    runner = CliRunner()
    wrong = runner.invoke(main, ["query", "--server", live_server, "--token", "bad", "--text", "x"])
    assert wrong.exit_code == 1 and "401" in wrong.output and len(wrong.output.strip().splitlines()) == 1, wrong.output
    bad = runner.invoke(main, ["query", "--server", live_server, "--token", "tok", "--region-id", "987654321"])
    assert bad.exit_code == 1 and "404" in bad.output and "region 987654321" in bad.output, bad.output
    nobody = runner.invoke(main, ["query", "--server", f"http://127.0.0.1:{free_port()}", "--text", "x"])
    assert nobody.exit_code == 1 and "cannot reach server" in nobody.output, nobody.output
    scheme = runner.invoke(main, ["query", "--server", "file:///etc/passwd", "--text", "x"])
    assert scheme.exit_code == 1 and "http(s)" in scheme.output, scheme.output
    local_only = runner.invoke(main, ["query", "--server", live_server, "--text", "x", "--save-vis", str(tmp_path)])
    assert local_only.exit_code == 2 and "local index" in local_only.output, local_only.output
