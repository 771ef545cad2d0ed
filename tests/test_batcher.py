"""The request batcher on its own: grouping by key under a token and a latency budget, order,
the queue bound, errors, draining on stop."""

import threading
import time

import pytest

from detr.serve.batcher import Batcher, Job, QueueFull


class Recorder:
    """A `run` function that remembers each call's inputs and can be held back."""

    def __init__(self) -> None:
        self.calls: list[list] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs: list) -> list:
        self.gate.wait(10)
        self.calls.append(list(inputs))
        return [x * 10 for x in inputs]


def test_jobs_with_one_key_share_a_call_and_get_their_own_results():
    run, records = Recorder(), []
    batcher = Batcher("m", max_tokens=100, max_wait=0.3, max_queue=10, on_batch=records.append)
    futures = [batcher.submit(Job("k", [i, i + 100], 2, run)) for i in range(4)]
    assert [f.result(5) for f in futures] == [[0, 1000], [10, 1010], [20, 1020], [30, 1030]]
    assert run.calls == [[0, 100, 1, 101, 2, 102, 3, 103]]  # one call, in arrival order
    assert records[0].requests == 4 and records[0].inputs == 8 and records[0].tokens == 8
    batcher.stop()


def test_other_keys_and_the_token_budget_split_batches():
    run = Recorder()
    run.gate.clear()  # hold the worker so that everything below is queued before the first call
    batcher = Batcher("m", max_tokens=5, max_wait=0.05, max_queue=10)
    first = batcher.submit(Job("a", [0], 1, run))
    time.sleep(0.2)  # the worker has taken the first job and waits at the gate
    jobs = [batcher.submit(Job(key, [i], 3 if key == "a" else 2, run))
            for i, key in enumerate(["a", "b", "a", "a", "b"], start=1)]
    run.gate.set()
    for f in [first, *jobs]:
        f.result(5)
    # after [0]: "a" jobs of 3 tokens fit one at a time under 5; the two "b" jobs of 2 batch together
    assert sorted(map(tuple, run.calls)) == sorted([(0,), (1,), (3,), (4,), (2, 5)])
    batcher.stop()


def test_a_request_waits_at_most_max_wait_for_company():
    run = Recorder()
    batcher = Batcher("m", max_tokens=1000, max_wait=0.2, max_queue=10)
    start = time.perf_counter()
    assert batcher.submit(Job("k", [1], 1, run)).result(5) == [10]
    assert 0.15 < time.perf_counter() - start < 2.0
    batcher.stop()


def test_a_full_queue_refuses_and_errors_reach_every_caller():
    run = Recorder()
    run.gate.clear()
    batcher = Batcher("m", max_tokens=1, max_wait=0.0, max_queue=2)
    held = batcher.submit(Job("k", [1], 1, run))
    time.sleep(0.2)  # taken by the worker: the queue is empty again
    batcher.submit(Job("k", [2], 1, run))
    batcher.submit(Job("k", [3], 1, run))
    with pytest.raises(QueueFull):
        batcher.submit(Job("k", [4], 1, run))
    run.gate.set()
    assert held.result(5) == [10]

    def broken(inputs):
        raise ValueError("no")

    failing = Batcher("m", max_tokens=100, max_wait=0.2, max_queue=10)
    futures = [failing.submit(Job("k", [i], 1, broken)) for i in range(3)]
    for f in futures:
        with pytest.raises(ValueError, match="no"):
            f.result(5)
    assert failing.submit(Job("k", [7], 1, Recorder())).result(5) == [70]  # the worker lives on
    batcher.stop()
    failing.stop()


def test_stop_finishes_what_was_queued_then_refuses():
    run = Recorder()
    batcher = Batcher("m", max_tokens=100, max_wait=5.0, max_queue=10)
    future = batcher.submit(Job("k", [1], 1, run))
    batcher.stop(timeout=5)  # does not wait the 5 s for company: stopping runs what is there
    assert future.result(0) == [10]
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(Job("k", [2], 1, run))


class Countdown:
    """A stream whose input n takes n steps and gives n * 10; it records who ran at every step."""

    def __init__(self, gate: threading.Event | None = None, joinable_steps: int | None = None) -> None:
        self.left: dict = {}  # tag → [steps left per input]
        self.steps: list[set] = []
        self.gate = gate
        self.joinable_steps = joinable_steps  # new jobs may join only in this many first steps (None: always)

    @property
    def joinable(self) -> bool:
        return self.joinable_steps is None or len(self.steps) < self.joinable_steps

    @property
    def running(self) -> int:
        return sum(1 for _, left in self.left.values() for n in left if n > 0)

    def add(self, tag, inputs):
        if any(x < 0 for x in inputs):
            raise ValueError("negative input")
        if not any(inputs):
            return [(tag, [0] * len(inputs))]
        self.left[tag] = (list(inputs), list(inputs))
        return []

    def step(self):
        if self.gate is not None:
            self.gate.wait(10)
        self.steps.append(set(self.left))
        done = []
        for tag, (given, left) in list(self.left.items()):
            left[:] = [n - 1 for n in left]
            if all(n <= 0 for n in left):
                del self.left[tag]
                done.append((tag, [x * 10 for x in given]))
        return done


