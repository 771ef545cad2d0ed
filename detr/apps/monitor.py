"""Sentiment monitoring: classify a stream of items, keep them in SQLite, aggregate them per topic
and time window, and raise an alert when negative items surge.

    store = MonitorStore("monitor.sqlite")
    monitor = Monitor(store, detr.load("runs/fpb_minilm"), MonitorConfig(window="1h"), topic=None)
    report = monitor.ingest(numbered_lines, on_alert=print)    # → IngestReport(read, stored, duplicates, bad)
    windows = aggregate(store, MonitorConfig(window="1h"))       # → [WindowStats(topic, start, count, ...)]

An item is one JSON object `{id, time (ISO 8601), text, source?, topic?}`. Ingestion is
idempotent: an id already stored is skipped, and every batch is one transaction, so running
the same input again, or resuming after a crash, neither counts an item twice nor loses one the
database acknowledged. Malformed items are counted and reported by line, never fatal.

Two alert rules, both needing at least `min_count` items in the window:
- threshold: the window's negative share exceeds `threshold`;
- surge: the share exceeds the mean of the last `baseline` windows (at least 3 of them with
  items) by more than `z` standard deviations. The deviation is the larger of the baseline's
  spread and the binomial noise of a share of this many items at the baseline rate, so a
  quiet baseline does not make every small wobble an alert.
A window raises at most one alert, evaluated as soon as its items arrive (so an alert can come
before the window closes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from detr.apps.database import Database
from detr.config import MonitorConfig
from detr.errors import ConfigError, DataError
from detr.labeller import Classifier
from detr.readers import json_object

log = logging.getLogger(__name__)

ALL = "all"  # the topic of items that have none and no topic run to give one
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, time REAL NOT NULL, iso TEXT NOT NULL, text TEXT NOT NULL, source TEXT,
    topic TEXT NOT NULL, sentiment TEXT NOT NULL, score REAL NOT NULL, probs TEXT NOT NULL, ingested REAL NOT NULL);
CREATE INDEX IF NOT EXISTS items_by_topic_time ON items (topic, time);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, window_start REAL NOT NULL, window_end REAL NOT NULL,
    rule TEXT NOT NULL, count INTEGER NOT NULL, negative_share REAL NOT NULL, baseline_mean REAL,
    baseline_std REAL, z REAL, stream_time REAL NOT NULL, created REAL NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0, UNIQUE (topic, window_start, window_end));
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Item:
    """One stream item, its time in seconds since the epoch (UTC)."""

    id: str
    time: float
    text: str
    source: str | None = None
    topic: str | None = None


def parse_time(value: Any) -> float:
    """An ISO 8601 time (`2026-11-30T12:00:00Z`, with or without offset; none means UTC) in epoch seconds.

    Raises:
        ValueError: not a string in ISO 8601.
    """
    if not isinstance(value, str):
        raise ValueError(f"time must be an ISO 8601 string, got {json.dumps(value)}")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"time {value!r} is not ISO 8601 (like 2026-11-30T12:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def iso(seconds: float) -> str:
    """Epoch seconds as ISO 8601 in UTC (`2026-11-30T12:00:00Z`)."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_item(obj: dict[str, Any]) -> Item:
    """An `Item` from its JSON object.

    Raises:
        ValueError: no id, no or malformed time, empty text, or a field of the wrong type (the reason).
    """
    for name in ("id", "time", "text"):
        if name not in obj:
            raise ValueError(f"no '{name}' field")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool) or str(obj["id"]).strip() == "":
        raise ValueError("id must be a non-empty string or an integer")
    if not isinstance(obj["text"], str) or not obj["text"].strip():
        raise ValueError("empty text")
    for name in ("source", "topic"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise ValueError(f"{name} must be a string")
    return Item(str(obj["id"]), parse_time(obj["time"]), obj["text"], obj.get("source"), obj.get("topic") or None)


@dataclass
class WindowStats:
    """What one topic's items in one window add up to."""

    topic: str
    start: float
    end: float
    count: int = 0
    negative: int = 0
    positive: int = 0
    score_sum: float = 0.0

    @property
    def negative_share(self) -> float:
        return self.negative / self.count if self.count else 0.0

    @property
    def positive_share(self) -> float:
        return self.positive / self.count if self.count else 0.0

    @property
    def mean_score(self) -> float:
        """The mean of P(positive) - P(negative) over the window's items."""
        return self.score_sum / self.count if self.count else 0.0

    def row(self) -> dict[str, Any]:
        return {"topic": self.topic, "start": iso(self.start), "end": iso(self.end), "count": self.count,
                "negative": self.negative, "positive": self.positive,
                "negative_share": round(self.negative_share, 4), "positive_share": round(self.positive_share, 4),
                "mean_score": round(self.mean_score, 4)}


@dataclass
class Alert:
    """A window whose negative share crossed a rule. `stream_time` is the newest item's time when it fired."""

    topic: str
    window_start: float
    window_end: float
    rule: str  # "threshold" or "surge"
    count: int
    negative_share: float
    baseline_mean: float | None
    baseline_std: float | None
    z: float | None
    stream_time: float
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("window_start", "window_end", "stream_time"):
            out[key] = iso(out[key])
        for key in ("negative_share", "baseline_mean", "baseline_std", "z"):
            if out[key] is not None:
                out[key] = round(out[key], 4)
        return {"alert": out.pop("id"), **out}


@dataclass
class IngestReport:
    """What one ingestion did: lines read, items stored, ids seen before, bad items by place, alerts."""

    read: int = 0
    stored: int = 0
    duplicates: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file:line, reason)
    alerts: int = 0

    def summary(self) -> str:
        return (f"{self.read} items read: {self.stored} stored, {self.duplicates} seen before, "
                f"{len(self.bad)} bad; {self.alerts} new alerts")


