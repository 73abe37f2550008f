"""Domain errors -> HTTP, registered in one place. Every error body is an :class:`ErrorBody`."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import OnepassError, UnknownIdsError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, details: object | None = None) -> Response:
    body = {"error": code, "message": message, "details": details}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _field(loc: tuple[object, ...]) -> str:
    # ("body", "customer_ids", 3) -> "customer_ids[3]"; the transport prefix says nothing to a client.
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _error(e: Any) -> dict[str, str]:
    if e.get("type") == "json_invalid":
        # loc is ("body", <character offset>): the offset is not a list index, so say what it is.
        return {"field": "body", "message": f"{e['msg']} at character {e['loc'][-1]}"}
    return {"field": _field(tuple(e["loc"])), "message": e["msg"]}


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method in ("POST", "PUT") and ctype != "application/json":
        # FastAPI reads a non-JSON body as "not an object"; the real problem is the content type.
        return error_response(
            415, "unsupported_media_type", f"content-type: {ctype or 'missing'}; send application/json"
        )
    errors = [_error(e) for e in exc.errors()]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return error_response(422, "invalid_input", summary, errors)


async def _domain(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, OnepassError)
    details = {"unknown_ids": exc.ids} if isinstance(exc, UnknownIdsError) else None
    return error_response(exc.status_code, exc.code, str(exc), details)


async def _http(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    response = error_response(exc.status_code, "http_error", str(exc.detail))
    response.headers.update(exc.headers or {})  # e.g. Allow on 405
    return response


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def register_error_handlers(app: FastAPI) -> None:
    """Map every error to the one body shape; the catch-all goes last."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(OnepassError, _domain)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unhandled)
