"""Dynamic batching: requests that arrive close together share the model's work.

Each served model has one `Batcher`: a bounded queue and one or more worker threads that
run the model (the event loop never does). A worker takes the oldest request, waits up to
`max_wait` for more requests that can share its batch (the same `key`: the same task and
decoding options), up to `max_tokens` source tokens, then runs them as one call and hands
each caller its own results, in order. A request larger than the budget runs alone.

With several workers each runs batches of its own at once, and each takes no more than its
share of the work (the tokens running and waiting, split evenly among the workers), so that
64 waiting requests become two batches of 32 on two workers rather than one batch of 64
beside an idle worker. On a small machine two workers of one thread each keep both cores
busy where one worker of two threads stalls whenever anything else (the event loop, the
clients) takes a core from one of its threads (benchmarks/RESULTS.md, "two workers").

Requests that can be decoded a step at a time (a job with a `stream`: translation) batch
continuously instead: they join the running batch between two decoding steps, as long as
its requests' tokens stay within `max_tokens` and the stream is `joinable`, and each leaves
as soon as its last line ends, so the batch stays full while requests come and go
(iteration-level scheduling, as in Orca and vLLM). A queued request of another key that has
waited `max_wait` stops new joiners; the running batch then drains and that key goes next.

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

    @property
    def joinable(self) -> bool:
        """Whether new requests may join it now (beam search takes them only while its batch is young)."""

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
    waiting: int = 0  # requests left in the queue after it


class Batcher:
    """The queue and worker threads of one model."""

    def __init__(self, name: str, max_tokens: int, max_wait: float, max_queue: int,
                 on_batch: Callable[[BatchRecord], None] | None = None,
                 on_start: Callable[[], None] | None = None, workers: int = 1) -> None:
        """`on_start` runs first in each worker thread (the server sets the thread's intra-op threads there);
        `workers`: how many threads run batches of this model at once."""
        self.name, self.max_tokens, self.max_wait, self.max_queue = name, max_tokens, max_wait, max_queue
        self.on_batch, self.on_start = on_batch, on_start
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._forming = threading.Lock()  # one worker at a time gathers a new batch
        self._loads = [0] * workers  # source tokens each worker is running
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, args=(w,), daemon=True,
                                          name=f"detr-batcher-{name}" + (f"-{w}" if workers > 1 else ""))
                         for w in range(workers)]
        for thread in self._threads:
            thread.start()

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
        """Finish the queued requests, then end the worker threads (waiting up to `timeout` in all)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _share(self, key: Hashable) -> float:
        """A worker's share of the work of `key`: the tokens running and waiting, split among the workers
        (the caller holds the lock)."""
        return (sum(self._loads) + sum(job.tokens for job in self._queue if job.key == key)) / len(self._loads)

    def _fits(self, worker: int, tokens: int, job: Job, share: float) -> bool:
        """Whether `job` may join the `tokens` that `worker` runs or gathers: within the budget and within
        the worker's share (a worker that has nothing takes at least one job)."""
        total = self._loads[worker] + tokens + job.tokens
        return total <= self.max_tokens and total <= max(share, job.tokens)

    def _take_batch(self, worker: int) -> list[Job] | None:
        """Wait for work and take one batch out of the queue (None: stopped and drained)."""
        with self._forming, self._cv:
            while True:
                while not self._queue:
                    if self._stopping:
                        return None
                    self._cv.wait()
                first = self._queue[0]  # (other workers' running batches may take jobs while this one waits)
                share = self._share(first.key)
                batch, tokens = [], 0
                for job in self._queue:
                    if job.key == first.key and (not batch or self._fits(worker, tokens, job, share)):
                        batch.append(job)
                        tokens += job.tokens
                wait = first.enqueued + self.max_wait - time.monotonic()
                if tokens >= self.max_tokens or wait <= 0 or self._stopping:
                    break
                self._cv.wait(wait)
            for job in batch:
                self._queue.remove(job)
            self._loads[worker] = tokens
            return batch

    def _loop(self, worker: int) -> None:
        if self.on_start is not None:
            self.on_start()
        while (batch := self._take_batch(worker)) is not None:
            try:
                self._work(batch, worker)
            finally:
                with self._cv:
                    self._loads[worker] = 0

    def _work(self, batch: list[Job], worker: int) -> None:
        if batch[0].stream is not None:
            self._stream(batch, worker)
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

    def _stream(self, batch: list[Job], worker: int) -> None:
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
            joiners = self._take_joiners(batch[0].key, worker, sum(job.tokens for job in running.values()),
                                         stream.joinable)

    def _take_joiners(self, key: Hashable, worker: int, running: int, joinable: bool) -> list[Job]:
        """Queued jobs of `key` that fit beside the `running` tokens of `worker`'s stream (budget and
        share), oldest first up to the first that does not fit; none once a request of another key has
        waited `max_wait` (the batch then drains for it), nor while the stream is not `joinable`."""
        with self._cv:
            self._loads[worker] = running
            now = time.monotonic()
            if not joinable or any(job.key != key and now - job.enqueued >= self.max_wait for job in self._queue):
                return []
            share, taken, gone, tokens = self._share(key), [], [], 0
            for job in self._queue:
                if job.future.cancelled():  # its caller went away while it waited
                    gone.append(job)
                elif job.key == key:
                    if not self._fits(worker, tokens, job, share):
                        break  # first come, first joined: a large request is not overtaken for ever
                    taken.append(job)
                    tokens += job.tokens
            for job in taken + gone:
                self._queue.remove(job)
            self._loads[worker] = running + tokens
            return taken

    def _record(self, batch: list[Job], seconds: float, tokens: int | None = None) -> None:
        if self.on_batch is not None:
            tokens = sum(job.tokens for job in batch) if tokens is None else tokens
            self.on_batch(BatchRecord(len(batch), sum(len(job.inputs) for job in batch), tokens, seconds,
                                      len(self._queue)))


def _deliver(job: Job, outputs: list[Any]) -> None:
    if not job.future.done():  # a caller that went away cancelled its future: nothing to deliver
        job.future.set_result(outputs)


def _fail(jobs: list[Job], err: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(err)
