"""Why `detr serve` keeps PyTorch's parallel work on one thread: a matrix multiply in a worker
thread, before and after the main thread has run parallel work of its own.

Each thread that runs a parallel PyTorch operation gets its own OpenMP team. GNU OpenMP lets its
idle threads spin for work only while the process holds no more of them than there are cores;
past that they sleep, and every parallel operation pays a wake-up. In one process, in order:

1. a worker thread, while the main thread has run nothing in parallel (one team in the process);
2. the main thread (its own team: two now);
3. a new worker thread (after the main thread's team exists);
4. the main thread at one intra-op thread, for scale.

    python benchmarks/thread_teams.py [--threads 2] [--calls 3000]

Prints seconds and the CPU cores used for `--calls` products of (64, 256) by (256, 1024), the
shape of a feed-forward layer of the Multi30k model over 64 sentences. Measure alone.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, w = torch.randn(64, 256), torch.randn(1024, 256)

    def products() -> None:
        for _ in range(args.calls):
            torch.nn.functional.linear(x, w)

    def timed(label: str, in_thread: bool) -> None:
        start, cpu = time.perf_counter(), sum(os.times()[:2])
        if in_thread:
            worker = threading.Thread(target=products)
            worker.start()
            worker.join()
        else:
            products()
        seconds = time.perf_counter() - start
        print(f"| {label} | {seconds:.2f} | {(sum(os.times()[:2]) - cpu) / seconds:.2f} |", flush=True)

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores")
    print("| where | seconds | CPU cores used |\n|---|---:|---:|")
    timed("worker thread, no other team in the process", True)
    timed("main thread", False)
    timed("worker thread, after the main thread's team", True)
    torch.set_num_threads(1)
    timed("main thread at 1 intra-op thread", False)


if __name__ == "__main__":
    main()
