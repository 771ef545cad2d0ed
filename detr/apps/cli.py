"""The applications' commands: `detr monitor ...` and `detr recommend ...`. Each parses its
arguments and calls the application's API; `detr.cli` adds them to the `detr` command."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import detr
from detr.apps.assistant import (
    LOG,
    Assistant,
    ExchangeLog,
    build_index,
    export_log,
    generator_input,
    generator_pairs,
    read_settings,
    tune_encoder,
)
from detr.apps.monitor import IngestReport, Monitor, MonitorStore, aggregate, follow
from detr.apps.recommend import Recommender, load_recommend_config, read_log, train_recommender, words
from detr.apps.report import write_report
from detr.atomic import atomic_write_text
from detr.command import add_config_flags, config_from_flags, run_training
from detr.config import AssistantConfig, EmbedTuneConfig, MonitorConfig
from detr.errors import ConfigError, DataError
from detr.labeller import Classifier
from detr.readers import decode_lines, json_object, one_line, read_lines

WINDOW_FIELDS = {"window", "every"}


def _classifier(path: str, role: str, device: str) -> Classifier:
    predictor = detr.load(path, device)
    if not isinstance(predictor, Classifier):
        raise ConfigError(f"--{role} {path}: a {type(predictor).__name__.lower()} run; give a classify run")
    return predictor


def _store(args: argparse.Namespace) -> MonitorStore:
    return MonitorStore(args.db)


def _windowing(args: argparse.Namespace, store: MonitorStore) -> MonitorConfig:
    """The window flags, with the labels the database was filled with."""
    config = dataclasses.replace(config_from_flags(args, MonitorConfig, "monitor"), **store.settings())
    config.validate()
    return config


def _numbered(args: argparse.Namespace, stop: threading.Event, config: MonitorConfig
              ) -> Iterator[tuple[str, str] | None]:
    if args.follow:
        yield from follow(args.follow, config.poll, stop)
        return
    if args.input and args.input != "-":
        name, lines = args.input, read_lines(args.input, "replace")
    else:
        name, lines = "<stdin>", decode_lines(sys.stdin.buffer, "<stdin>", "replace")
    for number, line in lines:
        yield f"{name}:{number}", line


def cmd_monitor_ingest(args: argparse.Namespace) -> int:
    if args.follow and args.input:
        raise ConfigError("give -i FILE or --follow FILE, not both")
    config = config_from_flags(args, MonitorConfig, "monitor")
    config.validate()
    sentiment = _classifier(args.sentiment, "sentiment", args.device)
    topic = _classifier(args.topic, "topic", args.device) if args.topic else None
    store = _store(args)
    monitor = Monitor(store, sentiment, config, topic)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)} \
        if args.follow else {}

    def on_alert(alert: Any) -> None:
        print(json.dumps(alert.to_dict(), ensure_ascii=False), flush=True)

    bar = tqdm(unit=" items", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)

    def on_batch(report: IngestReport) -> None:
        bar.n = report.read
        bar.set_postfix(stored=report.stored, alerts=report.alerts, refresh=False)
        bar.refresh()

    try:
        with logging_redirect_tqdm():
            report = monitor.ingest(_numbered(args, stop, config), on_alert, on_batch)
    finally:
        bar.close()
        store.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"detr monitor: {report.summary()}", file=sys.stderr)
    return 0


def cmd_monitor_windows(args: argparse.Namespace) -> int:
    store = _store(args)
    windows = aggregate(store, _windowing(args, store), args.topic_name)
    rows = [w.row() for w in windows if w.count or args.empty]
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        writer = csv.DictWriter(sys.stdout, list(rows[0]) if rows else ["topic"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


def cmd_monitor_alerts(args: argparse.Namespace) -> int:
    for alert in _store(args).alerts():
        print(json.dumps(alert.to_dict(), ensure_ascii=False))
    return 0


def cmd_monitor_report(args: argparse.Namespace) -> int:
    store = _store(args)
    for kind, path in write_report(store, _windowing(args, store), args.out).items():
        print(f"{kind}\t{path}")
    return 0


def add_monitor(sub: Any) -> None:
    monitor = sub.add_parser("monitor", help="sentiment monitoring: ingest items into SQLite, windows per topic, "
                                             "alerts, a report")
    actions = monitor.add_subparsers(dest="monitor_command", metavar="ACTION", required=True)

    ingest = actions.add_parser("ingest", help="classify JSON-lines items {id, time, text, source?, topic?} and "
                                               "store them (idempotent); print each new alert as a JSON line")
    ingest.add_argument("--sentiment", required=True, metavar="RUN", help="classify run that scores sentiment")
    ingest.add_argument("--topic", metavar="RUN", help="classify run that gives items without a topic theirs")
    ingest.add_argument("--db", required=True, help="the SQLite database (created if absent)")
    ingest.add_argument("-i", "--input", help="JSON-lines file of items (default: standard input)")
    ingest.add_argument("--follow", metavar="FILE", help="read FILE and keep reading what is appended, like tail -F "
                                                         "(rotation too), until SIGINT or SIGTERM")
    ingest.add_argument("--device", default="cpu")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(ingest.add_argument_group("windows and alerts"), MonitorConfig, "monitor", "default")
    ingest.set_defaults(func=cmd_monitor_ingest)

    windows = actions.add_parser("windows", help="counts, negative/positive share and mean score per topic and "
                                                 "window (CSV, or JSON lines)")
    windows.add_argument("--db", required=True)
    windows.add_argument("--topic", dest="topic_name", help="only this topic")
    windows.add_argument("--empty", action="store_true", help="also windows without items")
    windows.add_argument("--json", action="store_true", help="JSON lines instead of CSV")
    add_config_flags(windows, MonitorConfig, "monitor", "default", WINDOW_FIELDS)
    windows.set_defaults(func=cmd_monitor_windows)

    alerts = actions.add_parser("alerts", help="the stored alerts, one JSON line each")
    alerts.add_argument("--db", required=True)
    alerts.set_defaults(func=cmd_monitor_alerts)

    report = actions.add_parser("report", help="sentiment.png, windows.csv and index.html (chart and alerts)")
    report.add_argument("--db", required=True)
    report.add_argument("--out", required=True, help="folder to write into")
    add_config_flags(report, MonitorConfig, "monitor", "default", WINDOW_FIELDS)
    report.set_defaults(func=cmd_monitor_report)


def _weights(text: str | None) -> dict[str, float]:
    """`--features popularity=0.2,model=1` as a dict."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--features: {part!r} is not NAME=WEIGHT") from None
        if not eq or not name.strip():
            raise ConfigError(f"--features: {part!r} is not NAME=WEIGHT")
    return out


