"""The `detr` command. Each subcommand parses its arguments, then calls one API function.

Errors a user can cause (`DetrError`) print as one line on stderr with a non-zero exit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from typing import TextIO

import detr
from detr.errors import ConfigError, DetrError


def cmd_model(args: argparse.Namespace) -> int:
    from detr.summary import describe_model

    for line in describe_model(args.config, args.set or []):
        print(line)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from detr.data import MULTI30K_URL, fetch_multi30k

    for path in fetch_multi30k(args.to, base_url=args.url or MULTI30K_URL, langs=args.langs.split(",")):
        print(path)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from detr.config import load_config
    from detr.data import prepare

    config = load_config(args.config, args.set or [])
    report = prepare(config.data, config.train.max_tokens, args.out, config.train.seed)
    print(f"tokenizer: {report.tokenizer_path} (vocabulary src={report.src_vocab_size} tgt={report.tgt_vocab_size})")
    print(f"train: {report.examples} examples in {report.batches} batches of <= {config.train.max_tokens} tokens, "
          f"padding efficiency {report.padding_efficiency:.3f}")
    return 0


def dotted_options(rest: list[str]) -> list[str]:
    """`--train.max_steps 200`, `--run_dir=runs/x` → `["train.max_steps=200", "run_dir=runs/x"]`."""
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"unexpected argument {arg!r}; config keys are given as --section.key value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            value, i = rest[i + 1], i + 1
        out.append(f"{key}={value}")
        i += 1
    return out


def cmd_data_toy(args: argparse.Namespace) -> int:
    from detr.toy import make_toy_corpus

    for path in make_toy_corpus(args.to, args.train, args.valid, args.test, args.seed):
        print(path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from detr.config import load_config
    from detr.trainer import Interrupted, train

    config = load_config(args.config, (args.set or []) + dotted_options(args.rest))
    try:
        with logging_redirect_tqdm():
            result = train(config, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty())
    except Interrupted as err:
        again = args.command_line + ([] if args.resume else ["--resume"])
        print(f"detr: {err}\nresume with: detr {shlex.join(again)}", file=sys.stderr)
        return err.exit_code
    best = (f"best valid {result.best['metric']} {result.best['value']:.4g} at step {result.best['step']}; "
            if result.best else "")
    print(f"finished: {result.steps} steps, {result.epochs} epochs ({result.stopped}) in {result.seconds:.0f}s; "
          f"{best}model: {result.model_path}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from detr.checkpoint import average_checkpoints

    out, steps = average_checkpoints(args.run, args.last, args.out)
    print(f"averaged steps {', '.join(map(str, steps))} into {out}")
    return 0


def _input_lines(path: str | None, invalid: str) -> Iterator[str]:
    from detr.data import decode_lines, read_lines

    source = read_lines(path, invalid) if path and path != "-" else decode_lines(sys.stdin.buffer, "<stdin>", invalid)
    for _, text in source:
        yield text


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[TextIO]:
    if not path or path == "-":
        yield sys.stdout
        return
    try:
        f = open(path, "w", encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot write: {err.strerror}") from None
    with f:
        yield f


def _translator(args: argparse.Namespace):
    import detr.translator

    translator = detr.translator.load(args.run, device=args.device, weights=args.weights)
    translator.on_overlong = "error" if args.strict_length else "truncate"
    if _interactive(args):
        translator.read_ahead = 1  # interactive: answer each line as it is typed
    return translator


def _decode_options(args: argparse.Namespace) -> dict:
    names = {"beam": "beam_size", "nbest": "nbest", "batch_size": "batch_size", "max_tokens": "max_tokens",
             "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "length_penalty": "length_penalty"}
    return {key: getattr(args, arg) for arg, key in names.items() if getattr(args, arg, None) is not None}


def cmd_translate(args: argparse.Namespace) -> int:
    translator = _translator(args)
    options = _decode_options(args)
    config = translator.options(**options)
    sources: collections.deque[str] = collections.deque()  # inputs not yet answered, for --alignment

    def remembered(lines: Iterator[str]) -> Iterator[str]:
        for line in lines:
            sources.append(line)
            yield line

    with _output(args.output) as out:
        for nbest in translator.iter_nbest(remembered(_input_lines(args.input, args.invalid)), config):
            src = sources.popleft()
            if args.alignment:
                from detr.analysis import alignment_of

                nbest = [(f"{text}\t{alignment_of(translator, src, text)}", score) for text, score in nbest]
            if config.nbest == 1:
                out.write(nbest[0][0] + "\n")
            else:
                out.write("".join(f"{text}\t{score:.4f}\n" for text, score in nbest))
            out.flush()  # an interrupted run keeps every line already translated
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import detr
    from detr.translator import Translator
    from detr.visualize import inspect

    predictor = detr.load(args.run, device=args.device, weights=args.weights)
    translating = isinstance(predictor, Translator) and args.ref is None
    options = {"beam_size": args.beam, "nbest": args.nbest} if translating else {}
    for path in inspect(predictor, args.src, args.out, args.ref, **options):
        print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    translator = _translator(args)
    config = translator.options(**_decode_options(args))
    generator = torch.Generator(device=translator.device).manual_seed(args.seed)
    with _output(args.output) as out:
        for samples in translator.iter_samples(_input_lines(args.input, args.invalid), config, args.num_samples,
                                               generator):
            out.write("".join(text + "\n" for text, _ in samples))
            out.flush()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import detr

    predictor = detr.load(args.run, device=args.device, weights=args.weights)
    if hasattr(predictor, "evaluate"):  # a classify/tag run
        if not args.data:
            raise ConfigError("evaluate: a classify/tag run is scored on --data FILE (labelled like its training data)")
        report = predictor.evaluate(args.data)
        print(json.dumps(report, indent=2) if args.json else format_label_report(report, predictor.task.name))
        return 0
    from detr.evaluate import evaluate, evaluate_data

    predictor.on_overlong = "error" if args.strict_length else "truncate"
    metrics = args.metrics.split(",")
    if args.data:
        report = evaluate_data(predictor, args.data, args.src_field, args.ref_field or ["tgt"], metrics,
                               hypotheses_out=args.output, **_decode_options(args))
    elif args.src and args.ref:
        report = evaluate(predictor, args.src, args.ref, metrics, hypotheses_out=args.output,
                          **_decode_options(args))
    else:
        raise ConfigError("evaluate: a translation run is scored with --src FILE --ref FILE, or with --data "
                          "FILE.tsv|.jsonl --src-field NAME --ref-field NAME")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            print(line)
    return 0


def format_label_report(report: dict, task: str) -> str:
    """The report as a table: per class (classify) or seqeval's entity report (tag)."""
    if task == "tag":
        return (f"{report['report'].rstrip()}\n\nentity F1 {report['f1']:.4f}  precision {report['precision']:.4f}  "
                f"recall {report['recall']:.4f}  token accuracy {report['accuracy']:.4f}  ({report['n']} sentences)")
    labels = report["labels"]
    width = max(12, *(len(label) for label in labels))
    lines = [f"{'':>{width}} precision    recall        f1   support"]
    for label in labels:
        c = report["per_class"][label]
        lines.append(f"{label:>{width}} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1']:9.4f} {c['support']:9d}")
    lines += ["", f"accuracy {report['accuracy']:.4f}  macro-F1 {report['f1']:.4f}  ({report['n']} sentences)", "",
              "confusion matrix (rows: gold, columns: predicted):",
              f"{'':>{width}} " + " ".join(f"{label[:8]:>8}" for label in labels)]
    for label, row in zip(labels, report["confusion"]):
        lines.append(f"{label:>{width}} " + " ".join(f"{n:8d}" for n in row))
    return "\n".join(lines)


