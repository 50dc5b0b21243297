"""The dashboard's pages, rendered from recorded metrics (pure: data in, HTML strings out).

Charts are Plotly figures; plotly.js is inlined into every page that draws one, so the pages open
from disk with no network. Tables are plain HTML, readable without JavaScript. Nothing here
touches the store or the clock: `DashboardData` carries what the shell read, `generated_at`
included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from html import escape
from typing import Any

import pandas as pd

from bonewatch.dashboard.metrics import (
    ANALYTE_LABELS,
    KEY_ANALYTES,
    STATUS_LABELS,
    UNREADABLE_FEED,
    Thresholds,
    duration_text,
)
from bonewatch.ingest.parsing import public_reason

RAG_COLOURS = {"green": "#15803d", "amber": "#d97706", "red": "#b91c1c", "grey": "#cbd5e1"}
RAG_SYMBOLS = {"green": "✓", "amber": "!", "red": "✗", "grey": "·"}
RAG_WORDS = {"green": "OK", "amber": "Needs a look", "red": "Problem", "grey": "No run / not due"}
_RAG_LEVEL = {"grey": 0, "green": 1, "amber": 2, "red": 3}
_PALETTE = ["#2563eb", "#db2777", "#0d9488", "#7c3aed", "#ea580c", "#65a30d", "#0891b2", "#9333ea",
            "#ca8a04", "#475569"]


@dataclass
class DashboardData:
    """What the pages show. `feed_rows`/`night_rows`: recorded dq_feed_nights / dq_nights rows
    (JSON columns parsed); `validations`: run dicts with an `href` into the Data Docs (or '')."""

    site: str
    timezone: str
    generated_at: str                       # local time, for the footer
    nights: list[date]                      # the window, oldest first
    feeds: list[str]
    deadlines: dict[str, str]
    feed_rows: pd.DataFrame
    night_rows: pd.DataFrame
    validations: list[dict] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    datadocs_index: str = ""
    #: codes skipped rather than stored (`bonewatch.ingest.codes.load(everything=True)`)
    codes: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: (feed, public reason) -> a few "file, line N" of its quarantined rows (`build.quarantine_places`)
    places: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    #: silences in force when built (`build.silences_shown`): id, matches, alerts, until, by
    silenced: list[dict] = field(default_factory=list)


def feed_page_name(feed: str) -> str:
    """The file name of a feed's page (feed names come from data: keep them file-safe)."""
    return "feed-" + (re.sub(r"[^A-Za-z0-9_-]+", "_", feed) or "_") + ".html"


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("bonewatch.dashboard", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "" if v is None else f"{v:.1%}"
    return env


def _css() -> str:
    from importlib.resources import files

    return files("bonewatch.dashboard").joinpath("static/dashboard.css").read_text("utf-8")


# ---- figures -----------------------------------------------------------------------------------

def _figure(fig, div_id: str, height: int) -> str:
    height = fig.layout.height or height
    fig.update_layout(template="plotly_white", height=height, margin={"l": 60, "r": 20, "t": 40, "b": 40},
                      font={"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
                      legend={"orientation": "h", "y": -0.2}, hovermode="closest")
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, default_height=f"{height}px",
                       config={"displaylogo": False, "responsive": True,
                               "modeBarButtonsToRemove": ["lasso2d", "select2d"]})


def _night_labels(nights: list[date]) -> list[str]:
    return [n.isoformat() for n in nights]


def headline(row, thresholds: Thresholds) -> str:
    """A feed-night in a few words, worst first: 'Missing', 'Late, 30% quarantined', 'Unit switch'."""
    if row.status not in ("on_time", "late"):
        return STATUS_LABELS.get(row.status, row.status)
    parts = ["Late"] if row.status == "late" else []
    if row.rows_total and not row.rows_accepted:
        parts.append("nothing usable")
    elif row.rows_total and row.bad_row_rate > thresholds.bad_row_rate_max:
        parts.append(f"{row.bad_row_rate:.0%} quarantined")
    if row.unit_switches:
        parts.append("unit switch")
    if row.resent and any("byte-identical" in note for note in (row.notes or [])):
        parts.append("re-sent file")
    text = ", ".join(parts) or "On time"
    return text[0].upper() + text[1:]


def rag_grid(data: DashboardData) -> tuple[list[str], list[str], list[list[int]], list[list[str]], list[list[str]]]:
    """The overview grid: feeds (rows) x nights (columns) -> level, symbol and hover text.
    A night without a recorded run is grey "no run recorded"."""
    rows = {(r.night, r.feed): r for r in data.feed_rows.itertuples(index=False)} if len(data.feed_rows) else {}
    recorded = set(data.night_rows["night"]) if len(data.night_rows) else set()
    recorded |= {n for n, _ in rows}
    z, text, hover = [], [], []
    for feed in data.feeds:
        zr, tr, hr = [], [], []
        for night in data.nights:
            row = rows.get((night, feed))
            if row is None:
                colour = "grey"
                detail = STATUS_LABELS["no_run"] if night not in recorded else "nothing recorded for this feed"
            else:
                colour = row.rag
                detail = STATUS_LABELS.get(row.status, row.status)
                if row.rows_total:
                    detail += f"<br>{row.rows_total} rows, {row.bad_row_rate:.1%} quarantined"
                for note in (row.notes or [])[:3]:
                    detail += "<br>" + escape(_short(note))
            zr.append(_RAG_LEVEL[colour])
            tr.append(RAG_SYMBOLS[colour])
            hr.append(f"<b>{escape(feed)}</b> · night {night}<br>{detail}")
        z.append(zr)
        text.append(tr)
        hover.append(hr)
    return data.feeds, _night_labels(data.nights), z, text, hover


def _short(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def overview_figure(data: DashboardData) -> str:
    import plotly.graph_objects as go

    feeds, nights, z, text, hover = rag_grid(data)
    c = RAG_COLOURS
    scale = [[0, c["grey"]], [1 / 6, c["grey"]], [1 / 6, c["green"]], [0.5, c["green"]],
             [0.5, c["amber"]], [5 / 6, c["amber"]], [5 / 6, c["red"]], [1, c["red"]]]
    fig = go.Figure(go.Heatmap(z=z, x=nights, y=feeds, text=text, texttemplate="%{text}",
                               textfont={"color": "white", "size": 13}, hovertext=hover,
                               hovertemplate="%{hovertext}<extra></extra>", zmin=0, zmax=3,
                               colorscale=scale, showscale=False, xgap=3, ygap=3))
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(type="category", tickangle=-45, title=None)
    return _figure(fig, "rag-overview", 110 + 46 * max(len(feeds), 1))


def alert_volume_figure(data: DashboardData) -> str:
    import plotly.graph_objects as go

    rows = data.night_rows
    by_night = {r.night: r.alerts_by_rule for r in rows.itertuples(index=False)} if len(rows) else {}
    rules = sorted({rule for counts in by_night.values() for rule in counts})
    fig = go.Figure()
    for i, rule in enumerate(rules):
        fig.add_bar(name=rule, x=_night_labels(data.nights),
                    y=[by_night.get(n, {}).get(rule, 0) for n in data.nights],
                    marker_color=_PALETTE[i % len(_PALETTE)])
    fig.update_layout(barmode="stack", yaxis_title="alerts first raised", xaxis=_night_axis(data.nights))
    if not rules:
        _empty(fig, "No alerts raised in this window")
    return _figure(fig, "alert-volume", 340)


def ack_figure(data: DashboardData) -> str:
    import plotly.graph_objects as go

    rows = data.night_rows.sort_values("night") if len(data.night_rows) else data.night_rows
    x, med, p90, waiting = [], [], [], []
    for r in rows.itertuples(index=False) if len(rows) else []:
        stats = (r.ack_latency or {}).get("all", {})
        x.append(r.night.isoformat())
        med.append(stats.get("median_h"))
        p90.append(stats.get("p90_h"))
        waiting.append(stats.get("waiting", 0))
    fig = go.Figure()
    fig.add_scatter(name="median hours to acknowledge", x=x, y=med, mode="lines+markers", line_color="#2563eb")
    fig.add_scatter(name="90th percentile", x=x, y=p90, mode="lines+markers", line={"dash": "dot", "color": "#7c3aed"})
    fig.add_bar(name="notified, not yet acknowledged", x=x, y=waiting, yaxis="y2", marker_color="#fca5a5", opacity=0.6)
    fig.update_layout(yaxis={"title": "hours", "rangemode": "tozero"},
                      yaxis2={"title": "alerts waiting", "overlaying": "y", "side": "right", "rangemode": "tozero",
                              "showgrid": False},
                      xaxis=_night_axis(data.nights))
    if not any(v is not None for v in med) and not any(waiting):
        _empty(fig, "No alert notified in this window yet")
    return _figure(fig, "ack-latency", 320)


def _feed_frame(data: DashboardData, feed: str) -> pd.DataFrame:
    if not len(data.feed_rows):
        return data.feed_rows
    return data.feed_rows[data.feed_rows["feed"] == feed].sort_values("night")


def _night_axis(nights: list[date]) -> dict:
    """A date x-axis over the window (one tick label every few nights, so 30 nights stay readable
    in half a page); every chart of a page spans the same nights."""
    axis = {"type": "date", "tickformat": "%d %b", "hoverformat": "%Y-%m-%d"}
    if nights:
        axis["range"] = [(nights[0] - timedelta(hours=18)).isoformat(), (nights[-1] + timedelta(hours=18)).isoformat()]
    return axis


def _empty(fig, message: str) -> None:
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14, "color": "#64748b"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(showlegend=False, height=160)


def arrival_figure(data: DashboardData, feed: str) -> str:
    import plotly.graph_objects as go

    frame = _feed_frame(data, feed)
    fig = go.Figure()
    arrived = frame[frame["arrived_at"].notna()] if len(frame) else frame
    if len(arrived):
        minutes = ((pd.to_datetime(arrived["arrived_at"]) - pd.to_datetime(arrived["deadline_at"]))
                   .dt.total_seconds() / 60).round(0)
        fig.add_bar(name="minutes after (+) or before (−) the deadline",
                    x=[n.isoformat() for n in arrived["night"]], y=minutes,
                    marker_color=[RAG_COLOURS["amber"] if m > 0 else RAG_COLOURS["green"] for m in minutes],
                    hovertemplate="night %{x}<br>%{y:.0f} min relative to the deadline<extra></extra>")
    missing = frame[frame["status"] == "missing"] if len(frame) else frame
    if len(missing):
        fig.add_scatter(name="missing", x=[n.isoformat() for n in missing["night"]], y=[0] * len(missing),
                        mode="markers", marker={"symbol": "x", "size": 14, "color": RAG_COLOURS["red"]},
                        hovertemplate="night %{x}: missing<extra></extra>")
    fig.add_hline(y=0, line={"color": "#334155", "width": 1})
    fig.update_layout(yaxis_title="minutes after the deadline", xaxis=_night_axis(data.nights))
    return _figure(fig, f"arrival-{feed}", 300)


def rows_figure(data: DashboardData, feed: str) -> str:
    import plotly.graph_objects as go

    frame = _feed_frame(data, feed)
    x = [n.isoformat() for n in frame["night"]] if len(frame) else []
    fig = go.Figure()
    fig.add_bar(name="accepted", x=x, y=list(frame["rows_accepted"]) if len(frame) else [],
                marker_color="#60a5fa")
    fig.add_bar(name="quarantined", x=x, y=list(frame["rows_quarantined"]) if len(frame) else [],
                marker_color="#f87171")
    fig.add_scatter(name="bad-row rate", x=x, y=list(frame["bad_row_rate"] * 100) if len(frame) else [],
                    yaxis="y2", mode="lines+markers", line_color="#b91c1c")
    fig.add_scatter(name=f"threshold {data.thresholds.bad_row_rate_max:.0%}", x=x,
                    y=[data.thresholds.bad_row_rate_max * 100] * len(x), yaxis="y2", mode="lines",
                    line={"dash": "dash", "color": "#d97706"})
    fig.update_layout(barmode="stack", yaxis_title="rows",
                      yaxis2={"title": "% quarantined", "overlaying": "y", "side": "right", "rangemode": "tozero",
                              "showgrid": False},
                      xaxis=_night_axis(data.nights))
    return _figure(fig, f"rows-{feed}", 320)


def expectations_figure(data: DashboardData, feed: str) -> str:
    import plotly.graph_objects as go

    frame = _feed_frame(data, feed)
    x = [n.isoformat() for n in frame["night"]] if len(frame) else []
    fig = go.Figure()
    fig.add_bar(name="expectations passed", x=x, y=list(frame["expectations_passed"]) if len(frame) else [],
                marker_color="#86efac")
    fig.add_bar(name="expectations failed", x=x, y=list(frame["expectations_failed"]) if len(frame) else [],
                marker_color="#ef4444")
    fig.update_layout(barmode="stack", yaxis_title="expectation results (per chunk)",
                      xaxis=_night_axis(data.nights))
    return _figure(fig, f"expectations-{feed}", 260)


def unit_figures(data: DashboardData, feed: str) -> list[tuple[str, str]]:
    """(analyte, figure) for every analyte the feed sent in more than one unit in the window,
    or switched tonight: rows per unit and night, stacked."""
    import plotly.graph_objects as go

    frame = _feed_frame(data, feed)
    per: dict[str, dict[str, dict[date, int]]] = {}
    switched: set[str] = set()
    for r in frame.itertuples(index=False) if len(frame) else []:
        for analyte, units in (r.units or {}).items():
            for unit, n in units.items():
                per.setdefault(analyte, {}).setdefault(unit, {})[r.night] = n
        switched |= {s["analyte"] for s in (r.unit_switches or [])}
    out = []
    for analyte in sorted(per):
        if len(per[analyte]) < 2 and analyte not in switched:
            continue
        fig = go.Figure()
        nights = list(frame["night"])
        for i, (unit, counts) in enumerate(sorted(per[analyte].items())):
            fig.add_bar(name=unit, x=_night_labels(nights), y=[counts.get(n, 0) for n in nights],
                        marker_color=_PALETTE[i % len(_PALETTE)])
        fig.update_layout(barmode="stack", yaxis_title=f"{analyte} rows by unit as sent",
                          xaxis=_night_axis(data.nights))
        out.append((analyte, _figure(fig, f"units-{feed}-{analyte}", 260)))
    return out


def distribution_figures(data: DashboardData, feed: str) -> list[tuple[str, str]]:
    """(analyte, figure) per key analyte: each night's 5/25/50/75/95th percentiles as a box,
    against the history median (the median of the previous nights' medians)."""
    import plotly.graph_objects as go

    frame = _feed_frame(data, feed)
    out = []
    for analyte in KEY_ANALYTES:
        nights, stats = [], []
        for r in frame.itertuples(index=False) if len(frame) else []:
            s = (r.distributions or {}).get(analyte)
            if s and s.get("n"):
                nights.append(r.night.isoformat())
                stats.append(s)
        if not stats:
            continue
        fig = go.Figure()
        fig.add_box(name="tonight (5–95th percentile)", x=nights, q1=[s["p25"] for s in stats],
                    median=[s["p50"] for s in stats], q3=[s["p75"] for s in stats],
                    lowerfence=[s["p05"] for s in stats], upperfence=[s["p95"] for s in stats],
                    mean=[s["mean"] for s in stats], marker_color="#2563eb", boxpoints=False,
                    hovertext=[f"n={s['n']}" for s in stats])
        history = [s.get("history_p50") for s in stats]
        if any(h is not None for h in history):
            fig.add_scatter(name="history median", x=nights, y=history, mode="lines",
                            line={"dash": "dash", "color": "#d97706"})
        fig.update_layout(yaxis_title=ANALYTE_LABELS.get(analyte, analyte), xaxis=_night_axis(data.nights))
        out.append((analyte, _figure(fig, f"dist-{feed}-{analyte}", 300)))
    return out


# ---- tables ------------------------------------------------------------------------------------

def _fmt_time(value, tz: str) -> str:
    if value is None or pd.isna(value):
        return ""
    return pd.Timestamp(value).tz_localize("UTC").tz_convert(tz).strftime("%Y-%m-%d %H:%M")


def status_rows(data: DashboardData, night: date) -> list[dict]:
    """The feed status table of one night, one row a feed (expected feeds with no record say so)."""
    frame = data.feed_rows[data.feed_rows["night"] == night] if len(data.feed_rows) else data.feed_rows
    by_feed = {r.feed: r for r in frame.itertuples(index=False)} if len(frame) else {}
    out = []
    for feed in data.feeds:
        r = by_feed.get(feed)
        if r is None:
            if feed == UNREADABLE_FEED:
                continue
            out.append({"feed": feed, "page": feed_page_name(feed), "status": "no_run",
                        "label": STATUS_LABELS["no_run"], "headline": STATUS_LABELS["no_run"], "rag": "grey", "arrived": "", "deadline": "",
                        "lateness": "", "rows": "", "accepted": "", "not_monitored": "", "quarantined": "", "rate": "",
                        "expectations_failed": "", "units": "", "notes": []})
            continue
        lateness = ""
        if r.arrived_at is not None and not pd.isna(r.arrived_at):
            delta = pd.Timestamp(r.arrived_at) - pd.Timestamp(r.deadline_at)
            lateness = (f"{duration_text(delta.to_pytimedelta())} late" if delta.total_seconds() > 0
                        else f"{duration_text(-delta.to_pytimedelta())} early")
        units = "; ".join(f"{a}: {', '.join(f'{u} ({n})' for u, n in us.items())}"
                          for a, us in (r.units or {}).items() if a in KEY_ANALYTES)
        delivered = r.status in ("on_time", "late")
        out.append({"feed": feed, "page": feed_page_name(feed), "status": r.status,
                    "label": STATUS_LABELS.get(r.status, r.status), "headline": headline(r, data.thresholds),
                    "rag": r.rag, "arrived": _fmt_time(r.arrived_at, data.timezone),
                    "deadline": _fmt_time(r.deadline_at, data.timezone),
                    "lateness": lateness, "rows": r.rows_total if delivered else "",
                    "accepted": r.rows_accepted if delivered else "",
                    "not_monitored": getattr(r, "rows_not_monitored", 0) if delivered else "",
                    "quarantined": r.rows_quarantined if delivered else "",
                    "rate": r.bad_row_rate if r.rows_total else None,
                    "expectations_failed": r.expectations_failed if delivered else "", "units": units,
                    "notes": list(r.notes or [])})
    return out


def problem_list(data: DashboardData, limit: int = 60) -> list[dict]:
    """Every problem noted in the window, newest night first, red before amber."""
    items = []
    for r in data.feed_rows.itertuples(index=False) if len(data.feed_rows) else []:
        for note in r.notes or []:
            items.append({"night": r.night, "feed": r.feed, "rag": r.rag, "text": note})
    items.sort(key=lambda i: (-i["night"].toordinal(), -_RAG_LEVEL[i["rag"]], i["feed"], i["text"]))
    return items[:limit]


def quarantine_tables(data: DashboardData) -> tuple[list[dict], list[dict]]:
    """(by reason over the window, by night): reasons already stripped of patient data."""
    totals: dict[tuple[str, str], dict] = {}
    nightly = []
    for r in data.feed_rows.sort_values("night", ascending=False).itertuples(index=False) if len(data.feed_rows) else []:
        # public again: a night recorded by an older bonewatch kept some quoted text
        reasons: dict[str, int] = {}
        for reason, n in (r.quarantine_reasons or {}).items():
            reasons[public_reason(reason)] = reasons.get(public_reason(reason), 0) + int(n)
        reasons = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        for reason, n in reasons.items():
            slot = totals.setdefault((r.feed, reason), {"feed": r.feed, "page": feed_page_name(r.feed),
                                                        "reason": reason, "rows": 0, "nights": 0, "last": r.night,
                                                        "where": data.places.get((r.feed, reason), [])})
            slot["rows"] += n
            slot["nights"] += 1
            slot["last"] = max(slot["last"], r.night)
        if r.rows_quarantined:
            nightly.append({"night": r.night, "feed": r.feed, "rows": r.rows_total, "quarantined": r.rows_quarantined,
                            "rate": r.bad_row_rate, "rag": r.rag,
                            "reasons": "; ".join(f"{k} ({v})" for k, v in list(reasons.items())[:4])})
    return sorted(totals.values(), key=lambda t: (-t["rows"], t["feed"], t["reason"])), nightly


def alert_table(data: DashboardData) -> list[dict]:
    totals: dict[str, int] = {}
    for r in data.night_rows.itertuples(index=False) if len(data.night_rows) else []:
        for rule, n in (r.alerts_by_rule or {}).items():
            totals[rule] = totals.get(rule, 0) + n
    return [{"rule": k, "alerts": v} for k, v in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))]


