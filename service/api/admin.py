"""The admin API, on its own listener (port 8001), only when an admin token is configured.

Every route sits behind :func:`require_admin` (Bearer token, constant-time comparison), which runs
before any body is read. Head references are names and versions only: never a filesystem path or a
URL. Every state-changing call writes one JSON line on the ``onepass.audit`` logger (action, task, old
and new version and sha256, result), whether it succeeds or is refused; so does a refused token.
"""

from __future__ import annotations

import secrets
from typing import Annotated, TypeVar

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.app import _base_app
from service.api.schemas import ErrorBody
from service.config import Settings
from service.errors import InvalidInputError, OnepassError, PayloadTooLargeError
from service.runtime.predictor import Runtime
from service.runtime.registry import (
    AuditEntry,
    HeadManager,
    SwapReport,
    audit,
    validate_task_name,
    validate_version,
)

SAFETENSORS_TYPES = ("application/octet-stream", "application/vnd.safetensors")
#: JSON bodies (head references) are tiny; anything bigger is refused before parsing.
MAX_JSON_BYTES = 4096


class Unauthorized(OnepassError):
    """Missing or wrong admin token. HTTP 401."""

    status_code = 401
    code = "unauthorized"


class UnsupportedMediaType(OnepassError):
    """A head upload in a format other than safetensors or a JSON reference. HTTP 415."""

    status_code = 415
    code = "unsupported_media_type"


class HeadRef(BaseModel):
    """A head version already in the model store, by name: ``{"version": "v2"}``."""

    model_config = ConfigDict(extra="forbid")
    version: str = Field(..., max_length=200, description="head version, e.g. v2 (a name, never a path or URL)")


class NewHead(BaseModel):
    """A new task served from a head version in the model store: ``{"task": "active_30d", "version": "v1"}``."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(..., max_length=200)
    version: str = Field(..., max_length=200)


class SwapBody(BaseModel):
    """What every head change returns."""

    task: str
    action: str = Field(description="swap | unchanged | rollback | add | remove")
    old: dict[str, str] | None = Field(description="version and sha256 of the head served before")
    new: dict[str, str] | None = Field(description="version and sha256 of the head served now")
    drift: dict[str, float] | None = Field(description="golden-set difference from the previous head")
    propagated: bool = Field(description="the shared record (other replicas) was updated")


async def require_admin(request: Request) -> None:
    """Bearer-token check; refused attempts are audited (without the presented token)."""
    token: str = request.app.state.admin_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken does not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.encode()):
        audit("auth", None, None, None, "rejected: unauthorized", method=request.method, path=request.url.path)
        raise Unauthorized("missing or invalid admin token (Authorization: Bearer <token>)")


async def get_manager(request: Request) -> HeadManager:
    mgr: HeadManager = request.app.state.head_manager
    return mgr


ManagerDep = Annotated[HeadManager, Depends(get_manager)]
router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin)], tags=["admin"],
                   responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}})  # fmt: skip


def _entry(request: Request, action: str, task: str | None) -> AuditEntry:
    runtime: Runtime = request.app.state.runtime
    return AuditEntry(action, task, runtime.telemetry)


async def _read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body: {declared} bytes, the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body: more than {limit} bytes, the limit is {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], body: bytes, example: str) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise InvalidInputError(f"body: expected {example} ({where}: {first['msg']})") from e


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _report(report: SwapReport, status: int = 200) -> Response:
    return Response(orjson.dumps(report.to_json()), status_code=status, media_type="application/json")


@router.get("/model")
async def model_info(mgr: ManagerDep) -> Response:
    """Encoder hash, graph snapshot, cache namespace, and each head's version, sha256 and load time."""
    return Response(orjson.dumps(mgr.describe()), media_type="application/json")


# `{task:path}`: a task with '/' (e.g. `..%2F..%2Fetc`) reaches the name check and gets a clear 422
# instead of an anonymous 404 from the router.
@router.put(
    "/heads/{task:path}",
    response_model=SwapBody,
    responses={404: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody}},
)
async def swap_head(task: str, request: Request, mgr: ManagerDep) -> Response:
    """Swap one head. Body: a safetensors file (``application/octet-stream``) or JSON ``{"version": "v2"}``
    naming a head version in the model store. Verified (tensor names, shapes, dtypes, finite values,
    golden check) before one atomic swap; the response reports the drift from the previous head."""
    with _entry(request, "swap", task) as entry:
        task = validate_task_name(task)
        entry.old = mgr.current_ref(task)
        ctype = _content_type(request)
        if ctype == "application/json":
            ref = _parse(HeadRef, await _read_limited(request, MAX_JSON_BYTES), '{"version": "<head version>"}')
            entry.new = {"version": ref.version}
            report = await mgr.swap_version(task, validate_version(ref.version), entry)
        elif ctype in SAFETENSORS_TYPES:
            body = await _read_limited(request, request.app.state.settings.admin_max_upload_bytes)
            report = await mgr.swap_upload(task, body, entry)
        else:
            raise UnsupportedMediaType(
                f"content-type: {ctype or 'missing'}; send application/octet-stream (a safetensors file) "
                'or application/json ({"version": "<head version>"})'
            )
        return _report(report)


@router.post("/heads/{task:path}/rollback", response_model=SwapBody, responses={404: {"model": ErrorBody}})
async def rollback_head(task: str, request: Request, mgr: ManagerDep) -> Response:
    """Put back the head that served before the last swap (or removal) of ``task``."""
    with _entry(request, "rollback", task) as entry:
        return _report(await mgr.rollback(validate_task_name(task), entry))


@router.post(
    "/heads",
    status_code=201,
    response_model=SwapBody,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 413: {"model": ErrorBody}},
)
async def add_head(request: Request, mgr: ManagerDep) -> Response:
    """Serve a new task. Body: ``{"task": "<task>", "version": "<head version>"}``, a head version written
    by `onepass train-head`. /v1/predict includes it from the next request on."""
    with _entry(request, "add", None) as entry:
        # Parsed here rather than as a body parameter, so the token check runs before any body is read.
        body = _parse(NewHead, await _read_limited(request, MAX_JSON_BYTES), '{"task": "...", "version": "..."}')
        entry.task, entry.new = body.task, {"version": body.version}
        task, version = validate_task_name(body.task), validate_version(body.version)
        entry.old = mgr.current_ref(task)
        return _report(await mgr.add(task, version, entry), status=201)


@router.delete(
    "/heads/{task:path}", response_model=SwapBody, responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}}
)
async def delete_head(task: str, request: Request, mgr: ManagerDep) -> Response:
    """Stop serving a task (it can be rolled back)."""
    with _entry(request, "remove", task) as entry:
        return _report(await mgr.remove(validate_task_name(task), entry))


def create_admin_app(settings: Settings, runtime: Runtime, token: str) -> FastAPI:
    """The admin API over an existing runtime (it never owns the runtime).

    Args:
        settings: the server's settings (upload limit).
        runtime: the runtime the public app serves; the admin app must run on the same event loop.
        token: the admin bearer token, at least 16 characters.
    """
    if len(token) < 16:
        raise ValueError("the admin token must be at least 16 characters")
    app = _base_app("onepass admin", settings, runtime, owns_runtime=False)
    app.state.admin_token = token
    app.state.head_manager = runtime.manager
    app.include_router(router)
    return app
