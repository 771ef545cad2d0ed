"""Continuous batching against batches that run to their end, in one process, without HTTP.

A stream (`Translator.stream`) is kept at `--clients` running requests of one sentence each: as
one ends, the next sentence joins, as it would under that many clients that each send their next
request at once. Beside it, on the same sentences: one offline `translate` call (sorted by
length), and `translate` on chunks of 32 and 64 sentences in input order (what request batching
of that many clients gives at best). Sentences per second, the median of `--repeat` rounds that
interleave the four.

    python benchmarks/continuous_batching.py --run runs/multi30k_en_de \
        --sentences ../shared/data/translation/multi30k/test2016.en [--lines 640] [--threads 1]

Not part of the test run. Measure alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import detr  # noqa: E402


def rates(translator: detr.Translator, lines: list[str], options: detr.DecodeConfig, clients: int,
          repeat: int) -> dict[str, float]:
    """Sentences per second of each way, the median of `repeat` interleaved rounds."""

    def chunks(n: int) -> None:
        for i in range(0, len(lines), n):
            translator.translate(lines[i:i + n], options)

    def continuous() -> None:
        stream, sent = translator.stream(options), 0
        while sent < min(clients, len(lines)):
            stream.add(sent, [lines[sent]])
            sent += 1
        while stream.running:
            for _ in stream.step():
                if sent < len(lines):
                    stream.add(sent, [lines[sent]])
                    sent += 1

    ways = {"offline (one call)": lambda: translator.translate(lines, options), "chunks of 32": lambda: chunks(32),
            "chunks of 64": lambda: chunks(64), f"continuous, {clients} running": continuous}
    measured: dict[str, list[float]] = {name: [] for name in ways}
    translator.translate(lines[:16], options)  # warm-up
    for _ in range(repeat):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            measured[name].append(len(lines) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in measured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--sentences", required=True)
    parser.add_argument("--lines", type=int, default=640)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    translator = detr.load(args.run)
    lines = [line.strip() for line in Path(args.sentences).read_text(encoding="utf-8").splitlines()][:args.lines]
    for beam in map(int, args.beams.split(",")):
        found = rates(translator, lines, translator.options(beam_size=beam), args.clients, args.repeat)
        print(f"beam {beam}: " + ", ".join(f"{name} {rate:.1f}" for name, rate in found.items()), flush=True)


if __name__ == "__main__":
    main()