def latest_ack(data: DashboardData) -> dict[str, Any]:
    if not len(data.night_rows):
        return {}
    last = data.night_rows.sort_values("night").iloc[-1]
    return {"night": last["night"], **(last["ack_latency"] or {})}


# ---- pages -------------------------------------------------------------------------------------

#: plotly.js, written once beside the pages (a relative <script src>: opens from disk, no network)
PLOTLY_FILE = "plotly.min.js"


def render(data: DashboardData) -> dict[str, str]:
    """Every file of the dashboard: file name -> text (the HTML pages and the shared plotly.js)."""
    env = _environment()
    latest = data.nights[-1] if data.nights else None
    common = {"site": data.site, "timezone": data.timezone, "generated_at": data.generated_at,
              "first": data.nights[0] if data.nights else None, "last": latest,
              "feeds": [{"name": f, "page": feed_page_name(f)} for f in data.feeds],
              "css": _css(), "rag_colours": RAG_COLOURS, "rag_symbols": RAG_SYMBOLS, "rag_words": RAG_WORDS,
              "thresholds": data.thresholds, "datadocs_index": data.datadocs_index,
              "deadlines": data.deadlines, "status_labels": STATUS_LABELS}
    plotly = PLOTLY_FILE
    pages = {PLOTLY_FILE: _plotly_js()}
    status = status_rows(data, latest) if latest else []
    counts = {colour: sum(1 for s in status if s["rag"] == colour) for colour in RAG_COLOURS}
    pages["index.html"] = env.get_template("index.html.j2").render(
        **common, page="index", plotly_js=plotly, status=status, counts=counts,
        overview=overview_figure(data), problems=problem_list(data), alert_volume=alert_volume_figure(data),
        ack=ack_figure(data), alert_totals=alert_table(data), ack_latest=latest_ack(data),
        recorded=bool(len(data.feed_rows)), silenced=data.silenced,
        unmapped=int((data.codes["status"] == "unmapped").sum()) if len(data.codes) else 0)
    for feed in data.feeds:
        frame = _feed_frame(data, feed)
        nights = []
        for r in frame.sort_values("night", ascending=False).itertuples(index=False) if len(frame) else []:
            nights.append({"night": r.night, "status": STATUS_LABELS.get(r.status, r.status),
                           "headline": headline(r, data.thresholds), "rag": r.rag,
                           "arrived": _fmt_time(r.arrived_at, data.timezone), "rows": r.rows_total,
                           "accepted": r.rows_accepted, "quarantined": r.rows_quarantined,
                           "rate": r.bad_row_rate if r.rows_total else None,
                           "passed": r.expectations_passed, "failed": r.expectations_failed,
                           "notes": list(r.notes or [])})
        validations = sorted((v for v in data.validations if v["feed"] == feed),
                             key=lambda v: (str(v["night"]), v["delivery_id"], v["seq"]), reverse=True)
        pages[feed_page_name(feed)] = env.get_template("feed.html.j2").render(
            **common, page=feed_page_name(feed), feed=feed, plotly_js=plotly, nights=nights,
            unreadable=feed == UNREADABLE_FEED,
            arrival=arrival_figure(data, feed), rows=rows_figure(data, feed),
            expectations=expectations_figure(data, feed), units=unit_figures(data, feed),
            distributions=distribution_figures(data, feed), validations=validations[:20],
            validation_count=len(validations))
    by_reason, by_night = quarantine_tables(data)
    pages["quarantine.html"] = env.get_template("quarantine.html.j2").render(
        **common, page="quarantine", plotly_js="", by_reason=by_reason, by_night=by_night)
    codes = data.codes.to_dict("records") if len(data.codes) else []
    status_words = {"not_monitored": "not monitored", "ignored": "ignored"}
    pages["codes.html"] = env.get_template("codes.html.j2").render(
        **common, page="codes", plotly_js="", unmapped=[c for c in codes if c["status"] == "unmapped"],
        others=[{**c, "status": status_words.get(c["status"], f"mapped since: {c['analyte']}")}
                for c in codes if c["status"] != "unmapped"])
    pages["validations.html"] = env.get_template("validations.html.j2").render(
        **common, page="validations", plotly_js="",
        validations=sorted(data.validations, key=lambda v: (str(v["night"]), v["feed"], v["delivery_id"], v["seq"]),
                           reverse=True))
    return pages
