"""Monitoring rules around doses and courses: PRE_DOSE_SCR_MISSING, DENTAL_EXAM_MISSING,
URINE_ALBUMIN_DUE and MGUS_ON_BISPHOSPHONATE (SPEC 5 and 10)."""

from __future__ import annotations

import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding
from bonewatch.rules.common import conflict_evidence, finding, iso, num
from bonewatch.rules.derive import Facts, add_months, current_courses, urine_albumin

AGENT_NAMES = {"zoledronic_acid": "zoledronic acid", "pamidronate": "pamidronate", "denosumab": "denosumab"}


def check_pre_dose_scr(facts: Facts, settings: Settings) -> list[Finding]:
    """The latest bisphosphonate dose of a current course had no SCr from dose day - 7 to dose day;
    the evidence names the last creatinine before the dose (value and date), or says there is none."""
    days = int(settings.rule("PRE_DOSE_SCR_MISSING").params["days"])
    courses = current_courses(facts, "bisphosphonate")
    doses = facts.doses.merge(courses[["patient_id", "cls", "course_no"]], on=["patient_id", "cls", "course_no"])
    latest = doses.groupby("patient_id", sort=False).tail(1)
    if latest.empty:
        return []
    scr = facts.scr[["patient_id", "collected_day", "collected_at", "value", "censor"]]
    pairs = latest[["patient_id", "day"]].merge(scr[["patient_id", "collected_day"]], on="patient_id", how="left")
    covered = pairs[(pairs["collected_day"] <= pairs["day"])
                    & (pairs["collected_day"] >= pairs["day"] - pd.Timedelta(days=days))]
    missing = latest[~latest.set_index(["patient_id", "day"]).index.isin(
        covered.set_index(["patient_id", "day"]).index)].reset_index(drop=True)
    if missing.empty:
        return []
    # the last creatinine on or before the dose day, by collection time: not the latest overall
    # (one after the dose), which made the evidence say no earlier creatinine was on file
    before = scr.sort_values(["collected_day", "collected_at"], kind="stable").drop_duplicates(
        ["patient_id", "collected_day"], keep="last")
    missing = pd.merge_asof(missing.assign(_i=range(len(missing))).sort_values("day"),
                            before.rename(columns={"collected_day": "scr_day", "collected_at": "scr_at",
                                                   "value": "scr_value", "censor": "scr_censor"}),
                            left_on="day", right_on="scr_day", by="patient_id").sort_values("_i")
    findings = []
    for row in missing.itertuples(index=False):
        window_from = iso(row.day - pd.Timedelta(days=days))
        last = (None if pd.isna(row.scr_day) else
                {"value_mg_dl": num(row.scr_value), "date": iso(row.scr_day), **(
                    {"censor": row.scr_censor} if row.scr_censor else {})})
        said = (f"the last before it was {row.scr_censor}{row.scr_value:.2f} mg/dL on {iso(row.scr_day)}."
                if last is not None else "no creatinine before the dose is on file.")
        findings.append(finding(settings, "PRE_DOSE_SCR_MISSING", row.patient_id, f"dose {iso(row.day)}", row.day, {
            "summary": (f"{AGENT_NAMES.get(row.agent, row.agent).capitalize()} was given on {iso(row.day)}: no "
                        f"serum creatinine in the {days} days before the dose ({window_from} to {iso(row.day)}); "
                        + said),
            "dose": {"date": iso(row.day), "agent": row.agent, "dose_mg": None if pd.isna(row.dose_mg) else float(row.dose_mg)},
            "window": {"from": window_from, "to": iso(row.day)},
            "last_scr_before": last,
            **conflict_evidence(facts.conflict(row.patient_id, "creatinine", row.scr_at)),
        }))
    return findings


def _any_in_window(left: pd.DataFrame, right: pd.DataFrame, lo: str, hi: str) -> pd.Series:
    """For each row of `left` (index kept), whether `right` has a day for that patient in [lo, hi]."""
    pairs = left[["patient_id", lo, hi]].reset_index().merge(right[["patient_id", "day"]], on="patient_id")
    hit = pairs[(pairs["day"] >= pairs[lo]) & (pairs["day"] <= pairs[hi])]
    return pd.Series(left.index.isin(hit["index"]), index=left.index)


