"""App factories: the public API and the admin API, each a FastAPI app over one shared runtime."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response, register_error_handlers
from service.config import Settings
from service.runtime.predictor import Runtime
from service.runtime.telemetry import Telemetry

DOCS_NOTE = """<!doctype html><title>onepass API</title>
<h1>onepass API</h1>
<p>The interactive Swagger UI needs assets from the internet, which production clusters often lack, so
this server does not serve it. The machine-readable API description is at
<a href="/openapi.json">/openapi.json</a>; load it into any OpenAPI viewer.</p>
<p>Quick start: <code>curl -s localhost:8000/v1/predict -H 'content-type: application/json'
-d '{"customer_ids": [1, 2, 3]}'</code></p>"""


class MetricsMiddleware:
    """Request count and latency by route template, method and status (pure ASGI: no per-request
    task or body copy, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # labelled metrics, bound once

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            key = (getattr(route, "path", None) or "unmatched", scope["method"], status)
            children = self._children.get(key)
            if children is None:
                labels = (key[0], key[1], str(status))
                children = self._children[key] = (
                    self.telemetry.http_latency.labels(*labels),
                    self.telemetry.http_requests.labels(*labels),
                )
            children[0].observe(time.perf_counter() - start)
            children[1].inc()


class ContentLengthLimit:
    """413 for a request whose Content-Length is over the limit, before the body is read.

    A header check only: Starlette's body-limit middleware (which also counts chunked bodies) added ~7 µs
    to every cache hit, an eighth of the request; uvicorn and any proxy in front bound chunked bodies.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length":
                    if value.isdigit() and int(value) > self.max_bytes:
                        response = error_response(
                            413, "payload_too_large", f"body: {int(value)} bytes, the limit is {self.max_bytes} bytes"
                        )
                        await response(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


def _base_app(
    title: str, settings: Settings, runtime: Runtime, owns_runtime: bool, max_body_size: int | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owns_runtime:
            await runtime.start()
        try:
            yield
        finally:
            if owns_runtime:
                await runtime.close()

    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.state.settings = settings
    register_error_handlers(app)
    if max_body_size is not None:
        app.add_middleware(ContentLengthLimit, max_bytes=max_body_size)
    app.add_middleware(MetricsMiddleware, telemetry=runtime.telemetry)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_NOTE)

    return app


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The public API. Without ``runtime`` the app owns one: its lifespan starts and closes it.

    Building the app does no I/O; the model loads in the lifespan, in the background.
    """
    from service.api import routes_health, routes_predict

    app = _base_app(
        "onepass", settings, runtime or Runtime(settings), owns_runtime=runtime is None,
        max_body_size=settings.max_body_bytes,
    )  # fmt: skip
    for router in (routes_predict.router, routes_health.router):
        mount_flat(app, router)
    return app


def mount_flat(app: FastAPI, router: APIRouter) -> None:
    """Add a router's routes to the app itself instead of ``include_router``.

    FastAPI 0.165 matches included routers through an extra layer (effective-route contexts, scope
    bookkeeping) on every request; on the cache-hit path that was ~15% of the request (cProfile diff
    against a bare app, docs/serving.md). Only for routers without prefix or dependencies, which
    ``include_router`` would apply.
    """
    assert not router.prefix and not router.dependencies, "mount_flat would drop the router's prefix/dependencies"
    app.router.routes.extend(router.routes)