def test_streamed_jobs_join_the_running_batch_between_steps_and_leave_when_done():
    gate = threading.Event()
    stream, records = Countdown(gate), []
    batcher = Batcher("m", max_tokens=10, max_wait=0.5, max_queue=10, on_batch=records.append)
    job = lambda key, xs, tokens=1: Job(key, xs, tokens, Recorder(), stream=lambda: stream)
    long = batcher.submit(job("k", [6]))
    time.sleep(0.8)  # after its 0.5 s wait for company, the worker holds the long job at its first step
    short = batcher.submit(job("k", [2, 1]))
    heavy = batcher.submit(job("k", [1], tokens=10))  # over the budget beside the running ones: waits
    other = batcher.submit(job("other", [1]))  # another key: waits for the batch to drain
    gate.set()
    assert short.result(5) == [20, 10]
    assert long.result(5) == [60]
    assert heavy.result(5) == [10] and other.result(5) == [10]
    tags = [len(ran) for ran in stream.steps]
    assert tags[:3] == [1, 2, 2]  # the short job joined at the second step and left after its last
    assert max(r.requests for r in records) == 2  # steps are recorded as batches: two requests shared them
    batcher.stop()


def test_a_stream_that_takes_no_joiners_now_leaves_them_for_its_next_batch():
    gate = threading.Event()
    stream = Countdown(gate, joinable_steps=1)  # as beam search: joiners only at its first step
    batcher = Batcher("m", max_tokens=10, max_wait=0.05, max_queue=10)
    job = lambda xs: Job("k", xs, 1, Recorder(), stream=lambda: stream)  # noqa: E731
    long = batcher.submit(job([3]))
    time.sleep(0.3)  # the worker holds it at its first step
    late = batcher.submit(job([1]))
    gate.set()
    assert long.result(5) == [30] and late.result(5) == [10]
    assert [len(ran) for ran in stream.steps] == [1, 1, 1, 1]  # the late job ran after the long one, alone
    batcher.stop()


def test_a_streamed_job_that_fails_to_join_fails_alone():
    stream = Countdown()
    batcher = Batcher("m", max_tokens=10, max_wait=0.05, max_queue=10)
    futures = [batcher.submit(Job("k", xs, 1, Recorder(), stream=lambda: stream)) for xs in ([3], [-1], [0, 0])]
    assert futures[0].result(5) == [30]
    with pytest.raises(ValueError, match="negative"):
        futures[1].result(5)
    assert futures[2].result(5) == [0, 0]  # nothing to decode: done as it joins
    batcher.stop()


def test_on_start_runs_first_in_the_worker_thread():
    seen = []
    batcher = Batcher("m", max_tokens=10, max_wait=0.0, max_queue=10,
                      on_start=lambda: seen.append(("start", threading.current_thread().name)))
    run = lambda inputs: seen.append(("run", threading.current_thread().name)) or inputs  # noqa: E731
    assert batcher.submit(Job("k", [1], 1, run)).result(5) == [1]
    batcher.stop()
    assert seen == [("start", "detr-batcher-m"), ("run", "detr-batcher-m")]


def test_two_workers_run_batches_at_once_each_taking_its_share():
    meeting = threading.Barrier(2, timeout=5)  # each call waits for the other: they must run at the same time
    calls = []

    def run(inputs):
        calls.append(list(inputs))
        meeting.wait()
        return [x * 10 for x in inputs]

    batcher = Batcher("m", max_tokens=100, max_wait=0.2, max_queue=10, workers=2)
    futures = [batcher.submit(Job("k", [i], 1, run)) for i in range(4)]
    assert [f.result(10) for f in futures] == [[0], [10], [20], [30]]
    assert sorted(calls) == [[0, 1], [2, 3]]  # half each, not all four on one worker beside an idle one
    batcher.stop()


def test_two_workers_stream_side_by_side_and_share_the_joiners():
    streams: list[Countdown] = []

    class Slow(Countdown):  # a step takes a while, as a model's does (the other worker gets to run)
        def step(self):
            time.sleep(0.005)
            return super().step()

    def new_stream():
        streams.append(Slow())
        return streams[-1]

    batcher = Batcher("m", max_tokens=100, max_wait=0.2, max_queue=100, workers=2)
    futures = [batcher.submit(Job("k", [3 + i % 4], 1, Recorder(), stream=new_stream)) for i in range(40)]
    assert [f.result(10) for f in futures] == [[(3 + i % 4) * 10] for i in range(40)]
    assert len(streams) >= 2
    served = sorted(len(set().union(*s.steps)) for s in streams)
    assert served[-1] <= 30, served  # neither worker took (nearly) everything
    batcher.stop()
    assert not any(t.is_alive() for t in batcher._threads)
