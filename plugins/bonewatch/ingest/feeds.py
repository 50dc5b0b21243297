"""The canonical CSV feeds (SPEC 2.1 lab results, SPEC 2.4 clinical events): parse a chunk of raw
strings into canonical rows, and name a reason for every row that cannot be used."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from bonewatch.config import Settings
from bonewatch.ingest.parsing import (
    STATUS_RANK,
    factorized_map,
    first_reason,
    parse_instants,
    parse_numbers,
    parse_statuses,
    quote_series,
)
from bonewatch.store.tables import lab_results, patient_refs
from bonewatch.units import ANALYTES, LOINC, factor, is_loinc, normalise_unit

LAB_COLUMNS = ["patient_id", "result_id", "loinc", "value", "unit", "collected_at", "status"]
EVENT_COLUMNS = ["patient_id", "event_type", "occurred_at", "value", "detail"]
#: the longest identifiers the store holds (longer ones are quarantined, not cut: cut, two could meet)
PATIENT_ID_MAX = lab_results.c.patient_id.type.length
RESULT_ID_MAX = lab_results.c.result_id.type.length
REF_MAX = patient_refs.c.ref.type.length

EVENT_TYPES = {
    "diagnosis", "birth_date", "sex", "weight_kg", "bisphosphonate_dose", "bisphosphonate_stop",
    "myeloma_therapy_start", "response", "bone_disease", "dental_exam", "albuminuria_mg_24h",
    "care_team",
}
AGENTS = {"zoledronic_acid", "pamidronate", "denosumab"}
RESPONSES = {"scr": "sCR", "cr": "CR", "vgpr": "VGPR", "pr": "PR", "mr": "MR", "sd": "SD", "pd": "PD"}
DIAGNOSES = {"mm": "MM", "smm": "SMM", "mgus": "MGUS", "osteoporosis": "osteoporosis"}
SEXES = {"f": "F", "female": "F", "m": "M", "male": "M"}
BONE = {"active": "active", "none": "none"}


@dataclass
class Parsed:
    rows: pd.DataFrame        # canonical rows ready for the store
    rejected: pd.DataFrame    # columns: line, reason, raw
    codes: pd.DataFrame | None = None   # labs: rows skipped for their code (`parse_labs`)


def raw_text(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """The row as it was sent (for quarantine), rebuilt from its fields."""
    if frame.empty:
        return pd.Series([], index=frame.index, dtype="object")
    return frame[columns].astype("string").fillna("").agg(",".join, axis=1)


def has_nul(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Rows with a NUL character in one of `columns` (quarantined: no PostgreSQL text can hold it)."""
    nul = np.zeros(len(frame), dtype=bool)
    for column in columns:
        nul |= frame[column].astype("string").str.contains("\x00", regex=False).fillna(False).to_numpy(dtype=bool)
    return nul


def _split(frame: pd.DataFrame, reasons: pd.Series, columns: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    bad = reasons != ""
    rejected = pd.DataFrame({"line": frame.index[bad].astype("int64"), "reason": reasons[bad].to_numpy(),
                             "raw": raw_text(frame[bad], columns).to_numpy()})
    return frame[~bad], rejected


def implausible(feed: str, rows: pd.DataFrame, plausible: dict[str, tuple[float, float]]) -> pd.Series:
    """Row-level plausibility of parsed rows (canonical units, `[ingest.plausible]`), vectorised:
    the quarantine reason of each row outside its range, "" for the others. (The GX suite measures
    the same ranges per chunk for the data-quality record; the row-level verdict is made here.)"""
    return implausible_labs(rows, plausible) if feed == "labs" else implausible_events(rows, plausible)


def implausible_labs(rows: pd.DataFrame, plausible: dict[str, tuple[float, float]]) -> pd.Series:
    """Labs: the reason for each row outside its analyte's range, "" for the others."""
    reasons = np.full(len(rows), "", dtype=object)
    analyte = rows["analyte"].to_numpy(dtype=object)
    value = rows["value"].to_numpy(dtype="float64")
    for name, (low, high) in plausible.items():
        if name not in ANALYTES:
            continue
        bad = (analyte == name) & ((value < low) | (value > high))
        reasons[bad] = (f"implausible {name} value (outside {low:g}-{high:g} "
                        f"{ANALYTES[name].canonical_unit})")
    return pd.Series(reasons, index=rows.index, dtype=object)


def implausible_events(rows: pd.DataFrame, plausible: dict[str, tuple[float, float]]) -> pd.Series:
    """The same for events that carry a number (weight, 24-h urine albumin)."""
    reasons = np.full(len(rows), "", dtype=object)
    etype = rows["event_type"].to_numpy(dtype=object)
    number = rows["number"].to_numpy(dtype="float64")
    for event_type, analyte in (("weight_kg", "weight"), ("albuminuria_mg_24h", "urine_albumin_24h")):
        if analyte in plausible:
            low, high = plausible[analyte]
            bad = (etype == event_type) & ((number < low) | (number > high))
            reasons[bad] = f"implausible {event_type} value (outside {low:g}-{high:g})"
    return pd.Series(reasons, index=rows.index, dtype=object)


#: not a code: empty, spaces, punctuation a code system never uses (a name or note in a code field)
CODE_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+\-]{0,31}$")
#: what happens to a result by its code (SPEC 2.5): monitored rows go on; these three are counted
#: per code and skipped (`Parsed.codes`), never quarantined
SKIPPED_CODES = ("not_monitored", "unmapped", "ignored")


