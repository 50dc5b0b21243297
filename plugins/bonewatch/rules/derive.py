"""Derived quantities of SPEC section 4, computed from history as of a night (pure, vectorised).

Inputs are the store's rows as DataFrames; nothing here reads a clock or a file. Every frame is
restricted to what was collected (or happened) on or before `as_of`, so evaluating a past night
on today's store gives that night's answer; birth date and sex are the exception: timeless facts
(SPEC 2.5), they hold for every night whenever they were delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, tzinfo
from functools import cached_property

import numpy as np
import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import TIMELESS_EVENTS

BISPHOSPHONATES = {"zoledronic_acid", "pamidronate"}
USABLE = {"final", "corrected"}     # preliminary is shown but drives nothing; cancelled has no effect
#: Event types that hold for every night, a past one included, whenever they were delivered (SPEC 2.5):
#: a Patient loaded today is stamped with today, and cut off by the night a backfill had no age or sex.
TIMELESS = TIMELESS_EVENTS

#: Two results of one analyte for one patient at one instant with different values (real exports
#: have them): the rules use the cautious one, the reading that would raise the alert, and the
#: evidence names both. +1 the higher: creatinine (RENAL_HOLD, and the lower CrCl for DOSE_BAND),
#: ALP, GGT, albumin (the lower corrected calcium); -1 the lower: calcium, weight (the lower CrCl).
#: The renal baseline is the exception: the lower creatinine (see `renal.renal_baselines`).
CAUTIOUS = {"creatinine": 1, "alp": 1, "ggt": 1, "albumin": 1, "bsap_activity": 1, "bsap_mass": 1,
            "urine_albumin_24h": 1, "urine_albumin_spot": 1, "calcium": -1, "weight": -1}
#: (reporting precision in decimals, plural, canonical unit) per analyte, for the evidence; values
#: equal at reporting precision (SPEC 10) are no conflict
READING = {"creatinine": (2, "creatinines", "mg/dL"), "calcium": (2, "calciums", "mg/dL"),
           "albumin": (1, "albumins", "g/dL"), "alp": (1, "ALPs", "U/L"), "ggt": (1, "GGTs", "U/L"),
           "weight": (1, "weights", "kg"), "bsap_activity": (1, "bone-specific ALPs", "U/L"),
           "bsap_mass": (1, "bone-specific ALPs", "ug/L"),
           "urine_albumin_24h": (0, "24-h urine albumins", "mg/24 h"),
           "urine_albumin_spot": (1, "spot urine albumins", "mg/L")}
_COUNT = {2: "two", 3: "three", 4: "four"}


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
    conflicts: pd.DataFrame   # same-instant results that differ: patient_id, analyte, at, note, lowest, lowest_note

    @cached_property
    def _conflict_index(self) -> dict:
        return {(p, a, t): (n, low) for p, a, t, n, low in zip(
            self.conflicts["patient_id"], self.conflicts["analyte"], self.conflicts["at"],
            self.conflicts["note"], self.conflicts["lowest_note"], strict=True)}

    def conflict(self, patient_id: str, analyte: str, at, *, lowest: bool = False) -> str | None:
        """The evidence note for results of `analyte` at instant `at` that differ, else None: which
        values, and which one the rule used (the cautious one; `lowest`: the lowest exact one)."""
        if at is None or pd.isna(at):
            return None
        found = self._conflict_index.get((str(patient_id), analyte, pd.Timestamp(at)))
        return None if found is None else found[1 if lowest else 0]


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
    """Restrict to `as_of`, resolve same-instant conflicting results, then derive doses, courses
    and creatinine clearance."""
    cutoff = pd.Timestamp(as_of)
    labs, events = _normalise(labs, LAB_TEXT), _normalise(events, EVENT_TEXT)
    labs = labs.assign(collected_day=_dates(labs["collected_date"])).reset_index(drop=True)
    usable = (labs["collected_day"] <= cutoff) & labs["status"].isin(list(USABLE))
    # Sorted on the key columns alone, the results of one analyte at one instant are neighbours:
    # only those few are resolved (weights with the event weights, in creatinine_clearance); then the
    # frame is taken once, one result per analyte and instant, in an order no result id decides.
    keys = ["patient_id", "collected_at", "analyte"]
    order = labs.loc[usable, keys].sort_values(keys, kind="stable")
    same = np.zeros(len(order), dtype=bool)
    if len(order):
        same[1:] = True
        for key in keys:   # each row against the one before it, compared in the column's own array type
            column = order[key]
            same[1:] &= (column.iloc[1:].reset_index(drop=True) == column.iloc[:-1].reset_index(drop=True)
                         ).to_numpy(dtype=bool, na_value=False)
    shared = same | np.append(same[1:], False)
    shared &= order["analyte"].to_numpy() != "weight"
    lose, conflicts = outvoted(labs.loc[order.index[shared]], "collected_at", settings.tz)
    labs = labs.take(order.index[~order.index.isin(lose)]).reset_index(drop=True)
    events = events.assign(day=_dates(events["occurred_date"]))
    visible = (events["day"] <= cutoff) | events["event_type"].isin(TIMELESS)
    # value and detail break ties between events of one type at one instant (two weights at the same
    # time): the result never depends on the order the rows came in
    events = events[visible].sort_values(["patient_id", "occurred_at", "event_type", "value", "detail"],
                                         kind="stable")
    events = events.reset_index(drop=True)
    doses, courses = build_courses(events, cutoff, settings)
    scr = creatinine_clearance(labs, events, settings)
    return Facts(as_of, labs, events, doses, courses, scr, conflicts.rename(columns={"collected_at": "at"}))


def _shown(values: np.ndarray, digits: np.ndarray) -> np.ndarray:
    scale = 10.0 ** digits
    return np.floor(values * scale + 0.5 + 1e-9) / scale


def _label(censor: str, value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return censor + (text.rstrip("0").rstrip(".") if "." in text else text)


def same_instant(rows: pd.DataFrame, at: str, tz: tzinfo) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Several results of one analyte for one patient at one instant (`at`, naive UTC) reduced to
    one, the cautious one (see `outvoted`). Returns the rows (index reset) and the conflicts."""
    rows = rows.reset_index(drop=True)
    lose, conflicts = outvoted(rows, at, tz)
    return rows.drop(index=lose).reset_index(drop=True), conflicts