class MonitorStore(Database):
    """The SQLite database of items and alerts."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, SCHEMA, "monitor database")

    def known(self, ids: list[str]) -> set[str]:
        """Which of `ids` are stored already."""
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            out.update(row[0] for row in self.query(
                f"SELECT id FROM items WHERE id IN ({','.join('?' * len(chunk))})", tuple(chunk)))
        return out

    def check_settings(self, settings: dict[str, str]) -> None:
        """Record the settings the stored scores depend on (the sentiment labels); refuse other ones later.

        Raises:
            ConfigError: the database was filled with different settings.
        """
        with self.transaction() as db:
            for key, value in settings.items():
                row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
                if row is None:
                    db.execute("INSERT INTO settings VALUES (?, ?)", (key, value))
                elif row[0] != value:
                    raise ConfigError(f"{self.path}: its items were stored with {key}={row[0]!r}, not {value!r}; "
                                      f"use another --db for other settings")

    def window(self, topic: str, start: float, end: float, config: MonitorConfig) -> WindowStats:
        """One topic's items in [start, end)."""
        ((count, negative, positive, score),) = self.query(
            "SELECT COUNT(*), COALESCE(SUM(sentiment = ?), 0), COALESCE(SUM(sentiment = ?), 0), "
            "COALESCE(SUM(score), 0) FROM items WHERE topic = ? AND time >= ? AND time < ?",
            (config.negative, config.positive, topic, start, end))
        return WindowStats(topic, start, end, count, negative, positive, score)

    def topics(self) -> list[str]:
        return [row[0] for row in self.query("SELECT DISTINCT topic FROM items ORDER BY topic")]

    def items(self, topic: str | None = None, start: float = -math.inf, end: float = math.inf) -> list[dict[str, Any]]:
        """Stored items in time order (of one topic, in [start, end) when given)."""
        rows = self.query(
            "SELECT id, time, text, source, topic, sentiment, score FROM items WHERE time >= ? AND time < ? "
            + ("AND topic = ? " if topic is not None else "") + "ORDER BY time, id",
            (start, end) + ((topic,) if topic is not None else ()))
        return [{"id": r[0], "time": iso(r[1]), "text": r[2], "source": r[3], "topic": r[4], "sentiment": r[5],
                 "score": round(r[6], 4)} for r in rows]

    def alerts(self, undelivered: bool = False) -> list[Alert]:
        """Stored alerts in the order they were raised."""
        rows = self.query("SELECT id, topic, window_start, window_end, rule, count, negative_share, baseline_mean, "
                          "baseline_std, z, stream_time FROM alerts "
                          + ("WHERE delivered = 0 " if undelivered else "") + "ORDER BY id")
        return [Alert(*row[1:], id=row[0]) for row in rows]

    def add_alert(self, alert: Alert) -> bool:
        """Store `alert` unless its window has one already; whether it was new (its id is set)."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO alerts (topic, window_start, window_end, rule, count, negative_share, "
                "baseline_mean, baseline_std, z, stream_time, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (alert.topic, alert.window_start, alert.window_end, alert.rule, alert.count, alert.negative_share,
                 alert.baseline_mean, alert.baseline_std, alert.z, alert.stream_time, time.time()))
            if cursor.rowcount == 0:
                return False
            alert.id = cursor.lastrowid
            return True

    def mark_delivered(self, alert_id: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE alerts SET delivered = 1 WHERE id = ?", (alert_id,))

    def has_alert(self, topic: str, start: float, end: float) -> bool:
        return bool(self.query("SELECT 1 FROM alerts WHERE topic = ? AND window_start = ? AND window_end = ?",
                               (topic, start, end)))

    def settings(self) -> dict[str, str]:
        """The settings the stored items were scored with (`negative`, `positive`)."""
        return dict(self.query("SELECT key, value FROM settings"))

    def time_range(self) -> tuple[float, float] | None:
        ((low, high),) = self.query("SELECT MIN(time), MAX(time) FROM items")
        return None if low is None else (low, high)


class Grid:
    """Where windows lie: each starts at a multiple of `step` (since the epoch) and lasts `size` seconds."""

    def __init__(self, config: MonitorConfig) -> None:
        self.size, self.step = config.seconds()

    def starts(self, t: float) -> list[float]:
        """The starts of every window holding time `t` (one for back-to-back windows)."""
        last = math.floor(t / self.step) * self.step
        n = round(self.size / self.step)
        return [last - k * self.step for k in range(n - 1, -1, -1)]

    def baseline(self, start: float, k: int) -> list[float]:
        """The starts of `k` back-to-back windows before the one at `start`, oldest first (they do not
        overlap, also for rolling windows: K windows of baseline span K window lengths)."""
        return [start - j * self.size for j in range(k, 0, -1)]


def check_window(store: MonitorStore, grid: Grid, config: MonitorConfig, topic: str, start: float,
                 stream_time: float) -> Alert | None:
    """The alert one topic's window raises now, if any (the threshold rule first)."""
    now = store.window(topic, start, start + grid.size, config)
    if now.count < config.min_count:
        return None
    if now.negative_share > config.threshold:
        return Alert(topic, now.start, now.end, "threshold", now.count, now.negative_share, None, None, None,
                     stream_time)
    past = [w for w in (store.window(topic, s, s + grid.size, config) for s in grid.baseline(start, config.baseline))
            if w.count]
    if len(past) < min(3, config.baseline):
        return None
    shares = [w.negative_share for w in past]
    mean = sum(shares) / len(shares)
    spread = math.sqrt(sum((s - mean) ** 2 for s in shares) / max(1, len(shares) - 1))
    rate = (sum(w.negative for w in past) + 1) / (sum(w.count for w in past) + 2)  # never 0 or 1
    std = max(spread, math.sqrt(rate * (1 - rate) / now.count))
    z = (now.negative_share - mean) / std
    if z > config.z:
        return Alert(topic, now.start, now.end, "surge", now.count, now.negative_share, mean, std, z, stream_time)
    return None


