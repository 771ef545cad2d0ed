"""The sentiment monitor on a simulated stream: detection delay, missed bursts, false alerts, throughput.

    python benchmarks/monitor.py runs/fpb_minilm [--days 7] [--seed 1] [--threads 2] [--json out.json]

The stream is SIMULATED, built here from real sentences: every hour brings 12-28 items drawn from
the Financial PhraseBank test sentences (all three labels, their natural ~11% negative share)
and AG News Business items (neutral filler; the model labels them as it sees them). Into one
copy negative bursts are injected: N extra negative FPB test sentences spread evenly over one
hour starting at a random minute (so a burst can straddle two windows), at known times after
the first day. The other copy has no burst. Both are ingested in time order through
`detr.apps.monitor.Monitor` (default: 1 h windows, threshold 0.5, min-count 10, z 3, baseline
24) into a fresh SQLite file, the monitor checking its windows as a live follower would: every
`--tick` minutes of stream time.

Reported: per burst size, how many bursts were detected, the detection delay (stream time from
the burst's start to the alert, in window lengths and in minutes); alerts that match no burst
(false alerts) on both streams; and ingestion throughput (items/s, classification and storage,
`--threads` threads). Throughput is only meaningful when
nothing else runs on the machine. Not part of the test run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import detr  # noqa: E402
from detr.apps.monitor import Monitor, MonitorStore, aggregate, iso, parse_time  # noqa: E402
from detr.config import MonitorConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
HOUR = 3600.0


def sentences() -> tuple[list[tuple[str, str]], list[str]]:
    """(FPB test sentence, label) pairs and AG News Business texts."""
    with open(DATA / "sentiment" / "financial_phrasebank" / "test.tsv", encoding="utf-8") as f:
        fpb = [(row["sentence"], row["label"]) for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    with open(DATA / "topic" / "ag_news" / "train.tsv", encoding="utf-8") as f:
        business = [row["text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                    if row["label"] == "Business"]
    return fpb, business


def make_stream(days: int, bursts: list[tuple[float, int]], seed: int) -> list[dict]:
    """Items in time order; `bursts`: (start time, extra negative items over the next hour)."""
    fpb, business = sentences()
    negatives = [s for s, label in fpb if label == "negative"]
    rng = random.Random(seed)
    items = []
    for hour in range(days * 24):
        for _ in range(rng.randint(12, 28)):
            t = START + hour * HOUR + rng.random() * HOUR
            text = rng.choice(fpb)[0] if rng.random() < 0.6 else rng.choice(business)
            items.append((t, text))
    for start, size in bursts:
        items += [(start + (k + 0.5) * HOUR / size, rng.choice(negatives)) for k in range(size)]
    items.sort()
    return [{"id": f"item{n}", "time": iso(t), "text": text, "topic": "markets"} for n, (t, text) in enumerate(items)]


def arriving(items: list[dict], tick: float) -> Iterator[tuple[str, dict] | None]:
    """The items as a live follower sees them: after each `tick` seconds of stream time, an idle
    moment (None), at which the monitor stores what is pending and checks its windows."""
    edge = None
    for n, item in enumerate(items):
        t = parse_time(item["time"])
        if edge is None:
            edge = t + tick
        while t >= edge:
            yield None
            edge += tick
        yield f"item{n}", item


def run_stream(classifier, items: list[dict], config: MonitorConfig, tick: float) -> tuple[list, float, list]:
    """The alerts, the seconds ingestion took, and the windows."""
    with tempfile.TemporaryDirectory() as tmp:
        store = MonitorStore(Path(tmp) / "monitor.sqlite")
        monitor = Monitor(store, classifier, config)
        alerts: list = []
        start = time.perf_counter()
        report = monitor.ingest(arriving(items, tick), alerts.append)
        seconds = time.perf_counter() - start
        windows = aggregate(store, config)
        store.close()
    assert report.stored == len(items), report.summary()
    return alerts, seconds, windows


def score(alerts: list, bursts: list[tuple[float, int]], window: float) -> tuple[list[dict], int]:
    """Per burst: detected or not, delay; and the number of alerts matching no burst."""
    matched, rows = set(), []
    for start, size in bursts:
        hits = [a for a in alerts if a.window_end > start and a.window_start < start + HOUR]
        matched.update(id(a) for a in hits)
        first = min(hits, key=lambda a: a.stream_time) if hits else None
        rows.append({"start": iso(start), "size": size, "detected": first is not None,
                     "delay_windows": None if first is None else round((first.stream_time - start) / window, 2),
                     "delay_minutes": None if first is None else round((first.stream_time - start) / 60, 1),
                     "rule": None if first is None else first.rule})
    return rows, sum(id(a) not in matched for a in alerts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentiment", help="a Financial PhraseBank classify run (configs/fpb_minilm.yaml)")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--sizes", default="5,10,15,20", help="burst sizes (extra negative items in one hour)")
    parser.add_argument("--per-size", type=int, default=3, help="bursts of each size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--window", default="1h")
    parser.add_argument("--every", default=None, help="rolling windows: a new one this often (default: none)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--min-count", type=int, default=10)
    parser.add_argument("--z", type=float, default=3.0)
    parser.add_argument("--baseline", type=int, default=24)
    parser.add_argument("--tick", type=float, default=10, help="minutes of stream time between the checks of a "
                                                                "live follower (default 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classifier = detr.load(args.sentiment)
    config = MonitorConfig(window=args.window, every=args.every, threshold=args.threshold, min_count=args.min_count,
                           z=args.z, baseline=args.baseline)
    size, _ = config.seconds()
    rng = random.Random(args.seed)
    sizes = [int(s) for s in args.sizes.split(",")] * args.per_size
    hours = rng.sample(range(30, args.days * 24 - 2, 4), len(sizes))  # after the first day, apart
    bursts = sorted((START + h * HOUR + rng.random() * HOUR, size) for h, size in zip(hours, sizes))
    with_bursts = make_stream(args.days, bursts, args.seed)
    flat = make_stream(args.days, [], args.seed)
    alerts, seconds, _ = run_stream(classifier, with_bursts, config, args.tick * 60)
    rows, false_alerts = score(alerts, bursts, size)
    flat_alerts, flat_seconds, windows = run_stream(classifier, flat, config, args.tick * 60)
    shares = [w.negative_share for w in windows if w.count]
    mean = sum(shares) / len(shares)
    spread = (sum((x - mean) ** 2 for x in shares) / (len(shares) - 1)) ** 0.5
    out = {"config": dataclasses.asdict(config), "tick_minutes": args.tick, "days": args.days,
           "items": len(with_bursts), "flat_items": len(flat), "bursts": rows,
           "flat_negative_share": {"mean": round(mean, 4), "std": round(spread, 4)},
           "false_alerts_with_bursts": false_alerts, "false_alerts_flat": len(flat_alerts),
           "flat_alerts": [a.to_dict() for a in flat_alerts],
           "items_per_s": round(len(with_bursts) / seconds, 1), "flat_items_per_s": round(len(flat) / flat_seconds, 1),
           "threads": args.threads}
    print(f"simulated stream: {args.days} days, {len(with_bursts)} items ({len(flat)} without bursts); windows "
          f"{config.window}{f' every {config.every}' if config.every else ''}, threshold {config.threshold}, "
          f"min-count {config.min_count}, z {config.z}, baseline {config.baseline}; checked every {args.tick:g} min")
    print(f"burst-free stream: negative share per window {mean:.3f} ± {spread:.3f}")
    print("| burst size | bursts | detected | delay (windows) | delay (minutes) |")
    print("|---|---|---|---|---|")
    for size in sorted(set(sizes)):
        some = [r for r in rows if r["size"] == size]
        found = [r for r in some if r["detected"]]
        delays = [r["delay_windows"] for r in found]
        minutes = [r["delay_minutes"] for r in found]
        print(f"| {size} | {len(some)} | {len(found)} | "
              f"{'-' if not found else f'{sum(delays) / len(delays):.2f} (max {max(delays):.2f})'} | "
              f"{'-' if not found else f'{sum(minutes) / len(minutes):.0f}'} |")
    print(f"false alerts: {false_alerts} on the stream with bursts, {len(flat_alerts)} on the burst-free stream")
    print(f"ingestion: {out['items_per_s']} items/s (with bursts), {out['flat_items_per_s']} items/s (flat), "
          f"{args.threads} threads")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
