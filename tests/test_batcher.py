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
