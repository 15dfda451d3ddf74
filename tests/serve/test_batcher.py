"""The dynamic batcher alone, with a fake model: batch sizes, the adapter limit per batch, the queue bound,
cancelled rows, and failures confined to their batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from adapterkit.serve.batcher import Batcher, QueueFullError, TooManyRowsError


def _recording():
    batches: list[list[str | None]] = []

    def run(rows):
        batches.append([adapter for adapter, _ in rows])
        return [f"{adapter}:{value}" for adapter, value in rows]
    return run, batches


def test_rows_of_concurrent_requests_share_batches_within_the_adapter_limit() -> None:
    run, batches = _recording()
    sizes: list[int] = []

    async def go() -> list[str]:
        batcher = Batcher(run, max_batch=4, max_wait_s=0.05, max_queue=64, max_adapters=2, on_batch=sizes.append)
        await batcher.start()
        names = ["a", "b", "a", "c", "c", "b", "a", "a", "d", "d"]
        futures = batcher.submit([(n, (n, i)) for i, n in enumerate(names)])
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return results

    results = asyncio.run(go())
    assert results == [f"{n}:{i}" for i, n in enumerate(["a", "b", "a", "c", "c", "b", "a", "a", "d", "d"])]
    assert batches == [["a", "b", "a"], ["c", "c", "b"], ["a", "a", "d", "d"]]  # FIFO; never 3 adapters at once
    assert sizes == [3, 3, 4]


def test_a_lone_row_waits_at_most_max_wait_and_none_rows_need_no_adapter_slot() -> None:
    run, batches = _recording()

    async def go() -> float:
        batcher = Batcher(run, max_batch=8, max_wait_s=0.02, max_adapters=1)
        await batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*batcher.submit([("a", ("a", 0)), (None, (None, 1)), (None, (None, 2))]))
        waited = loop.time() - start
        await batcher.stop()
        return waited

    assert asyncio.run(go()) < 1.0
    assert batches == [["a", None, None]]


def test_queue_bound_cancelled_rows_and_failures() -> None:
    release = threading.Event()
    seen: list[list[str]] = []

    def run(rows):
        seen.append([value for _, value in rows])
        release.wait(10)
        if "boom" in [value for _, value in rows]:
            raise RuntimeError("model exploded")
        return [value for _, value in rows]

    async def go() -> None:
        batcher = Batcher(run, max_batch=1, max_wait_s=0, max_queue=2)
        await batcher.start()
        first = batcher.submit([("a", ("a", "first"))])[0]
        while not seen:  # the first row is running, the queue is empty
            await asyncio.sleep(0.005)
        doomed, boom = batcher.submit([("a", ("a", "doomed")), ("a", ("a", "boom"))])
        with pytest.raises(QueueFullError, match="2 of 2"):
            batcher.submit([("a", ("a", "third"))])
        assert batcher.depth == 2
        doomed.cancel()  # its request gave up: never run
        release.set()
        assert await first == "first"
        with pytest.raises(RuntimeError, match="exploded"):
            await boom
        late = batcher.submit([("a", ("a", "late"))])[0]
        assert await late == "late"  # the loop survived the failure
        await batcher.stop()

    asyncio.run(go())
    assert seen == [["first"], ["boom"], ["late"]]


def test_more_rows_than_the_queue_can_ever_hold_is_its_own_error() -> None:
    """A request larger than the whole queue can never be queued: TooManyRowsError (413), not a 'retry later'
    QueueFullError (503); the rows that fit are still taken."""
    run, batches = _recording()

    async def go() -> list[str]:
        batcher = Batcher(run, max_batch=8, max_wait_s=0, max_queue=3)
        await batcher.start()
        with pytest.raises(TooManyRowsError, match="4 rows in one request; the queue holds at most 3"):
            batcher.submit([("a", ("a", i)) for i in range(4)])
        assert batcher.depth == 0  # all or nothing
        results = await asyncio.gather(*batcher.submit([("a", ("a", i)) for i in range(3)]))
        await batcher.stop()
        return results

    assert asyncio.run(go()) == ["a:0", "a:1", "a:2"]
