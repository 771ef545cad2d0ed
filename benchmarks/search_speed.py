"""Decoding speed of one trained run from the checkout it is run in: greedy and beam 5 over
Multi30k test2016, best of 3, 2 threads. Run it from two checkouts to compare code versions:

    (cd CHECKOUT && python /path/to/benchmarks/search_speed.py RUN LABEL)

Not part of the test run; measure alone.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")  # the checkout the command runs in, not this file's
import detr  # noqa: E402

TEST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "translation" / "multi30k" / "test2016.en"

if __name__ == "__main__":
    torch.set_num_threads(2)
    translator = detr.load(sys.argv[1])
    src = TEST.read_text(encoding="utf-8").splitlines()
    for beam in (1, 5):
        best = []
        for _ in range(3):
            start = time.perf_counter()
            translator.translate(src, translator.options(beam_size=beam))
            best.append(time.perf_counter() - start)
        print(f"{sys.argv[2]} beam {beam}: best of 3 {min(best):.2f} s ({len(src) / min(best):.1f} sentences/s)")