def code_kinds(code: pd.Series, settings: Settings) -> tuple[pd.Series, pd.Series]:
    """Per row: (analyte or None, what happens to the row: "" monitored, one of `SKIPPED_CODES`,
    or "missing" / "malformed" (quarantined)). The hospital's map comes first, then LOINC."""
    code_map = settings.ingest.code_map
    ignore = set(settings.ingest.ignore_codes)

    def classify(c: str) -> tuple[str | None, str]:
        if c == "":
            return None, "missing"
        mapped = code_map.get(c, c)
        analyte = LOINC.get(mapped)
        if analyte is not None:
            return analyte, ""
        if c in ignore or mapped in ignore:
            return None, "ignored"
        if is_loinc(mapped):
            return None, "not_monitored"
        if not CODE_SHAPE.match(c):
            return None, "malformed"
        return None, "unmapped"

    # once per distinct code: a feed carries a handful of codes in millions of rows
    positions, uniques = pd.factorize(code, use_na_sentinel=True)
    decided = [classify(str(u)) for u in uniques]
    analytes = np.array([a for a, _ in decided] + [None], dtype=object)     # the last slot: missing
    kinds = np.array([k for _, k in decided] + ["missing"], dtype=object)
    return (pd.Series(analytes[positions], index=code.index, dtype=object),
            pd.Series(kinds[positions], index=code.index, dtype=object))


def _code_counts(code: pd.Series, kind: pd.Series, day: pd.Series) -> pd.DataFrame:
    """Skipped rows per code: code, kind, rows, first_collected, last_collected."""
    if not len(code):       # the rule, and pandas' named aggregation costs milliseconds even on nothing
        return pd.DataFrame(columns=["code", "kind", "rows", "first_collected", "last_collected"])
    frame = pd.DataFrame({"code": code.to_numpy(dtype=object), "kind": kind.to_numpy(dtype=object),
                          "day": pd.to_datetime(day).to_numpy()})
    return (frame.groupby(["code", "kind"], sort=True)
            .agg(rows=("day", "size"), first_collected=("day", "min"), last_collected=("day", "max"))
            .reset_index())


