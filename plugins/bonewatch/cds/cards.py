"""CDS Hooks cards from alerts and findings (pure: no clock, no database).

A card says what the nurse's email says, in the EHR: the summary (the rule and its action, at
most 139 characters: the specification asks for fewer than 140), the detail in GitHub-flavoured
Markdown (why, the arithmetic, the rule with its version, the action, the source), the indicator
from the severity (high: critical, medium: warning, info: info), the source (the rule's citation,
its URL from `[cds_hooks.source_urls]`, and the rule as its topic), and a link to the alert's
acknowledgement page. A silenced alert (`silence`: until, reason, by) becomes an `info` card that
says so first.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from bonewatch.config import Settings
from bonewatch.notify.render import DISCLAIMER, _compact, _evidence_dict, _fmt

SUMMARY_MAX = 139
INDICATOR = {"high": "critical", "medium": "warning", "info": "info"}
RULE_SYSTEM = "urn:bonewatch:rule"
#: a stable namespace for card uuids: the same alert occurrence always has the same card uuid
_NAMESPACE = uuid.UUID("6f1d3c2a-4b8e-5f70-9a61-2d0c8e7b4a13")
TITLES = {
    "RENAL_HOLD": "Renal hold", "RENAL_RESUME": "Renal function recovered", "DOSE_BAND": "Zoledronic acid dose band",
    "PRE_DOSE_SCR_MISSING": "No creatinine before the dose", "DENTAL_EXAM_MISSING": "No dental examination",
    "ALBUMINURIA": "Albuminuria hold", "URINE_ALBUMIN_DUE": "Urine albumin due", "HYPOCALCEMIA": "Hypocalcaemia",
    "REVIEW_1Y": "1-year bisphosphonate review", "REVIEW_2Y": "2-year bisphosphonate review",
    "MGUS_ON_BISPHOSPHONATE": "Bisphosphonate in MGUS", "ALP_ELEVATED_START": "Raised ALP at therapy start",
    "ALP_RISE_BORTEZOMIB": "ALP rise on bortezomib", "ALP_MONITOR_DUE": "ALP due",
    "ALP_NONBONE_CAUSE": "ALP may be hepatic",
}
# Markdown that would change what the text says (emphasis, links, raw HTML, a table cell)
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|#])")


def uuid_of(key: str) -> str:
    """A stable uuid for a card or suggestion key."""
    return str(uuid.uuid5(_NAMESPACE, key))


def shorten(text: str, limit: int = SUMMARY_MAX) -> str:
    """One line of at most `limit` characters, cut at a word with an ellipsis when too long."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:.")
    return cut + "\N{HORIZONTAL ELLIPSIS}"


def md(text: Any) -> str:
    """Plain text as Markdown that shows it as it is."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))


def card(*, key: str, rule: str, rule_version: str, severity: str, action: str, citation: str, evidence: Any,
         settings: Settings, status: str = "", raised_on: Any = None, ack_url: str = "",
         silence: Mapping[str, Any] | None = None, summary: str = "", indicator: str = "",
         suggestions: list[dict] | None = None) -> dict:
    """One card. `key` makes its uuid (an alert id and its night, or a hook instance and rule);
    `summary` / `indicator` replace the defaults (rule title and action; from the severity)."""
    evidence = _evidence_dict(evidence)
    title = TITLES.get(rule, rule)
    summary = summary or f"{title}: {action}"
    indicator = indicator or INDICATOR.get(severity, "info")
    lines: list[str] = []
    if silence:
        said = (f"Silenced until {_fmt(silence.get('until'))} by {silence.get('by') or '-'}: "
                f"{silence.get('reason') or 'no reason given'}")
        lines += [f"**{md(said)}.**", ""]
        summary, indicator = f"{title} (silenced until {_fmt(silence.get('until'))} by {silence.get('by') or '-'}: "\
                             f"{silence.get('reason') or 'no reason given'})", "info"
    why = evidence.pop("summary", None)
    if why:
        lines += [f"**Why:** {md(_fmt(why))}", ""]
    arithmetic = evidence.pop("arithmetic", None)
    crcl = evidence.get("crcl")
    sums = [str(arithmetic)] if arithmetic else []
    if isinstance(crcl, dict) and crcl.get("formula"):
        sums.append(f"CrCl = {crcl['formula']} = {_fmt(crcl.get('value_ml_min'))} mL/min (Cockcroft-Gault)")
    if sums:
        lines += ["**Arithmetic:**", "", *[f"    {s}" for s in sums], ""]
    notes = [(k, evidence.pop(k)) for k in ("missing", "conflict", "time_basis", "caveat", "note")
             if evidence.get(k) not in (None, "", [], {})]
    for name, value in notes:
        lines += [f"**{name.replace('_', ' ').capitalize()}:** {md(_compact(value))}", ""]
    shown = [(k, v) for k, v in evidence.items() if v not in (None, "", [], {})]
    if shown:
        lines += ["**Evidence:**", "", *[f"- {md(k.replace('_', ' '))}: {md(_compact(v))}" for k, v in shown], ""]
    rule_text = settings.describe_rule(rule) if rule in settings.rules else rule
    lines += [f"**Action:** {md(action)}", "",
              f"**Rule:** {md(rule)} version {md(rule_version)}: {md(rule_text)}", ""]
    if status or raised_on:
        lines += [f"**Alert:** {md(status or '-')}, raised on the night of {md(_fmt(raised_on))}", ""]
    lines += [f"**Source:** {md(citation)}", "", f"_{md(DISCLAIMER)}_"]
    source: dict[str, Any] = {"label": shorten(citation or "bonewatch", 200),
                              "topic": {"system": RULE_SYSTEM, "code": rule,
                                        "display": f"{rule} version {rule_version}"}}
    url = settings.cds_hooks.source_urls.get(rule)
    if url:
        source["url"] = url
    out: dict[str, Any] = {
        "uuid": uuid_of(key),
        "summary": shorten(summary),
        "indicator": indicator,
        "detail": "\n".join(lines),
        "source": source,
    }
    if suggestions:
        out["suggestions"] = suggestions
        out["selectionBehavior"] = "at-most-one"
    if ack_url:
        out["links"] = [{"label": "Acknowledge in bonewatch", "url": ack_url, "type": "absolute"}]
    return out


def alert_card(alert: Mapping[str, Any], settings: Settings, *, ack_url: str = "",
               silence: Mapping[str, Any] | None = None) -> dict:
    """The card of a stored alert (a row of the `alerts` table)."""
    return card(key=f"{alert['alert_id']}\x1f{_fmt(alert['raised_on'])}", rule=alert["rule"],
                rule_version=alert["rule_version"], severity=alert["severity"], action=alert["action"],
                citation=alert["citation"], evidence=alert["evidence"], settings=settings,
                status=alert["status"], raised_on=alert["raised_on"], ack_url=ack_url, silence=silence)
