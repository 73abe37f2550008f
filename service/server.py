"""`onepass serve`: the public listener and, when an admin token is configured, the admin listener,
two uvicorn servers in one process and one event loop, sharing one runtime (one model, one cache).

The two ports let a Kubernetes Service expose the public API without the admin API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
from typing import Any

import uvicorn

from service.api.app import create_app
from service.cache.local_redis import LocalRedis
from service.config import Settings
from service.runtime.predictor import Runtime

log = logging.getLogger("onepass")


class _Server(uvicorn.Server):
    """A uvicorn server whose exit signal stops its siblings too."""

    siblings: list[uvicorn.Server]

    def handle_exit(self, sig: int, frame: Any) -> None:  # noqa: ARG002 - uvicorn's signal handler signature
        # Not uvicorn.Server.handle_exit: since uvicorn 0.29 it records the signal and re-raises it once
        # serve() returns, and the default SIGTERM action then kills the process before runtime.close()
        # and before the local redis-server is stopped (an orphaned redis-server, exit code 143).
        # Shutting down without recording the signal lets `onepass serve` clean up and exit 0.
        for s in self.siblings:
            if s.should_exit and sig == signal.SIGINT:
                s.force_exit = True  # a second Ctrl-C skips the graceful wait, as in uvicorn
            else:
                s.should_exit = True


def _config(app: Any, settings: Settings, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=settings.log_level,
        access_log=False,  # per-request logs cost more than the cache-hit path; metrics carry the counts
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )


async def serve_async(settings: Settings) -> None:
    runtime = Runtime(settings)
    apps: list[tuple[Any, int]] = [(create_app(settings, runtime), settings.port)]
    token = settings.resolved_admin_token()
    if token is not None:
        from service.api.admin import create_admin_app

        apps.append((create_admin_app(settings, runtime, token), settings.admin_port))
    else:
        log.info("admin API disabled: no ONEPASS_ADMIN_TOKEN / ONEPASS_ADMIN_TOKEN_FILE configured")
    servers = [_Server(_config(app, settings, port)) for app, port in apps]
    for s in servers:
        s.siblings = list(servers)
    await runtime.start()

    failed: list[str] = []

    async def announce() -> None:
        try:
            await runtime.wait_ready(timeout_s=None)
        except Exception:  # noqa: BLE001 - a model that cannot load is fatal: exit, let the supervisor see it
            failed.append(runtime.reason)
            log.error("cannot serve: %s; shutting down", runtime.reason)
            for s in servers:
                s.should_exit = True
            return
        host = "localhost" if settings.host in ("0.0.0.0", "::") else settings.host
        # The command as this user can type it: bare `onepass` only when it is on PATH.
        cli = "onepass" if shutil.which("onepass") else os.path.relpath(sys.argv[0])
        print(  # noqa: T201 - the run command's user-facing hint
            f"\nonepass ready in {runtime.startup_s:.1f} s. Try:\n"
            f"  curl -s {host}:{settings.port}/v1/predict -H 'content-type: application/json' "
            f"-d '{{\"customer_ids\": [1, 2, 3]}}'\n"
            f"  {cli} predict --ids 1,2,3 --url http://{host}:{settings.port}\n",
            flush=True,
        )

    announcer = asyncio.create_task(announce())
    try:
        await asyncio.gather(*(s.serve() for s in servers))
    finally:
        announcer.cancel()
        await runtime.close()
    if failed:
        raise SystemExit(f"onepass: model load failed: {failed[0]}")


def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM; start (and stop) a local Redis when no Redis URL is configured."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    local: LocalRedis | None = None
    if settings.redis_url is None:
        try:
            local = LocalRedis()
        except RuntimeError as e:
            # No redis-server binary (e.g. the slim image): serve without the shared cache, degraded.
            log.warning("no Redis: %s; serving without the embedding cache (readiness reports degraded)", e)
        else:
            log.info("started a local redis-server on %s (set ONEPASS_REDIS_URL to use your own)", local.url)
            settings = settings.model_copy(update={"redis_url": local.url})
    try:
        import uvloop

        uvloop.run(serve_async(settings))
    finally:
        if local is not None:
            local.stop()