def parse_labs(frame: pd.DataFrame, settings: Settings, delivery_id: str, received_at: datetime) -> Parsed:
    """Raw lab CSV strings (index = source line) -> canonical results + rejected rows + the rows
    skipped for their code, counted per code (`Parsed.codes`, SPEC 2.5).

    A frame may carry one optional column after `LAB_COLUMNS`, `collected_basis` (FHIR: where the
    collection time came from when the Observation had none of its own).
    Vectorised throughout: per-value work (code map, unit spelling, conversion factor) is done
    once per distinct value, not once per row."""
    frame = frame.copy()
    for column in LAB_COLUMNS:
        frame[column] = frame[column].astype("string").fillna("").str.strip()
    code = frame["loinc"]
    analyte, code_kind = code_kinds(code, settings)
    latest = pd.Timestamp(received_at) + pd.Timedelta(days=1)
    collected_at, collected_date, r_date = parse_instants(frame["collected_at"], settings.tz, latest)
    skipped = code_kind.isin(SKIPPED_CODES).to_numpy()
    codes = _code_counts(code[skipped], code_kind[skipped], collected_date[skipped])
    if skipped.any():
        keep = ~skipped
        frame, code, analyte, code_kind = frame[keep], code[keep], analyte[keep], code_kind[keep]
        collected_at, collected_date, r_date = collected_at[keep], collected_date[keep], r_date[keep]
    r_code = pd.Series("", index=frame.index, dtype="object")
    r_code[(code_kind == "missing").to_numpy()] = "missing code"
    r_code[(code_kind == "malformed").to_numpy()] = "malformed code (not shaped like a code)"
    number, censor, r_value = parse_numbers(frame["value"])
    aliases = {normalise_unit(k): v for k, v in settings.ingest.unit_aliases.items()}
    # the unit as sent, unless the hospital configured an alias for its spelling
    unit_read = factorized_map(frame["unit"], lambda u: aliases.get(normalise_unit(u), u), default="")
    factor = _factors(analyte, unit_read)
    r_unit = pd.Series("", index=frame.index, dtype="object")
    no_unit = (factor.isna() & analyte.notna()).to_numpy()
    if no_unit.any():       # (set only where needed: see parsing.parse_instants)
        r_unit[no_unit] = ("unit " + quote_series(frame["unit"][no_unit], 16) + " cannot be converted for "
                           + analyte[no_unit].astype("string"))
    status, r_status = parse_statuses(frame["status"])
    r_ids = pd.Series("", index=frame.index, dtype="object")
    for bad, reason in (((frame["result_id"] == ""), "missing result_id"),
                        ((frame["result_id"].str.len() > RESULT_ID_MAX), f"result_id longer than {RESULT_ID_MAX} characters"),
                        ((frame["patient_id"] == ""), "missing patient_id"),
                        ((frame["patient_id"].str.len() > PATIENT_ID_MAX),
                         f"patient_id longer than {PATIENT_ID_MAX} characters"),
                        (has_nul(frame, LAB_COLUMNS), "NUL character in the row")):
        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            r_ids[bad] = reason
    value = number * factor
    basis = (frame["collected_basis"].astype("string").fillna("").str.strip().str.slice(0, 32)
             if "collected_basis" in frame.columns else "")
    canonical = pd.DataFrame({
        "result_id": frame["result_id"],
        "patient_id": frame["patient_id"],
        "analyte": analyte,
        "code": code.str.slice(0, 32),
        "value": value,
        "censor": censor,
        "unit": factorized_map(analyte, lambda a: ANALYTES[a].canonical_unit if isinstance(a, str) else None),
        "orig_value": frame["value"].str.slice(0, 64),
        "orig_unit": frame["unit"].str.slice(0, 32),
        "collected_at": collected_at,
        "collected_date": collected_date,
        "collected_basis": basis,
        "status": status,
        "status_rank": factorized_map(status, STATUS_RANK),
        "delivery_id": delivery_id,
        "source_line": frame.index.astype("int64"),
    }, index=frame.index)
    reasons = first_reason(r_code, r_ids, r_value, r_unit, r_date, r_status)
    good, rejected = _split(frame, reasons, LAB_COLUMNS)
    rows = canonical.loc[good.index]
    rows["status_rank"] = rows["status_rank"].astype("int64")
    # Several rows with one result id (a correction in the same file) are all accepted rows; the
    # store keeps the one its rule says (`writes.upsert_results`), whichever chunk each is in.
    return Parsed(rows, rejected, codes)


def _factors(analyte: pd.Series, unit: pd.Series) -> pd.Series:
    """The factor to each row's canonical unit (NaN: the unit cannot be converted), computed once
    per distinct (analyte, unit) pair present (`units.factor`, a UCUM library behind it)."""
    a_codes, a_names = pd.factorize(analyte)
    u_codes, u_names = pd.factorize(unit)
    table = np.full((len(a_names) + 1, len(u_names) + 1), np.nan)   # the last row/column: missing
    pairs = pd.DataFrame({"a": a_codes, "u": u_codes}).drop_duplicates()
    for i, j in pairs[(pairs["a"] >= 0) & (pairs["u"] >= 0)].itertuples(index=False):
        found = factor(a_names[i], u_names[j])
        table[i, j] = np.nan if found is None else found
    return pd.Series(table[a_codes, u_codes], index=analyte.index, dtype="float64")


