"""Runtime.close() must finish: `onepass serve` waits for it on SIGTERM, before Kubernetes' SIGKILL."""

from __future__ import annotations

import asyncio
import time

from service.config import Settings
from service.runtime.predictor import Runtime
from service.runtime.registry import HeadManager


class CancelSwallowingManager(HeadManager):
    """The real head manager, whose listener eats the first cancel and carries on, as redis-py's
    `PubSub.get_message(timeout=...)` sometimes does when the cancel races its internal asyncio.timeout."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.listening = asyncio.Event()
        self.swallowed = 0

    async def _listen(self) -> None:
        self.listening.set()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.swallowed += 1
                if self.swallowed > 1:
                    raise


class StubbornListenerRuntime(Runtime):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.manager: CancelSwallowingManager = CancelSwallowingManager(self)


def test_close_finishes_when_the_head_listener_swallows_a_cancel(settings: Settings) -> None:
    async def main() -> tuple[float, int]:
        runtime = StubbornListenerRuntime(settings)
        await runtime.start()
        await runtime.wait_ready()
        await asyncio.wait_for(runtime.manager.listening.wait(), 5)
        t0 = time.perf_counter()
        closing = asyncio.ensure_future(runtime.close())
        await asyncio.wait({closing}, timeout=5)  # not wait_for: its cancel could be swallowed as well
        elapsed = time.perf_counter() - t0
        if not closing.done():
            closing.cancel()
        return elapsed, runtime.manager.swallowed

    elapsed, swallowed = asyncio.run(main())

    assert elapsed < 2.0
    assert swallowed == 2
