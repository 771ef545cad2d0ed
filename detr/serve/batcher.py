"""Dynamic batching: requests that arrive close together share the model's work.

Each served model has one `Batcher`: a bounded queue and one worker thread that owns the
model (the event loop never runs it). The worker takes the oldest request, waits up to
`max_wait` for more requests that can share its batch (the same `key`: the same task and
decoding options), up to `max_tokens` source tokens, then runs them as one call and hands
each caller its own results, in order. A request larger than the budget runs alone.

Requests that can be decoded a step at a time (a job with a `stream`: translation) batch
continuously instead: they join the running batch between two decoding steps, as long as
its requests' tokens stay within `max_tokens`, and each leaves as soon as its last line
ends, so the batch stays full while requests come and go (iteration-level scheduling, as
in Orca and vLLM). A queued request of another key that has waited `max_wait` stops new
joiners; the running batch then drains and that key goes next.

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
from typing import Any, Protocol

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The model's queue holds `max_queue` requests already (the server answers 429)."""


class Stream(Protocol):
    """A running batch decoded a step at a time, which requests join and leave (`TranslationStream`)."""

    @property
    def running(self) -> int:
        """Inputs still being decoded."""

    def add(self, tag: Hashable, inputs: list[Any]) -> list[tuple[Hashable, list[Any]]]:
        """Start request `tag`; the requests done at once (nothing to decode), with their outputs."""

    def step(self) -> list[tuple[Hashable, list[Any]]]:
        """One step; the requests that ended, with their outputs in input order."""


@dataclass
class Job:
    """One request's share of work: `inputs` for `run`, which maps a list of inputs to a list of outputs,
    or, where `stream` is given, for the running batch that jobs of its key share (`stream()` starts one)."""

    key: Hashable  # jobs with equal keys may share a call of `run`, or a stream
    inputs: list[Any]
    tokens: int  # its cost against the batch budget
    run: Callable[[list[Any]], list[Any]]
    stream: Callable[[], Stream] | None = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchRecord:
    """What one model call (or one step of a stream) served, for metrics."""

    requests: int  # sharing the call
    inputs: int
    tokens: int  # of the requests it started (a stream's step: those that joined at it)
    seconds: float


class Batcher:
    """The queue and worker thread of one model."""

    def __init__(self, name: str, max_tokens: int, max_wait: float, max_queue: int,
                 on_batch: Callable[[BatchRecord], None] | None = None,
                 on_start: Callable[[], None] | None = None) -> None:
        """`on_start` runs first in the worker thread (the server sets the thread's intra-op threads there)."""
        self.name, self.max_tokens, self.max_wait, self.max_queue = name, max_tokens, max_wait, max_queue
        self.on_batch, self.on_start = on_batch, on_start
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
        if self.on_start is not None:
            self.on_start()
        while (batch := self._take_batch()) is not None:
            self._work(batch)

    def _work(self, batch: list[Job]) -> None:
        if batch[0].stream is not None:
            self._stream(batch)
            return
        inputs = [x for job in batch for x in job.inputs]
        start = time.perf_counter()
        try:
            outputs = batch[0].run(inputs)
        except BaseException as err:  # every caller of the batch learns why; the worker goes on
            _fail(batch, err)
            return
        seconds = time.perf_counter() - start
        at = 0
        for job in batch:
            _deliver(job, outputs[at:at + len(job.inputs)])
            at += len(job.inputs)
        self._record(batch, seconds)

    def _stream(self, batch: list[Job]) -> None:
        """Decode `batch` a step at a time, letting jobs of its key join between steps, until it is empty."""
        try:
            stream = batch[0].stream()
        except BaseException as err:
            _fail(batch, err)
            return
        running: dict[int, Job] = {}  # by id(job), the tag it runs under
        joiners = batch
        while True:
            tokens = sum(job.tokens for job in joiners)
            for job in joiners:
                try:
                    ended = stream.add(id(job), job.inputs)
                except BaseException as err:  # this request's own mistake (an over-long line): it alone fails
                    _fail([job], err)
                    continue
                running[id(job)] = job
                for tag, outputs in ended:
                    _deliver(running.pop(tag), outputs)
            if not stream.running:
                return
            start = time.perf_counter()
            try:
                ended = stream.step()
            except BaseException as err:  # the batch is lost: every caller in it learns why
                _fail(list(running.values()), err)
                return
            self._record(list(running.values()), time.perf_counter() - start, tokens)
            for tag, outputs in ended:
                _deliver(running.pop(tag), outputs)
            joiners = self._take_joiners(batch[0].key, sum(job.tokens for job in running.values()))

    def _take_joiners(self, key: Hashable, tokens: int) -> list[Job]:
        """Queued jobs of `key` that fit beside `tokens` running ones, oldest first up to the first that
        does not fit; none once a request of another key has waited `max_wait` (the batch then drains
        for it)."""
        with self._cv:
            now = time.monotonic()
            if any(job.key != key and now - job.enqueued >= self.max_wait for job in self._queue):
                return []
            taken, gone = [], []
            for job in self._queue:
                if job.future.cancelled():  # its caller went away while it waited
                    gone.append(job)
                elif job.key == key:
                    if tokens + job.tokens > self.max_tokens:
                        break  # first come, first joined: a large request is not overtaken for ever
                    taken.append(job)
                    tokens += job.tokens
            for job in taken + gone:
                self._queue.remove(job)
            return taken

    def _record(self, batch: list[Job], seconds: float, tokens: int | None = None) -> None:
        if self.on_batch is not None:
            tokens = sum(job.tokens for job in batch) if tokens is None else tokens
            self.on_batch(BatchRecord(len(batch), sum(len(job.inputs) for job in batch), tokens, seconds))


def _deliver(job: Job, outputs: list[Any]) -> None:
    if not job.future.done():  # a caller that went away cancelled its future: nothing to deliver
        job.future.set_result(outputs)


def _fail(jobs: list[Job], err: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(err)
