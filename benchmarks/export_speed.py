"""A trained run decoded by detr's own search (float32 and int8), by its CTranslate2 export, and by
detr's search over its ONNX graphs in ONNX Runtime: speed, identity, BLEU.

Translates `--src` (one call per engine over all lines, after one warm-up call on the first 50;
with `--repeat N`, N rounds that interleave the engines, and the median)
with greedy and beam search (length penalty 0, which both engines rank the same way), and
reports sentences per second, how many outputs equal detr's own, and BLEU against `--ref`.

    python benchmarks/export_speed.py RUN --src test.en --ref test.de [--threads 2] [--beams 1,4] [--only WORDS]

Every timed call runs in a fresh process of its own: engines sharing a process slow each other
(each keeps a team of worker threads; two CTranslate2 translators in one process decode at about
0.6x the speed of one alone, RESULTS.md). `--only CTranslate2` times the CTranslate2 rows only.

Not part of the test run; the conversions go to RUN/engines/ as with `detr translate --engine`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import ctranslate2  # before torch, so that it keeps its own OpenMP runtime (detr/openmp.py)
import torch

from detr import load
from detr.export import onnx
from detr.export.ctranslate2 import CTranslate2Search, cached_export, vocabulary
from detr.metrics import bleu


class DirectCTranslate2:
    """CTranslate2 called directly, as a user of it would without detr: the run's subword tokenizer
    (`tokenizers`, batch encode/decode), then `translate_batch` over every line with its own
    batching (the same token budget as detr's batches) and one length limit for all; or, with
    `per_line_budgets`, one call per distinct length limit of detr's rule (a · source length + b),
    which is what reproducing detr's lengths without detr takes."""

    def __init__(self, folder, tokenizer, threads: int, per_line_budgets: bool = False) -> None:
        self.translator = ctranslate2.Translator(str(folder), intra_threads=threads)
        self.src, self.tgt = tokenizer.src, tokenizer.tgt
        self.tokens = vocabulary(tokenizer, "src")
        self.ids = {t: i for i, t in enumerate(vocabulary(tokenizer, "tgt"))}
        self.per_line_budgets = per_line_budgets

    def translate(self, lines: list[str], options) -> list[str]:
        sources = [[self.tokens[i] for i in ids] + ["</s>"] for ids in self.src.encode_batch(lines)]
        budget = [int(options.max_len_a * (len(s) - 1) + options.max_len_b) for s in sources]
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(budget):
            groups.setdefault(b if self.per_line_budgets else max(budget), []).append(i)
        hypotheses: list = [None] * len(lines)
        for limit, index in groups.items():
            results = self.translator.translate_batch(
                [sources[i] for i in index], max_batch_size=options.max_tokens, batch_type="tokens",
                beam_size=options.beam_size, length_penalty=0.0, max_decoding_length=limit)
            for i, result in zip(index, results):
                hypotheses[i] = [self.ids[t] for t in result.hypotheses[0]]
        return self.tgt.decode_batch(hypotheses)


def engines(run: str, threads: int) -> dict:
    """The engines by name, each made when called."""
    def on_ctranslate2(quantize: str):
        other = load(run)
        other.engine = CTranslate2Search(cached_export(run, quantize), other.tokenizer, threads=threads)
        return other

    def onnx_runtime():
        other = load(run)
        other.engine = onnx.OnnxSearch(onnx.cached_export(run), threads=threads)
        return other

    def direct(per_line_budgets: bool):
        return DirectCTranslate2(cached_export(run, "float32"), load(run).tokenizer, threads, per_line_budgets)

    return {
        "detr (torch)": lambda: load(run),
        "detr (torch) int8": lambda: load(run).quantize("int8"),
        "CTranslate2 float32": lambda: on_ctranslate2("float32"),
        "CTranslate2 float32, called directly": lambda: direct(False),
        "CTranslate2 float32, called directly with detr's per-line length limits": lambda: direct(True),
        "CTranslate2 int8": lambda: on_ctranslate2("int8"),
        "detr search on ONNX Runtime": onnx_runtime,
    }


def time_one(args: argparse.Namespace, lines: list[str]) -> None:
    """In the child process: one engine, one warm-up, one timed call; seconds and outputs as JSON."""
    engine = engines(args.run, args.threads)[args.engine]()
    options = load(args.run).options(beam_size=args.beam, length_penalty=0.0)
    engine.translate(lines[:50], options)
    start = time.perf_counter()
    outputs = engine.translate(lines, options)
    json.dump({"seconds": time.perf_counter() - start, "outputs": outputs}, sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--src", required=True)
    parser.add_argument("--ref", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per engine, interleaved; the median counts")
    parser.add_argument("--only", help="time only the engines whose names contain one of these comma-separated "
                                       "words (detr's own output is still made, untimed, to compare with)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # the child process: time this engine alone
    parser.add_argument("--beam", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = open(args.src, encoding="utf-8").read().splitlines()
    if args.engine:
        return time_one(args, lines)
    refs = open(args.ref, encoding="utf-8").read().splitlines()
    wanted = [w.strip() for w in args.only.split(",")] if args.only else [""]
    names = [name for name in engines(args.run, args.threads) if any(w in name for w in wanted)]
    print(f"{len(lines)} sentences, {args.threads} threads, torch {torch.__version__}, each call in its own process")
    print("| search | engine | sentences/s | ÷ detr | outputs equal to detr's | BLEU |")
    print("|---|---|---:|---:|---:|---:|")
    for beam in map(int, args.beams.split(",")):
        seconds: dict[str, list[float]] = {name: [] for name in names}
        outputs: dict[str, list[str]] = {}
        for _ in range(args.repeat):  # rounds interleave the engines: the machine's drift hits them alike
            for name in names:
                child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--engine", name, "--beam", str(beam)],
                                       check=True, capture_output=True, text=True)
                result = json.loads(child.stdout)
                outputs[name] = result["outputs"]
                seconds[name].append(result["seconds"])
        speeds = {name: len(lines) / statistics.median(seconds[name]) for name in names}
        own = outputs.get("detr (torch)")
        if own is None:  # detr's own output, untimed, to compare with
            reference = load(args.run)
            own = reference.translate(lines, reference.options(beam_size=beam, length_penalty=0.0))
        base = speeds.get("detr (torch)")
        for name in names:
            same = sum(a == b for a, b in zip(outputs[name], own))
            ratio = f"{speeds[name] / base:.2f}" if base else "—"
            print(f"| {'greedy' if beam == 1 else f'beam {beam}'} | {name} | {speeds[name]:,.1f} | {ratio} | "
                  f"{same}/{len(lines)} | {bleu(outputs[name], [refs]).score:.2f} |", flush=True)


if __name__ == "__main__":
    main()
