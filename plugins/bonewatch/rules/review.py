"""Continuation reviews: REVIEW_1Y and REVIEW_2Y of the current bisphosphonate course."""

from __future__ import annotations

import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding
from bonewatch.rules.common import finding, iso
from bonewatch.rules.derive import Facts


def _latest_status(facts: Facts, event_type: str) -> dict[str, tuple[str, str]]:
    rows = facts.events[facts.events["event_type"] == event_type].groupby("patient_id").tail(1)
    return {r.patient_id: (r.value, iso(r.day)) for r in rows.itertuples(index=False)}


def check_reviews(facts: Facts, settings: Settings) -> list[Finding]:
    """REVIEW_1Y from 12 months of the current course until 24; REVIEW_2Y from 24 months on.
    Months are calendar months, clamped at month end (SPEC 10)."""
    courses = facts.courses[(facts.courses["cls"] == "bisphosphonate") & ~facts.courses["discontinued"].astype(bool)]
    if courses.empty:
        return []
    as_of = pd.Timestamp(facts.as_of)
    m1, m2 = int(settings.rule("REVIEW_1Y").params["months"]), int(settings.rule("REVIEW_2Y").params["months"])
    responses, bone = _latest_status(facts, "response"), _latest_status(facts, "bone_disease")
    findings = []
    for row in courses.itertuples(index=False):
        due1 = row.start + pd.DateOffset(months=m1)
        due2 = row.start + pd.DateOffset(months=m2)
        if as_of < due1:
            continue
        rule, due = ("REVIEW_2Y", due2) if as_of >= due2 else ("REVIEW_1Y", due1)
        response = responses.get(row.patient_id)
        disease = bone.get(row.patient_id)
        said_response = f"{response[0]} ({response[1]})" if response else "not recorded"
        said_bone = f"{disease[0]} ({disease[1]})" if disease else "not recorded"
        findings.append(finding(settings, rule, row.patient_id, f"course {iso(row.start)}", due, {
            "summary": (f"The bisphosphonate course that began {iso(row.start)} reached "
                        f"{m2 if rule == 'REVIEW_2Y' else m1} months on {iso(due)}. Latest response: "
                        f"{said_response}; bone disease: {said_bone}."),
            "course_start": iso(row.start), "due": iso(due), "last_dose": iso(row.last_dose),
            "response": {"value": response[0], "date": response[1]} if response else None,
            "bone_disease": {"value": disease[0], "date": disease[1]} if disease else None,
        }))
    return findings
