"""`detr monitor`: idempotent ingestion into SQLite, crash and kill safety, windows, alerts that
fire once on a burst and never on a flat stream, the webhook, --follow with rotation, the report
(opened in headless Chromium) and bad items reported by line."""

import http.server
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

import detr
from detr import load_config
from detr.apps.monitor import Grid, Monitor, MonitorStore, aggregate, follow, parse_time
from detr.config import MonitorConfig
from detr.errors import ConfigError
from tests.conftest import ROOT, detr_cli

COMPANIES = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay"]
TEMPLATES = {
    "negative": ["shares of {c} fell sharply", "{c} reported a heavy loss", "{c} cut jobs after weak sales",
                 "{c} warned of lower profit"],
    "neutral": ["{c} will publish results on monday", "{c} moved its office", "{c} named a new auditor",
                "{c} holds its meeting in may"],
    "positive": ["{c} reported record profit", "shares of {c} rose strongly", "{c} raised its dividend",
                 "{c} won a large contract"]}
START = datetime(2026, 1, 5, tzinfo=timezone.utc)


def sentence(label, rng):
    return rng.choice(TEMPLATES[label]).format(c=rng.choice(COMPANIES))


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    """A tiny three-class sentiment run, trained in seconds on template sentences."""
    tmp = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    for split, n in (("train", 900), ("valid", 60)):
        rows = ["sentence\tlabel"] + [f"{sentence(label, rng)}\t{label}" for label in
                                      (rng.choice(list(TEMPLATES)) for _ in range(n))]
        (tmp / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    detr.train(load_config(None, {
        "task": "classify", "run_dir": str(tmp / "run"), "model_preset": "tiny", "data.train": str(tmp / "train.tsv"),
        "data.valid": str(tmp / "valid.tsv"), "data.src_field": "sentence", "data.vocab_size": 300,
        "train.max_steps": 150, "train.eval_every": 150, "train.save_every": 150, "train.lr": 3e-3,
        "train.warmup_steps": 10, "train.max_tokens": 1024, "train.threads": 1, "model.dropout": 0.0}))
    assert detr.load(tmp / "run").score_file(tmp / "valid.tsv")["accuracy"] == 1.0
    return tmp / "run"


def stream(path, hours, per_hour, burst=None, seed=1, topic="markets", start_id=0):
    """A JSON-lines stream: `per_hour` items each hour, mostly neutral/positive with a steady 10%
    negative; `burst=(hour, n)` adds n negative items in that hour."""
    rng = random.Random(seed)
    items, n = [], start_id
    for hour in range(hours):
        labels = ["negative" if k % 10 == 0 else rng.choice(["neutral", "positive"]) for k in range(per_hour)]
        if burst and burst[0] == hour:
            labels += ["negative"] * burst[1]
        for k, label in enumerate(labels):
            moment = START + timedelta(hours=hour, minutes=k * 60 / len(labels))
            items.append({"id": f"i{n}", "time": moment.isoformat().replace("+00:00", "Z"),
                          "text": sentence(label, rng), "topic": topic})
            n += 1
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def config(**changes):
    return MonitorConfig(**({"window": "1h", "min_count": 8, "threshold": 0.6, "z": 3.0, "baseline": 6,
                             "batch_size": 16} | changes))


def ingest(sentiment_run, db, path, **changes):
    store = MonitorStore(db)
    alerts = []
    try:
        lines = ((f"{path}:{n}", line) for n, line in enumerate(path.read_text().splitlines(), 1))
        report = Monitor(store, detr.load(sentiment_run), config(**changes)).ingest(lines, alerts.append)
    finally:
        store.close()
    return report, alerts


def count_rows(db, table="items"):
    with sqlite3.connect(db) as c:
        return c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def rows_so_far(db, table="items"):
    """`count_rows` while another process may still be creating the database: 0 before its table exists."""
    try:
        return count_rows(db, table) if db.exists() else 0
    except sqlite3.OperationalError as err:  # the file is there, its schema not yet
        if "no such table" not in str(err):
            raise
        return 0


def test_times_and_windows():
    assert parse_time("2026-01-05T10:30:00Z") == parse_time("2026-01-05T11:30:00+01:00") == \
        START.timestamp() + 10.5 * 3600
    assert parse_time("2026-01-05T10:30:00") == parse_time("2026-01-05T10:30:00Z")  # no offset: UTC
    with pytest.raises(ValueError, match="not ISO 8601"):
        parse_time("05/01/2026 10:30")
    assert Grid(MonitorConfig(window="1h")).starts(7300) == [7200]
    assert Grid(MonitorConfig(window="1h", every="15m")).starts(7300) == [4500, 5400, 6300, 7200]
    assert Grid(MonitorConfig(window="1h")).baseline(7200, 3) == [-3600, 0, 3600]
    with pytest.raises(ConfigError, match="monitor.every=25m must divide monitor.window=1h"):
        MonitorConfig(window="1h", every="25m").validate()
    with pytest.raises(ConfigError, match="monitor.window: expected a positive duration"):
        MonitorConfig(window="hourly").validate()


def test_ingest_is_idempotent_and_bad_items_are_reported_by_line(sentiment, tmp_path):
    path = stream(tmp_path / "items.jsonl", hours=4, per_hour=10)
    with path.open("a") as f:
        f.write('{"id": "x1", "text": "acme fell"}\n')                                 # no time
        f.write('{"id": "x2", "time": "yesterday", "text": "acme fell"}\n')            # bad time
        f.write('{"id": "x3", "time": "2026-01-05T01:00:00Z", "text": "  "}\n')        # empty text
        f.write("not json\n\n")
        f.write('{"id": "i3", "time": "2026-01-05T01:00:00Z", "text": "again"}\n')    # an id seen before
    db = tmp_path / "m.sqlite"
    first, _ = ingest(sentiment, db, path)
    assert (first.read, first.stored, first.duplicates) == (45, 40, 1)
    assert [(where.rsplit(":", 1)[1], reason) for where, reason in first.bad] == [
        ("41", "no 'time' field"), ("42", "time 'yesterday' is not ISO 8601 (like 2026-11-30T12:00:00Z)"),
        ("43", "empty text"), ("44", "invalid JSON: Expecting value (column 1)")]
    before = [w.row() for w in aggregate(MonitorStore(db), config())]
    second, _ = ingest(sentiment, db, path)
    assert (second.stored, second.duplicates, len(second.bad)) == (0, 41, 4)
    assert [w.row() for w in aggregate(MonitorStore(db), config())] == before
    assert count_rows(db) == 40
    assert [w["count"] for w in before] == [10, 10, 10, 10] and all(w["negative"] == 1 for w in before)


def test_a_crash_mid_ingest_loses_nothing_acknowledged_and_the_rerun_counts_nothing_twice(sentiment, tmp_path):
    path = stream(tmp_path / "items.jsonl", hours=3, per_hour=20)
    db = tmp_path / "m.sqlite"
    classifier, calls = detr.load(sentiment), []
    real = classifier.classify

    def failing(texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real(texts)

    classifier.classify = failing
    store = MonitorStore(db)
    lines = ((f"x:{n}", line) for n, line in enumerate(path.read_text().splitlines(), 1))
    with pytest.raises(RuntimeError, match="power cut"):
        Monitor(store, classifier, config()).ingest(lines)
    store.close()
    assert count_rows(db) == 32  # two batches of 16 acknowledged
    report, _ = ingest(sentiment, db, path)
    assert (report.stored, report.duplicates) == (28, 32) and count_rows(db) == 60


def test_a_killed_follower_loses_nothing_committed(sentiment, tmp_path):
    path = stream(tmp_path / "items.jsonl", hours=2, per_hour=12)
    db = tmp_path / "m.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "detr", "monitor", "ingest", "--sentiment", str(sentiment),
                             "--db", str(db), "--follow", str(path), "--batch-size", "5", "--poll", "0.1",
                             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and rows_so_far(db) < 24:
            time.sleep(0.2)
        assert count_rows(db) == 24
        with path.open("a") as f:  # the follower picks up what is appended
            f.write(stream(tmp_path / "more.jsonl", hours=1, per_hour=6, seed=3, start_id=100).read_text())
        while time.time() < deadline and count_rows(db) < 30:
            time.sleep(0.2)
        assert count_rows(db) == 30
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    report, _ = ingest(sentiment, db, path)
    assert (report.stored, report.duplicates) == (0, 30)


def test_follow_reads_appended_lines_and_survives_rotation(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("a\nb\npartial")
    stop, seen = threading.Event(), []

    def reader():
        for entry in follow(path, 0.05, stop):
            if entry is not None:
                seen.append(entry)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        time.sleep(0.3)
        assert seen == [(f"{path}:1", "a"), (f"{path}:2", "b")]  # the unfinished line waits
        with path.open("a") as f:
            f.write(" line\n")
        time.sleep(0.3)
        os.rename(path, tmp_path / "log.jsonl.1")  # rotate: a new file under the old name
        path.write_text("c\n")
        time.sleep(0.4)
    finally:
        stop.set()
        thread.join(5)
    assert [text for _, text in seen] == ["a", "b", "partial line", "c"] and seen[-1][0] == f"{path}:1"


def test_an_alert_fires_once_on_a_burst_and_never_on_a_flat_stream(sentiment, tmp_path):
    flat, alerts = ingest(sentiment, tmp_path / "flat.sqlite", stream(tmp_path / "flat.jsonl", hours=12, per_hour=10))
    assert flat.stored == 120 and alerts == []
    # a surge: 10 extra negatives in hour 8 → 11 of 20 negative (55%, under the 60% threshold): the z rule
    path = stream(tmp_path / "burst.jsonl", hours=12, per_hour=10, burst=(8, 10))
    db = tmp_path / "burst.sqlite"
    _, alerts = ingest(sentiment, db, path)
    assert [(a.rule, a.window_start - START.timestamp()) for a in alerts] == [("surge", 8 * 3600)]
    assert alerts[0].z > 3 and alerts[0].count >= 8
    _, again = ingest(sentiment, db, path)  # the same stream again: no second alert
    assert again == [] and count_rows(db, "alerts") == 1
    _, high = ingest(sentiment, tmp_path / "high.sqlite", stream(tmp_path / "high.jsonl", hours=2, per_hour=10,
                                                                 burst=(0, 30)))
    assert [a.rule for a in high] == ["threshold"]


class Receiver(http.server.BaseHTTPRequestHandler):
    """A loopback webhook receiver that fails its first request."""

    received: list = []
    fail_first = True

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Receiver.fail_first:
            Receiver.fail_first = False
            self.send_response(500)
        else:
            Receiver.received.append(body)
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alerts_are_posted_to_the_webhook_with_retries(sentiment, tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        path = stream(tmp_path / "burst.jsonl", hours=2, per_hour=10, burst=(0, 30))
        url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
        out = detr_cli("monitor", "ingest", "--sentiment", str(sentiment), "--db", str(tmp_path / "m.sqlite"), "-i",
                       str(path), "--threshold", "0.6", "--min-count", "8", "--webhook", url, "--no-progress")
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    printed = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(printed) == 1 and printed[0]["rule"] == "threshold" and printed[0]["topic"] == "markets"
    assert Receiver.received == printed  # delivered on the second attempt
    assert "attempt 1 of 4 failed" in out.stderr and "50 items read: 50 stored" in out.stderr
    with sqlite3.connect(tmp_path / "m.sqlite") as c:
        assert c.execute("SELECT delivered FROM alerts").fetchall() == [(1,)]


def test_report_writes_a_png_a_csv_and_a_page_chromium_renders(sentiment, tmp_path):
    db = tmp_path / "m.sqlite"
    ingest(sentiment, db, stream(tmp_path / "burst.jsonl", hours=12, per_hour=10, burst=(8, 10)))
    out = detr_cli("monitor", "report", "--db", str(db), "--out", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr
    from matplotlib.image import imread

    image = imread(tmp_path / "report" / "sentiment.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 500
    rows = (tmp_path / "report" / "windows.csv").read_text().splitlines()
    assert rows[0] == "topic,start,end,count,negative,positive,negative_share,positive_share,mean_score"
    assert len(rows) == 13 and rows[9].startswith("markets,2026-01-05T08:00:00Z,2026-01-05T09:00:00Z,20,11,")
    windows = detr_cli("monitor", "windows", "--db", str(db), "--window", "6h", "--json")
    assert [json.loads(line)["count"] for line in windows.stdout.splitlines()] == [60, 70]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (tmp_path / "report" / "index.html").as_uri()], capture_output=True, text=True, timeout=60)
    assert 'id="alerts"' in dom.stdout and 'href="#alert-1"' in dom.stdout and 'id="alert-1"' in dom.stdout
    assert "data:image/png;base64," in dom.stdout and dom.stdout.count("<tr>") >= 2 + 21


def test_monitor_commands_say_what_is_wrong_in_one_line(sentiment, tmp_path):
    path = stream(tmp_path / "items.jsonl", hours=1, per_hour=10)
    base = ["monitor", "ingest", "--sentiment", str(sentiment), "--db", str(tmp_path / "m.sqlite"), "-i", str(path)]
    for extra, message in (
            (["--negative", "bad"], "monitor.negative='bad' is not a label of the sentiment run (its labels: "
                                    "negative, neutral, positive); give --negative LABEL"),
            (["--window", "1 hour"], "monitor.window: expected a positive duration like 30s, 15m, 1h or 1d, "
                                     "got '1 hour'"),
            (["--webhook", "ftp://x"], "monitor.webhook: expected an http:// or https:// URL, got 'ftp://x'")):
        out = detr_cli(*base, *extra)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"detr: error: {message}"], out.stderr
    (tmp_path / "junk.sqlite").write_text("not a database" * 100)
    out = detr_cli("monitor", "alerts", "--db", str(tmp_path / "junk.sqlite"))
    assert out.returncode == 2 and out.stderr.startswith(f"detr: error: {tmp_path / 'junk.sqlite'}: not a usable")


def test_serve_ingests_items_and_lists_alerts(sentiment, tmp_path):
    pytest.importorskip("fastapi", reason="needs the serving extra: pip install -e '.[serve]'")
    from tests.test_serve import Server

    db = tmp_path / "m.sqlite"
    server = Server(f"sentiment={sentiment}", "--monitor-db", str(db), "--monitor-sentiment", "sentiment",
                    "--threshold", "0.6", "--min-count", "8")
    try:
        items = [json.loads(line) for line in
                 stream(tmp_path / "burst.jsonl", hours=2, per_hour=10, burst=(0, 30)).read_text().splitlines()]
        first = server.post("/v1/monitor/items", {"items": items[40:] + [{"id": "b", "text": "acme"}]}).json()
        assert (first["stored"], first["duplicates"]) == (10, 0) and first["alerts"] == []  # hour 1: calm
        assert first["bad"] == [{"item": "items[10]", "reason": "no 'time' field"}]
        second = server.post("/v1/monitor/items", {"items": items}).json()  # hour 0 holds the burst
        assert (second["stored"], second["duplicates"]) == (40, 10)
        assert [a["rule"] for a in second["alerts"]] == ["threshold"]
        import httpx

        listed = httpx.get(server.url + "/v1/monitor/alerts").json()["alerts"]
        assert listed == second["alerts"] and httpx.get(server.url + "/v1/monitor/alerts?after=1").json() == {
            "alerts": []}
        assert server.post("/v1/monitor/items", {"items": "x"}).status_code == 422
    finally:
        server.stop()
    assert count_rows(db) == 50
    off = detr_cli("serve", f"s={sentiment}", "--monitor-db", str(db))
    assert off.returncode == 2 and "serve.monitor_db and serve.monitor_sentiment go together" in off.stderr
