"""Dynamic batching: requests that arrive close together share one model call.

Each served model has one `Batcher`: a bounded queue and one worker thread that owns the
model (the event loop never runs it). The worker takes the oldest request, waits up to
`max_wait` for more requests that can share its batch (the same `key`: the same task and
decoding options), up to `max_tokens` source tokens, then runs them as one call and hands
each caller its own results, in order. A request larger than the budget runs alone.
Because detr's decoding is batch-invariant, a request's output does not depend on what it
was batched with.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The model's queue holds `max_queue` requests already (the server answers 429)."""


@dataclass
class Job:
    """One request's share of work: `inputs` for `run`, which maps a list of inputs to a list of outputs."""

    key: Hashable  # jobs with equal keys may share a call of `run`
    inputs: list[Any]
    tokens: int  # its cost against the batch budget
    run: Callable[[list[Any]], list[Any]]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchRecord:
    """What one model call served, for metrics."""

    requests: int
    inputs: int
    tokens: int
    seconds: float


class Batcher:
    """The queue and worker thread of one model."""

    def __init__(self, name: str, max_tokens: int, max_wait: float, max_queue: int,
                 on_batch: Callable[[BatchRecord], None] | None = None) -> None:
        self.name, self.max_tokens, self.max_wait, self.max_queue = name, max_tokens, max_wait, max_queue
        self.on_batch = on_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"detr-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queue)

    def submit(self, job: Job) -> Future:
        """Queue `job`; its future gets the outputs (or the exception `run` raised).

        Raises:
            QueueFull: `max_queue` requests are waiting already.
            RuntimeError: the batcher is stopping.
        """
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.name)
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued requests, then end the worker thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _take_batch(self) -> list[Job] | None:
        """Wait for work and take one batch out of the queue (None: stopped and drained)."""
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._cv.wait()
            first = self._queue[0]
            deadline = first.enqueued + self.max_wait
            while True:
                batch, tokens = [], 0
                for job in self._queue:
                    if job.key == first.key and (not batch or tokens + job.tokens <= self.max_tokens):
                        batch.append(job)
                        tokens += job.tokens
                wait = deadline - time.monotonic()
                if tokens >= self.max_tokens or wait <= 0 or self._stopping:
                    break
                self._cv.wait(wait)
            for job in batch:
                self._queue.remove(job)
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            inputs = [x for job in batch for x in job.inputs]
            start = time.perf_counter()
            try:
                outputs = batch[0].run(inputs)
            except BaseException as err:  # every caller of the batch learns why; the worker goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            seconds = time.perf_counter() - start
            at = 0
            for job in batch:
                mine = outputs[at:at + len(job.inputs)]
                at += len(job.inputs)
                if not job.future.done():  # a caller that went away cancelled its future: nothing to deliver
                    job.future.set_result(mine)
            if self.on_batch is not None:
                self.on_batch(BatchRecord(len(batch), len(inputs), sum(job.tokens for job in batch), seconds))