def _ids(text: str, name: str) -> list[str]:
    ids = [i.strip() for i in text.split(",") if i.strip()]
    if not ids and name == "--candidates":
        raise ConfigError("--candidates: give at least one item id")
    return ids


def cmd_recommend_train(args: argparse.Namespace) -> int:
    config, recommend = load_recommend_config(args.config, args.set or [])
    return run_training(args, lambda progress: train_recommender(config, recommend, args.resume, progress))


def cmd_recommend_rank(args: argparse.Namespace) -> int:
    recommender = Recommender.load(args.run, args.items, args.device)
    weights = _weights(args.features)
    if args.impressions:
        for number, line in read_lines(args.impressions):
            if not line.strip():
                continue
            where = f"{args.impressions}:{number}"
            obj = json_object(line, where)
            if not isinstance(obj.get("history"), list) or not isinstance(obj.get("candidates"), list):
                raise DataError(f"{where}: give 'history' and 'candidates' as lists of item ids")
            try:
                ranked = recommender.rank([str(i) for i in obj["history"]], [str(i) for i in obj["candidates"]],
                                          weights)
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            print(json.dumps({**({"user": obj["user"]} if "user" in obj else {}),
                              "ranking": [dataclasses.asdict(r) for r in ranked]}, ensure_ascii=False), flush=True)
        return 0
    if args.candidates is None:
        raise ConfigError("give --candidates ID,ID,... (with --history ID,...), or --impressions FILE")
    for r in recommender.rank(_ids(args.history or "", "--history"), _ids(args.candidates, "--candidates"), weights):
        item = recommender.items[r.id]
        print(f"{r.id}\t{r.score:.4f}\t{r.probability:.4f}\t{one_line(item.title or words(item.text, 12))}")
    return 0


def cmd_recommend_evaluate(args: argparse.Namespace) -> int:
    recommender = Recommender.load(args.run, args.items, args.device)
    impressions = read_log(args.log, args.format or recommender.config.format, recommender.items)
    print(json.dumps(recommender.evaluate(impressions, _weights(args.features)), indent=2))
    return 0


