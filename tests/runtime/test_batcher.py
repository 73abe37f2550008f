"""DynamicBatcher on its own, with a recording encode function (its injected dependency)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest

from service.runtime.batcher import DynamicBatcher

T = TypeVar("T")
DIM = 3


class RecordingEncoder:
    """Embeds row r as [r, r, r]; records the rows of every call. Optionally blocks until released, or
    raises on chosen calls."""

    def __init__(self, *, hold: bool = False, fail_calls: tuple[int, ...] = ()) -> None:
        self.calls: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail_calls = fail_calls

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(rows.tolist())
        self.started.set()
        self.release.wait(10)
        if len(self.calls) in self.fail_calls:
            raise RuntimeError(f"encoder failed on call {len(self.calls)}")
        return np.repeat(rows.astype(np.float32)[:, None], DIM, axis=1)


def run(encoder: RecordingEncoder, body: Callable[[DynamicBatcher], Awaitable[T]], **kwargs: object) -> T:
    """Run ``body(batcher)`` on a fresh event loop with a started batcher, closed afterwards."""
    options: dict[str, object] = {"max_batch": 64, "max_wait_ms": 50.0}
    options.update(kwargs)

    async def main() -> T:
        batcher = DynamicBatcher(encoder, **options)  # type: ignore[arg-type]
        batcher.start()
        try:
            return await asyncio.wait_for(body(batcher), 10)
        finally:
            await batcher.close()

    return asyncio.run(main())


def rows(*r: int) -> np.ndarray:
    return np.asarray(r, dtype=np.int64)


def test_embed_returns_one_row_per_requested_row_in_order() -> None:
    enc = RecordingEncoder()

    out = run(enc, lambda b: b.embed(rows(7, 3, 5)))

    np.testing.assert_array_equal(out, [[7] * DIM, [3] * DIM, [5] * DIM])
    assert out.dtype == np.float32
    assert enc.calls == [[7, 3, 5]]


def test_submissions_within_max_wait_share_one_pass() -> None:
    enc = RecordingEncoder()

    async def body(b: DynamicBatcher) -> list[np.ndarray]:
        return list(await asyncio.gather(b.embed(rows(1, 2)), b.embed(rows(3)), b.embed(rows(4, 5, 6))))

    outs = run(enc, body, max_wait_ms=200.0)

    assert enc.calls == [[1, 2, 3, 4, 5, 6]]
    assert [o[:, 0].tolist() for o in outs] == [[1, 2], [3], [4, 5, 6]]


def test_submission_after_the_pass_started_goes_to_the_next_pass() -> None:
    enc = RecordingEncoder(hold=True)

    async def body(b: DynamicBatcher) -> list[np.ndarray]:
        first = asyncio.ensure_future(b.embed(rows(1)))
        await asyncio.to_thread(enc.started.wait, 5)  # pass 1 is running
        second = asyncio.ensure_future(b.embed(rows(2)))
        await asyncio.sleep(0.01)
        enc.release.set()
        return [await first, await second]

    run(enc, body, max_wait_ms=1.0)

    assert enc.calls == [[1], [2]]


def test_max_batch_caps_a_pass_but_never_splits_one_submission() -> None:
    enc = RecordingEncoder()

    async def body(b: DynamicBatcher) -> None:
        await asyncio.gather(b.embed(rows(0, 1, 2)), b.embed(rows(3, 4)), b.embed(rows(5, 6, 7, 8, 9, 10)))

    run(enc, body, max_batch=4, max_wait_ms=200.0)

    # 3 + 2 > 4: a pass each; the 6-row submission is bigger than the cap and goes whole, alone.
    assert enc.calls == [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9, 10]]


def test_full_batch_does_not_wait_for_max_wait() -> None:
    enc = RecordingEncoder()

    async def body(b: DynamicBatcher) -> float:
        t0 = time.perf_counter()
        await b.embed(rows(0, 1, 2, 3))
        return time.perf_counter() - t0

    elapsed = run(enc, body, max_batch=4, max_wait_ms=5_000.0)

    assert elapsed < 2.0
    assert enc.calls == [[0, 1, 2, 3]]


def test_concurrent_requests_for_the_same_rows_are_encoded_once() -> None:
    enc = RecordingEncoder()

    async def body(b: DynamicBatcher) -> list[np.ndarray]:
        return list(await asyncio.gather(b.embed(rows(7)), b.embed(rows(7, 8)), b.embed(rows(8, 7))))

    outs = run(enc, body, max_wait_ms=100.0)

    assert sorted(r for call in enc.calls for r in call) == [7, 8]
    assert [o[:, 0].tolist() for o in outs] == [[7], [7, 8], [8, 7]]


def test_rows_being_encoded_are_not_submitted_again() -> None:
    enc = RecordingEncoder(hold=True)

    async def body(b: DynamicBatcher) -> list[np.ndarray]:
        first = asyncio.ensure_future(b.embed(rows(7)))
        await asyncio.to_thread(enc.started.wait, 5)
        second = asyncio.ensure_future(b.embed(rows(7)))  # joins the running pass
        await asyncio.sleep(0.01)
        enc.release.set()
        return [await first, await second]

    outs = run(enc, body, max_wait_ms=1.0)

    assert enc.calls == [[7]]
    assert [o.tolist() for o in outs] == [[[7.0] * DIM], [[7.0] * DIM]]


def test_rows_are_encoded_again_after_their_pass_completed() -> None:
    # Reuse across requests is the embedding cache's job; the batcher keeps nothing once a pass is done.
    enc = RecordingEncoder()

    async def body(b: DynamicBatcher) -> int:
        await b.embed(rows(7))
        await b.embed(rows(7))
        return b.passes

    assert run(enc, body, max_wait_ms=1.0) == 2
    assert enc.calls == [[7], [7]]


def test_encoder_error_reaches_every_waiter_and_the_batcher_keeps_working() -> None:
    enc = RecordingEncoder(fail_calls=(1,))

    async def body(b: DynamicBatcher) -> tuple[list[object], np.ndarray, int]:
        failed = await asyncio.gather(b.embed(rows(1)), b.embed(rows(2)), b.embed(rows(1, 3)), return_exceptions=True)
        after = await b.embed(rows(1, 2))
        return list(failed), after, b.passes

    failed, after, passes = run(enc, body, max_wait_ms=100.0)

    assert len(enc.calls) == 2
    assert all(isinstance(e, RuntimeError) and str(e) == "encoder failed on call 1" for e in failed)
    np.testing.assert_array_equal(after[:, 0], [1, 2])
    assert passes == 1  # a failed pass is not counted


def test_cancelled_request_does_not_fail_others_waiting_on_the_same_rows() -> None:
    enc = RecordingEncoder(hold=True)

    async def body(b: DynamicBatcher) -> np.ndarray:
        gone = asyncio.ensure_future(b.embed(rows(7)))
        stays = asyncio.ensure_future(b.embed(rows(7, 8)))
        await asyncio.to_thread(enc.started.wait, 5)
        gone.cancel()  # e.g. the client of the first request went away
        await asyncio.sleep(0.01)
        enc.release.set()
        return await stays

    out = run(enc, body, max_wait_ms=20.0)

    np.testing.assert_array_equal(out[:, 0], [7, 8])
    assert enc.calls == [[7, 8]]


def test_batching_off_runs_each_submission_as_its_own_pass() -> None:
    enc = RecordingEncoder()

    async def body(b: DynamicBatcher) -> int:
        await asyncio.gather(b.embed(rows(1)), b.embed(rows(2, 3)), b.embed(rows(4)))
        return b.passes

    passes = run(enc, body, batching=False, max_wait_ms=200.0)

    assert passes == 3
    assert enc.calls == [[1], [2, 3], [4]]


def test_queue_wait_is_reported_once_per_submission() -> None:
    enc = RecordingEncoder()
    waits: list[float] = []

    async def body(b: DynamicBatcher) -> None:
        await asyncio.gather(b.embed(rows(1)), b.embed(rows(2)))

    run(enc, body, max_wait_ms=30.0, on_queue_wait=waits.append)

    assert len(waits) == 2
    assert all(0.0 <= w < 5.0 for w in waits)
    assert max(waits) >= 0.02  # the first submission waited for max_wait before the pass


@pytest.mark.parametrize("batching", [True, False])
def test_close_cancels_waiters_of_a_pass_that_never_ran(batching: bool) -> None:
    enc = RecordingEncoder(hold=True)

    async def main() -> BaseException | None:
        b = DynamicBatcher(enc, max_batch=8, max_wait_ms=1.0, batching=batching)
        b.start()
        first = asyncio.ensure_future(b.embed(rows(1)))
        await asyncio.to_thread(enc.started.wait, 5)
        waiting = asyncio.ensure_future(b.embed(rows(2)))  # queued behind the running pass
        await asyncio.sleep(0.01)
        await b.close()
        enc.release.set()
        results = await asyncio.gather(first, waiting, return_exceptions=True)
        return results[1] if isinstance(results[1], BaseException) else None

    err = asyncio.run(main())

    assert isinstance(err, asyncio.CancelledError)
