"""A trained run decoded by detr's own search (float32 and int8), by its CTranslate2 export, and by
detr's search over its ONNX graphs in ONNX Runtime: speed, identity, BLEU.

Translates `--src` (one call per engine over all lines, after one warm-up call on the first 50)
with greedy and beam search (length penalty 0, which both engines rank the same way), and
reports sentences per second, how many outputs equal detr's own, and BLEU against `--ref`.

    python benchmarks/export_speed.py RUN --src test.en --ref test.de [--threads 2] [--beams 1,4]

Not part of the test run; the conversions go to RUN/engines/ as with `detr translate --engine`.
"""

from __future__ import annotations

import argparse
import time

import torch

from detr import load
from detr.export import onnx
from detr.export.ctranslate2 import CTranslate2Search, cached_export, vocabulary
from detr.metrics import bleu


class DirectCTranslate2:
    """CTranslate2 called directly, as a user of it would without detr: the run's subword tokenizer
    (`tokenizers`, batch encode/decode), then one `translate_batch` over every line with its own
    batching (the same token budget as detr's batches) and one length limit for all."""

    def __init__(self, folder, tokenizer, threads: int) -> None:
        import ctranslate2

        self.translator = ctranslate2.Translator(str(folder), intra_threads=threads)
        self.src, self.tgt = tokenizer.src, tokenizer.tgt
        self.tokens = vocabulary(tokenizer, "src")
        self.ids = {t: i for i, t in enumerate(vocabulary(tokenizer, "tgt"))}

    def translate(self, lines: list[str], options) -> list[str]:
        sources = [[self.tokens[i] for i in ids] + ["</s>"] for ids in self.src.encode_batch(lines)]
        longest = max(map(len, sources))
        results = self.translator.translate_batch(
            sources, max_batch_size=options.max_tokens, batch_type="tokens", beam_size=options.beam_size,
            length_penalty=0.0, max_decoding_length=int(options.max_len_a * longest + options.max_len_b))
        return self.tgt.decode_batch([[self.ids[t] for t in r.hypotheses[0]] for r in results])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--src", required=True)
    parser.add_argument("--ref", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beams", default="1,4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = open(args.src, encoding="utf-8").read().splitlines()
    refs = open(args.ref, encoding="utf-8").read().splitlines()
    translator = load(args.run)
    engines = [("detr (torch)", translator), ("detr (torch) int8", load(args.run).quantize("int8"))]
    for quantize in ("float32", "int8"):
        other = load(args.run)
        other.engine = CTranslate2Search(cached_export(args.run, quantize), translator.tokenizer, threads=args.threads)
        engines.append((f"CTranslate2 {quantize}", other))
        if quantize == "float32":
            direct = DirectCTranslate2(cached_export(args.run, quantize), translator.tokenizer, args.threads)
            engines.append(("CTranslate2 float32, called directly", direct))
    other = load(args.run)
    other.engine = onnx.OnnxSearch(onnx.cached_export(args.run), threads=args.threads)
    engines.append(("detr search on ONNX Runtime", other))
    print(f"{len(lines)} sentences, {args.threads} threads, torch {torch.__version__}")
    print("| search | engine | sentences/s | ÷ detr | outputs equal to detr's | BLEU |")
    print("|---|---|---:|---:|---:|---:|")
    for beam in map(int, args.beams.split(",")):
        options = translator.options(beam_size=beam, length_penalty=0.0)
        own: list[str] = []
        base = 0.0
        for name, engine in engines:
            engine.translate(lines[:50], options)  # warm-up
            start = time.perf_counter()
            out = engine.translate(lines, options)
            speed = len(lines) / (time.perf_counter() - start)
            own, base = (out, speed) if engine is translator else (own, base)
            same = sum(a == b for a, b in zip(out, own))
            score = bleu(out, [refs]).score
            print(f"| {'greedy' if beam == 1 else f'beam {beam}'} | {name} | {speed:,.1f} | {speed / base:.2f} | "
                  f"{same}/{len(lines)} | {score:.2f} |", flush=True)


if __name__ == "__main__":
    main()