def add_recommend(sub: Any) -> None:
    recommend = sub.add_parser("recommend", help="text-based recommendation: train a pair model on a click log, "
                                                 "rank candidates for a user, evaluate (AUC, MRR, nDCG)")
    actions = recommend.add_subparsers(dest="recommend_command", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="turn the click log into (history, candidate) pairs and train a pair "
                                             "classifier (a classify config with a recommend section)")
    train.add_argument("config", help="YAML: a classify config plus recommend: {items, train, valid, ...}")
    train.add_argument("--resume", action="store_true", help="continue the run where its last checkpoint left it")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=cmd_recommend_train)

    features = ("add weight x an item's numeric field to the score: NAME=WEIGHT,...; model=W weighs P(click) "
                "(default 1)")
    rank = actions.add_parser("rank", help="candidates best first for a user's history: ID<TAB>score<TAB>P(click)"
                                           "<TAB>title, or a JSON line per impression")
    rank.add_argument("run", help="run directory written by detr recommend train")
    rank.add_argument("--history", "--user-history", dest="history",
                      help="the user's clicked item ids, oldest first: ID,ID,...")
    rank.add_argument("--candidates", help="item ids to rank: ID,ID,...")
    rank.add_argument("--impressions", metavar="FILE", help="JSON lines {user?, history: [...], candidates: [...]}")
    rank.add_argument("--items", help="items file (default: the one the run was trained with)")
    rank.add_argument("--features", help=features)
    rank.add_argument("--device", default="cpu")
    rank.set_defaults(func=cmd_recommend_rank)

    evaluate = actions.add_parser("evaluate", help="AUC, MRR, nDCG@5, nDCG@10 on a held-out click log")
    evaluate.add_argument("run")
    evaluate.add_argument("--log", required=True, help="click log (JSON lines or MIND behaviors.tsv)")
    evaluate.add_argument("--format", choices=["jsonl", "mind"], help="default: the run's")
    evaluate.add_argument("--items", help="items file (default: the one the run was trained with)")
    evaluate.add_argument("--features", help=features)
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(func=cmd_recommend_evaluate)


ASK_FIELDS = {"answer_threshold", "handoff_threshold", "top_k", "context_turns", "context_weight", "generator", "log"}


