"""Fixtures of the API tests (the shared ones, Redis and the tiny model, are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from tests.api.support import served_of


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client on the session's redis-server, to look at what the service wrote."""
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


@pytest.fixture
def known_ids(client: TestClient) -> list[int]:
    """Customer ids of the tiny model's graph, ascending."""
    served = served_of(client)
    ids = served.graph.nodes[served.graph.spec.seed_type].ids
    assert ids is not None
    out: list[int] = ids.tolist()
    assert len(out) >= 100
    return out
