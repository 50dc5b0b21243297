"""The functional core: pure rule functions over DataFrames, `as_of` passed in, no I/O, no clock.

`evaluate(labs, events, as_of, settings)` returns every finding as of that night;
`evaluate_with_state` also returns the state of every course (active / held / discontinued, with
its renal baseline), which the shell persists.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import date

import numpy as np
import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding
from bonewatch.rules.alp import (
    HEPATIC_NOTE,
    check_alp_elevated_start,
    check_alp_monitor_due,
    check_alp_nonbone,
    check_alp_rise_bortezomib,
)
from bonewatch.rules.calcium import check_hypocalcemia
from bonewatch.rules.common import iso
from bonewatch.rules.derive import Facts, prepare
from bonewatch.rules.monitoring import check_dental_exam, check_mgus, check_pre_dose_scr, check_urine_albumin_due
from bonewatch.rules.renal import check_albuminuria, check_dose_band, check_renal
from bonewatch.rules.review import check_reviews

__all__ = ["evaluate", "evaluate_with_state"]

ALP_RULES = {"ALP_RISE_BORTEZOMIB", "ALP_ELEVATED_START", "ALP_MONITOR_DUE"}


def evaluate(labs: pd.DataFrame, events: pd.DataFrame, as_of: date, settings: Settings) -> list[Finding]:
    """All findings as of `as_of`, sorted by (patient, rule, episode): deterministic, and the
    order of the input rows never matters."""
    return evaluate_with_state(labs, events, as_of, settings)[0]


def evaluate_with_state(labs: pd.DataFrame, events: pd.DataFrame, as_of: date,
                        settings: Settings) -> tuple[list[Finding], pd.DataFrame]:
    facts = prepare(labs, events, as_of, settings)
    renal, renal_held, baselines = check_renal(facts, settings)
    albuminuria, albumin_held = check_albuminuria(facts, settings)
    held = _combine_holds(renal_held, albumin_held)
    nonbone = check_alp_nonbone(facts, settings)
    findings = [
        *renal, *albuminuria, *check_dose_band(facts, held, settings),
        *check_pre_dose_scr(facts, settings), *check_dental_exam(facts, settings),
        *check_urine_albumin_due(facts, settings), *check_mgus(facts, settings),
        *check_hypocalcemia(facts, settings),
        *check_alp_rise_bortezomib(facts, settings), *check_alp_elevated_start(facts, settings),
        *check_alp_monitor_due(facts, settings), *nonbone,
        *check_reviews(facts, settings),
    ]
    # An ALP alert raised together with ALP_NONBONE_CAUSE says that the ALP may be hepatic.
    hepatic = {f.patient_id for f in nonbone}
    findings = [dataclasses.replace(f, evidence={**f.evidence, "note": HEPATIC_NOTE})
                if f.rule in ALP_RULES and f.patient_id in hepatic else f for f in findings]
    findings = _note_time_basis(findings, facts.labs)
    return sorted(findings, key=lambda f: (f.patient_id, f.rule, f.episode)), course_states(
        facts, baselines, renal_held, albumin_held, settings)


#: where a result's collection time came from when it had none of its own (FHIR, SPEC 2.3)
TIME_BASIS = {"DiagnosticReport.effective": "the effective time of the DiagnosticReport that lists it",
              "issued": "the time the result was issued"}


def _note_time_basis(findings: list[Finding], labs: pd.DataFrame) -> list[Finding]:
    """A finding whose evidence cites a day on which one of its patient's results had no collection
    time of its own says so, and which time stands in for it (the evidence `time_basis`)."""
    if "collected_basis" not in labs.columns or not findings:
        return findings
    borrowed = labs[labs["collected_basis"].astype(str) != ""]
    if borrowed.empty:
        return findings
    by_patient: dict[str, list[tuple[str, str, str]]] = {}
    for row in (borrowed[["patient_id", "analyte", "collected_day", "collected_basis"]]
                .drop_duplicates().itertuples(index=False)):
        by_patient.setdefault(row.patient_id, []).append((row.analyte, iso(row.collected_day), row.collected_basis))
    out = []
    for f in findings:
        cited = json.dumps(f.evidence, default=str) if f.patient_id in by_patient else ""
        notes = [f"the {analyte} of {day} had no collection time of its own: "
                 f"{TIME_BASIS.get(basis, basis)} is used" for analyte, day, basis in by_patient.get(f.patient_id, [])
                 if day and day in cited]
        out.append(dataclasses.replace(f, evidence={**f.evidence, "time_basis": sorted(set(notes))}) if notes else f)
    return out


def _combine_holds(*frames: pd.DataFrame) -> pd.DataFrame:
    parts = [f[["patient_id", "course_no", "held"]] for f in frames if not f.empty]
    if not parts:
        return pd.DataFrame(columns=["patient_id", "course_no", "held"])
    both = pd.concat(parts)
    both["held"] = both["held"].astype(bool)
    return both.groupby(["patient_id", "course_no"], as_index=False)["held"].any()


def course_states(facts: Facts, baselines: pd.DataFrame, renal_held: pd.DataFrame, albumin_held: pd.DataFrame,
                  settings: Settings) -> pd.DataFrame:
    """One row per course as of the night: status (active / held / discontinued), why held, and the
    renal baseline with the rule that chose it (or why there is none)."""
    columns = ["patient_id", "agent_class", "course_start", "last_dose", "course_end", "status", "hold_reason",
               "renal_baseline_scr", "renal_baseline_date", "renal_baseline_crcl", "baseline_note"]
    courses = facts.courses
    if courses.empty:
        return pd.DataFrame(columns=columns)
    key = ["patient_id", "course_no"]
    out = courses.merge(baselines[[*key, "cls", "base_value", "base_day", "base_crcl"]], on=[*key, "cls"], how="left") \
        if not baselines.empty else courses.assign(base_value=np.nan, base_day=pd.NaT, base_crcl=np.nan)
    bis = out["cls"] == "bisphosphonate"
    renal = renal_held.rename(columns={"held": "renal_held"})
    albumin = albumin_held.rename(columns={"held": "albumin_held"})
    out = out.merge(renal, on=key, how="left").merge(albumin, on=key, how="left")
    out.loc[~bis, ["renal_held", "albumin_held"]] = False
    renal_on = out["renal_held"].fillna(False).astype(bool)
    albumin_on = out["albumin_held"].fillna(False).astype(bool)
    discontinued = out["discontinued"].astype(bool)
    status = np.where(discontinued, "discontinued", np.where(renal_on | albumin_on, "held", "active"))
    reason = np.where(discontinued | ~(renal_on | albumin_on), "",
                      np.where(renal_on & albumin_on, "renal deterioration; albuminuria",
                               np.where(renal_on, "renal deterioration", "albuminuria")))
    window = settings.clinical.renal_baseline_window_days
    note = np.where(~bis, "", np.where(out["base_value"].isna(),
                    f"no renal baseline: no creatinine in the {window} days up to the first dose, so the renal "
                    "rules do not apply to this course", ""))
    return pd.DataFrame({
        "patient_id": out["patient_id"], "agent_class": out["cls"], "course_start": out["start"].dt.date,
        "last_dose": out["last_dose"].dt.date, "course_end": out["end"].dt.date, "status": status,
        "hold_reason": reason, "renal_baseline_scr": out["base_value"],
        "renal_baseline_date": [None if pd.isna(d) else iso(d) for d in out["base_day"]],
        "renal_baseline_crcl": out["base_crcl"], "baseline_note": note,
    })[columns]
