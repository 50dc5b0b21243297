"""`bonewatch explain ALERT_ID` and the rule catalogue: plain words for people (pure formatting)."""

from __future__ import annotations

from typing import Any

from bonewatch.config import Settings
from bonewatch.rules.common import DISCLAIMER

TABLE_BEGIN = "<!-- rules-table:begin (generated from default.toml by `bonewatch rules`; do not edit) -->"
TABLE_END = "<!-- rules-table:end -->"


def rules_markdown(settings: Settings) -> str:
    """The rule table of the README, generated from the configuration."""
    lines = ["| id | version | severity | fires when | action | source |", "| --- | --- | --- | --- | --- | --- |"]
    for rule_id, rule in settings.rules.items():
        cells = [f"`{rule_id}`", settings.rule_version(rule_id), rule.severity, settings.describe_rule(rule_id),
                 rule.action, rule.citation]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _plain(value: Any, indent: int = 0) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        out = []
        for key, inner in value.items():
            if inner in (None, "", [], {}):
                continue
            label = key.replace("_", " ")
            if isinstance(inner, dict | list):
                out.append(f"{pad}{label}:")
                out.extend(_plain(inner, indent + 2))
            else:
                out.append(f"{pad}{label}: {inner}")
        return out
    if isinstance(value, list):
        return [line for item in value for line in _plain(item, indent)]
    return [f"{pad}{value}"]


def explain_alert(alert: dict, settings: Settings, courses: list[dict]) -> str:
    """The alert's evidence, arithmetic, rule and citation in plain words."""
    evidence = dict(alert["evidence"])
    rule_id = alert["rule"]
    lines = [
        f"{rule_id} (version {alert['rule_version']}, {alert['severity']}) for MRN {alert['patient_id']}",
        f"  status {alert['status']}; raised on the night of {alert['raised_on']}, last seen {alert['last_seen_on']}"
        + (f", resolved {alert['resolved_on']}" if alert.get("resolved_on") else ""),
        f"  episode: {alert['episode']} (observed {alert['observed_on']})",
        "",
        "Why:",
        f"  {evidence.pop('summary', '')}",
    ]
    arithmetic = evidence.pop("arithmetic", None)
    if arithmetic:
        lines += ["", "Arithmetic:", f"  {arithmetic}"]
    crcl = evidence.get("crcl")
    if isinstance(crcl, dict) and crcl.get("formula"):
        lines += [f"  CrCl = {crcl['formula']} = {crcl.get('value_ml_min')} mL/min (Cockcroft-Gault)"]
    missing = evidence.pop("missing", None)
    if missing:
        lines += ["", "Missing:", f"  {missing}"]
    for key in ("note", "caveat"):
        if evidence.get(key):
            lines += ["", f"{key.capitalize()}:", f"  {evidence.pop(key)}"]
    if evidence:
        lines += ["", "Evidence:", *_plain(evidence, 2)]
    if courses:
        lines += ["", "Courses (as of the last evaluation):"]
        for c in courses:
            baseline = (f"renal baseline SCr {c['renal_baseline_scr']:.2f} mg/dL on {c['renal_baseline_date']}"
                        if c.get("renal_baseline_scr") is not None else (c.get("baseline_note") or "no renal baseline"))
            lines.append(f"  {c['agent_class']} course from {c['course_start']} (last dose {c['last_dose']}): "
                         f"{c['status']}{' (' + c['hold_reason'] + ')' if c.get('hold_reason') else ''}; "
                         + (baseline if c["agent_class"] == "bisphosphonate" else "no renal baseline needed"))
    lines += ["", "Rule:", f"  {settings.describe_rule(rule_id) if rule_id in settings.rules else rule_id}",
              "", "Action:", f"  {alert['action']}", "", "Source:", f"  {alert['citation']}", "", DISCLAIMER]
    return "\n".join(lines)
