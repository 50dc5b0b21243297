"""Continuation reviews: REVIEW_1Y and REVIEW_2Y of the current bisphosphonate course."""

from __future__ import annotations

import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding
from bonewatch.rules.common import finding, iso
from bonewatch.rules.derive import Facts, current_courses


def latest_status(facts: Facts, event_type: str) -> pd.DataFrame:
    """The latest value of an event type per patient (index patient_id; columns value, day)."""
    rows = facts.events[facts.events["event_type"] == event_type].groupby("patient_id").tail(1)
    return rows.set_index("patient_id")[["value", "day"]]


def check_reviews(facts: Facts, settings: Settings) -> list[Finding]:
    """REVIEW_1Y from 12 months of the current course until 24; REVIEW_2Y from 24 months on.
    Months are calendar months, clamped at month end (SPEC 10)."""
    courses = current_courses(facts, "bisphosphonate")
    if courses.empty:
        return []
    as_of = pd.Timestamp(facts.as_of)
    m1, m2 = int(settings.rule("REVIEW_1Y").params["months"]), int(settings.rule("REVIEW_2Y").params["months"])
    due1 = courses["start"] + pd.DateOffset(months=m1)
    due2 = courses["start"] + pd.DateOffset(months=m2)
    courses = courses.assign(due1=due1, due2=due2)[due1 <= as_of]
    responses, bone = latest_status(facts, "response"), latest_status(facts, "bone_disease")
    findings = []
    for row in courses.itertuples(index=False):
        rule, months, due = ("REVIEW_2Y", m2, row.due2) if as_of >= row.due2 else ("REVIEW_1Y", m1, row.due1)
        response = responses.loc[row.patient_id] if row.patient_id in responses.index else None
        disease = bone.loc[row.patient_id] if row.patient_id in bone.index else None
        said_response = f"{response['value']} ({iso(response['day'])})" if response is not None else "not recorded"
        said_bone = f"{disease['value']} ({iso(disease['day'])})" if disease is not None else "not recorded"
        findings.append(finding(settings, rule, row.patient_id, f"course {iso(row.start)}", due, {
            "summary": (f"The bisphosphonate course that began {iso(row.start)} reached {months} months on "
                        f"{iso(due)}. Latest response: {said_response}; bone disease: {said_bone}."),
            "course_start": iso(row.start), "due": iso(due), "last_dose": iso(row.last_dose),
            "response": None if response is None else {"value": response["value"], "date": iso(response["day"])},
            "bone_disease": None if disease is None else {"value": disease["value"], "date": iso(disease["day"])},
            "missing": ", ".join(k for k, v in (("response", response), ("bone-disease status", disease))
                                 if v is None) or None,
        }))
    return findings