def aggregate(store: MonitorStore, config: MonitorConfig, topic: str | None = None) -> list[WindowStats]:
    """Every window from the first stored item to the last, per topic (empty windows included), in
    topic then time order."""
    grid, span = Grid(config), store.time_range()
    if span is None:
        return []
    first, last = grid.starts(span[0])[0], grid.starts(span[1])[-1]
    starts = [first + k * grid.step for k in range(round((last - first) / grid.step) + 1)]
    topics = [topic] if topic is not None else store.topics()
    return [store.window(t, s, s + grid.size, config) for t in topics for s in starts]


class Webhook:
    """POSTs alerts as JSON to a URL, with retries and exponential back-off."""

    BACKOFF = 0.5  # seconds before the second attempt; doubled for each one after
    TIMEOUT = 10.0  # seconds one attempt may take

    def __init__(self, url: str, attempts: int) -> None:
        self.url, self.attempts = url, attempts

    def post(self, payload: dict[str, Any]) -> bool:
        """Whether the receiver answered 2xx within the attempts."""
        body = json.dumps(payload).encode()
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.BACKOFF * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.TIMEOUT) as answer:
                    if 200 <= answer.status < 300:
                        return True
            except (urllib.error.URLError, OSError) as err:
                log.warning("webhook %s: attempt %d of %d failed: %s", self.url, attempt + 1, self.attempts,
                            getattr(err, "reason", err))
        return False