def check_dental_exam(facts: Facts, settings: Settings) -> list[Finding]:
    """A current course of any bone-modifying agent began with no dental exam in the prior 6 months."""
    months = int(settings.rule("DENTAL_EXAM_MISSING").params["months"])
    courses = current_courses(facts)
    if courses.empty:
        return []
    exams = facts.events[facts.events["event_type"] == "dental_exam"][["patient_id", "day"]]
    first = facts.doses.sort_values("at").groupby(["patient_id", "cls", "course_no"]).head(1)
    courses = courses.merge(first[["patient_id", "cls", "course_no", "agent"]],
                            on=["patient_id", "cls", "course_no"]).reset_index(drop=True)
    courses["since"] = courses["start"] + pd.DateOffset(months=-months)
    missing = courses[~_any_in_window(courses, exams, "since", "start")]
    last_exam = exams.groupby("patient_id")["day"].max()
    findings = []
    for row in missing.itertuples(index=False):
        last = last_exam.get(row.patient_id)
        last = iso(last) if last is not None and last < row.since else None
        findings.append(finding(settings, "DENTAL_EXAM_MISSING", row.patient_id, f"{row.cls} course {iso(row.start)}",
                                row.start, {
            "summary": (f"First {AGENT_NAMES.get(row.agent, row.agent)} dose of this course on {iso(row.start)} with no "
                        f"dental examination since {iso(row.since)}"
                        + (f" (the last one was on {last})." if last else " (none on file).")),
            "course_start": iso(row.start), "agent": row.agent, "window": {"from": iso(row.since), "to": iso(row.start)},
            "last_dental_exam": last,
        }))
    return findings


def check_urine_albumin_due(facts: Facts, settings: Settings) -> list[Finding]:
    """On zoledronic acid or pamidronate for at least `months`, with no urine albumin result in the
    last `months` (the window includes both ends)."""
    months = int(settings.rule("URINE_ALBUMIN_DUE").params["months"])
    as_of = pd.Timestamp(facts.as_of)
    window_start = add_months(as_of, -months)
    courses = current_courses(facts, "bisphosphonate").reset_index(drop=True)
    courses = courses[courses["start"] + pd.DateOffset(months=months) <= as_of]
    if courses.empty:
        return []
    results = urine_albumin(facts, only_24h=False)
    results = results[results["day"] <= as_of]
    recent = set(results.loc[results["day"] >= window_start, "patient_id"])
    last_result = results.groupby("patient_id")["day"].max()
    findings = []
    for row in courses[~courses["patient_id"].isin(recent)].itertuples(index=False):
        last = last_result.get(row.patient_id)
        due = add_months(row.start, months)
        if last is not None:
            due = max(due, add_months(last, months) + pd.Timedelta(days=1))
        findings.append(finding(settings, "URINE_ALBUMIN_DUE", row.patient_id, f"course {iso(row.start)}; due {iso(due)}",
                                due, {
            # worded from the data, not from the night: under incremental evaluation the same
            # finding is carried over nights without being recomputed
            "summary": (f"On a bisphosphonate since {iso(row.start)}; " + (
                f"the last urine albumin result was on {iso(last)}, none in the {months} months since."
                if last is not None else f"no urine albumin result on file ({months}-monthly check).")),
            "course_start": iso(row.start), "last_result": iso(last), "window_months": months,
        }))
    return findings


def check_mgus(facts: Facts, settings: Settings) -> list[Finding]:
    """MGUS or smouldering myeloma, no MM and no osteoporosis on record, and a bisphosphonate dose."""
    dx = facts.events[facts.events["event_type"] == "diagnosis"]
    bis = facts.doses[facts.doses["cls"] == "bisphosphonate"]
    if dx.empty or bis.empty:
        return []
    values = dx.groupby("patient_id")["value"].agg(set)
    eligible = values[values.map(lambda v: bool(v & {"MGUS", "SMM"}) and not v & {"MM", "osteoporosis"})]
    latest = bis[bis["patient_id"].isin(eligible.index)].groupby("patient_id").tail(1)
    diagnosed = dx[dx["value"].isin(["MGUS", "SMM"])].groupby("patient_id")["day"].min()
    findings = []
    for row in latest.itertuples(index=False):
        kinds = eligible[row.patient_id]
        kind = "MGUS" if "MGUS" in kinds else "smouldering myeloma"
        when = diagnosed[row.patient_id]
        findings.append(finding(settings, "MGUS_ON_BISPHOSPHONATE", row.patient_id, f"course {iso(row.course_start)}",
                                max(row.course_start, when), {
            "summary": (f"Diagnosis {kind} ({iso(when)}) with no multiple myeloma or osteoporosis on record, "
                        f"and {AGENT_NAMES.get(row.agent, row.agent)} given on {iso(row.day)}."),
            "diagnoses": sorted(kinds), "latest_dose": {"date": iso(row.day), "agent": row.agent},
        }))
    return findings
