"""Shared fixtures: a real redis-server on a free port, a tiny trained model store, app clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.cache.local_redis import LocalRedis
from service.config import Settings
from tests.helpers import make_settings, train_tiny_model


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    """One real redis-server for the session (tests flush it through `redis_url`)."""
    server = LocalRedis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with model 'tiny' v1, trained once per session (about a second)."""
    root = tmp_path_factory.mktemp("model_store")
    train_tiny_model(root)
    return root


@pytest.fixture
def settings(model_store: Path, redis_url: str) -> Settings:
    return make_settings(model_store, redis_url)


@pytest.fixture
def client_factory() -> Iterator[Callable[..., TestClient]]:
    """Start apps with `with`-semantics (lifespan runs) and wait until they are ready."""
    clients: list[TestClient] = []

    def make(settings: Settings, *, wait_ready: bool = True, **_: Any) -> TestClient:
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        if wait_ready:
            client.portal.call(client.app.state.runtime.wait_ready)  # type: ignore[attr-defined]
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(settings: Settings, client_factory: Callable[..., TestClient]) -> TestClient:
    return client_factory(settings)
