"""The ASGI app of ``engine serve``: :func:`create_app` builds the routes over one :class:`Engine`.

Routes (all under ``/api`` need the bearer token when the server has one):

- ``GET /api/health``, ``GET /api/info`` (``engine info --json``), ``GET /api/images`` (a listing);
- ``POST /api/search``: JSON :class:`~engine.server.schemas.SearchBody`, or multipart with an uploaded
  ``image`` file and the same fields; answers ``engine query --json``'s ``{"hits": [...]}``;
- ``GET /api/images/{id}`` (an indexed image's file), ``GET /api/regions/{id}`` (its image and box),
  ``GET /api/regions/{id}/crop`` (JPEG) and ``GET /api/regions/{id}/explain?text=`` (the text's map, PNG);
- ``POST /api/index`` (a folder under the corpus root, in the background) and ``GET /api/index/status``;
- ``POST /api/shard/{call}``: the server as one shard of a sharded search (:mod:`engine.server.shard_service`;
  ``engine query --shard-servers``), bodies in :mod:`engine.server.shard_wire`'s format;
- ``/docs`` and ``/openapi.json``; the web page at ``/`` when ``static/`` ships one.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from engine.api import Engine
from engine.errors import InvalidInputError, UnknownIdError
from engine.results import hits_payload
from engine.server.errors import NotFoundError, install_error_handlers
from engine.server.guards import BearerAuth, BodyLimit
from engine.server.jobs import IndexJobs
from engine.server.media import crop_jpeg
from engine.server.schemas import SEARCH_FIELDS, IndexBody, SearchBody
from engine.server.service import SearchService
from engine.server.shard_service import ShardService
from engine.server import shard_wire
from engine.server.settings import ServerSettings
from engine.server.uploads import saved_upload
from query.request import MAX_TEXT_CHARS

__all__ = ["create_app", "STATIC_DIR"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The web page's files (``index.html`` and what it loads), served at ``/`` and ``/static/``."""

_ID = re.compile(r"[0-9]{1,19}")
_MAX_ID = 2**63 - 1


def _parse_id(text: str, what: str) -> int:
    """A path segment as an id; anything else (``..``, a name, a huge number) is an unknown id: 404."""
    if not _ID.fullmatch(text) or int(text) > _MAX_ID:
        raise UnknownIdError(f"no indexed {what} has the id {text[:40]!r}; ids are whole numbers from the API's answers")
    return int(text)


def _search_openapi() -> dict[str, Any]:
    """The request body of ``POST /api/search`` for the docs: JSON, or multipart with a file."""
    schema = SearchBody.model_json_schema()
    form = {**schema, "properties": {**schema["properties"], "image": {"type": "string", "format": "binary", "description": "The query image file (or an indexed image's id)."}, "region": {"type": "string", "description": "x1,y1,x2,y2 in pixels"}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}}}}


def _form_fields(form: FormData) -> tuple[UploadFile | None, dict[str, Any]]:
    """The uploaded ``image`` file (if any) and the other fields of a multipart search (empty ones left out)."""
    upload: UploadFile | None = None
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in fields or (key == "image" and upload is not None):
            raise InvalidInputError(f"field {key!r} is given twice; give each field once")
        if isinstance(value, UploadFile):
            if key != "image":
                raise InvalidInputError(f"field {key!r} is a file; only 'image' may be a file")
            upload = value
        elif value != "":
            fields[key] = value
    return upload, fields


