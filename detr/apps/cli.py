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
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import detr
from detr.apps.monitor import IngestReport, Monitor, MonitorStore, aggregate, follow
from detr.apps.report import write_report
from detr.cli import add_config_flags, config_from_flags
from detr.config import MonitorConfig
from detr.errors import ConfigError
from detr.labeller import Classifier
from detr.readers import decode_lines, read_lines

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


def add_commands(sub: Any) -> None:
    """Add the applications' commands to the `detr` parser's subcommands."""
    add_monitor(sub)
