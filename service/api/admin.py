"""The admin API, on its own listener (port 8001), only when an admin token is configured.

Every route sits behind :func:`require_admin` (Bearer token, constant-time comparison). Head
references are names and versions only: never a filesystem path or a URL.
"""

from __future__ import annotations

import secrets
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.api.app import _base_app
from service.api.schemas import ErrorBody
from service.config import Settings
from service.errors import InvalidInputError, OnepassError, PayloadTooLargeError
from service.runtime.predictor import Runtime
from service.runtime.registry import HeadManager, validate_task_name

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SAFETENSORS_TYPES = ("application/octet-stream", "application/vnd.safetensors")


class Unauthorized(OnepassError):
    """Missing or wrong admin token. HTTP 401."""

    status_code = 401
    code = "unauthorized"


class HeadRef(BaseModel):
    """A head version already in the model store, by name: ``{"version": "v2"}``."""

    model_config = ConfigDict(extra="forbid")
    version: str = Field(..., pattern=NAME_PATTERN, description="head version, e.g. v2")


class NewHead(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(..., pattern=NAME_PATTERN)
    version: str = Field(..., pattern=NAME_PATTERN)


def require_admin(request: Request) -> None:
    token: str = request.app.state.admin_token
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest: the time taken does not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("missing or invalid admin token (Authorization: Bearer <token>)")


def get_manager(request: Request) -> HeadManager:
    mgr: HeadManager = request.app.state.head_manager
    return mgr


ManagerDep = Annotated[HeadManager, Depends(get_manager)]
router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin)], tags=["admin"],
                   responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}})  # fmt: skip


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def _read_limited(request: Request, limit: int) -> bytes:
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


@router.get("/model")
async def model_info(mgr: ManagerDep) -> Response:
    """Encoder hash, each head's version, sha256 and load time, and the cache namespace."""
    return _json(mgr.describe())


@router.put("/heads/{task}", responses={404: {"model": ErrorBody}, 413: {"model": ErrorBody}})
async def swap_head(task: str, request: Request, mgr: ManagerDep) -> Response:
    """Swap one head. Body: a safetensors file (``application/octet-stream``) or JSON ``{"version": "v2"}``
    naming a head version in the model store. Verified (names, shapes, dtypes, finite values, golden
    check) before one atomic swap; the response reports the drift from the previous head."""
    task = validate_task_name(task)
    limit = request.app.state.settings.admin_max_upload_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_limited(request, limit)
    if ctype == "application/json":
        try:
            ref = HeadRef.model_validate_json(body)
        except ValueError as e:
            raise InvalidInputError(f'body: expected {{"version": "<head version>"}} ({_first_error(e)})') from e
        record = mgr.record_from_store(task, ref.version)
    elif ctype in SAFETENSORS_TYPES:
        record = mgr.record_from_upload(task, body)
    else:
        raise InvalidInputError(
            f"content-type: {ctype or 'missing'}; send application/octet-stream (safetensors) or application/json"
        )
    report = await mgr.swap(task, record)
    return _json(report.to_json())


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}"
    return str(e)


@router.post("/heads/{task}/rollback", responses={404: {"model": ErrorBody}})
async def rollback_head(task: str, mgr: ManagerDep) -> Response:
    """Put back the head that served before the last swap of ``task``."""
    return _json((await mgr.rollback(validate_task_name(task))).to_json())


@router.post("/heads", status_code=201, responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
async def add_head(body: NewHead, mgr: ManagerDep) -> Response:
    """Serve a new task: a head version written by `onepass train-head`. /v1/predict includes it at once."""
    return _json((await mgr.add(body.task, body.version)).to_json(), status=201)


@router.delete("/heads/{task}", responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
async def delete_head(task: str, mgr: ManagerDep) -> Response:
    """Stop serving a task (it can be rolled back)."""
    return _json((await mgr.remove(validate_task_name(task))).to_json())


def create_admin_app(settings: Settings, runtime: Runtime, token: str) -> FastAPI:
    """The admin API over an existing runtime (it never owns the runtime)."""
    app = _base_app("onepass admin", settings, runtime, owns_runtime=False)
    app.state.admin_token = token
    app.state.head_manager = runtime.manager
    app.include_router(router)
    return app