def outvoted(rows: pd.DataFrame, at: str, tz: tzinfo) -> tuple[pd.Index, pd.DataFrame]:
    """Of several results of one analyte for one patient at one instant (`at`, naive UTC), the
    cautious one (CAUTIOUS; NaN never wins) stays, whatever the order of the rows or their result
    ids. `rows` (a unique index) has patient_id, analyte, value, censor and `at`.

    Returns the index labels of the rows that lose, and the conflicts: one row per instant whose
    values differ at reporting precision, with patient_id, analyte, `at`, `note` ("two creatinines
    at 2024-03-01 08:00: 1.9 and 1.2 mg/dL; the higher (1.9) is used", the time in the hospital's
    zone), `lowest` (the lowest exact value) and `lowest_note` (the same words for it)."""
    keys = ["patient_id", "analyte", at]
    empty = pd.DataFrame({"patient_id": pd.Series(dtype="str"), "analyte": pd.Series(dtype="str"),
                          at: pd.Series(dtype="datetime64[ns]"), "note": pd.Series(dtype="str"),
                          "lowest": pd.Series(dtype="float64"), "lowest_note": pd.Series(dtype="str")})
    shared = rows.index[rows.duplicated(keys, keep=False)]
    if not len(shared):
        return shared, empty
    dup = rows.loc[shared]
    sign = dup["analyte"].map(CAUTIOUS).fillna(1).to_numpy("float64")
    digits = dup["analyte"].map({a: r[0] for a, r in READING.items()}).fillna(2).to_numpy("int64")
    value = dup["value"].to_numpy("float64")
    shown = _shown(value, digits)
    bound = dup["censor"].map({"<": -1.0, ">": 1.0}).fillna(0.0).to_numpy("float64")
    dup = dup.assign(_shown=shown, _digits=digits, _sign=sign, _k1=sign * shown, _k2=sign * bound, _k3=sign * value)
    tie = ["result_id"] if "result_id" in dup.columns else []
    # the cautious one last in its instant
    dup = dup.sort_values([*keys, "_k1", "_k2", "_k3", *tie], kind="stable", na_position="first")
    lose = dup.index[dup.duplicated(keys, keep="last")]
    distinct = dup.dropna(subset=["_shown"]).drop_duplicates([*keys, "_shown", "censor"], keep="last")
    distinct = distinct[distinct.duplicated(keys, keep=False)]
    if distinct.empty:
        return lose, empty
    # the words, one conflict at a time: conflicts are few, and a plain pass over them is cheaper
    # than grouping them in pandas
    lowest = dup[dup["censor"] == ""].groupby(keys, sort=False)["value"].min().to_dict()
    when = distinct[at].dt.tz_localize("UTC").dt.tz_convert(tz).dt.strftime("%Y-%m-%d %H:%M")
    columns = [distinct[c].to_numpy(dtype=object) for c in ("patient_id", "analyte", at, "censor", "_shown",
                                                            "_digits", "_sign")]
    out: list[tuple] = []
    instant, labels = None, []
    for patient, analyte, moment, censor, shown_value, d, up, local in zip(*columns, when.to_numpy(dtype=object),
                                                                        strict=True):
        if (patient, analyte, moment) != instant:
            instant, labels = (patient, analyte, moment), []
            out.append((patient, analyte, moment, local, up, int(d), labels))
        labels.insert(0, _label(censor, shown_value, int(d)))    # the cautious one (last) first
    rows_out = []
    for patient, analyte, moment, local, up, d, labels in out:
        _, plural, unit = READING.get(analyte, (2, f"{analyte} results", ""))
        n = len(labels)
        listing = " and ".join(labels) if n == 2 else ", ".join(labels[:-1]) + " and " + labels[-1]
        said = f"{_COUNT.get(n, str(n))} {plural} at {local}: {listing}{' ' + unit if unit else ''}"
        pick = ("higher" if up > 0 else "lower") if n == 2 else ("highest" if up > 0 else "lowest")
        low = lowest.get((patient, analyte, moment))
        rows_out.append((patient, analyte, moment, f"{said}; the {pick} ({labels[0]}) is used",
                         np.nan if low is None else low,
                         None if low is None else
                         f"{said}; the {'lower' if n == 2 else 'lowest'} ({_label('', low, d)}) is the baseline"))
    conflicts = pd.DataFrame(rows_out, columns=["patient_id", "analyte", at, "note", "lowest", "lowest_note"])
    return lose, conflicts.astype({"patient_id": "str", "analyte": "str", at: "datetime64[ns]", "lowest": "float64"})


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
    w_labs = labs[labs["analyte"] == "weight"]
    weights = pd.concat([
        pd.DataFrame({"patient_id": w_events["patient_id"], "at": w_events["occurred_at"], "day": w_events["day"],
                      "value": pd.to_numeric(w_events["value"], errors="coerce")}),
        pd.DataFrame({"patient_id": w_labs["patient_id"], "at": w_labs["collected_at"], "day": w_labs["collected_day"],
                      "value": w_labs["value"]}),
    ]).dropna(subset=["value"]).assign(analyte="weight", censor="")
    scr["_i"] = np.arange(len(scr))
    if weights.empty or scr.empty:
        scr["weight_kg"] = np.nan
        scr["weight_day"] = pd.NaT
        scr["weight_note"] = None
    else:
        # two weights at one instant: the lower (the lower CrCl, the cautious reading), named in the evidence
        weights, clashes = same_instant(weights, "at", settings.tz)
        weights = weights.merge(clashes[["patient_id", "at", "note"]], on=["patient_id", "at"], how="left")
        # "within 90 days before": by calendar day, the weight's day may equal the creatinine's.
        left = scr.sort_values("collected_day")
        # the day's latest weight
        right = weights.sort_values(["day", "at"], kind="stable").drop_duplicates(["patient_id", "day"], keep="last")
        right = right.rename(columns={"day": "w_day", "value": "weight_kg", "note": "weight_note"})
        merged = pd.merge_asof(left, right[["patient_id", "w_day", "weight_kg", "weight_note"]], left_on="collected_day",
                               right_on="w_day", by="patient_id",
                               tolerance=pd.Timedelta(days=settings.clinical.weight_window_days))
        merged = merged.set_index("_i").reindex(scr["_i"])
        scr["weight_kg"] = merged["weight_kg"].to_numpy()
        scr["weight_day"] = merged["w_day"].to_numpy()
        scr["weight_note"] = merged["weight_note"].to_numpy()
    day = scr["collected_day"]
    birth = scr["birth_date"]
    before_birthday = (day.dt.month < birth.dt.month) | ((day.dt.month == birth.dt.month) & (day.dt.day < birth.dt.day))
    scr["age"] = day.dt.year - birth.dt.year - before_birthday.astype("float64")
    scr["crcl"] = cockcroft_gault(scr["age"], scr["weight_kg"], scr["value"], scr["sex"])
    missing = np.where(scr["birth_date"].isna(), "age (no birth date)",
               np.where(~scr["sex"].isin(["F", "M"]), "sex",
               np.where(scr["weight_kg"].isna(),
                        f"weight (none in the {settings.clinical.weight_window_days} days before)", "")))
    scr["crcl_missing"] = missing
    scr.loc[scr["censor"] != "", "crcl"] = np.nan
    scr.loc[(scr["censor"] != "") & (scr["crcl_missing"] == ""), "crcl_missing"] = "an exact creatinine (censored value)"
    return scr.drop(columns="_i").reset_index(drop=True)


