"""Dynamic batching with single-flight for encoder passes (like Triton's dynamic batcher).

Requests submit their cache-miss rows; a worker task gathers the submissions that arrive within
``max_wait_ms`` (or until ``max_batch`` rows), runs ONE encoder pass for all of them in a worker thread
(off the event loop, so probes stay responsive) and resolves every waiting future. A row already
queued or being encoded is not submitted again: concurrent misses for the same customer share one
future (single-flight). One request's misses are never split across passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Submission:
    rows: np.ndarray
    enqueued: float = field(default_factory=time.perf_counter)


log = logging.getLogger(__name__)
EncodeFn = Callable[[np.ndarray], np.ndarray]  # graph rows -> embeddings [n, H] float32


class DynamicBatcher:
    """Coalesces concurrent encoder work. ``batching=False`` runs each submission as its own pass."""

    def __init__(
        self,
        encode: EncodeFn,
        *,
        max_batch: int,
        max_wait_ms: float,
        batching: bool = True,
        on_queue_wait: Callable[[float], None] | None = None,
        on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
    ) -> None:
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.batching = batching
        self._on_queue_wait = on_queue_wait
        self._on_batch = on_batch
        self._inflight: dict[int, asyncio.Future[np.ndarray]] = {}
        self._queue: list[_Submission] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onepass-encoder")
        self._worker: asyncio.Task[None] | None = None
        self.passes = 0

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="onepass-batcher")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for fut in self._inflight.values():
            if not fut.done():
                fut.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of ``rows`` (unique graph rows), computed once across concurrent callers."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[np.ndarray]] = []
        new: list[int] = []
        for r in rows.tolist():
            fut = self._inflight.get(r)
            if fut is None:
                fut = loop.create_future()
                self._inflight[r] = fut
                new.append(r)
            futures.append(fut)
        if new:
            self._queue.append(_Submission(np.asarray(new, dtype=np.int64)))
            self._wakeup.set()
        # shield: the futures are shared with concurrent callers (single-flight); without it, one cancelled
        # request (client gone, timeout) would cancel the shared futures and fail every other waiter.
        results = await asyncio.gather(*(asyncio.shield(f) for f in futures))
        return np.stack(results) if results else np.zeros((0, 0), dtype=np.float32)

    def _take(self) -> list[_Submission]:
        """Whole submissions, oldest first, up to max_batch rows (a bigger one goes alone)."""
        if not self.batching:
            return [self._queue.pop(0)]
        taken: list[_Submission] = []
        n = 0
        while self._queue and (not taken or n + len(self._queue[0].rows) <= self.max_batch):
            sub = self._queue.pop(0)
            taken.append(sub)
            n += len(sub.rows)
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.batching and self.max_wait_s > 0:
                # Give concurrent requests a moment to join, unless the batch is already full.
                deadline = self._queue[0].enqueued + self.max_wait_s
                while sum(len(s.rows) for s in self._queue) < self.max_batch:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            subs = self._take()
            rows = np.concatenate([s.rows for s in subs])
            now = time.perf_counter()
            if self._on_queue_wait is not None:
                for s in subs:
                    self._on_queue_wait(now - s.enqueued)
            try:
                embs = await loop.run_in_executor(self._executor, self._encode, rows)
                self.passes += 1
                if len(embs) != len(rows):
                    raise RuntimeError(f"encoder returned {len(embs)} embeddings for {len(rows)} rows")
            except Exception as e:  # noqa: BLE001 - the error goes to every waiting request
                for r in rows.tolist():
                    fut = self._inflight.pop(r, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(e)
                continue
            for r, emb in zip(rows.tolist(), embs, strict=True):
                fut = self._inflight.pop(r, None)
                if fut is not None and not fut.done():
                    fut.set_result(emb)
            if self._on_batch is not None:
                try:
                    self._on_batch(rows, embs)  # e.g. one cache write-back per pass, not one per request
                except Exception:  # noqa: BLE001 - a failed write-back must not stop the batcher
                    log.exception("after-batch hook failed; the batcher keeps running")