def _search_body(data: bytes | dict[str, Any]) -> SearchBody:
    """Validate a search body (JSON bytes or form fields); a mistake is FastAPI's one-line 422."""
    try:
        return SearchBody.model_validate_json(data) if isinstance(data, bytes) else SearchBody.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The API over ``engine`` (its models load on the first query and stay loaded) with ``settings``."""
    settings = settings or ServerSettings()
    service = SearchService(engine, max_k=settings.max_k)
    shards = ShardService(engine, settings, service.lock)
    jobs = IndexJobs(index_dir=engine.index_dir, config=engine.config, corpus_root=settings.corpus_root)
    app = FastAPI(title="Region retrieval engine", version="1", description="Search an index of image regions by region, description or both (`engine serve`).")
    app.state.service, app.state.jobs, app.state.settings = service, jobs, settings
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.token is not None:
        app.add_middleware(BearerAuth, token=settings.token)

    @app.get("/api/health", summary="Whether the server is up")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/info", summary="Counts, index type, device and models (as `engine info --json`)")
    def info() -> JSONResponse:
        return JSONResponse(service.info())

    @app.get("/api/images", summary="The indexed images (id, path, size), by id")
    def images(offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        return {"images": service.images(offset=offset, limit=limit), "offset": offset, "limit": limit}

    @app.get("/api/images/{image_id}", summary="The file of an indexed image", response_class=FileResponse)
    def image_file(image_id: str) -> FileResponse:
        entry = service.image(_parse_id(image_id, "image"))
        path = Path(entry.path)
        if not path.is_file():
            raise NotFoundError(f"the file of image {entry.id} is gone from the disk; re-run `engine index` on its folder")
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/api/regions/{region_id}", summary="An indexed region: its image (id and path) and box")
    def region(region_id: str) -> dict[str, Any]:
        row = service.region(_parse_id(region_id, "region"))
        return {"region_id": row.id, "image_id": row.image_id, "image": row.image_path, "box": [round(float(v), 2) for v in row.box], "width": row.width, "height": row.height}

    @app.get("/api/regions/{region_id}/crop", summary="The pixels of an indexed region (JPEG)", response_class=Response)
    def region_crop(region_id: str) -> Response:
        row = service.region(_parse_id(region_id, "region"))
        if not Path(row.image_path).is_file():
            raise NotFoundError(f"the image file of region {row.id} is gone from the disk; re-run `engine index` on its folder")
        return Response(crop_jpeg(row.image_path, row.box), media_type="image/jpeg")

    @app.get("/api/regions/{region_id}/explain", summary="Where a text is in a region's image (PNG: the box beside the text's map)", response_class=Response)
    def region_explain(
        region_id: str,
        text: str = Query(min_length=1, max_length=MAX_TEXT_CHARS, description="The description to locate."),
        via: str = Query("auto", pattern="^(auto|attention|vocabulary)$", description="vocabulary: as a search through the open vocabulary reads the text (hits with a 'concept' score); attention: MCB; auto: MCB when it knows every content word."),
    ) -> Response:
        png = service.explain(_parse_id(region_id, "region"), text, via=via)
        return Response(png, media_type="image/png")

    @app.post("/api/search", summary="Search by region, description or both (as `engine query --json`)", openapi_extra=_search_openapi())
    async def search(request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            async with request.form(max_files=1, max_fields=len(SEARCH_FIELDS)) as form:
                upload, fields = _form_fields(form)
                body = _search_body(fields)
                hits = await run_in_threadpool(_search_upload, service, settings, body, upload)
        elif kind in ("application/json", ""):
            hits = await run_in_threadpool(service.search, _search_body(await request.body()))
        else:
            raise InvalidInputError(f"Content-Type {kind!r} is not taken here; send application/json, or multipart/form-data with an image file")
        return JSONResponse(hits_payload(hits))

    @app.post("/api/shard/{call}", summary="One step of a sharded search on this index (engine query --shard-servers)", response_class=Response)
    async def shard_call(call: str, request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != shard_wire.CONTENT_TYPE:
            raise InvalidInputError(f"a shard call's body is {shard_wire.CONTENT_TYPE}, not {kind or 'missing'}; it comes from engine query --shard-servers")
        answer = await run_in_threadpool(shards.call, call, await request.body())
        return Response(answer, media_type=shard_wire.CONTENT_TYPE)

    @app.post("/api/index", status_code=202, summary="Start indexing a folder under the corpus root (in the background)")
    def start_index(body: IndexBody) -> dict[str, Any]:
        return jobs.start(body.folder, proposals=body.proposals, batch_size=body.batch_size).to_dict()

    @app.get("/api/index/status", summary="Progress of the latest indexing job")
    def index_status() -> dict[str, Any]:
        return jobs.status().to_dict()

    if (STATIC_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        def page() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")

    return app


def _search_upload(service: SearchService, settings: ServerSettings, body: SearchBody, upload: UploadFile | None):  # -> list[Hit]
    """A multipart search: with the uploaded file saved within the limits, or without one."""
    if upload is None:
        return service.search(body)
    with saved_upload(upload, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels) as path:
        return service.search(body, upload=path)
