"""A trained run decoded by detr's own search (float32 and int8), by its CTranslate2 export, and by
detr's search over its ONNX graphs in ONNX Runtime: speed, identity, BLEU.

Translates `--src` (one call per engine over all lines, after one warm-up call on the first 50;
with `--repeat N`, N rounds that interleave the engines, and the median)
with greedy and beam search (length penalty 0, which both engines rank the same way), and
reports sentences per second, how many outputs equal detr's own, and BLEU against `--ref`.

    python benchmarks/export_speed.py RUN --src test.en --ref test.de [--threads 2] [--beams 1,4] [--only WORDS]

`--only CTranslate2` times the CTranslate2 rows alone in the process (engines sharing a process
slow each other: RESULTS.md).

Not part of the test run; the conversions go to RUN/engines/ as with `detr translate --engine`.
"""

from __future__ import annotations

import argparse
import statistics
import time

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
        import ctranslate2

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = open(args.src, encoding="utf-8").read().splitlines()
    refs = open(args.ref, encoding="utf-8").read().splitlines()
    translator = load(args.run)

    def ctranslate2(quantize: str):
        other = load(args.run)
        other.engine = CTranslate2Search(cached_export(args.run, quantize), translator.tokenizer, threads=args.threads)
        return other

    def onnx_runtime():
        other = load(args.run)
        other.engine = onnx.OnnxSearch(onnx.cached_export(args.run), threads=args.threads)
        return other

    def direct(per_line_budgets: bool):
        return DirectCTranslate2(cached_export(args.run, "float32"), translator.tokenizer, args.threads,
                                 per_line_budgets)

    makers = {
        "detr (torch)": lambda: translator,
        "detr (torch) int8": lambda: load(args.run).quantize("int8"),
        "CTranslate2 float32": lambda: ctranslate2("float32"),
        "CTranslate2 float32, called directly": lambda: direct(False),
        "CTranslate2 float32, called directly with detr's per-line length limits": lambda: direct(True),
        "CTranslate2 int8": lambda: ctranslate2("int8"),
        "detr search on ONNX Runtime": onnx_runtime,
    }
    wanted = [w.strip() for w in args.only.split(",")] if args.only else [""]
    engines = [(name, make()) for name, make in makers.items() if any(w in name for w in wanted)]
    print(f"{len(lines)} sentences, {args.threads} threads, torch {torch.__version__}")
    print("| search | engine | sentences/s | ÷ detr | outputs equal to detr's | BLEU |")
    print("|---|---|---:|---:|---:|---:|")
    for beam in map(int, args.beams.split(",")):
        options = translator.options(beam_size=beam, length_penalty=0.0)
        for _, engine in engines:
            engine.translate(lines[:50], options)  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name, _ in engines}
        outputs: dict[str, list[str]] = {}
        for _ in range(args.repeat):  # rounds interleave the engines: the machine's drift hits them alike
            for name, engine in engines:
                start = time.perf_counter()
                outputs[name] = engine.translate(lines, options)
                seconds[name].append(time.perf_counter() - start)
        timed = [(name, outputs[name], len(lines) / statistics.median(seconds[name])) for name, _ in engines]
        own = dict((name, out) for name, out, _ in timed).get("detr (torch)") or translator.translate(lines, options)
        base = dict((name, speed) for name, _, speed in timed).get("detr (torch)")
        for name, out, speed in timed:
            same = sum(a == b for a, b in zip(out, own))
            ratio = f"{speed / base:.2f}" if base else "—"
            print(f"| {'greedy' if beam == 1 else f'beam {beam}'} | {name} | {speed:,.1f} | {ratio} | "
                  f"{same}/{len(lines)} | {bleu(out, [refs]).score:.2f} |", flush=True)


if __name__ == "__main__":
    main()