def cockcroft_gault(age, weight_kg, scr_mg_dl, sex) -> np.ndarray:
    """CrCl (mL/min) at reporting precision (0.1): (140 - age) x weight / (72 x SCr), x 0.85 if
    female; NaN when an input is missing or the sex is neither F nor M."""
    sex = np.asarray(sex, dtype=object)
    factor = np.where(sex == "F", 0.85, np.where(sex == "M", 1.0, np.nan))
    age, weight, scr = (np.asarray(v, dtype="float64") for v in (age, weight_kg, scr_mg_dl))
    return round_half_up((140 - age) * weight / (72 * scr) * factor, 1)


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
    analytes = ["urine_albumin_24h"] if only_24h else ["urine_albumin_24h", "urine_albumin_spot", "urine_albumin_ratio"]
    labs = facts.labs[facts.labs["analyte"].isin(analytes)]
    frames.append(pd.DataFrame({"patient_id": labs["patient_id"], "day": labs["collected_day"],
                                "at": labs["collected_at"], "value": labs["value"], "censor": labs["censor"],
                                "kind": np.where(labs["analyte"] == "urine_albumin_24h",
                                                 "24-h urine albumin (mg/24 h)", "spot urine albumin")}))
    out = pd.concat([f for f in frames if not f.empty]) if any(not f.empty for f in frames) else frames[0]
    # two results at one instant: the higher last, so it decides the state after that instant (the
    # cautious reading); the events' values are text, and '1200' sorted before '300'
    return out.dropna(subset=["value"]).sort_values(["patient_id", "at", "value"], kind="stable").reset_index(drop=True)
