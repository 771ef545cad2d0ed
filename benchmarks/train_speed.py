"""Training throughput: real (non-padding) target tokens per second of a recipe's model shape.

Runs `--steps` optimiser steps of the recipe (after `--warmup` untimed ones) on its own
training data through `detr.trainer.Trainer`, so batching, padding and the loss are exactly
what `detr train` does; no validation, no checkpoints in the timed part.

    python benchmarks/train_speed.py configs/multi30k_en_de.yaml [--steps 30] [--threads 2] [--set key=value ...]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from detr.config import load_config
from detr.tokenizer import PAD
from detr.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(args.config, [f"run_dir={run_dir}", "data.valid=null",
                                           f"train.max_steps={args.steps + args.warmup}", *args.set])
        trainer = Trainer(config)
        real = padded = 0
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                start, real, padded = time.perf_counter(), 0, 0
            batches = trainer.next_batches()
            trainer.train_step(batches)
            for b in batches:
                real += int((b.tgt_out != PAD).sum())
                padded += b.tgt_out.numel()
        seconds = time.perf_counter() - start
    m = config.model
    print(f"model d_model={m.d_model} layers={m.n_layers}+{m.decoder_layers} d_ff={m.d_ff} heads={m.n_heads}, "
          f"max_tokens={config.train.max_tokens}, threads={args.threads}")
    print(f"{args.steps} steps in {seconds:.1f}s: {real / seconds:,.0f} real target tokens/s "
          f"({padded / seconds:,.0f} with padding; target-side padding efficiency {real / padded:.3f}), "
          f"{seconds / args.steps:.2f} s/step")


if __name__ == "__main__":
    main()