class Monitor:
    """Classifies items with a sentiment run (and a topic run), stores them and raises alerts."""

    def __init__(self, store: MonitorStore, sentiment: Classifier, config: MonitorConfig,
                 topic: Classifier | None = None) -> None:
        """
        Raises:
            ConfigError: a run that is not a single-text classifier, sentiment labels the run lacks,
                or a database filled with other sentiment labels.
        """
        config.validate()
        for role, run in (("sentiment", sentiment), ("topic", topic)):
            if run is not None and (not isinstance(run, Classifier) or run.pairs):
                raise ConfigError(f"monitor: the {role} run must classify single texts")
        for name in ("negative", "positive"):
            if getattr(config, name) not in sentiment.labels:
                raise ConfigError(f"monitor.{name}={getattr(config, name)!r} is not a label of the sentiment run "
                                  f"(its labels: {', '.join(sentiment.labels)}); give --{name} LABEL")
        store.check_settings({"negative": config.negative, "positive": config.positive})
        self.store, self.sentiment, self.topic, self.config = store, sentiment, topic, config
        self.grid = Grid(config)
        self.webhook = Webhook(config.webhook, config.retries) if config.webhook else None

    def add(self, items: list[Item]) -> tuple[int, int, list[Alert]]:
        """Classify and store one batch in one transaction, then check the windows it touched.
        Returns (stored, seen before, new alerts)."""
        seen = self.store.known([item.id for item in items])
        fresh, ids = [], set()
        for item in items:
            if item.id not in seen and item.id not in ids:
                fresh.append(item)
                ids.add(item.id)
        if not fresh:
            return 0, len(items), []
        labels = self.sentiment.classify([item.text for item in fresh])
        topics = [item.topic for item in fresh]
        unknown = [i for i, t in enumerate(topics) if t is None]
        if self.topic is not None and unknown:
            for i, (label, _) in zip(unknown, self.topic.classify([fresh[i].text for i in unknown])):
                topics[i] = label
        now = time.time()
        with self.store.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                (item.id, item.time, iso(item.time), item.text, item.source, topic or ALL, label,
                 probs[self.config.positive] - probs[self.config.negative], json.dumps(probs), now)
                for item, topic, (label, probs) in zip(fresh, topics, labels)])
        stream_time = max(item.time for item in fresh)
        touched = sorted({(topic or ALL, start) for item, topic in zip(fresh, topics)
                          for start in self.grid.starts(item.time)})
        alerts = []
        for topic, start in touched:
            if self.store.has_alert(topic, start, start + self.grid.size):
                continue
            alert = check_window(self.store, self.grid, self.config, topic, start, stream_time)
            if alert is not None and self.store.add_alert(alert):
                alerts.append(alert)
        return len(fresh), len(items) - len(fresh), alerts

    def deliver(self) -> None:
        """POST every alert not yet delivered to the webhook (this run's and earlier runs' alike)."""
        if self.webhook is None:
            return
        for alert in self.store.alerts(undelivered=True):
            if self.webhook.post(alert.to_dict()):
                self.store.mark_delivered(alert.id)  # type: ignore[arg-type]
            else:
                log.warning("webhook %s: alert %d not delivered; it will be tried at the next ingest",
                            self.webhook.url, alert.id)

    def ingest(self, lines: Iterable[tuple[str, str | dict] | None], on_alert: Callable[[Alert], None] | None = None,
               on_batch: Callable[[IngestReport], None] | None = None) -> IngestReport:
        """Read items from `(place, JSON line or object)` pairs (place: "file:line"), in batches of
        `config.batch_size`; a `None` in `lines` (an idle moment of a followed file) stores what is
        pending. Bad items are logged and listed in the report; blank lines are skipped.

        Args:
            on_alert: called with each new alert as it is raised.
            on_batch: called with the report so far after each committed batch (progress).
        """
        report, pending = IngestReport(), []

        def flush() -> None:
            stored, duplicates, alerts = self.add(pending)
            report.stored += stored
            report.duplicates += duplicates
            report.alerts += len(alerts)
            pending.clear()
            for alert in alerts:
                log.info("alert %d: %s %s..%s negative share %.2f (%s)", alert.id, alert.topic,
                         iso(alert.window_start), iso(alert.window_end), alert.negative_share, alert.rule)
                if on_alert is not None:
                    on_alert(alert)
            self.deliver()
            if on_batch is not None:
                on_batch(report)

        self.deliver()  # what an earlier run could not
        for entry in lines:
            if entry is None:
                if pending:
                    flush()
                continue
            where, line = entry
            if isinstance(line, str) and not line.strip():
                continue
            report.read += 1
            try:
                pending.append(parse_item(json_object(line, where) if isinstance(line, str) else line))
            except (DataError, ValueError) as err:
                report.bad.append((where, str(err).removeprefix(f"{where}: ")))
                log.warning("%s: skipped: %s", where, report.bad[-1][1])
                continue
            if len(pending) >= self.config.batch_size:
                flush()
        if pending:
            flush()
        return report


