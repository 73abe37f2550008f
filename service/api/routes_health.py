"""Probes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client.exposition import choose_encoder

from service.api.deps import RuntimeDep
from service.api.schemas import ReadyBody

router = APIRouter(tags=["probes"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. Never depends on the model or on Redis."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyBody, responses={503: {"model": ReadyBody}})
async def readyz(runtime: RuntimeDep) -> Response:
    """Readiness: 200 once the encoder and every head are loaded and warmed, 503 before (with the reason).

    Redis being down keeps 200 with `degraded: true`: a shared dependency must not take every
    replica out of the Service at once.
    """
    await runtime.probe_dependencies()
    body = runtime.health()
    return Response(orjson.dumps(body), status_code=200 if body["ready"] else 503, media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    """Prometheus exposition (text, or OpenMetrics when the scraper asks for it)."""
    runtime.health()  # refresh the breaker gauge
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(runtime.telemetry.registry), media_type=content_type)
