"""The monitor's report: sentiment per topic over time as a PNG, the windows as CSV, and one
self-contained HTML page with the chart and the alerts, each alert linking to its items.

    files = write_report(MonitorStore("monitor.sqlite"), MonitorConfig(window="1h"), "report/")
    # → {"png": report/sentiment.png, "csv": report/windows.csv, "html": report/index.html}
"""

from __future__ import annotations

import base64
import csv
import html
import io
from datetime import datetime, timezone
from pathlib import Path

from detr.apps.monitor import Alert, MonitorStore, WindowStats, aggregate, iso
from detr.atomic import atomic_path, atomic_write_text
from detr.config import MonitorConfig
from detr.errors import DataError


def chart_png(windows: list[WindowStats], alerts: list[Alert]) -> bytes:
    """One panel per topic: negative and positive share per window, item counts as bars behind, and
    each alert's window marked."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    topics = sorted({w.topic for w in windows})
    figure = Figure(figsize=(10, 2.6 * len(topics) + 0.6), layout="constrained")
    axes = figure.subplots(len(topics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, topic in zip(axes, topics):
        rows = [w for w in windows if w.topic == topic]
        half = (rows[0].end - rows[0].start) / 2
        when = [datetime.fromtimestamp(w.start + half, timezone.utc) for w in rows]  # window middles
        counts = ax.twinx()
        counts.bar(when, [w.count for w in rows], width=2 * half / 86400, color="0.88", zorder=0)
        counts.set_ylabel("items", color="0.5")
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot(when, [w.negative_share for w in rows], color="#c0392b", label="negative share")
        ax.plot(when, [w.positive_share for w in rows], color="#27ae60", label="positive share")
        for alert in (a for a in alerts if a.topic == topic):
            ax.axvspan(datetime.fromtimestamp(alert.window_start, timezone.utc),
                       datetime.fromtimestamp(alert.window_end, timezone.utc), color="#c0392b", alpha=0.2)
            ax.plot([datetime.fromtimestamp(alert.window_start + half, timezone.utc)], [alert.negative_share], "v",
                    color="#c0392b", markersize=9)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("share")
        ax.set_title(f"topic: {topic}", loc="left", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("time (UTC); one point per window, at its middle; shaded: alert windows, "
                       "▼ the negative share when the alert fired")
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    return out.getvalue()


def write_csv(path: Path, windows: list[WindowStats]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        fields = list(WindowStats("", 0, 0).row())
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(w.row() for w in windows)


def page(png: bytes, alerts: list[Alert], items: dict[int, list[dict]], windows: int) -> str:
    """The HTML page: the chart inline (a data: URL), the alert table, and each alert's items."""
    e = html.escape
    rows = "".join(
        f'<tr><td><a href="#alert-{a.id}">{a.id}</a></td><td>{e(a.topic)}</td><td>{iso(a.window_start)}</td>'
        f"<td>{iso(a.window_end)}</td><td>{a.rule}</td><td>{a.count}</td><td>{a.negative_share:.2f}</td>"
        f"<td>{'' if a.z is None else f'{a.z:.1f}'}</td></tr>" for a in alerts)
    sections = "".join(
        f'<section id="alert-{a.id}" class="alert-items"><h3>Alert {a.id}: {e(a.topic)}, {iso(a.window_start)} '
        f"to {iso(a.window_end)}</h3><table><tr><th>time</th><th>id</th><th>sentiment</th><th>score</th>"
        f"<th>text</th></tr>"
        + "".join(f"<tr><td>{e(i['time'])}</td><td>{e(i['id'])}</td><td>{e(i['sentiment'])}</td>"
                  f"<td>{i['score']:+.2f}</td><td>{e(i['text'])}</td></tr>" for i in items[a.id])
        + "</table></section>" for a in alerts)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>detr monitor report</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>Sentiment monitor</h1>
<p>{windows} windows; {len(alerts)} alerts. Negative share per topic and window, alert windows shaded.</p>
<img id="chart" alt="sentiment share per topic over time" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Alerts</h2>
<table id="alerts"><tr><th>alert</th><th>topic</th><th>window start</th><th>window end</th><th>rule</th>
<th>items</th><th>negative share</th><th>z</th></tr>{rows}</table>
{sections}
</body></html>
"""


def write_report(store: MonitorStore, config: MonitorConfig, out: str | Path) -> dict[str, Path]:
    """Write `sentiment.png`, `windows.csv` and `index.html` into `out` (created; each file atomic).

    Raises:
        DataError: the database holds no items.
    """
    windows = aggregate(store, config)
    if not windows:
        raise DataError(f"{store.path}: no items to report on")
    alerts = store.alerts()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = chart_png(windows, alerts)
    files = {"png": out / "sentiment.png", "csv": out / "windows.csv", "html": out / "index.html"}
    with atomic_path(files["png"]) as tmp:
        tmp.write_bytes(png)
    write_csv(files["csv"], windows)
    items = {a.id: store.items(a.topic, a.window_start, a.window_end) for a in alerts}
    atomic_write_text(files["html"], page(png, alerts, items, len(windows)))  # type: ignore[arg-type]
    return files
