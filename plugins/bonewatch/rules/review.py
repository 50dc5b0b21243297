"""Continuation reviews: REVIEW_1Y and REVIEW_2Y of the current bisphosphonate course."""

from __future__ import annotations

import numpy as np
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
    # the latest response and bone-disease status joined on, not looked up a course at a time
    responses, bone = latest_status(facts, "response"), latest_status(facts, "bone_disease")
    courses = courses.join(responses.add_prefix("response_"), on="patient_id").join(
        bone.add_prefix("bone_"), on="patient_id")
    second = as_of >= courses["due2"]
    courses = courses.assign(rule=np.where(second, "REVIEW_2Y", "REVIEW_1Y"), months=np.where(second, m2, m1),
                             due=courses["due2"].where(second, courses["due1"]))
    findings = []
    for row in courses.itertuples(index=False):
        response = None if pd.isna(row.response_day) else {"value": row.response_value, "date": iso(row.response_day)}
        disease = None if pd.isna(row.bone_day) else {"value": row.bone_value, "date": iso(row.bone_day)}
        said_response = f"{response['value']} ({response['date']})" if response is not None else "not recorded"
        said_bone = f"{disease['value']} ({disease['date']})" if disease is not None else "not recorded"
        findings.append(finding(settings, row.rule, row.patient_id, f"course {iso(row.start)}", row.due, {
            "summary": (f"The bisphosphonate course that began {iso(row.start)} reached {row.months} months on "
                        f"{iso(row.due)}. Latest response: {said_response}; bone disease: {said_bone}."),
            "course_start": iso(row.start), "due": iso(row.due), "last_dose": iso(row.last_dose),
            "response": response, "bone_disease": disease,
            "missing": ", ".join(k for k, v in (("response", response), ("bone-disease status", disease))
                                 if v is None) or None,
        }))
    return findings