def cmd_classify(args: argparse.Namespace) -> int:
    import detr

    labeller = detr.load(args.run, device=args.device)
    with _output(args.output) as out:
        for chunk in _chunked(_input_lines(args.input, args.invalid), 1 if _interactive(args) else 256):
            for label, probs in labeller.classify(chunk):
                extra = "\t" + " ".join(f"{k}={v:.4f}" for k, v in probs.items()) if args.probs and probs else ""
                out.write(label + extra + "\n")
            out.flush()
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    import detr

    labeller = detr.load(args.run, device=args.device)
    with _output(args.output) as out:
        for chunk in _chunked(_input_lines(args.input, args.invalid), 1 if _interactive(args) else 256):
            for pairs in labeller.tag(chunk):
                if args.json:
                    out.write(json.dumps({"tokens": [w for w, _ in pairs], "tags": [t for _, t in pairs]},
                                         ensure_ascii=False) + "\n")
                else:
                    out.write("".join(f"{w}\t{t}\n" for w, t in pairs) + "\n")
            out.flush()
    return 0


def _interactive(args: argparse.Namespace) -> bool:
    return args.input in (None, "-") and sys.stdin.isatty()


def _chunked(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _add_decoding(p: argparse.ArgumentParser, sampling: bool = False) -> None:
    p.add_argument("run", help="run directory written by detr train")
    p.add_argument("-i", "--input", help="input file, one sentence per line (default: standard input)")
    p.add_argument("-o", "--output", help="output file (default: standard output)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="sentences per batch")
    p.add_argument("--max-tokens", type=int, dest="max_tokens", help="source tokens per batch")
    p.add_argument("--weights", help="a .safetensors file to use instead of RUN/model.safetensors")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--strict-length", action="store_true",
                   help="an input line longer than the model's maximum is an error (default: truncate, warn)")
    p.add_argument("--invalid", choices=["error", "replace"], default="error",
                   help="invalid UTF-8 in the input: stop with an error naming the line, or replace it")
    if sampling:
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-k", type=int, dest="top_k")
        p.add_argument("--top-p", type=float, dest="top_p")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--num-samples", type=int, default=1, dest="num_samples")
    else:
        p.add_argument("--beam", type=int, help="beam size (1: greedy)")
        p.add_argument("--nbest", type=int, help="outputs per input, as TEXT<tab>SCORE lines")
        p.add_argument("--length-penalty", type=float, dest="length_penalty", help="GNMT alpha")
        p.add_argument("--alignment", action="store_true",
                       help="append a tab and source-target word alignments from cross-attention (0-0 1-2 ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr", description="detr: train, decode and inspect encoder-decoder Transformers.")
    parser.add_argument("--version", action="version", version=f"detr {detr.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a model; any config key can be given as --section.key value",
                           usage="detr train CONFIG [--resume] [--section.key VALUE ...]")
    train.add_argument("config", help="YAML config (task, run_dir, data, model, train, decode)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in run_dir exactly where its last checkpoint left it")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    train.set_defaults(func=cmd_train)

    average = sub.add_parser("average", help="average the weights of a run's last K checkpoints")
    average.add_argument("run", help="run directory")
    average.add_argument("--last", type=int, default=5, help="how many checkpoints (default 5)")
    average.add_argument("--out", help="file to write (default RUN/average_lastK.safetensors)")
    average.set_defaults(func=cmd_average)

    translate = sub.add_parser("translate", help="translate lines with a trained run (greedy or beam search)")
    _add_decoding(translate)
    translate.set_defaults(func=cmd_translate)

    generate = sub.add_parser("generate", help="sample outputs (temperature, top-k, top-p) from a trained run")
    _add_decoding(generate, sampling=True)
    generate.set_defaults(func=cmd_generate)

    evaluate = sub.add_parser("evaluate", help="score a run: BLEU/chrF/ROUGE (translate), accuracy/F1 reports "
                                               "(classify, tag)")
    _add_decoding(evaluate)
    evaluate.add_argument("--src", help="translate: source file")
    evaluate.add_argument("--ref", action="append", help="translate: reference file (repeat for more)")
    evaluate.add_argument("--data", help="classify/tag: a labelled file in the training data's format; "
                                         "translate: a .tsv/.jsonl test file (see --src-field, --ref-field)")
    evaluate.add_argument("--src-field", default="src", dest="src_field", help="--data: the source field")
    evaluate.add_argument("--ref-field", action="append", dest="ref_field",
                          help="--data: a reference field (repeat for more references; default: tgt)")
    evaluate.add_argument("--metrics", default="bleu,chrf",
                          help="comma-separated: bleu, chrf, rouge, distinct (Distinct-1/2), ppl")
    evaluate.add_argument("--json", action="store_true", help="print the scores as JSON")
    evaluate.set_defaults(func=cmd_evaluate)

    for name, helptext, func in (("classify", "label each input line (one label per line)", cmd_classify),
                                 ("tag", "tag the words of each input line (word<TAB>tag, blank line after each)",
                                  cmd_tag)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", help="run directory of a classify/tag training run")
        p.add_argument("-i", "--input", help="input file, one sentence per line (default: standard input)")
        p.add_argument("-o", "--output", help="output file (default: standard output)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--invalid", choices=["error", "replace"], default="error",
                       help="invalid UTF-8 in the input: stop with an error naming the line, or replace it")
        if name == "classify":
            p.add_argument("--probs", action="store_true", help="append each label's probability")
        else:
            p.add_argument("--json", action="store_true", help='JSON lines {"tokens": [...], "tags": [...]}')
        p.set_defaults(func=func)

    inspect = sub.add_parser("inspect", help="attention maps of every layer and head, saliency, an HTML page")
    inspect.add_argument("run", help="run directory")
    inspect.add_argument("--src", required=True, help="the source sentence")
    inspect.add_argument("--ref", help="a reference output to inspect instead of the model's own")
    inspect.add_argument("--out", required=True, help="folder for the PNGs, index.html and attention.json")
    inspect.add_argument("--beam", type=int, default=1, help="beam size of the search (default 1: greedy)")
    inspect.add_argument("--nbest", type=int, default=1, help="inspect this many outputs")
    inspect.add_argument("--weights", help="a .safetensors file to use instead of RUN/model.safetensors")
    inspect.add_argument("--device", default="cpu")
    inspect.set_defaults(func=cmd_inspect)

    model = sub.add_parser("model", help="build a model from a config or preset; print its size and a forward pass")
    model.add_argument("config", help="a YAML config file, or a preset name (tiny, small, base, big)")
    model.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config key, e.g. --set model.d_model=256 (repeatable)")
    model.set_defaults(func=cmd_model)

    data = sub.add_parser("data", help="data sets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = data_sub.add_parser("fetch", help="download a public data set and verify its checksums")
    fetch.add_argument("name", choices=["multi30k"])
    fetch.add_argument("--to", required=True, help="destination folder")
    fetch.add_argument("--url", help="base URL of a mirror (https://, file://)")
    fetch.add_argument("--langs", default="en,de,fr,cs", help="comma-separated languages (default: all)")
    fetch.set_defaults(func=cmd_data_fetch)
    toy = data_sub.add_parser("toy", help="write the toy English-German corpus configs/tiny.yaml trains on")
    toy.add_argument("--to", required=True, help="destination folder")
    toy.add_argument("--train", type=int, default=20000, help="training pairs (default 20000)")
    toy.add_argument("--valid", type=int, default=300)
    toy.add_argument("--test", type=int, default=300)
    toy.add_argument("--seed", type=int, default=1)
    toy.set_defaults(func=cmd_data_toy)
    prep = data_sub.add_parser("prepare", help="check a config's data, learn its tokenizer, report batch statistics")
    prep.add_argument("config", help="YAML config with a data section")
    prep.add_argument("--out", required=True, help="where to write tokenizer.json")
    prep.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    prep.set_defaults(func=cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "func", None) is not cmd_train:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except DetrError as err:
        print(f"detr: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("detr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`detr translate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
