"""Training throughput: real (non-padding) target tokens per second of a recipe's model shape.

Runs `--steps` optimiser steps of the recipe (after `--warmup` untimed ones) on its own
training data through `detr.trainer.Trainer`, so batching, padding and the loss are exactly
what `detr train` does; no validation, no checkpoints in the timed part.

    python benchmarks/train_speed.py configs/multi30k_en_de.yaml [--steps 30] [--threads 2] [--set key=value ...]

Data-parallel: the same under torchrun, with a run directory every rank sees; the tokens
counted are the whole global batch's (all ranks):

    torchrun --standalone --nproc-per-node 2 benchmarks/train_speed.py configs/multi30k_en_de.yaml \\
        --threads 1 --run-dir /tmp/speed --set train.accumulate=1

The peer: `--joeynmt VENV` trains JoeyNMT (installed in the virtual environment VENV, with
torch pinned to detr's version) on the same data with the same model shape, vocabulary size
(a joint 8k BPE, sentencepiece) and token budget per batch, and reports its own "Tokens per
Sec" (non-padding target tokens, measured the same way) over the windows after the first.

Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import yaml

from detr.config import Config, load_config
from detr.tokenizer import PAD
from detr.trainer import Trainer


def detr_speed(config: Config, steps: int, warmup: int) -> tuple[float, float, float] | None:
    """(real target tokens/s, padded tokens/s, s/step) over the global batches; None on ranks > 0."""
    trainer = Trainer(config)
    real = padded = 0
    start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            start, real, padded = time.perf_counter(), 0, 0
        batches = trainer.next_batches()
        trainer.train_step(batches)
        for b in batches:
            real += int((b.tgt_out != PAD).sum())
            padded += b.tgt_out.numel()
    seconds = time.perf_counter() - start
    main = trainer.world.main
    trainer.close()
    return (real / seconds, padded / seconds, seconds / steps) if main else None


def joeynmt_speed(venv: Path, config: Config, steps: int, warmup: int, threads: int, folder: Path) -> list[float]:
    """JoeyNMT's logged tokens/s for each window of `warmup` steps after the first window."""
    python = str(venv / "bin" / "python")
    data, m, t = config.data, config.model, config.train
    train, valid = Path(str(data.train)).resolve(), Path(str(data.valid)).resolve()
    src, tgt = f"{train}.{data.src_lang}", f"{train}.{data.tgt_lang}"
    subprocess.run([python, "-c", (
        "import sentencepiece as spm, sys; spm.SentencePieceTrainer.train(input=sys.argv[1], model_prefix=sys.argv[2], "
        "vocab_size=int(sys.argv[3]), model_type='bpe', character_coverage=1.0, bos_id=-1, eos_id=-1, "
        "minloglevel=2)"), f"{src},{tgt}", str(folder / "spm"), str(data.vocab_size)], check=True)
    pieces = [line.split("\t")[0] for line in (folder / "spm.vocab").read_text(encoding="utf-8").splitlines()]
    (folder / "vocab.txt").write_text("\n".join(p for p in pieces if p != "<unk>") + "\n", encoding="utf-8")
    side = {"level": "bpe", "lowercase": False, "max_length": data.max_len, "voc_file": str(folder / "vocab.txt"),
            "tokenizer_type": "sentencepiece", "tokenizer_cfg": {"model_file": str(folder / "spm.model")}}
    layers = {"type": "transformer", "num_layers": m.n_layers, "num_heads": m.n_heads,
              "embeddings": {"embedding_dim": m.d_model, "scale": True}, "hidden_size": m.d_model,
              "ff_size": m.d_ff, "dropout": m.dropout, "layer_norm": m.norm}
    joey = {
        "name": "speed",
        "data": {"train": str(train), "dev": str(valid), "dataset_type": "plain",
                 "src": {"lang": data.src_lang, **side}, "trg": {"lang": data.tgt_lang, **side}},
        "training": {"random_seed": t.seed, "optimizer": "adamw", "adam_betas": list(t.betas),
                     "learning_rate": t.lr, "batch_size": t.max_tokens, "batch_type": "token",
                     "batch_multiplier": t.accumulate, "normalization": "tokens", "label_smoothing": t.label_smoothing,
                     "scheduling": "warmupinversesquareroot", "learning_rate_warmup": t.warmup_steps,
                     "updates": warmup + steps, "epochs": 100, "validation_freq": 10**9, "logging_freq": warmup,
                     "model_dir": str(folder / "model"), "overwrite": True, "shuffle": True, "use_cuda": False,
                     "num_workers": 0, "print_valid_sents": []},
        "testing": {"beam_size": 1, "eval_metrics": ["bleu"]},
        "model": {"initializer": "xavier_uniform", "embed_initializer": "xavier_uniform", "tied_embeddings": True,
                  "tied_softmax": True, "encoder": layers, "decoder": layers},
    }
    (folder / "joey.yaml").write_text(yaml.safe_dump(joey), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([python, "-m", "joeynmt", "train", str(folder / "joey.yaml"), "--skip-test"],
                         capture_output=True, text=True, env=env, cwd=folder)
    rates = [float(r) for r in re.findall(r"Tokens per Sec:\s*([0-9.]+)", out.stdout + out.stderr)]
    if out.returncode != 0 or len(rates) < 2:
        raise SystemExit(f"JoeyNMT did not train (exit {out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    params = re.search(r"Total params:\s*([0-9,]+)", out.stdout + out.stderr)
    vocab = re.search(r"(?:Src|Trg) vocab \(([0-9,]+)\)|(?:src|trg) vocab size:?\s*([0-9,]+)", out.stdout + out.stderr)
    print(f"JoeyNMT's log: total params {params.group(1) if params else '?'}"
          f"{f', vocabulary {vocab.group(1) or vocab.group(2)}' if vocab else ''}")
    return rates[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-dir", help="run directory (under torchrun: one every rank sees; default: temporary)")
    parser.add_argument("--joeynmt", type=Path, metavar="VENV", help="measure JoeyNMT from this virtual environment")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.config, [f"run_dir={args.run_dir or tmp}",
                                           f"train.max_steps={args.steps + args.warmup}", *args.set])
        m, t = config.model, config.train
        encoder = m.pretrained if m.pretrained else f"{m.n_layers} layers"  # a pretrained one brings its own depth
        shape = (f"model d_model={m.d_model} encoder={encoder} decoder={m.decoder_layers} layers d_ff={m.d_ff} "
                 f"heads={m.n_heads}, max_tokens={t.max_tokens}, accumulate={t.accumulate}, threads={args.threads}")
        if args.joeynmt:
            rates = joeynmt_speed(args.joeynmt, config, args.steps, args.warmup, args.threads, Path(tmp))
            print(f"JoeyNMT, {shape}")
            print(f"windows of {args.warmup} steps after the first: {', '.join(f'{r:,.0f}' for r in rates)} "
                  f"real target tokens/s (mean {sum(rates) / len(rates):,.0f})")
            return
        config.data.valid = None
        measured = detr_speed(config, args.steps, args.warmup)
    if measured is not None:
        real, padded, per_step = measured
        world = int(os.environ.get("WORLD_SIZE", 1))
        print(f"detr, {shape}, processes={world}")
        print(f"{args.steps} steps: {real:,.0f} real target tokens/s ({padded:,.0f} with padding; target-side "
              f"padding efficiency {real / padded:.3f}), {per_step:.2f} s/step")


if __name__ == "__main__":
    main()
