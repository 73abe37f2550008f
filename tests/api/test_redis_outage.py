"""Redis going away mid-run and coming back: requests keep succeeding, the breaker opens and readiness
reports `degraded`, then the cache is used again. A private redis-server, so the session's stays up."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.cache.local_redis import LocalRedis, free_port
from tests.api.support import drain_writes, predict, sample, scrape, served_of
from tests.helpers import make_settings


@pytest.fixture
def private_redis() -> Iterator[list[LocalRedis]]:
    """A list holding the current private server (the test replaces it on restart); all stopped at the end."""
    servers = [LocalRedis()]
    yield servers
    for s in servers:
        s.stop()


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_redis_outage_degrades_to_computing_then_recovers(
    model_store: Path, private_redis: list[LocalRedis], client_factory: Callable[..., TestClient]
) -> None:
    server = private_redis[0]
    settings = make_settings(
        model_store, server.url, local_cache_entries=0, breaker_failures=2, breaker_reset_s=0.2, redis_timeout_s=0.2
    )
    client = client_factory(settings)
    ids = [1, 2, 3]
    baseline = predict(client, ids)
    drain_writes(client)
    assert predict(client, ids)["cache"] == {"hits": 3, "misses": 0}  # from Redis: the LRU is off

    server.stop()
    during = []
    for _ in range(4):
        during.append(client.post("/v1/predict", json={"customer_ids": ids}))
        drain_writes(client)  # the failed background write counts too; wait for it, so the state is settled
    ready_during = client.get("/readyz")
    metrics_during = scrape(client)
    breaker_during = sample(metrics_during, "onepass_redis_breaker_state")

    assert [r.status_code for r in during] == [200] * 4
    assert all(r.json()["cache"] == {"hits": 0, "misses": 3} for r in during)
    assert all(r.json()["predictions"] == baseline["predictions"] for r in during)
    assert sample(metrics_during, "onepass_cache_lookups_total", result="error") >= 1
    assert ready_during.status_code == 200
    assert (ready_during.json()["ready"], ready_during.json()["degraded"]) == (True, True)
    assert ready_during.json()["redis"] == "unavailable"
    assert breaker_during == 2
    assert served_of(client).cache.errors >= settings.breaker_failures

    private_redis.append(LocalRedis(port=server.port))  # same URL, empty: no persistence

    def cache_in_use() -> bool:
        r = client.post("/v1/predict", json={"customer_ids": ids})
        assert r.status_code == 200
        drain_writes(client)
        hits: int = r.json()["cache"]["hits"]
        return hits == len(ids)

    assert wait_for(cache_in_use), "the cache was not used again after Redis came back"
    ready_after = client.get("/readyz")
    assert ready_after.status_code == 200
    assert (ready_after.json()["degraded"], ready_after.json()["redis"]) == (False, "ok")
    assert sample(scrape(client), "onepass_redis_breaker_state") == 0


def test_redis_outage_opens_the_breaker_and_stops_calling_redis(
    model_store: Path, private_redis: list[LocalRedis], client_factory: Callable[..., TestClient]
) -> None:
    server = private_redis[0]
    settings = make_settings(model_store, server.url, local_cache_entries=0, breaker_failures=3, breaker_reset_s=60)
    client = client_factory(settings)
    cache = served_of(client).cache

    server.stop()
    for _ in range(8):
        assert client.post("/v1/predict", json={"customer_ids": [5]}).status_code == 200
        drain_writes(client)
    ready = client.get("/readyz")
    m = scrape(client)

    assert cache.errors == settings.breaker_failures  # once open, requests skip Redis: no more errors
    assert ready.status_code == 200
    assert ready.json()["degraded"] is True
    assert ready.json()["redis"] == "unavailable"
    assert sample(m, "onepass_redis_breaker_state") == 2


def test_readiness_reports_redis_down_without_any_prediction_traffic(
    model_store: Path, client_factory: Callable[..., TestClient]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    client = client_factory(make_settings(model_store, dead, breaker_failures=2, breaker_reset_s=60))
    bodies = [client.get("/readyz").json() for _ in range(3)]  # each readiness check pings Redis once
    assert all(b["ready"] for b in bodies)
    assert bodies[-1]["degraded"] is True and bodies[-1]["redis"] == "unavailable"
