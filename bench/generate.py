"""Fast, vectorised bench feeds: a backfill (lab CSV + events CSV) and one heavy night.

Every patient has a visit about monthly (creatinine, ALP, calcium; some in SI units), a birth date,
a sex, a weight every three months, an anti-myeloma therapy start and, for most, zoledronic acid or
pamidronate doses (monthly in the first year, then quarterly). About 100 lab rows a patient, so
100 k / 1 M / 10 M rows are about 1 k / 10 k / 100 k patients. A few rows are bad on purpose
(unknown code, unparseable value), as in a real feed.

Rows are in collection order, as a lab history export is; result ids grow with time. The night
holds 1 % of the backfill's rows (100 k over 10 M), a panel for a third of the patients on the
day after the history ends: the heavy night a network sees after a weekend or an outage.

Built with numpy and written with pyarrow: 10 M rows in well under a minute. Fixed seed; the
files are written once into bench/out/<scale>/ and reused while their stamp matches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

VERSION = 3            # bump to regenerate files written by an older generator
SEED = 20260801
SPAN_DAYS = 1100       # about three years of history
LAST_HISTORY_DAY = date(2025, 6, 29)
NIGHT = date(2025, 6, 30)
ROWS_PER_PATIENT = 99  # 33 visits x 3 analytes on average
PIECE = 1_000_000      # rows written per piece (bounds the generator's memory)

LAB_NAMES = ["patient_id", "result_id", "loinc", "value", "unit", "collected_at", "status"]
EVENT_NAMES = ["patient_id", "event_type", "occurred_at", "value", "detail"]


@dataclass(frozen=True)
class Feeds:
    root: Path
    rows: int
    patients: int
    history_labs: Path
    history_events: Path
    night_dir: Path
    night: date
    meta: dict


def _days(day_numbers: np.ndarray) -> np.ndarray:
    """Day numbers (0 = first history day) -> datetime64[D]."""
    first = np.datetime64(LAST_HISTORY_DAY) - np.timedelta64(SPAN_DAYS - 1, "D")
    return first + day_numbers.astype("timedelta64[D]")


def _timestamps(days: np.ndarray, minutes: np.ndarray) -> pa.Array:
    stamps = _days(days).astype("datetime64[m]") + minutes.astype("timedelta64[m]")
    return pc.strftime(pa.array(stamps.astype("datetime64[s]")), format="%Y-%m-%dT%H:%M:%S")


def _fmt(values: np.ndarray, digits: int) -> pa.Array:
    rounded = np.round(values, digits)
    return pc.cast(pa.array(rounded), pa.string())


def _write(path: Path, table: pa.Table, first: bool) -> None:
    options = pacsv.WriteOptions(include_header=first, quoting_style="none")
    with path.open("wb" if first else "ab") as handle:
        pacsv.write_csv(table, handle, write_options=options)


def _patients(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    ids = np.asarray(pc.utf8_lpad(pc.cast(pa.array(np.arange(1, n + 1)), pa.string()), 8, "0").to_pylist(),
                     dtype=object)   # MRNs with leading zeros
    return {
        "id": ids,
        "birth": (np.datetime64("1935-01-01") + rng.integers(0, 40 * 365, n).astype("timedelta64[D]")),
        "female": rng.random(n) < 0.45,
        "weight": np.clip(rng.normal(76, 14, n), 40, 160),
        "scr": np.exp(rng.normal(np.log(0.95), 0.25, n)),
        "scr_trend": np.where(rng.random(n) < 0.1, rng.uniform(0.1, 0.6, n), 0.0),   # mg/dL a year
        "alp": np.clip(rng.normal(95, 30, n), 35, None) * np.where(rng.random(n) < 0.15, 2.0, 1.0),
        "ca": rng.normal(9.4, 0.35, n),
        "agent": rng.choice(np.array(["zoledronic_acid", "pamidronate", ""]), n, p=[0.65, 0.07, 0.28]),
        "bortezomib": rng.random(n) < 0.6,
        "si": rng.random(n) < 0.1,          # this patient's lab sends SI units
    }


def _visits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(patient index, day number) of every visit, about monthly."""
    counts = rng.integers(20, 47, n)
    gaps = rng.integers(26, 37, counts.sum())
    patient = np.repeat(np.arange(n), counts)
    offsets = np.cumsum(gaps) - gaps
    group_start = np.repeat(np.cumsum(counts) - counts, counts)
    within = offsets - offsets[group_start]
    span = within[np.cumsum(counts) - 1]   # last visit offset of each patient
    start = (rng.random(n) * np.maximum(SPAN_DAYS - 1 - span, 0)).astype(np.int64)
    day = start[patient] + within
    return patient, np.minimum(day, SPAN_DAYS - 1)


