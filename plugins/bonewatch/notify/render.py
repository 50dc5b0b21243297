"""Render one recipient's nightly digest: alert rows in, subject + plain text + HTML out.

Pure: no clock, no database, no network. The same rows and settings always give the same bytes,
which is what the golden-file test relies on. The shape of the email is decided here (grouping,
order, wording); the Jinja2 templates in `bonewatch/templates/` only lay it out.

Written for a nurse reading on a ward computer: urgent first, one block per patient, the action
in plain words before the evidence, and the acknowledgement command (and link) under every alert.
Trend charts come in as `Trend` values and go out as inline PNG parts (`Digest.images`), drawn by
the pure `charts.draw_trend`; the shell loads the lab history and signs the links.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from bonewatch.config import Settings
from bonewatch.notify.charts import Trend, draw_trend, trend_lines, trend_text

DISCLAIMER = "This alert supports, and does not replace, clinical judgement."

# Plain words for the severities (the raw value is shown beside them).
_LABELS = {"high": "URGENT", "medium": "REVIEW", "info": "FYI"}
_COUNT_WORDS = {"high": "urgent", "medium": "to review", "info": "for information"}
_RANK = {"high": 0, "medium": 1, "info": 2}
# Evidence lists can be long (every SCr of a course); the email shows the first few, the alert
# record (`bonewatch alerts --format json`) keeps them all.
_MAX_LIST_ITEMS = 6
_WIDTH = 76


@dataclass(frozen=True)
class Digest:
    """A rendered digest: what goes into the Subject header and the two MIME parts."""

    subject: str
    text: str
    html: str
    # (Content-ID without angle brackets, PNG bytes): the charts the HTML part shows inline
    images: tuple[tuple[str, bytes], ...] = ()


def render_digest(recipient: str, night: date, alerts: Iterable[Mapping[str, Any]],
                  settings: Settings, *, links: Mapping[str, str] | None = None,
                  trends: Mapping[str, list[Trend]] | None = None,
                  reminders: Iterable[str] = ()) -> Digest:
    """Render the digest for `recipient` for `night` from alert rows (mappings with the columns
    of the `alerts` table; `evidence` as JSON text or a dict).

    Patients with an urgent alert come first, then review, then information; inside a patient,
    alerts by severity then rule. `links` maps alert ids to their signed acknowledgement links,
    `trends` patient ids to the charts to embed, `reminders` names the alerts re-sent because
    nobody acknowledged them. With `settings.site.phi_minimal` only the MRN, the rule id, the
    severity and a link to the alert go in: no values, dates, evidence or chart.
    """
    rows = [dict(row) for row in alerts]
    phi_minimal = settings.site.phi_minimal
    reminded = set(reminders)
    patients = _group(rows, settings, phi_minimal, links or {}, reminded)
    images: list[tuple[str, bytes]] = []
    if trends and not phi_minimal and settings.notify.charts:
        for patient in patients:
            for trend in trends.get(patient["mrn"], []):
                cid = f"chart{len(images) + 1}.{night.isoformat()}@bonewatch"
                images.append((cid, draw_trend(trend)))
                patient["charts"].append({"cid": cid, "alt": trend.title, "text": trend_text(trend),
                                          "lines": trend_lines(trend)})
    n_urgent = sum(1 for row in rows if row["severity"] == "high")
    n_reminders = sum(1 for row in rows if row["alert_id"] in reminded)
    headline = _headline(len(rows), len(patients), n_urgent, n_reminders)
    context = {
        "headline": headline,
        "night": night.isoformat(),
        "disclaimer": DISCLAIMER,
        "patients": patients,
        "phi_minimal": phi_minimal,
        "site": settings.site.name,
        "recipient": recipient,
    }
    env = _environment()
    return Digest(
        subject=f"bonewatch: {headline} \N{EM DASH} night of {night.isoformat()}",
        text=env.get_template("digest.txt.j2").render(context),
        html=env.get_template("digest.html.j2").render(context),
        images=tuple(images),
    )


# ---- shaping (pure) ------------------------------------------------------------------------

def _headline(n_alerts: int, n_patients: int, n_urgent: int, n_reminders: int = 0) -> str:
    text = f"{_plural(n_alerts, 'alert')} for {_plural(n_patients, 'patient')}"
    text = f"{text}, {n_urgent} urgent" if n_urgent else text
    return f"{text} ({_plural(n_reminders, 'reminder')})" if n_reminders else text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _rank(severity: str) -> int:
    return _RANK.get(severity, len(_RANK))


def _group(rows: list[dict], settings: Settings, phi_minimal: bool, links: Mapping[str, str],
           reminded: set[str]) -> list[dict]:
    by_patient: dict[str, list[dict]] = {}
    for row in rows:
        by_patient.setdefault(str(row["patient_id"]), []).append(row)

    def patient_key(item: tuple[str, list[dict]]) -> tuple:
        mrn, items = item
        ranks = sorted(_rank(r["severity"]) for r in items)
        # most severe first, then more alerts at that level, then MRN for a stable order
        return (ranks[0], -ranks.count(ranks[0]), mrn)

    groups = []
    for mrn, items in sorted(by_patient.items(), key=patient_key):
        items.sort(key=lambda r: (_rank(r["severity"]), r["rule"], str(r.get("observed_on")),
                                  r["alert_id"]))
        counts = [f"{sum(1 for r in items if r['severity'] == sev)} {word}"
                  for sev, word in _COUNT_WORDS.items() if any(r["severity"] == sev for r in items)]
        groups.append({
            "mrn": mrn,
            "counts": ", ".join(counts),
            "alerts": [_alert_view(r, settings, phi_minimal, links.get(r["alert_id"]), r["alert_id"] in reminded)
                       for r in items],
            "charts": [],
        })
    return groups


# conflict: two values at one instant, and the one used; time basis: a result without a collection
# time of its own, and whose time stands in for it (FHIR)
NURSE_NOTES = ("missing", "conflict", "time_basis", "caveat", "note")


def _alert_view(row: dict, settings: Settings, phi_minimal: bool, link: str | None, reminder: bool) -> dict:
    severity = str(row["severity"])
    view = {
        "alert_id": row["alert_id"],
        "rule": row["rule"],
        "severity": severity,
        "label": _LABELS.get(severity, severity.upper()),
        # without a signing key the link is unsigned: the web app shows how to acknowledge instead
        "link": link or f"{settings.site.ack_base_url.rstrip('/')}/alerts/{row['alert_id']}",
        "ack_link": link or "",
        "ack": f"bonewatch ack {row['alert_id']} --by <your name>",
        "reminder": reminder,
        "last_sent": "",
    }
    if phi_minimal:
        return view
    evidence = _evidence_dict(row.get("evidence"))
    summary = evidence.pop("summary", None)
    view.update({
        "rule_version": row.get("rule_version", ""),
        "observed_on": _fmt(row.get("observed_on")),
        "raised_on": _fmt(row.get("raised_on")),
        "last_sent": _fmt(row.get("last_notified_night")) if reminder else "",
        "action": row.get("action", ""),
        "citation": row.get("citation", ""),
        "summary": _fmt(summary) if summary not in (None, "") else "",
        # Ten seconds a digest: the summary says why; only notes a nurse must not miss follow it.
        # The structured evidence stays in `bonewatch alerts --format json`.
        "details": [(key.replace("_", " "), _compact(evidence[key]))
                    for key in NURSE_NOTES if evidence.get(key) not in (None, "", [], {})],
    })
    return view


def _evidence_dict(raw: Any) -> dict:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {"note": raw}
    return dict(raw) if isinstance(raw, dict) else {"note": raw}


def _fmt(value: Any) -> str:
    """One scalar as a nurse reads it: 0.9 not 0.90000001, 130 not 130.0, yes/no for booleans."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.4f}".rstrip("0").rstrip(".")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _compact(value: Any) -> str:
    """Nested evidence on one line: {'value': 0.9, 'unit': 'mg/dL', 'date': ...} reads
    '0.9 mg/dL, date 2025-04-01'; lists are joined with '; '."""
    if isinstance(value, Mapping):
        parts = []
        for key, item in value.items():
            if key == "unit" and "value" in value:
                continue
            if key == "value":
                unit = value.get("unit")
                parts.append(f"{_fmt(item)} {unit}" if unit else _fmt(item))
            elif item not in (None, "", [], {}):
                parts.append(f"{str(key).replace('_', ' ')} {_compact(item)}")
        return ", ".join(parts)
    if isinstance(value, (list, tuple)):
        shown = [_compact(item) for item in value[:_MAX_LIST_ITEMS]]
        more = len(value) - len(shown)
        return "; ".join(shown) + (f" (+{more} more)" if more > 0 else "")
    return _fmt(value)


# ---- templates -----------------------------------------------------------------------------

def _wrap(text: str, indent: int = 0) -> str:
    """Wrap a paragraph for the plain-text part. The template has already printed `indent`
    characters before it (a label column), so continuation lines are indented to match."""
    pad = " " * indent
    filled = textwrap.fill(str(text), width=_WIDTH, initial_indent=pad, subsequent_indent=pad,
                           break_long_words=False, break_on_hyphens=False)
    return filled[indent:]


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("bonewatch", "templates"),
        # HTML escapes everything that comes from the data; the text part must not.
        autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["wrap"] = _wrap
    return env
