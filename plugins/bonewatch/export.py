"""Export alerts as FHIR R4 `DetectedIssue` resources (SPEC 6: every alert is exportable).

Pure: alert rows in (the dicts `store.alerts.list_alerts` returns), resources out. Each resource
is validated by the R4 models of `fhir.resources` (the `R4B` subpackage reads and writes R4) before
it is written, so a malformed export fails here rather than in the receiving system.

Mapping:
- `id` and `identifier` (system `urn:bonewatch:alert`): the alert id, stable per
  (patient, rule, episode);
- `code`: the rule id (system `urn:bonewatch:rule`); `severity`: high / moderate / low;
- `patient`: a logical reference by MRN (identifier type MR, HL7 table 0203);
- `identifiedDateTime` (the night first found), or `identifiedPeriod` (found .. resolved);
- `detail`: the evidence summary; `mitigation`: the acknowledgement, when there is one;
- extensions (`urn:bonewatch:fhir:*`): rule version, recommended action, citation, episode,
  lifecycle status, observed-on date, and the full evidence as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import date, datetime
from typing import Any

SEVERITY = {"high": "high", "medium": "moderate", "info": "low"}
RULE_SYSTEM = "urn:bonewatch:rule"
ALERT_SYSTEM = "urn:bonewatch:alert"
EXT = "urn:bonewatch:fhir:"
MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR",
                  "display": "Medical record number"}]}


def _day(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)[:10]


def _instant(value: Any) -> str | None:
    """A store timestamp (naive UTC) as a FHIR dateTime with its zone."""
    if value in (None, ""):
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(microsecond=0).isoformat() + ("Z" if moment.tzinfo is None else "")


def detected_issue_dict(alert: Mapping[str, Any]) -> dict:
    """The DetectedIssue of one alert as a plain dict (not yet validated)."""
    evidence = alert.get("evidence") or {}
    if isinstance(evidence, str):
        evidence = json.loads(evidence)
    summary = evidence.get("summary") if isinstance(evidence, dict) else None
    extensions = [
        {"url": EXT + "rule-version", "valueString": str(alert["rule_version"])},
        {"url": EXT + "recommended-action", "valueString": str(alert["action"])},
        {"url": EXT + "citation", "valueString": str(alert.get("citation") or "")},
        {"url": EXT + "episode", "valueString": str(alert.get("episode") or "")},
        {"url": EXT + "alert-status", "valueCode": str(alert["status"])},
        {"url": EXT + "evidence", "valueString": json.dumps(evidence, sort_keys=True, default=str)},
    ]
    if _day(alert.get("observed_on")):
        extensions.append({"url": EXT + "observed-on", "valueDate": _day(alert.get("observed_on"))})
    extensions = [e for e in extensions if e.get("valueString", e.get("valueCode", e.get("valueDate"))) != ""]
    resource: dict[str, Any] = {
        "resourceType": "DetectedIssue",
        "id": str(alert["alert_id"]),
        "extension": extensions,
        "identifier": [{"system": ALERT_SYSTEM, "value": str(alert["alert_id"])}],
        "status": "final",
        "code": {"coding": [{"system": RULE_SYSTEM, "code": str(alert["rule"])}], "text": str(alert["rule"])},
        "severity": SEVERITY.get(str(alert["severity"]), "low"),
        "patient": {"identifier": {"type": MR, "value": str(alert["patient_id"])}},
        "author": {"display": "bonewatch rule engine"},
        "detail": str(summary or alert["action"]),
    }
    raised, resolved = _day(alert.get("raised_on")), _day(alert.get("resolved_on"))
    if resolved:
        resource["identifiedPeriod"] = {"start": raised, "end": resolved}
    else:
        resource["identifiedDateTime"] = raised
    if alert.get("acknowledged_at"):
        resource["mitigation"] = [{
            "action": {"coding": [{"system": "urn:bonewatch:mitigation", "code": "acknowledged"}],
                       "text": "Alert acknowledged"},
            "date": _instant(alert["acknowledged_at"]),
            "author": {"display": str(alert.get("acknowledged_by") or "unknown")},
        }]
    return resource


def detected_issue(alert: Mapping[str, Any]) -> dict:
    """The DetectedIssue of one alert, validated by the FHIR R4 model; a JSON-ready dict."""
    from fhir.resources.R4B.detectedissue import DetectedIssue

    model = DetectedIssue.model_validate(detected_issue_dict(alert))
    return json.loads(model.model_dump_json(exclude_none=True))


def detected_issue_lines(alerts: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """NDJSON (FHIR bulk-data style): one validated DetectedIssue a line."""
    for alert in alerts:
        yield json.dumps(detected_issue(alert), sort_keys=True)
