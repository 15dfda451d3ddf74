"""Dynamic batching: rows from concurrent requests, whatever their adapters, run through the model together.

Requests put rows in a bounded queue (full: QueueFullError, answered 503; more rows than it can ever hold:
TooManyRowsError, answered 413). One asyncio task forms batches: it takes the oldest row, then keeps taking rows
until the batch holds ``max_batch`` rows or the oldest row has waited ``max_wait_s``; a row whose adapter would
make the batch need more adapters than can be resident waits for the next batch. Each batch runs in one worker
thread, so the event loop keeps accepting requests meanwhile, and the model is only ever driven by that one thread.
A request that gives up (its timeout) cancels its rows: rows not yet started are skipped, results of rows already
running are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from adapterkit.core.errors import AdapterKitError


class QueueFullError(AdapterKitError):
    """The queue holds too many rows for now (answered 503, with Retry-After)."""


class TooManyRowsError(AdapterKitError):
    """A request with more rows than the queue can ever hold (answered 413: retrying cannot help)."""


@dataclass
class Job:
    """One row waiting for a batch, and the future its request awaits."""

    row: Any
    adapter: str | None
    future: asyncio.Future = field(repr=False)
    queued_at: float = 0.0


class QueueWorker:
    """What the batcher and the continuous scheduler share: their limits, a bounded queue's admission checks, and
    one asyncio task (``_loop``) that drives the model in one worker thread, started and stopped with the app."""

    kind = "batcher"  # named in errors and in the worker thread's name

    def __init__(self, max_batch: int, max_wait_s: float, max_queue: int, max_adapters: int,
                 on_batch: Callable[[int], None] | None) -> None:
        for what, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_adapters", max_adapters)):
            if value < 1:
                raise AdapterKitError(f"{what} must be at least 1, got {value}")
        if max_wait_s < 0:
            raise AdapterKitError(f"max_wait must be >= 0, got {max_wait_s}")
        self.max_batch, self.max_wait_s, self.max_queue, self.max_adapters = max_batch, max_wait_s, max_queue, \
            max_adapters
        self.on_batch = on_batch
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Rows waiting."""
        raise NotImplementedError

    async def start(self) -> None:
        """Start the task (on the running loop)."""
        self._ready = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"adapterkit-{self.kind}")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the task; rows still waiting (or running) fail with a 503-style error."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail_pending(QueueFullError("server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _check_room(self, rows: int) -> None:
        """Refuse ``rows`` more rows unless the worker runs and its queue has room for all of them."""
        if self._ready is None:
            raise AdapterKitError(f"the {self.kind} is not running")
        if rows > self.max_queue:
            raise TooManyRowsError(f"{rows} rows in one request; the queue holds at most {self.max_queue}")
        if self.depth + rows > self.max_queue:
            raise QueueFullError(f"server busy: the queue holds {self.depth} of {self.max_queue} rows; retry later")

    def _fail_pending(self, error: Exception) -> None:
        raise NotImplementedError

    async def _loop(self) -> None:
        raise NotImplementedError


class Batcher(QueueWorker):
    """Forms batches from queued rows and runs ``run(rows) -> results`` on them in a worker thread."""

    def __init__(self, run: Callable[[Sequence[Any]], list[Any]], max_batch: int = 16, max_wait_s: float = 0.005,
                 max_queue: int = 256, max_adapters: int = 8,
                 on_batch: Callable[[int], None] | None = None) -> None:
        super().__init__(max_batch, max_wait_s, max_queue, max_adapters, on_batch)
        self.run = run
        self._queue: collections.deque[Job] = collections.deque()
        self._carry: Job | None = None  # a row that did not fit the last batch's adapters: first in the next

    @property
    def depth(self) -> int:
        """Rows waiting (not counting the batch that runs)."""
        return len(self._queue) + (self._carry is not None)

    def _fail_pending(self, error: Exception) -> None:
        for job in [*([self._carry] if self._carry else []), *self._queue]:
            if not job.future.done():
                job.future.set_exception(error)
        self._queue.clear()
        self._carry = None

    def submit(self, rows: Sequence[tuple[str | None, Any]]) -> list[asyncio.Future]:
        """Queue all ``rows`` ((adapter, row) pairs) or none of them; one future per row."""
        self._check_room(len(rows))
        assert self._ready is not None
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        jobs = [Job(row, adapter, loop.create_future(), now) for adapter, row in rows]
        self._queue.extend(jobs)
        self._ready.set()
        return [job.future for job in jobs]

    def _next(self) -> Job | None:
        while self._carry is not None or self._queue:
            job = self._carry or self._queue.popleft()
            self._carry = None
            if not job.future.done():  # a row whose request timed out is skipped
                return job
        return None

    async def _loop(self) -> None:
        assert self._ready is not None
        loop = asyncio.get_running_loop()
        while True:
            first = self._next()
            if first is None:
                self._ready.clear()
                await self._ready.wait()
                continue
            batch, adapters = [first], {first.adapter} - {None}
            deadline = first.queued_at + self.max_wait_s
            while len(batch) < self.max_batch:
                job = self._next()
                if job is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._ready.clear()
                    try:  # losing a wait on an Event is harmless (unlike losing a queue item)
                        await asyncio.wait_for(self._ready.wait(), remaining)
                    except TimeoutError:
                        break
                    continue
                if job.adapter is not None and job.adapter not in adapters and len(adapters) >= self.max_adapters:
                    self._carry = job
                    break
                batch.append(job)
                if job.adapter is not None:
                    adapters.add(job.adapter)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.run, [j.row for j in batch])
            except Exception as exc:  # one failure answers every row of the batch; the loop goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, Exception):  # this row failed alone (e.g. its adapter was unloaded)
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
