"""Derived quantities of SPEC section 4, computed from history as of a night (pure, vectorised).

Inputs are the store's rows as DataFrames; nothing here reads a clock or a file. Every frame is
restricted to what was collected (or happened) on or before `as_of`, so evaluating a past night
on today's store gives that night's answer; birth date and sex are the exception: timeless facts
(SPEC 2.5), they hold for every night whenever they were delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd

from bonewatch.config import Settings

BISPHOSPHONATES = {"zoledronic_acid", "pamidronate"}
USABLE = {"final", "corrected"}     # preliminary is shown but drives nothing; cancelled has no effect
#: Event types that hold for every night, a past one included, whenever they were delivered (SPEC 2.5):
#: a Patient loaded today is stamped with today, and cut off by the night a backfill had no age or sex.
TIMELESS = ("birth_date", "sex")


def agent_class(agent: pd.Series) -> pd.Series:
    return np.where(agent.isin(list(BISPHOSPHONATES)), "bisphosphonate", "denosumab")


def round_half_up(values: pd.Series | np.ndarray, digits: int) -> np.ndarray:
    """Round at reporting precision (SPEC 10): 1.4 - 0.9 counts as 0.5, never 0.49999."""
    scale = 10 ** digits
    return np.floor(np.asarray(values, dtype="float64") * scale + 0.5 + 1e-9) / scale


@dataclass
class Facts:
    """Everything the rules read, as of one night."""

    as_of: date
    labs: pd.DataFrame        # usable results: patient_id, analyte, value, censor, collected_at, collected_date, ...
    events: pd.DataFrame      # patient_id, event_type, occurred_at, occurred_date, value, detail
    doses: pd.DataFrame       # patient_id, agent, cls, at, day, dose_mg, course_no, course_start
    courses: pd.DataFrame     # one row per (patient, cls, course_no): start, last_dose, end, status ...
    scr: pd.DataFrame         # creatinine with CrCl and its inputs


def _dates(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series).astype("datetime64[ns]")


LAB_TEXT = ["result_id", "patient_id", "analyte", "censor", "unit", "status"]
EVENT_TEXT = ["patient_id", "event_type", "value", "detail"]


def _plain_text(column: pd.Series) -> bool:
    """Already `str` without missing values (as the store's reads return text): nothing to do."""
    return column.dtype == "str" and not column.isna().any()


def _normalise(frame: pd.DataFrame, text: list[str]) -> pd.DataFrame:
    """One string dtype for text columns and plain floats/timestamps, whatever the caller built
    the frame with (store reads, parsed chunks, tests): merges between derived frames then line up."""
    frame = frame.copy()
    for column in text:
        if column in frame.columns and not _plain_text(frame[column]):
            frame[column] = frame[column].astype("object").where(frame[column].notna(), "").astype("str")
    if "value" in frame.columns and "analyte" in frame.columns:
        frame["value"] = frame["value"].astype("float64")
    for column in ("collected_at", "occurred_at"):
        if column in frame.columns:
            frame[column] = pd.to_datetime(frame[column]).astype("datetime64[ns]")
    return frame


def prepare(labs: pd.DataFrame, events: pd.DataFrame, as_of: date, settings: Settings) -> Facts:
    """Restrict to `as_of`, then derive doses, courses and creatinine clearance."""
    cutoff = pd.Timestamp(as_of)
    labs, events = _normalise(labs, LAB_TEXT), _normalise(events, EVENT_TEXT)
    labs = labs.assign(collected_day=_dates(labs["collected_date"]))
    labs = labs[(labs["collected_day"] <= cutoff) & labs["status"].isin(list(USABLE))]
    labs = labs.sort_values(["patient_id", "collected_at", "result_id"], kind="stable").reset_index(drop=True)
    events = events.assign(day=_dates(events["occurred_date"]))
    visible = (events["day"] <= cutoff) | events["event_type"].isin(TIMELESS)
    # value and detail break ties between events of one type at one instant (two weights at the same
    # time): the result never depends on the order the rows came in
    events = events[visible].sort_values(["patient_id", "occurred_at", "event_type", "value", "detail"],
                                         kind="stable")
    events = events.reset_index(drop=True)
    doses, courses = build_courses(events, cutoff, settings)
    scr = creatinine_clearance(labs, events, settings)
    return Facts(as_of, labs, events, doses, courses, scr)


def build_courses(events: pd.DataFrame, cutoff: pd.Timestamp, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Courses per agent class (SPEC 10): a dose with no same-class dose in the previous
    `course_gap_days`, or after a stop, starts a course; a stop or `course_gap_days` without a
    dose ends it. Holds do not end a course."""
    gap = pd.Timedelta(days=settings.clinical.course_gap_days)
    dose_rows = events[events["event_type"] == "bisphosphonate_dose"]
    doses = pd.DataFrame({
        "patient_id": dose_rows["patient_id"].to_numpy(),
        "agent": dose_rows["value"].to_numpy(),
        "at": dose_rows["occurred_at"].to_numpy(),
        "day": dose_rows["day"].to_numpy(),
        "dose_mg": pd.to_numeric(dose_rows["detail"].replace("", None), errors="coerce").to_numpy(),
    })
    doses["cls"] = agent_class(doses["agent"])
    doses = doses.sort_values(["patient_id", "cls", "at"], kind="stable").reset_index(drop=True)
    stop_rows = events[events["event_type"] == "bisphosphonate_stop"]
    stops = pd.DataFrame({"patient_id": stop_rows["patient_id"].to_numpy(),
                          "stop_at": stop_rows["occurred_at"].to_numpy(),
                          "stop_day": stop_rows["day"].to_numpy(),
                          # a stop without an agent stops the bisphosphonate class
                          "cls": agent_class(stop_rows["value"].replace("", "zoledronic_acid"))})
    stamp = pd.Series(dtype="datetime64[ns]")
    empty_courses = pd.DataFrame({"patient_id": pd.Series(dtype="str"), "cls": pd.Series(dtype="str"),
                                  "course_no": pd.Series(dtype="int64"), "start": stamp, "start_at": stamp,
                                  "last_dose": stamp, "last_dose_at": stamp, "end": stamp,
                                  "discontinued": pd.Series(dtype=bool), "stopped_on": stamp})
    if doses.empty:
        doses["course_no"] = pd.Series(dtype="int64")
        doses["course_start"] = pd.Series(dtype="datetime64[ns]")
        return doses, empty_courses
    group = doses.groupby(["patient_id", "cls"], sort=False)
    prev_at = group["at"].shift()
    prev_day = group["day"].shift()
    # the latest stop strictly before each dose (same patient and class)
    doses["_i"] = np.arange(len(doses))
    if stops.empty:
        last_stop = pd.Series(pd.NaT, index=doses.index, dtype="datetime64[ns]")
    else:
        merged = pd.merge_asof(doses.sort_values("at"), stops.sort_values("stop_at"), left_on="at",
                               right_on="stop_at", by=["patient_id", "cls"], allow_exact_matches=False)
        last_stop = merged.set_index("_i")["stop_at"].reindex(doses["_i"]).to_numpy()
        last_stop = pd.Series(last_stop, index=doses.index, dtype="datetime64[ns]")
    new_course = prev_at.isna() | ((doses["day"] - prev_day) > gap) | (last_stop.notna() & (last_stop >= prev_at))
    doses["course_no"] = new_course.astype("int64").groupby([doses["patient_id"], doses["cls"]]).cumsum()
    doses = doses.drop(columns="_i")
    courses = (doses.groupby(["patient_id", "cls", "course_no"], sort=False)
               .agg(start=("day", "min"), start_at=("at", "min"), last_dose=("day", "max"),
                    last_dose_at=("at", "max"))
               .reset_index())
    # a stop at or after the course's last dose ends it
    if stops.empty:
        courses["stopped_on"] = pd.NaT
    else:
        after = courses.merge(stops, on=["patient_id", "cls"], how="left")
        after = after[after["stop_at"] >= after["last_dose_at"]]
        first_stop = after.groupby(["patient_id", "cls", "course_no"])["stop_day"].min()
        courses = courses.merge(first_stop.rename("stopped_on").reset_index(), how="left",
                                on=["patient_id", "cls", "course_no"])
    lapse = courses["last_dose"] + gap
    stop_end = courses["stopped_on"] - pd.Timedelta(days=1)
    courses["end"] = lapse.where(courses["stopped_on"].isna() | (lapse < stop_end), stop_end)
    courses["discontinued"] = courses["end"] < cutoff
    doses = doses.merge(courses[["patient_id", "cls", "course_no", "start"]].rename(columns={"start": "course_start"}),
                        on=["patient_id", "cls", "course_no"], how="left")
    return doses, courses


def latest_per_patient(events: pd.DataFrame, event_type: str) -> pd.DataFrame:
    """The latest event of a type per patient (index patient_id): by occurred_at, then by value, so
    two deliveries at one instant never depend on the order of the rows."""
    rows = events[events["event_type"] == event_type].sort_values(["patient_id", "occurred_at", "value"],
                                                                  kind="stable")
    return rows.groupby("patient_id", sort=False).tail(1).set_index("patient_id")


def creatinine_clearance(labs: pd.DataFrame, events: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Serum creatinine rows with Cockcroft-Gault CrCl (SPEC 4) and the inputs it used.

    CrCl = (140 - age) x weight / (72 x SCr) (x 0.85 if female); age in whole years at collection;
    weight = the latest weight within `weight_window_days` before the creatinine. Missing age, sex
    or weight leaves CrCl empty and `crcl_missing` says which.
    """
    scr = labs[labs["analyte"] == "creatinine"][
        ["patient_id", "result_id", "value", "censor", "collected_at", "collected_day"]].copy()
    births = latest_per_patient(events, "birth_date")["value"]
    sexes = latest_per_patient(events, "sex")["value"]
    scr["birth_date"] = pd.to_datetime(scr["patient_id"].map(births), errors="coerce")
    scr["sex"] = scr["patient_id"].map(sexes)
    w_events = events[events["event_type"] == "weight_kg"]
    weights = pd.concat([
        pd.DataFrame({"patient_id": w_events["patient_id"], "w_at": w_events["occurred_at"],
                      "w_day": w_events["day"], "weight_kg": pd.to_numeric(w_events["value"], errors="coerce")}),
        pd.DataFrame({"patient_id": labs.loc[labs["analyte"] == "weight", "patient_id"],
                      "w_at": labs.loc[labs["analyte"] == "weight", "collected_at"],
                      "w_day": labs.loc[labs["analyte"] == "weight", "collected_day"],
                      "weight_kg": labs.loc[labs["analyte"] == "weight", "value"]}),
    ]).dropna(subset=["weight_kg"])
    scr["_i"] = np.arange(len(scr))
    if weights.empty or scr.empty:
        scr["weight_kg"] = np.nan
        scr["weight_day"] = pd.NaT
    else:
        # "within 90 days before": by calendar day, the weight's day may equal the creatinine's.
        left = scr.sort_values("collected_day")
        # the day's latest weight; two at the same instant: the lower (the lower CrCl, the cautious reading)
        right = weights.sort_values(["w_day", "w_at", "weight_kg"], ascending=[True, True, False],
                                    kind="stable").drop_duplicates(["patient_id", "w_day"], keep="last")
        merged = pd.merge_asof(left, right[["patient_id", "w_day", "weight_kg"]], left_on="collected_day",
                               right_on="w_day", by="patient_id",
                               tolerance=pd.Timedelta(days=settings.clinical.weight_window_days))
        merged = merged.set_index("_i").reindex(scr["_i"])
        scr["weight_kg"] = merged["weight_kg"].to_numpy()
        scr["weight_day"] = merged["w_day"].to_numpy()
    day = scr["collected_day"]
    birth = scr["birth_date"]
    before_birthday = (day.dt.month < birth.dt.month) | ((day.dt.month == birth.dt.month) & (day.dt.day < birth.dt.day))
    scr["age"] = day.dt.year - birth.dt.year - before_birthday.astype("float64")
    factor = np.where(scr["sex"] == "F", 0.85, np.where(scr["sex"] == "M", 1.0, np.nan))
    crcl = (140 - scr["age"]) * scr["weight_kg"] / (72 * scr["value"]) * factor
    scr["crcl"] = round_half_up(crcl, 1)
    missing = np.where(scr["birth_date"].isna(), "age (no birth date)",
               np.where(~scr["sex"].isin(["F", "M"]), "sex",
               np.where(scr["weight_kg"].isna(),
                        f"weight (none in the {settings.clinical.weight_window_days} days before)", "")))
    scr["crcl_missing"] = missing
    scr.loc[scr["censor"] != "", "crcl"] = np.nan
    scr.loc[(scr["censor"] != "") & (scr["crcl_missing"] == ""), "crcl_missing"] = "an exact creatinine (censored value)"
    return scr.drop(columns="_i").reset_index(drop=True)


def add_months(day, months: int) -> pd.Timestamp:
    """Calendar months, clamped at month end (SPEC 10): 31 August + 6 months = 28/29 February."""
    return pd.Timestamp(day) + pd.DateOffset(months=months)


def current_courses(facts: Facts, cls: str | None = None) -> pd.DataFrame:
    """Courses active or held as of the night (not discontinued), optionally of one class."""
    courses = facts.courses[~facts.courses["discontinued"].astype(bool)]
    return courses if cls is None else courses[courses["cls"] == cls]


def urine_albumin(facts: Facts, *, only_24h: bool) -> pd.DataFrame:
    """Urine albumin results from events (albuminuria_mg_24h) and labs: patient_id, day, at, value,
    censor, kind. Spot tests count as a result for URINE_ALBUMIN_DUE, never against the 24-h limit."""
    ev = facts.events[facts.events["event_type"] == "albuminuria_mg_24h"]
    frames = [pd.DataFrame({"patient_id": ev["patient_id"], "day": ev["day"], "at": ev["occurred_at"],
                            "value": pd.to_numeric(ev["value"], errors="coerce"), "censor": "",
                            "kind": "24-h urine albumin (mg/24 h)"})]
    analytes = ["urine_albumin_24h"] if only_24h else ["urine_albumin_24h", "urine_albumin_spot"]
    labs = facts.labs[facts.labs["analyte"].isin(analytes)]
    frames.append(pd.DataFrame({"patient_id": labs["patient_id"], "day": labs["collected_day"],
                                "at": labs["collected_at"], "value": labs["value"], "censor": labs["censor"],
                                "kind": np.where(labs["analyte"] == "urine_albumin_24h",
                                                 "24-h urine albumin (mg/24 h)", "spot urine albumin")}))
    out = pd.concat([f for f in frames if not f.empty]) if any(not f.empty for f in frames) else frames[0]
    return out.dropna(subset=["value"]).sort_values(["patient_id", "at"], kind="stable").reset_index(drop=True)
