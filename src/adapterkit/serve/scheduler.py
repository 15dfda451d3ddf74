"""Continuous (iteration-level) batching of completions, and request-level batching behind the same interface.

``Scheduler`` keeps one running batch (serve/decode.py). Before every decode step, rows waiting in the queue join
it (up to ``max_batch`` rows and ``max_adapters`` distinct adapters, in arrival order); rows leave as soon as they
finish, so a long generation never holds a short one back. While nothing runs, the first row waits up to
``max_wait_s`` for others to share its prefill; while a batch runs, nobody waits. Every step runs in one worker
thread (the event loop keeps accepting requests; only that thread drives the model), and ``run(joining)`` is the
step's entry point.

A request submits its rows with one ``asyncio.Queue``; each row reports ``(index, "text", piece)`` as its text
settles, then ``(index, "done", result)`` or ``(index, "error", exception)``. ``Ticket.cancel()`` (a timeout, a
client gone) drops its rows: waiting ones are skipped, running ones leave at the next step. ``RequestLevel`` gives
the dynamic batcher (serve/batcher.py: a batch runs to its longest row, nobody joins) the same interface; its rows
report their whole text when done.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterkit.serve.batcher import Batcher, QueueWorker
from adapterkit.serve.decode import Decoder, Running
from adapterkit.serve.rows import Row
from adapterkit.serve.sequence import Sequence as Generation


@dataclass(eq=False)
class _Job:
    seq: Generation
    index: int
    events: asyncio.Queue = field(repr=False)
    queued_at: float = 0.0


@dataclass
class Ticket:
    """A request's rows in a scheduler; ``cancel`` gives them up."""

    cancel: Callable[[], None]


class Scheduler(QueueWorker):
    """Iteration-level batching over ``decoder``: rows join and leave the running batch at every step."""

    kind = "scheduler"

    def __init__(self, decoder: Decoder, max_batch: int = 16, max_wait_s: float = 0.005, max_queue: int = 256,
                 max_adapters: int = 8, on_batch: Callable[[int], None] | None = None) -> None:
        super().__init__(max_batch, max_wait_s, max_queue, max_adapters, on_batch)
        self.decoder = decoder
        self.batch = Running()
        self._jobs: dict[Generation, _Job] = {}  # every row admitted and not yet answered
        self._queue: collections.deque[_Job] = collections.deque()

    @property
    def depth(self) -> int:
        """Rows waiting to join (not counting the running batch)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self.batch)

    def run(self, joining: list[Generation]) -> list[Generation]:
        """One step of the running batch with ``joining`` prefilled into it (in the worker thread)."""
        return self.decoder.step(self.batch, joining)

    def _fail_pending(self, error: Exception) -> None:
        for job in [*self._queue, *self._jobs.values()]:  # waiting and running rows alike
            job.events.put_nowait((job.index, "error", error))
        self._queue.clear()
        self._jobs.clear()

    def submit(self, rows: Sequence[tuple[str | None, Row]], events: asyncio.Queue) -> Ticket:
        """Queue all ``rows`` ((adapter, row) pairs; row i reports on ``events`` as index i) or none of them."""
        self._check_room(len(rows))
        assert self._ready is not None  # _check_room refused a worker that is not running
        now = time.monotonic()
        jobs = [_Job(seq, i, events, now) for i, seq in enumerate(self.decoder.start(row for _, row in rows))]
        self._queue.extend(jobs)
        self._ready.set()

        def cancel() -> None:
            for job in jobs:
                job.seq.cancelled = True
        return Ticket(cancel)

    def _admit(self) -> list[_Job]:
        """Waiting rows that fit the running batch, oldest first; the first that does not fit waits (in order)."""
        adapters = {s.row.adapter for s in self.batch.seqs} - {None}
        room = self.max_batch - len(self.batch)
        joining: list[_Job] = []
        while self._queue and len(joining) < room:
            job = self._queue[0]
            if job.seq.cancelled:
                self._queue.popleft()
                continue
            name = job.seq.row.adapter
            if name is not None and name not in adapters and len(adapters) >= self.max_adapters:
                break
            joining.append(self._queue.popleft())
            if name is not None:
                adapters.add(name)
        return joining

    async def _gather(self) -> None:
        """While nothing runs: let the oldest waiting row wait up to max_wait_s for company."""
        assert self._ready is not None
        deadline = self._queue[0].queued_at + self.max_wait_s
        while len(self._queue) < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
            self._ready.clear()
            try:  # losing a wait on an Event is harmless (unlike losing a queue item)
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                break

    async def _loop(self) -> None:
        assert self._ready is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self.batch.seqs:
                while not any(not j.seq.cancelled for j in self._queue):
                    self._queue.clear()
                    self._ready.clear()
                    await self._ready.wait()
                await self._gather()
            joining = self._admit()
            for job in joining:
                self._jobs[job.seq] = job
            if self.on_batch is not None:
                self.on_batch(len(self.batch) + len(joining))
            try:
                touched = await loop.run_in_executor(self._executor, self.run, [j.seq for j in joining])
            except Exception as exc:  # a failed step answers every row it held; the batch starts afresh
                self.batch = Running()
                for job in self._jobs.values():
                    job.events.put_nowait((job.index, "error", exc))
                self._jobs.clear()
                continue
            for seq in touched:
                self._report(seq)

    def _report(self, seq: Generation) -> None:
        job = self._jobs.get(seq)
        if job is None:
            return
        if seq.error is not None:
            job.events.put_nowait((job.index, "error", seq.error))
        elif not seq.cancelled:
            piece = seq.take()
            if piece:
                job.events.put_nowait((job.index, "text", piece))
            if seq.finish is not None:
                job.events.put_nowait((job.index, "done", seq.result()))
        if seq.done:
            del self._jobs[seq]


class RequestLevel:
    """The dynamic batcher (``run(rows) -> results``: a whole batch at a time) behind the Scheduler's interface."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    @property
    def depth(self) -> int:
        """Rows waiting for a batch."""
        return self.batcher.depth

    async def start(self) -> None:
        """Start the batcher."""
        await self.batcher.start()

    async def stop(self) -> None:
        """Stop the batcher."""
        await self.batcher.stop()

    def submit(self, rows: Sequence[tuple[str | None, Row]], events: asyncio.Queue) -> Ticket:
        """Queue ``rows``; each reports its whole text, then done, once its batch has run."""
        futures = self.batcher.submit(rows)
        for index, future in enumerate(futures):
            future.add_done_callback(functools.partial(_relay, index=index, events=events))

        def cancel() -> None:
            for future in futures:
                future.cancel()
        return Ticket(cancel)


def _relay(future: asyncio.Future, *, index: int, events: asyncio.Queue) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        events.put_nowait((index, "error", error))
        return
    result: dict[str, Any] = future.result()
    if result["text"]:
        events.put_nowait((index, "text", result["text"]))
    events.put_nowait((index, "done", result))
