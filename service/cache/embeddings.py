"""Embedding cache: an in-process LRU in front of Redis, behind a circuit breaker.

Keys are namespaced by encoder hash and graph snapshot id (``onepass:emb:<encoder>:<snapshot>:<id>``),
so a new encoder or a new graph never reads an old embedding, while a head swap keeps every entry
valid. Values are raw little-endian float32 (or float16) bytes: no pickle, no JSON.

Redis trouble never fails a request: calls have bounded timeouts and no retries, and after
``failures`` consecutive errors the breaker opens and requests skip Redis (computing embeddings
instead) until a half-open probe succeeds.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
K = TypeVar("K")
T = TypeVar("T")
V = TypeVar("V")


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Consecutive-failure breaker. Single event loop, so no locking is needed."""

    def __init__(self, failures: int, reset_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._monotonic = monotonic
        self.state = BreakerState.CLOSED
        self._errors = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    def allow(self) -> bool:
        """May a Redis call go out now? In half-open state only one probe at a time."""
        if self.state is BreakerState.OPEN:
            if self._monotonic() - self._opened_at < self.reset_s:
                return False
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
        return True

    def success(self) -> None:
        self._errors = 0
        self._probe_in_flight = False
        self.state = BreakerState.CLOSED

    def abandon(self) -> None:
        """The call :meth:`allow` let out ended without an answer (cancelled): free the half-open probe
        slot, or the breaker would refuse every later call and stay half-open for good."""
        self._probe_in_flight = False

    def failure(self) -> None:
        self._probe_in_flight = False
        self._errors += 1
        if self.state is BreakerState.HALF_OPEN or self._errors >= self.failures:
            if self.state is not BreakerState.OPEN:
                log.warning("redis circuit breaker open after %d errors", self._errors)
            self.state = BreakerState.OPEN
            self._opened_at = self._monotonic()


class LocalLRU(Generic[K, V]):
    """Bounded in-process map (the hot set stays in process memory); least recently used goes first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


class EmbeddingCache:
    """Redis-backed embedding store for one (encoder hash, snapshot id) namespace."""

    def __init__(
        self,
        client: aioredis.Redis | None,
        *,
        namespace: str,
        dim: int,
        ttl_s: int,
        dtype: str = "float32",
        breaker: CircuitBreaker | None = None,
        local_entries: int = 0,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.dim = dim
        self.ttl_s = ttl_s
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.breaker = breaker or CircuitBreaker(3, 2.0)
        self.local: LocalLRU[int, np.ndarray] = LocalLRU(local_entries)
        self.errors = 0
        self._on_error = on_error  # e.g. the cache-lookup error counter
        self._pending: set[asyncio.Task[None]] = set()

    def _error(self) -> None:
        self.errors += 1
        self.breaker.failure()
        if self._on_error is not None:
            self._on_error()

    def key(self, customer_id: int) -> str:
        return f"onepass:emb:{self.namespace}:{customer_id}"

    @property
    def degraded(self) -> bool:
        return self.client is None or self.breaker.state is not BreakerState.CLOSED

    def _decode(self, raw: bytes) -> np.ndarray | None:
        if len(raw) != self.dim * self.dtype.itemsize:
            return None  # written by another dtype or dimension: treat as a miss
        return np.frombuffer(raw, dtype=self.dtype).astype(np.float32)

    async def _call(self, what: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run one Redis call through the breaker: ``(True, result)``, or ``(False, None)`` when the breaker
        skipped it or it failed (counted, never raised: Redis trouble only costs the cache)."""
        if self.client is None or not self.breaker.allow():
            return False, None
        try:
            result = await fn(self.client)
        except asyncio.CancelledError:
            self.breaker.abandon()  # free a half-open probe slot the cancelled call held
            raise
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._error()
            log.debug("redis %s failed: %r", what, e)
            return False, None
        self.breaker.success()
        return True, result

    async def probe(self) -> None:
        """One PING through the breaker, so readiness reflects Redis even when no request has hit it."""
        await self._call("ping", lambda c: c.ping())  # type: ignore[no-any-return]

    async def get_many(self, ids: Sequence[int]) -> list[np.ndarray | None]:
        """Embeddings for ``ids`` (None = miss): local LRU first, then one Redis MGET for the rest."""
        out: list[np.ndarray | None] = [self.local.get(i) for i in ids]
        missing = [k for k, v in enumerate(out) if v is None]
        if not missing:
            return out
        keys = [self.key(ids[k]) for k in missing]
        ok, raws = await self._call("mget", lambda c: c.mget(keys))
        if not ok or raws is None:
            return out
        for k, raw in zip(missing, raws, strict=True):
            if isinstance(raw, bytes):
                emb = self._decode(raw)
                if emb is not None:
                    out[k] = emb
                    self.local.put(ids[k], emb)
        return out

    def remember(self, ids: Sequence[int], embs: np.ndarray) -> None:
        """Keep fresh embeddings locally and write them to Redis in the background (pipeline + TTL)."""
        for i, e in zip(ids, embs, strict=True):
            self.local.put(i, e)
        if self.client is None:
            return
        task = asyncio.get_running_loop().create_task(self._write(list(ids), embs))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, ids: list[int], embs: np.ndarray) -> None:
        data = np.ascontiguousarray(embs, dtype=self.dtype)

        async def pipeline(client: aioredis.Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for i, row in zip(ids, data, strict=True):
                    pipe.set(self.key(i), row.tobytes(), ex=self.ttl_s)
                await pipe.execute()

        await self._call("write", pipeline)

    async def drain(self) -> None:
        """Wait for background writes (tests, shutdown)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
