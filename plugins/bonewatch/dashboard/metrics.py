"""Functional core of data-quality monitoring: one night's deliveries -> per-feed metrics, a
red/amber/green status, and the problems the data team must hear about.

Everything here is pure: frames and plain values in, rows and dataclasses out. The clock (`now`)
and the arrival times are passed in by the shell (`bonewatch.dashboard.record`); nothing reads
the clock, the store or the file system.

Vocabulary
- A feed's *night* D is due by its deadline, a local time on the morning after (day D+1).
- status: `on_time` | `late` (the night's last file arrived after the deadline) | `missing`
  (an expected feed, nothing by the deadline) | `pending` (nothing yet, deadline not reached) |
  `not_expected` (an optional feed that sent nothing) | `unreadable` (what the feed sent tonight
  could not be read at all). A file that cannot be read is counted against the feed its format or
  name gives (`.hl7` -> hl7, `.events.csv` -> events, ...): that feed is red, and never "missing"
  for it; only a file whose feed cannot be told at all goes to the pseudo-feed `unreadable`.
- rag: `red` | `amber` | `green` | `grey` (nothing to judge yet).
- A file byte-identical to an earlier delivery is skipped by the ledger, but it did arrive: it
  counts for timeliness, and when it holds rows it is a problem of its own (`resent`: a stuck
  export sends yesterday's file again). Header-only files are identical every night: no problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from html import escape
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from bonewatch.ingest.parsing import public_reason
from bonewatch.units import ANALYTES, factor

#: The analytes whose value distributions are tracked night by night (ALP, SCr, Ca).
KEY_ANALYTES = ("alp", "creatinine", "calcium")
ANALYTE_LABELS = {"alp": "ALP (U/L)", "creatinine": "SCr (mg/dL)", "calcium": "Ca (mg/dL)"}

#: The pseudo-feed of files that could not be read and whose feed cannot be told from their
#: format or name. ("unknown" is the ledger's name for them before issue 15; read as this one.)
UNREADABLE_FEED = "unreadable"
_LEGACY_UNREADABLE = "unknown"

STATUS_LABELS = {
    "on_time": "On time", "late": "Late", "missing": "Missing", "pending": "Not yet due",
    "not_expected": "Not expected", "unreadable": "Unreadable files", "no_run": "No run recorded",
}


@dataclass(frozen=True)
class FeedRule:
    """When a feed is due and whether a night without it is a problem."""

    deadline: str = "01:00"      # HH:MM hospital time on the morning after the night
    expected: bool = True


@dataclass(frozen=True)
class Thresholds:
    """The [quality] numbers the core needs (kept apart from pydantic so tests build them freely)."""

    bad_row_rate_max: float = 0.05   # over this: amber, and the data team hears about it
    bad_row_rate_red: float = 0.25   # at or over this: red
    page_max_age_hours: float = 48   # problems of older nights are recorded, not emailed

    @classmethod
    def of(cls, quality) -> Thresholds:
        return cls(quality.bad_row_rate_max, quality.bad_row_rate_red, quality.page_max_age_hours)


@dataclass(frozen=True)
class Problem:
    """One thing the data team must hear about for a night (never a patient identifier)."""

    night: date
    feed: str
    issue: str          # stable id within (night, feed): late | missing | bad_rows | resent | unit_switch:<analyte> | unreadable
    severity: str       # red | amber
    text: str


@dataclass
class NightAssessment:
    """The outcome for one night: a row per feed (dq_feed_nights) and the problems found."""

    rows: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    unreadable_files: int = 0      # the night's files that could not be read, every feed


# ---- time --------------------------------------------------------------------------------------

def parse_hhmm(text: str) -> time:
    """'01:00' -> time(1, 0); ValueError for anything else."""
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", text.strip())
    if not match:
        raise ValueError(f"expected a time like 01:00, got {text!r}")
    return time(int(match.group(1)), int(match.group(2)))


def deadline_at(night: date, deadline: str, tz: ZoneInfo) -> datetime:
    """The moment night `night` is due: `deadline` local time on the next day, as naive UTC
    (the store's convention)."""
    local = datetime.combine(night + timedelta(days=1), parse_hhmm(deadline), tzinfo=tz)
    return local.astimezone(UTC).replace(tzinfo=None)


def as_naive_utc(moment: datetime) -> datetime:
    """An aware datetime -> naive UTC; a naive one is taken as UTC already."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def local_hhmm(moment: datetime | None, tz: ZoneInfo) -> str:
    """Naive UTC -> 'YYYY-MM-DD HH:MM' in the hospital zone ('' for None)."""
    if moment is None or pd.isna(moment):
        return ""
    return pd.Timestamp(moment).tz_localize("UTC").tz_convert(tz).strftime("%Y-%m-%d %H:%M")


def duration_text(delta: timedelta) -> str:
    minutes = int(round(delta.total_seconds() / 60))
    hours, minutes = divmod(abs(minutes), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


# ---- units ---------------------------------------------------------------------------------------

def unit_scale(analyte: str, unit: str) -> float | None:
    """The factor to the canonical unit: spellings of the same scale (U/L, IU/L) share it."""
    return factor(analyte, unit)


def merge_units(documents: Iterable[str | Mapping | None]) -> dict[str, dict[str, int]]:
    """Sum ledger unit mixes ({analyte: {unit as sent: rows}}, JSON or dicts) into one."""
    total: dict[str, dict[str, int]] = {}
    for doc in documents:
        if doc is None or (isinstance(doc, float) and np.isnan(doc)):
            continue
        mix = json.loads(doc) if isinstance(doc, str) else doc
        for analyte, units in (mix or {}).items():
            slot = total.setdefault(analyte, {})
            for unit, rows in units.items():
                slot[unit] = slot.get(unit, 0) + int(rows)
    return {a: dict(sorted(u.items())) for a, u in sorted(total.items())}


def unit_switches(tonight: Mapping[str, Mapping[str, int]],
                  history: Mapping[str, Mapping[str, int]]) -> list[dict]:
    """Units tonight whose scale the feed did not use for that analyte in the history window.

    In: tonight's mix and the history's mix ({analyte: {unit as sent: rows}}). Out: one dict per
    switched (analyte, unit): analyte, unit, rows, share (of tonight's rows of that analyte) and
    `usual` (the history's units, most used first). An analyte without history is not judged
    (a new analyte is not a switch); U/L -> IU/L is a spelling, not a switch.
    """
    found = []
    for analyte, units in sorted(tonight.items()):
        seen = history.get(analyte) or {}
        if not seen:
            continue
        seen_scales = {unit_scale(analyte, u) for u in seen}
        total = sum(units.values()) or 1
        for unit, rows in sorted(units.items()):
            if unit_scale(analyte, unit) not in seen_scales:
                usual = [u for u, _ in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))]
                found.append({"analyte": analyte, "unit": unit, "rows": int(rows),
                              "share": round(rows / total, 4), "usual": usual})
    return found


# ---- distributions -------------------------------------------------------------------------------

def distribution(values: pd.Series) -> dict:
    """n, mean and the 5/25/50/75/95th percentiles of a numeric series (rounded for display)."""
    data = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if data.size == 0:
        return {"n": 0}
    q = np.percentile(data, [5, 25, 50, 75, 95])
    out = {"n": int(data.size), "mean": float(np.round(data.mean(), 4))}
    out.update({k: float(np.round(v, 4)) for k, v in zip(("p05", "p25", "p50", "p75", "p95"), q, strict=True)})
    return out


def distributions(values: pd.DataFrame, history_p50: Mapping[str, list[float]]) -> dict[str, dict]:
    """Per key analyte: tonight's distribution and `history_p50`, the median of the previous
    nights' medians (None without history). `values` has columns analyte, value."""
    out = {}
    for analyte in KEY_ANALYTES:
        tonight = values.loc[values["analyte"] == analyte, "value"] if len(values) else pd.Series(dtype=float)
        stats = distribution(tonight)
        past = [p for p in history_p50.get(analyte, []) if p is not None and not pd.isna(p)]
        stats["history_p50"] = float(np.round(np.median(past), 4)) if past else None
        if stats["n"] or stats["history_p50"] is not None:
            out[analyte] = stats
    return out


# ---- one night ---------------------------------------------------------------------------------

def feed_status(*, delivered: bool, arrived_at: datetime | None, due: datetime, now: datetime,
                expected: bool) -> str:
    """on_time | late | missing | pending | not_expected (see the module docstring)."""
    if delivered:
        return "on_time" if arrived_at is not None and arrived_at <= due else "late"
    if now < due:
        return "pending"
    return "missing" if expected else "not_expected"


def rag(status: str, *, bad_row_rate: float, switches: int, rows_total: int, rows_accepted: int,
        thresholds: Thresholds, resent: int = 0) -> str:
    """red: missing, unreadable, nothing usable, or bad rows at/over the red rate; amber: late,
    bad rows over the threshold, a unit switch, or a re-sent file with rows; grey: nothing to judge
    yet; else green."""
    if status in ("missing", "unreadable"):
        return "red"
    if status in ("pending", "not_expected", "no_run"):
        return "grey"
    if rows_total > 0 and rows_accepted == 0:
        return "red"
    if bad_row_rate >= thresholds.bad_row_rate_red and rows_total > 0:
        return "red"
    if status == "late" or bad_row_rate > thresholds.bad_row_rate_max or switches or resent:
        return "amber"
    return "green"


def assess_night(night: date, *, feeds: Mapping[str, FeedRule], default_rule: FeedRule,
                 deliveries: pd.DataFrame, reasons: pd.DataFrame, values: pd.DataFrame,
                 unit_history: Mapping[str, Mapping[str, Mapping[str, int]]],
                 p50_history: Mapping[str, Mapping[str, list[float]]],
                 thresholds: Thresholds, tz: ZoneInfo, now: datetime,
                 resent: pd.DataFrame | None = None) -> NightAssessment:
    """Assess one night, every feed.

    In:
    - `feeds`: the configured feeds; feeds seen in `deliveries` but not configured use
      `default_rule` with expected=False (never "missing").
    - `deliveries`: the night's ledger rows: delivery_id, feed, status (loaded|failed),
      arrived_at (naive UTC), rows_total, rows_accepted, rows_quarantined, rows_not_monitored
      (optional: results skipped for their code, which are neither accepted nor bad),
      expectations_passed, expectations_failed, units (JSON).
    - `reasons`: feed, reason, rows (the night's quarantine, raw reasons; the row keeps their
      public form, `bonewatch.ingest.parsing.public_reason`, summed over the values they quoted).
    - `values`: feed, analyte, value: accepted, uncensored key-analyte values of the night.
    - `unit_history`: feed -> {analyte: {unit: rows}} over the history window.
    - `p50_history`: feed -> {analyte: [previous nights' medians]}.
    - `now`: the run's clock (naive UTC or aware).
    - `resent`: feed, night (of the original), rows_total, arrived_at: tonight's files that are
      byte-identical to an earlier delivery (optional).
    Out: a dq_feed_nights row per feed (JSON columns as dicts/lists) and the problems.
    """
    now = as_naive_utc(now)
    out = NightAssessment()
    loaded = deliveries[deliveries["status"] == "loaded"] if len(deliveries) else deliveries
    failed = deliveries[deliveries["status"] != "loaded"] if len(deliveries) else deliveries
    failed_feeds = (failed["feed"].replace({_LEGACY_UNREADABLE: UNREADABLE_FEED}) if len(failed)
                    else pd.Series([], dtype=object))
    out.unreadable_files = int(len(failed))
    unreadable_of = failed_feeds[failed_feeds != UNREADABLE_FEED].value_counts().to_dict()
    failed = failed[(failed_feeds == UNREADABLE_FEED).to_numpy()] if len(failed) else failed
    resent = resent if resent is not None and len(resent) else pd.DataFrame(
        columns=["feed", "night", "rows_total", "arrived_at"])
    names = sorted(set(feeds) | set(loaded["feed"] if len(loaded) else []) | set(resent["feed"])
                   | set(unreadable_of))
    for feed in names:
        rule = feeds.get(feed) or FeedRule(default_rule.deadline, expected=False)
        due = deadline_at(night, rule.deadline, tz)
        mine = loaded[loaded["feed"] == feed] if len(loaded) else loaded
        again = resent[resent["feed"] == feed]
        arrivals = list(mine["arrived_at"] if len(mine) else []) + list(again["arrived_at"])
        arrived = pd.Timestamp(max(arrivals)).to_pydatetime() if arrivals else None
        status = feed_status(delivered=bool(arrivals), arrived_at=arrived, due=due, now=now,
                             expected=rule.expected)
        unreadable = int(unreadable_of.get(feed, 0))
        if unreadable and not arrivals:
            status = "unreadable"      # it did send: nothing of it could be read (not "missing")
        resent_rows = again[again["rows_total"] > 0]
        total = int(mine["rows_total"].sum()) if len(mine) else 0
        accepted = int(mine["rows_accepted"].sum()) if len(mine) else 0
        quarantined = int(mine["rows_quarantined"].sum()) if len(mine) else 0
        not_monitored = int(mine["rows_not_monitored"].sum()) if len(mine) and "rows_not_monitored" in mine else 0
        # SPEC 2.5: a result of an analyte bonewatch does not monitor is not a bad row, and does not
        # dilute the rate either: the rate is over the rows bonewatch meant to use
        usable = total - not_monitored
        rate = round(quarantined / usable, 4) if usable > 0 else 0.0
        units = merge_units(mine["units"]) if len(mine) else {}
        switches = unit_switches(units, unit_history.get(feed, {}))
        feed_reasons: dict[str, int] = {}
        if len(reasons):
            for reason, rows in reasons.loc[reasons["feed"] == feed, ["reason", "rows"]].itertuples(index=False):
                key = public_reason(reason)
                feed_reasons[key] = feed_reasons.get(key, 0) + int(rows)
        feed_values = values[values["feed"] == feed] if len(values) else pd.DataFrame(columns=["analyte", "value"])
        dists = distributions(feed_values, p50_history.get(feed, {})) if len(mine) else {}
        colour = rag(status, bad_row_rate=rate, switches=len(switches), rows_total=usable,
                     rows_accepted=accepted, thresholds=thresholds, resent=len(resent_rows))
        if unreadable:
            colour = "red"
        row = {
            "night": night, "feed": feed, "expected": rule.expected, "deadline_at": due,
            "arrived_at": arrived, "status": status, "rag": colour, "deliveries": int(len(mine)) + unreadable,
            "resent": int(len(again)),
            "rows_total": total, "rows_accepted": accepted, "rows_quarantined": quarantined,
            "rows_not_monitored": not_monitored, "bad_row_rate": rate,
            "expectations_passed": int(mine["expectations_passed"].sum()) if len(mine) else 0,
            "expectations_failed": int(mine["expectations_failed"].sum()) if len(mine) else 0,
            "quarantine_reasons": dict(sorted(feed_reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "units": units, "unit_switches": switches, "distributions": dists,
        }
        problems = _problems(row, rule, tz, now, thresholds)
        if unreadable:
            problems.insert(0, Problem(night, feed, "unreadable", "red",
                                       f"{feed}: {unreadable} file(s) for night {night} could not be read at all "
                                       "(bonewatch ingest names the file and the first bad line)"))
        if len(resent_rows):
            originals = ", ".join(sorted({str(n) for n in resent_rows["night"]}))
            problems.append(Problem(night, feed, "resent", "amber",
                                    f"{feed}: {len(resent_rows)} file(s) for night {night} are byte-identical to "
                                    f"earlier deliveries (night {originals}): nothing new was loaded from them; "
                                    "is the export stuck?"))
        row["notes"] = [p.text for p in problems]
        out.rows.append(row)
        out.problems.extend(problems)
    if len(failed):
        due = deadline_at(night, default_rule.deadline, tz)
        row = {
            "night": night, "feed": UNREADABLE_FEED, "expected": False, "deadline_at": due,
            "arrived_at": None, "status": "unreadable", "rag": "red", "deliveries": int(len(failed)), "resent": 0,
            "rows_total": 0, "rows_accepted": 0, "rows_quarantined": 0, "rows_not_monitored": 0, "bad_row_rate": 0.0,
            "expectations_passed": 0, "expectations_failed": 0, "quarantine_reasons": {},
            "units": {}, "unit_switches": [], "distributions": {},
        }
        text = (f"{len(failed)} file(s) for night {night} could not be read at all, and their feed cannot be "
                "told from their name (bonewatch ingest names the file and the first bad line)")
        row["notes"] = [text]
        out.rows.append(row)
        out.problems.append(Problem(night, UNREADABLE_FEED, "unreadable", "red", text))
    return out


def _problems(row: dict, rule: FeedRule, tz: ZoneInfo, now: datetime, thresholds: Thresholds) -> list[Problem]:
    night, feed, status = row["night"], row["feed"], row["status"]
    found: list[Problem] = []
    due_text = f"{rule.deadline} on {night + timedelta(days=1)}"
    if status == "missing":
        found.append(Problem(night, feed, "missing", "red",
                             f"{feed}: no delivery for night {night} by its deadline ({due_text}); "
                             f"still nothing at {local_hhmm(now, tz)}"))
    elif status == "late":
        late_by = duration_text(row["arrived_at"] - row["deadline_at"])
        found.append(Problem(night, feed, "late", "amber",
                             f"{feed}: night {night} arrived at {local_hhmm(row['arrived_at'], tz)}, "
                             f"{late_by} after its deadline ({due_text})"))
    total, rate = row["rows_total"] - row.get("rows_not_monitored", 0), row["bad_row_rate"]
    if total and rate > thresholds.bad_row_rate_max:
        top = "; ".join(f"{reason} ({n})" for reason, n in list(row["quarantine_reasons"].items())[:3])
        found.append(Problem(night, feed, "bad_rows", "red" if rate >= thresholds.bad_row_rate_red else "amber",
                             f"{feed}: {rate:.1%} of night {night}'s rows were quarantined "
                             f"({row['rows_quarantined']} of {total}; threshold {thresholds.bad_row_rate_max:.1%})"
                             + (f"; top reasons: {top}" if top else "")))
    for switch in row["unit_switches"]:
        canonical = ANALYTES[switch["analyte"]].canonical_unit if switch["analyte"] in ANALYTES else ""
        found.append(Problem(night, feed, f"unit_switch:{switch['analyte']}", "amber",
                             f"{feed}: {switch['analyte']} arrived in '{switch['unit']}' "
                             f"({switch['rows']} rows, {switch['share']:.0%} of tonight's {switch['analyte']}), "
                             f"a unit the feed did not send in the history window (usual: "
                             f"{', '.join(switch['usual'])}); values were converted to {canonical} on ingest: "
                             "confirm the lab really changed units"))
    return found


def pageable(problems: Iterable[Problem], rows: Iterable[dict], now: datetime,
             thresholds: Thresholds) -> list[Problem]:
    """The problems worth an email now: those of nights whose deadline passed at most
    `page_max_age_hours` ago. A backfill or a replay of old nights records its problems on the
    dashboard but pages no one: a page about a delivery a month ago helps nobody act."""
    now = as_naive_utc(now)
    due = {(r["night"], r["feed"]): r["deadline_at"] for r in rows}
    limit = timedelta(hours=thresholds.page_max_age_hours)
    return [p for p in problems if now - due.get((p.night, p.feed), now) <= limit]


# ---- alerts and acknowledgements --------------------------------------------------------------

def alert_volume(alerts: pd.DataFrame, night: date) -> dict[str, int]:
    """Alerts first raised on `night`, by rule. `alerts` has columns rule, raised_on."""
    if alerts.empty:
        return {}
    raised = pd.to_datetime(alerts["raised_on"]).dt.date == night
    counts = alerts.loc[raised, "rule"].value_counts()
    return {str(rule): int(n) for rule, n in sorted(counts.items())}


def ack_latency(alerts: pd.DataFrame) -> dict:
    """Acknowledgement latency (hours from the accepted email to the acknowledgement) over the
    given alerts (columns severity, notified_at, acknowledged_at), overall and for high severity:
    notified, acknowledged, waiting (notified, not acknowledged), median_h, p90_h, max_h."""
    def stats(frame: pd.DataFrame) -> dict:
        notified = frame[frame["notified_at"].notna()]
        acked = notified[notified["acknowledged_at"].notna()]
        hours = ((pd.to_datetime(acked["acknowledged_at"]) - pd.to_datetime(acked["notified_at"]))
                 .dt.total_seconds() / 3600).clip(lower=0).to_numpy(dtype=float)
        out = {"notified": int(len(notified)), "acknowledged": int(len(acked)),
               "waiting": int(len(notified) - len(acked))}
        if hours.size:
            out.update(median_h=round(float(np.median(hours)), 2),
                       p90_h=round(float(np.percentile(hours, 90)), 2),
                       max_h=round(float(hours.max()), 2))
        return out

    if alerts.empty:
        return {"all": stats(pd.DataFrame(columns=["severity", "notified_at", "acknowledged_at"])),
                "high": stats(pd.DataFrame(columns=["severity", "notified_at", "acknowledged_at"]))}
    return {"all": stats(alerts), "high": stats(alerts[alerts["severity"] == "high"])}


# ---- the data-team email -----------------------------------------------------------------------

@dataclass(frozen=True)
class Notice:
    subject: str
    text: str
    html: str


def data_team_notice(night: date, problems: list[Problem], site_name: str, dashboard_hint: str = "") -> Notice:
    """The data team's email for a night's new problems: counts, feed names, units and reasons,
    never a patient identifier. Red first."""
    ordered = sorted(problems, key=lambda p: (p.severity != "red", p.feed, p.issue))
    heads = []
    for p in ordered:
        head = f"{p.feed} {p.issue.split(':')[0].replace('_', ' ')}"
        if head not in heads:
            heads.append(head)
    subject = f"bonewatch data quality, night {night}: " + "; ".join(heads)
    lines = [f"{site_name}: data-quality problems for night {night}.", ""]
    lines += [f"- [{p.severity.upper()}] {p.text}" for p in ordered]
    lines += ["", "This is an operational message for the clinical data team; the nurses do not receive it."]
    if dashboard_hint:
        lines.append(f"Dashboard: {dashboard_hint}")
    items = "".join(
        f'<li><strong style="color:{"#b91c1c" if p.severity == "red" else "#b45309"}">'
        f"{escape(p.severity.upper())}</strong> {escape(p.text)}</li>" for p in ordered)
    html = (f"<html><body style=\"font-family:sans-serif\"><p>{escape(site_name)}: data-quality problems "
            f"for night {night}.</p><ul>{items}</ul><p style=\"color:#555\">An operational message for the "
            "clinical data team; the nurses do not receive it."
            + (f"<br>Dashboard: {escape(dashboard_hint)}" if dashboard_hint else "") + "</p></body></html>")
    return Notice(subject[:250], "\n".join(lines) + "\n", html)
