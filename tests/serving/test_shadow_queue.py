"""The answering process's queue to the shadow scorer: requests go in batches (one call
per flush interval or batch size, every segment's together), and a lagging scorer
costs dropped, counted batches, never unbounded memory."""

from __future__ import annotations

import asyncio

from serving import app
from serving.app import ShadowQueue


class _Method:
    """A handle method whose calls wait until the test releases them."""

    def __init__(self) -> None:
        self.calls: list[list] = []
        self.release = asyncio.Event()

    def remote(self, calls):
        self.calls.append(calls)

        async def answer():
            await self.release.wait()

        return answer()


class _Handle:
    def __init__(self) -> None:
        self.score = _Method()


def test_requests_go_in_batches_and_a_lagging_scorer_drops():
    async def run() -> tuple[_Handle, ShadowQueue]:
        h = _Handle()
        q = ShadowQueue(h)
        # under the batch size: nothing is sent before the flush interval
        q.put("feed", "challenger", [{"r": 1}])
        q.put("video", "champion", [{"r": 2}, {"r": 3}])
        await asyncio.sleep(0)
        assert h.score.calls == []
        await asyncio.sleep(app.SHADOW_FLUSH_S * 1.5)
        assert h.score.calls == [[("feed", "challenger", [{"r": 1}]),
                                  ("video", "champion", [{"r": 2}, {"r": 3}])]]  # fmt: skip
        # a full batch goes at once; past SHADOW_MAX_CALLS unanswered calls (the first
        # call above among them), batches drop
        for i in range(app.SHADOW_MAX_CALLS + 2):
            q.put("feed", "challenger", [{"r": i}] * app.SHADOW_BATCH)
        await asyncio.sleep(0)
        assert len(h.score.calls) == app.SHADOW_MAX_CALLS
        assert len(q._pending) == app.SHADOW_MAX_CALLS
        assert q.dropped == 3 * app.SHADOW_BATCH
        h.score.release.set()
        await asyncio.sleep(0.01)
        assert not q._pending  # answered calls are let go
        q.put("feed", "challenger", [{"r": 0}] * app.SHADOW_BATCH)
        await asyncio.sleep(0)
        assert len(h.score.calls) == app.SHADOW_MAX_CALLS + 1
        return h, q

    asyncio.run(run())