def _lab_rows(rng: np.random.Generator, p: dict, patient: np.ndarray, day: np.ndarray,
              first_result: int) -> pa.Table:
    """Three results (creatinine, ALP, calcium) per visit, in collection order."""
    n = len(patient)
    patient = np.repeat(patient, 3)
    day = np.repeat(day, 3)
    kind = np.tile(np.arange(3), n)
    minutes = np.repeat(rng.integers(7 * 60, 12 * 60, n), 3)
    years = day / 365.0
    noise = rng.normal(1.0, 0.05, 3 * n)
    si = p["si"][patient]
    scr = (p["scr"][patient] + p["scr_trend"][patient] * years) * noise
    alp = p["alp"][patient] * rng.normal(1.0, 0.08, 3 * n)
    ca = p["ca"][patient] + rng.normal(0, 0.2, 3 * n)
    value = np.select([kind == 0, kind == 1], [np.where(si, scr * 88.4, scr), np.where(si, alp / 60, alp)],
                      np.where(si, ca / 4.008, ca))
    digits = np.select([kind == 0, kind == 1], [np.where(si, 0, 2), np.where(si, 2, 0)], np.where(si, 2, 1))
    loinc = np.select([kind == 0, kind == 1], [np.where(si, "14682-9", "2160-0"), np.full(3 * n, "6768-6")],
                      np.where(si, "2000-8", "17861-6"))
    unit = np.select([kind == 0, kind == 1], [np.where(si, "umol/L", "mg/dL"), np.where(si, "ukat/L", "U/L")],
                     np.where(si, "mmol/L", "mg/dL"))
    order = np.lexsort((kind, minutes, day))   # collection order
    patient, day, kind, minutes = patient[order], day[order], kind[order], minutes[order]
    value, digits, loinc, unit = value[order], digits[order], loinc[order], unit[order]
    text = pc.if_else(pa.array(digits == 0), _fmt(value, 0),
                      pc.if_else(pa.array(digits == 1), _fmt(value, 1), _fmt(value, 2)))
    roll = rng.random(len(value))
    status = np.where(roll < 0.005, "preliminary", np.where(roll < 0.01, "corrected", "final"))
    text = pc.if_else(pa.array(roll > 0.9995), "n/a", text)          # unparseable value
    loinc = np.where((roll > 0.9992) & (roll <= 0.9995), "9999-9", loinc)   # unknown code
    ids = pc.binary_join_element_wise(
        "R", pc.utf8_lpad(pc.cast(pa.array(np.arange(first_result, first_result + len(value))), pa.string()), 10, "0"), "")
    return pa.table({
        "patient_id": pa.array(p["id"][patient]),
        "result_id": ids,
        "loinc": pa.array(loinc),
        "value": text,
        "unit": pa.array(unit),
        "collected_at": _timestamps(day, minutes),
        "status": pa.array(status),
    })


def _event_rows(rng: np.random.Generator, p: dict, patient: np.ndarray, day: np.ndarray,
                first_visit: np.ndarray | None) -> pa.Table:
    """Demographics at the first visit; weights every third visit; doses; responses."""
    n_visits = len(patient)
    seq = np.arange(n_visits) - np.searchsorted(patient, patient)  # visit number within patient
    parts: list[dict] = []

    def add(mask, event_type, value, detail=None):
        idx = np.flatnonzero(mask)
        parts.append({"patient": patient[idx], "day": day[idx], "event_type": np.full(len(idx), event_type),
                      "value": np.asarray(value)[idx] if np.ndim(value) else np.full(len(idx), value),
                      "detail": np.asarray(detail)[idx] if detail is not None and np.ndim(detail)
                      else np.full(len(idx), detail or "")})

    first = seq == 0 if first_visit is None else first_visit
    birth = np.datetime_as_string(p["birth"][patient], unit="D")
    add(first, "birth_date", birth)
    add(first, "sex", np.where(p["female"][patient], "F", "M"))
    add(first, "diagnosis", "MM", "C90.00")
    add(first, "myeloma_therapy_start", np.where(p["bortezomib"][patient], "bortezomib", "lenalidomide"))
    weight = np.round(p["weight"][patient] + rng.normal(0, 1.5, n_visits), 1).astype(str)
    add(seq % 3 == 0, "weight_kg", weight)
    agent = p["agent"][patient]
    dosing = (agent != "") & ((seq < 12) | (seq % 3 == 0))
    dose = np.where(agent == "pamidronate", "90", rng.choice(np.array(["4.0", "4.0", "4.0", "3.5", "3.3"]), n_visits))
    add(dosing, "bisphosphonate_dose", agent, dose)
    add((seq % 6 == 5), "response", rng.choice(np.array(["CR", "VGPR", "PR", "SD", "PD"]), n_visits))
    cols = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    minutes = rng.integers(9 * 60, 17 * 60, len(cols["day"]))
    order = np.lexsort((minutes, cols["day"]))
    return pa.table({
        "patient_id": pa.array(p["id"][cols["patient"][order]]),
        "event_type": pa.array(cols["event_type"][order]),
        "occurred_at": _timestamps(cols["day"][order], minutes[order]),
        "value": pa.array(cols["value"][order].astype(str)),
        "detail": pa.array(cols["detail"][order].astype(str)),
    })