def follow(path: str | Path, poll: float, stop: threading.Event | None = None) -> Iterator[tuple[str, str] | None]:
    """The lines of a growing file, like `tail -F`: from its start, then each line as it is completed;
    `None` whenever nothing new came for `poll` seconds. When the file is replaced (rotated: a new
    inode) or truncated, the rest of the old one is read, then the new one from its start. Runs
    until `stop` is set (or forever).

    Raises:
        DataError: the file is absent at the start.
    """
    path = Path(path)
    stop = stop or threading.Event()

    def open_file() -> tuple[Any, int]:
        handle = open(path, "rb")
        return handle, os.fstat(handle.fileno()).st_ino

    try:
        handle, inode = open_file()
    except OSError as err:
        raise DataError(f"{path}: cannot follow: {err.strerror}") from None
    number, partial = 0, b""
    try:
        while not stop.is_set():
            chunk = handle.readline()
            if chunk:
                partial += chunk
                if partial.endswith(b"\n"):
                    number += 1
                    yield f"{path}:{number}", partial.decode("utf-8", errors="replace").rstrip("\r\n")
                    partial = b""
                continue
            try:
                current = path.stat()
            except FileNotFoundError:
                current = None  # being rotated: look again
            if current is not None and (current.st_ino != inode or current.st_size < handle.tell()):
                handle.close()
                handle, inode = open_file()
                number, partial = 0, b""
                continue
            yield None
            stop.wait(poll)
    finally:
        handle.close()