def _event_values(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Normalise each event's value by its type; return (value, number, reasons)."""
    etype, value = frame["event_type"], frame["value"]
    lower = value.str.lower()
    out = value.copy()
    reasons = pd.Series("", index=frame.index, dtype="object")
    number = pd.Series(float("nan"), index=frame.index, dtype="float64")

    def vocabulary(kind: str, mapping: dict[str, str], allow_empty: bool = False) -> None:
        rows = etype == kind
        mapped = lower[rows].map(mapping)
        bad = mapped.isna() & ~((lower[rows] == "") & allow_empty)
        out[rows] = mapped.fillna(value[rows])
        reasons[bad[bad].index] = f"unknown {kind} value " + quote_series(value[bad[bad].index], 32)

    vocabulary("sex", SEXES)
    vocabulary("response", RESPONSES)
    vocabulary("bone_disease", BONE)
    vocabulary("diagnosis", DIAGNOSES)
    vocabulary("bisphosphonate_dose", {a: a for a in AGENTS})
    vocabulary("bisphosphonate_stop", {a: a for a in AGENTS}, allow_empty=True)
    for kind in ("weight_kg", "albuminuria_mg_24h"):
        rows = etype == kind
        parsed, _, r = parse_numbers(value[rows])
        number[rows] = parsed
        reasons[rows] = r
    births = etype == "birth_date"
    if births.any():
        parsed = pd.to_datetime(value[births], format="ISO8601", errors="coerce")
        bad = parsed.isna() | (parsed < pd.Timestamp("1900-01-01"))
        out[births] = parsed.dt.strftime("%Y-%m-%d").fillna(value[births])
        # not quoted, not even for the operator: a birth date is patient data (as HL7 PID-7)
        reasons[bad[bad].index] = "impossible birth date (not a calendar date from 1900 on)"
    needs_value = etype.isin(["myeloma_therapy_start", "care_team"]) & (value == "")
    reasons[needs_value] = "missing value for " + etype[needs_value]
    doses = etype == "bisphosphonate_dose"
    dose_mg = pd.to_numeric(frame["detail"][doses].replace("", None), errors="coerce")
    bad_dose = (frame["detail"][doses] != "") & (dose_mg.isna() | (dose_mg <= 0) | (dose_mg > 1000))
    reasons[bad_dose[bad_dose].index] = "unparseable dose (mg) " + quote_series(frame["detail"][bad_dose[bad_dose].index], 16)
    return out, number, reasons


def event_keys(rows: pd.DataFrame) -> list[str]:
    """Events have no source id: the key is a hash of every field, so a re-sent event is the same."""
    joined = (rows["patient_id"] + "\x1f" + rows["event_type"] + "\x1f"
              + rows["occurred_at"].astype("string") + "\x1f" + rows["value"] + "\x1f" + rows["detail"])
    return [hashlib.sha256(text.encode()).hexdigest()[:40] for text in joined]


def parse_events(frame: pd.DataFrame, settings: Settings, delivery_id: str, received_at: datetime) -> Parsed:
    """Raw events CSV strings (index = source line) -> canonical events + rejected rows."""
    frame = frame.copy()
    for column in EVENT_COLUMNS:
        frame[column] = frame[column].astype("string").fillna("").str.strip()
    frame["event_type"] = frame["event_type"].str.lower()
    r_type = pd.Series("", index=frame.index, dtype="object")
    unknown = ~frame["event_type"].isin(EVENT_TYPES)
    r_type[unknown] = "unknown event type " + quote_series(frame["event_type"][unknown], 32)
    r_type[frame["patient_id"] == ""] = "missing patient_id"
    r_type[frame["patient_id"].str.len() > PATIENT_ID_MAX] = f"patient_id longer than {PATIENT_ID_MAX} characters"
    r_type[has_nul(frame, EVENT_COLUMNS)] = "NUL character in the row"
    latest = pd.Timestamp(received_at) + pd.Timedelta(days=1)
    occurred_at, occurred_date, r_date = parse_instants(frame["occurred_at"], settings.tz, latest)
    value, number, r_value = _event_values(frame)
    reasons = first_reason(r_type, r_date, r_value)
    canonical = pd.DataFrame({
        "patient_id": frame["patient_id"],
        "event_type": frame["event_type"],
        "occurred_at": occurred_at,
        "occurred_date": occurred_date,
        "value": value.astype("string").fillna("").str.slice(0, 128),
        "detail": frame["detail"].str.slice(0, 256),
        "number": number,
        "delivery_id": delivery_id,
        "source_line": frame.index.astype("int64"),
    }, index=frame.index)
    good, rejected = _split(frame, reasons, EVENT_COLUMNS)
    rows = canonical.loc[good.index]
    rows.insert(0, "event_key", event_keys(rows) if len(rows) else [])
    return Parsed(rows, rejected)   # a re-sent event has the same key: the store keeps one