def generate(out: Path, rows: int, seed: int = SEED) -> Feeds:
    """Write (or reuse) the feeds for `rows` backfill lab rows under out/<rows>/."""
    root = out / str(rows)
    stamp = root / "feeds.json"
    meta_wanted = {"version": VERSION, "rows": rows, "seed": seed}
    if stamp.exists():
        meta = json.loads(stamp.read_text())
        if {k: meta.get(k) for k in meta_wanted} == meta_wanted:
            return _feeds(root, meta)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = max(10, rows // (ROWS_PER_PATIENT - 4))   # a few spare visits, cut at exactly `rows`
    p = _patients(rng, n)
    patient, day = _visits(rng, n)
    order = np.lexsort((patient, day))
    patient, day = patient[order], day[order]
    labs_path, events_path = root / "history.csv", root / "history.events.csv"
    # labs: visits in time order, three rows each, cut at exactly `rows`
    n_visits = min(len(patient), -(-rows // 3))
    written = 0
    for start in range(0, n_visits, PIECE // 3):
        stop = min(start + PIECE // 3, n_visits)
        table = _lab_rows(rng, p, patient[start:stop], day[start:stop], first_result=1 + 3 * start)
        table = table.slice(0, max(0, min(len(table), rows - written)))
        _write(labs_path, table, first=start == 0)
        written += len(table)
    # events of the visits that made it into the history, grouped per patient for visit numbering
    by_patient = np.lexsort((day[:n_visits], patient[:n_visits]))
    events = _event_rows(rng, p, patient[:n_visits][by_patient], day[:n_visits][by_patient], None)
    _write(events_path, events, first=True)
    # the night: a panel for a third of the patients (1 % of the backfill's rows)
    night_rows = max(300, rows // 100)
    night_patients = np.sort(rng.choice(n, size=min(n, night_rows // 3), replace=False))
    night_day = np.full(len(night_patients), SPAN_DAYS)  # the day after the history
    night_dir = root / "inbox" / NIGHT.isoformat()
    night_dir.mkdir(parents=True, exist_ok=True)
    night_labs = _lab_rows(rng, p, night_patients, night_day, first_result=10 * rows + 1)
    _write(night_dir / "labs.csv", night_labs, first=True)
    night_events = _event_rows(rng, p, night_patients, night_day, np.zeros(len(night_patients), bool))
    _write(night_dir / "night.events.csv", night_events, first=True)
    meta = {**meta_wanted, "patients": int(n), "history_rows": int(written), "history_events": len(events),
            "night_rows": len(night_labs), "night_events": len(night_events), "night": NIGHT.isoformat(),
            "night_patients": len(night_patients),
            "history_bytes": labs_path.stat().st_size}
    stamp.write_text(json.dumps(meta, indent=1))
    return _feeds(root, meta)


def _feeds(root: Path, meta: dict) -> Feeds:
    return Feeds(root, meta["history_rows"], meta["patients"], root / "history.csv", root / "history.events.csv",
                 root / "inbox" / meta["night"], date.fromisoformat(meta["night"]), meta)


if __name__ == "__main__":  # python -m bench.generate ROWS
    import sys
    import time

    t = time.perf_counter()
    feeds = generate(Path(__file__).parent / "out", int(float(sys.argv[1])))
    print(feeds.meta, f"{time.perf_counter() - t:.1f}s")


FORMAT_FILES = {"hl7": "history.hl7", "fhir": "history.bundle.json", "ndjson": "ndjson"}


def other_formats(feeds: Feeds, formats=("hl7", "fhir", "ndjson")) -> dict[str, Path]:
    """The backfill's lab CSV written again as HL7 v2 ORU, a FHIR Bundle and FHIR NDJSON, with the
    package's own writers (the ones the synthetic cohort uses); written once, reused after."""
    from bonewatch.ingest import fhir, hl7

    folder = feeds.root / "formats"
    folder.mkdir(exist_ok=True)
    paths = {fmt: folder / FORMAT_FILES[fmt] for fmt in formats}
    missing = [fmt for fmt, path in paths.items() if not path.exists()]
    if not missing:
        return paths
    table = pacsv.read_csv(feeds.history_labs, convert_options=pacsv.ConvertOptions(
        column_types={name: pa.string() for name in LAB_NAMES}))
    rows = list(zip(*(table.column(name).to_pylist() for name in LAB_NAMES), strict=True))
    events = pacsv.read_csv(feeds.history_events, convert_options=pacsv.ConvertOptions(
        column_types={name: pa.string() for name in EVENT_NAMES}))
    # the patients' demographics: FHIR names patients by reference, resolved through Patient resources
    demographics = events.filter(pc.is_in(events.column("event_type"), pa.array(["birth_date", "sex"])))
    facts = list(zip(*(demographics.column(name).to_pylist() for name in EVENT_NAMES), strict=True))
    for fmt in missing:
        if fmt == "hl7":
            hl7.write_hl7(paths[fmt], rows)
        elif fmt == "fhir":
            fhir.write_bundle(paths[fmt], rows, facts)
        else:
            paths[fmt].mkdir(exist_ok=True)
            fhir.write_ndjson(paths[fmt], rows, facts)
    return paths
