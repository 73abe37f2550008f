"""Dependency accessors: routes get the runtime and settings from app state, one line each.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker thread, which cost
~130 µs per request on the cache-hit path (measured with cProfile, docs/serving.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.runtime.predictor import Runtime


def runtime_of(request: Request) -> Runtime:
    """The app's runtime, for the hot path that skips dependency injection."""
    rt: Runtime = request.app.state.runtime
    return rt


async def get_runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def get_settings_dep(request: Request) -> Settings:
    s: Settings = request.app.state.settings
    return s


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