def _assistant_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, to replace the built ones."""
    return {name: getattr(args, f"assistant_{name}") for name in ASK_FIELDS
            if getattr(args, f"assistant_{name}", None) is not None}


def cmd_assistant_build(args: argparse.Namespace) -> int:
    config = config_from_flags(args, AssistantConfig, "assistant")
    report = build_index(args.pairs, config, args.out)
    print(f"detr assistant: {report.added} pairs embedded, {report.skipped} already indexed; {report.total} in "
          f"{args.out}", file=sys.stderr)
    return 0


def cmd_assistant_tune(args: argparse.Namespace) -> int:
    config = config_from_flags(args, AssistantConfig, "assistant")
    losses = tune_encoder(args.pairs, config, config_from_flags(args, EmbedTuneConfig, "tune"), args.out,
                          progress=not args.no_progress)
    print(f"detr assistant: {config.encoder} tuned on {args.pairs} (loss per epoch: "
          f"{', '.join(f'{x:.3f}' for x in losses)}) into {args.out}; build with --encoder {args.out}", file=sys.stderr)
    return 0


def _print_reply(reply: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(reply.to_dict(), ensure_ascii=False), flush=True)
    else:
        print(f"[{reply.id} {reply.source} {reply.confidence:.2f}] {one_line(reply.answer)}", flush=True)


def cmd_assistant_ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise DataError("question: empty")
    assistant = Assistant.load(args.dir, _assistant_changes(args), args.device)
    try:
        _print_reply(assistant.ask(args.question, args.session), True)
    finally:
        assistant.close()
    return 0


def cmd_assistant_chat(args: argparse.Namespace) -> int:
    assistant = Assistant.load(args.dir, _assistant_changes(args), args.device)
    session = args.session or uuid.uuid4().hex[:12]
    if sys.stdin.isatty():
        print(f"session {session}; an empty line or Ctrl-D ends", file=sys.stderr)
    try:
        for _, line in decode_lines(sys.stdin.buffer, "<stdin>", "replace"):
            if not line.strip():
                if sys.stdin.isatty():
                    break
                continue
            _print_reply(assistant.ask(line, session), args.json)
    finally:
        assistant.close()
    return 0


def cmd_assistant_feedback(args: argparse.Namespace) -> int:
    log = ExchangeLog(read_settings(Path(args.dir)).log or Path(args.dir) / LOG)
    try:
        log.set_feedback(args.id, args.value)
    finally:
        log.close()
    return 0


def cmd_assistant_export_log(args: argparse.Namespace) -> int:
    log = ExchangeLog(read_settings(Path(args.dir)).log or Path(args.dir) / LOG)
    try:
        n = export_log(log, args.to, args.only == "good")
    finally:
        log.close()
    print(f"detr assistant: {n} pairs written to {args.to}", file=sys.stderr)
    return 0


def cmd_assistant_generator_data(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in generator_pairs(args.dir, args.top_k, args.valid_share, args.seed).items():
        atomic_write_text(out / f"{split}.tsv", "src\ttgt\n" + "".join(
            f"{one_line(generator_input(q, answers))}\t{one_line(a)}\n" for q, answers, a in rows))
        print(f"{split}\t{len(rows)}\t{out / f'{split}.tsv'}")
    return 0


def add_assistant(sub: Any) -> None:
    assistant = sub.add_parser("assistant", help="a customer-service assistant: FAQ retrieval with sentence "
                                                 "embeddings, grounded generation, hand-off, a logged conversation")
    actions = assistant.add_subparsers(dest="assistant_command", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="embed the questions of a pairs file into DIR (new pairs only when DIR "
                                             "exists)")
    build.add_argument("--pairs", required=True, help="FAQ pairs: TSV with a header, or JSON lines")
    build.add_argument("--out", required=True, help="the assistant folder")
    add_config_flags(build.add_argument_group("settings"), AssistantConfig, "assistant", "default")
    build.set_defaults(func=cmd_assistant_build)

    tune = actions.add_parser("tune", help="fine-tune the sentence encoder on a pairs file (each question beside "
                                           "its answer and its other wordings), for build --encoder OUT")
    tune.add_argument("--pairs", required=True, help="FAQ pairs: TSV with a header, or JSON lines")
    tune.add_argument("--out", required=True, help="folder for the tuned encoder (a pretrained-model folder)")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    settings = tune.add_argument_group("settings")
    add_config_flags(settings, AssistantConfig, "assistant", "default", ("encoder", "question_field", "answer_field"))
    add_config_flags(settings, EmbedTuneConfig, "tune", "default")
    tune.set_defaults(func=cmd_assistant_tune)

    def asking(name: str, helptext: str, func: Any) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=helptext)
        p.add_argument("dir", help="the assistant folder (detr assistant build)")
        p.add_argument("--session", help="conversation id: the session's last questions join the query")
        p.add_argument("--device", default="cpu")
        add_config_flags(p.add_argument_group("settings (default: as built)"), AssistantConfig, "assistant",
                         "default", ASK_FIELDS)
        p.set_defaults(func=func)
        return p

    ask = asking("ask", "answer one question: a JSON line {id, answer, source, confidence, matches}", cmd_assistant_ask)
    ask.add_argument("question")
    chat = asking("chat", "answer each line of standard input, as one session", cmd_assistant_chat)
    chat.add_argument("--json", action="store_true", help="JSON lines instead of [id source confidence] answer")

    feedback = actions.add_parser("feedback", help="mark a logged exchange good or bad")
    feedback.add_argument("dir")
    feedback.add_argument("id", type=int, help="the exchange id (the reply's id)")
    feedback.add_argument("value", choices=["good", "bad"])
    feedback.set_defaults(func=cmd_assistant_feedback)

    export = actions.add_parser("export-log", help="logged exchanges as training pairs (TSV question, answer)")
    export.add_argument("dir")
    export.add_argument("--to", required=True, help="TSV file to write")
    export.add_argument("--only", choices=["good"], help="only exchanges marked good")
    export.set_defaults(func=cmd_assistant_export_log)

    data = actions.add_parser("generator-data", help="train/valid TSV for the generator: 'question [SEP] retrieved "
                                                     "answers' -> answer (each pair's own answer left out)")
    data.add_argument("dir")
    data.add_argument("--out", required=True, help="folder for train.tsv and valid.tsv")
    data.add_argument("--top-k", type=int, default=3, help="retrieved answers per input (default 3)")
    data.add_argument("--valid-share", type=float, default=0.05, help="share of questions held out (default 0.05)")
    data.add_argument("--seed", type=int, default=1)
    data.set_defaults(func=cmd_assistant_generator_data)


def add_commands(sub: Any) -> None:
    """Add the applications' commands to the `detr` parser's subcommands."""
    add_assistant(sub)
    add_monitor(sub)
    add_recommend(sub)
