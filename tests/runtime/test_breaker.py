"""CircuitBreaker's state machine with an injected clock, and the embedding cache's use of it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis.asyncio as aioredis

from service.cache.embeddings import BreakerState, CircuitBreaker, EmbeddingCache


class Clock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def open_breaker(clock: Clock, failures: int = 3, reset_s: float = 2.0) -> CircuitBreaker:
    b = CircuitBreaker(failures, reset_s, monotonic=clock)
    for _ in range(failures):
        assert b.allow()
        b.failure()
    assert b.state is BreakerState.OPEN
    return b


def test_breaker_starts_closed_and_allows_calls(clock: Clock) -> None:
    b = CircuitBreaker(3, 2.0, monotonic=clock)

    assert b.state is BreakerState.CLOSED
    assert all(b.allow() for _ in range(5))  # no probe limit while closed


def test_breaker_opens_after_n_consecutive_failures_not_before(clock: Clock) -> None:
    b = CircuitBreaker(3, 2.0, monotonic=clock)

    b.failure()
    b.failure()
    state_after_two = b.state
    b.failure()

    assert state_after_two is BreakerState.CLOSED
    assert b.state is BreakerState.OPEN
    assert not b.allow()


def test_breaker_success_resets_the_failure_count(clock: Clock) -> None:
    b = CircuitBreaker(3, 2.0, monotonic=clock)

    for _ in range(5):
        b.failure()
        b.failure()
        b.success()

    assert b.state is BreakerState.CLOSED


def test_open_breaker_refuses_calls_until_reset_s_has_passed(clock: Clock) -> None:
    b = open_breaker(clock, reset_s=2.0)

    clock.now += 1.999
    refused = b.allow()

    assert refused is False
    assert b.state is BreakerState.OPEN


def test_half_open_breaker_lets_exactly_one_probe_out(clock: Clock) -> None:
    b = open_breaker(clock, reset_s=2.0)
    clock.now += 2.0

    probe = b.allow()
    second = b.allow()
    third = b.allow()

    assert probe is True
    assert b.state is BreakerState.HALF_OPEN
    assert (second, third) == (False, False)


def test_successful_probe_closes_the_breaker(clock: Clock) -> None:
    b = open_breaker(clock)
    clock.now += 2.0
    assert b.allow()

    b.success()

    assert b.state is BreakerState.CLOSED
    assert all(b.allow() for _ in range(3))


def test_failed_probe_reopens_at_once_and_restarts_the_wait(clock: Clock) -> None:
    b = open_breaker(clock, failures=3, reset_s=2.0)
    clock.now += 2.0
    assert b.allow()

    b.failure()  # one failure is enough in half-open state
    reopened = b.state
    clock.now += 1.0
    too_early = b.allow()
    clock.now += 1.0
    next_probe = b.allow()

    assert reopened is BreakerState.OPEN
    assert too_early is False
    assert next_probe is True
    assert b.state is BreakerState.HALF_OPEN


def test_abandoned_probe_frees_the_probe_slot(clock: Clock) -> None:
    b = open_breaker(clock)
    clock.now += 2.0
    assert b.allow()

    b.abandon()

    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()


def test_cache_lookup_cancelled_during_the_probe_does_not_wedge_the_breaker(clock: Clock, redis_url: str) -> None:
    async def main() -> tuple[BreakerState, list[np.ndarray | None]]:
        client = aioredis.from_url(redis_url)
        breaker = open_breaker(clock, reset_s=2.0)
        cache = EmbeddingCache(client, namespace="t:s", dim=2, ttl_s=60, breaker=breaker)
        clock.now += 2.0
        lookup = asyncio.ensure_future(cache.get_many([1, 2]))
        await asyncio.sleep(0)  # the lookup took the probe and waits on Redis
        lookup.cancel()
        await asyncio.gather(lookup, return_exceptions=True)
        after = await cache.get_many([1, 2])  # must be allowed to probe again
        state = breaker.state
        await client.aclose()
        return state, after

    state, after = asyncio.run(main())

    assert state is BreakerState.CLOSED
    assert after == [None, None]


def test_cache_without_redis_is_degraded_and_serves_the_local_lru() -> None:
    async def main() -> list[np.ndarray | None]:
        cache = EmbeddingCache(None, namespace="t:s", dim=2, ttl_s=60, local_entries=4)
        cache.remember([1], np.ones((1, 2), dtype=np.float32))
        return await cache.get_many([1, 2])

    got = asyncio.run(main())

    assert got[1] is None
    assert got[0] is not None and got[0].tolist() == [1.0, 1.0]
    assert EmbeddingCache(None, namespace="t:s", dim=2, ttl_s=60).degraded
