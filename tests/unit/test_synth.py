"""The synthetic cohort generator: layout, determinism, and that its ground truth is consistent.

The consistency tests read the written files back and re-derive, with small independent oracles
for every rule of SPEC 5 (the generator's own CrCl/band/month helpers, never `bonewatch.rules`),
which findings the data supports, night by night where a finding can come and go; they must equal
`expected_alerts.jsonl` exactly, so the data give no rule an unplanted reason to fire. Where SPEC
could be read two ways, the oracles check that both readings agree on the planted data.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from bonewatch.synth import (
    COVERING,
    EVENT_HEADER,
    LAB_HEADER,
    SCENARIOS,
    add_months,
    age_on,
    crcl,
    generate,
    zoledronic_dose,
)

LAST = date(2025, 6, 30)
UNITS = {
    "2160-0": {"mg/dL"}, "14682-9": {"umol/L"}, "6768-6": {"U/L", "ukat/L"},
    "17861-6": {"mg/dL"}, "1751-7": {"g/dL"}, "2324-2": {"U/L"}, "29463-7": {"kg"},
    "14959-1": {"mg/g"},
}
SPOT_CODES = {"14957-5", "2862-1", "14959-1"}
BISPHOSPHONATES = {"zoledronic_acid", "pamidronate"}
ALERTING = {
    "renal_hold_at_threshold": {"RENAL_HOLD"},
    "renal_hold_abnormal_baseline": {"RENAL_HOLD"},
    "renal_resume": {"RENAL_HOLD", "RENAL_RESUME"},
    "renal_resume_near_miss": {"RENAL_HOLD"},
    "dose_band_change": {"DOSE_BAND"},
    "dose_band_first_dose": {"DOSE_BAND"},
    "alp_rise_bortezomib": {"ALP_RISE_BORTEZOMIB"},
    "review_1y": {"REVIEW_1Y"},
    "review_2y": {"REVIEW_1Y", "REVIEW_2Y"},
    "pre_dose_scr_missing": {"PRE_DOSE_SCR_MISSING"},
    "alp_elevated_start": {"ALP_ELEVATED_START"},
    "alp_monitor_due_3m": {"ALP_MONITOR_DUE"},
    "alp_monitor_due_6m": {"ALP_MONITOR_DUE"},
    "alp_nonbone_cause": {"ALP_NONBONE_CAUSE"},
    "alp_nonbone_cause_7_days": {"ALP_NONBONE_CAUSE"},
    "hypocalcemia": {"HYPOCALCEMIA"},
    "hypocalcemia_uncorrected": {"HYPOCALCEMIA"},
    "hypocalcemia_albumin_tie": {"HYPOCALCEMIA"},
    "hypocalcemia_denosumab": {"HYPOCALCEMIA"},
    "mgus_on_bisphosphonate": {"MGUS_ON_BISPHOSPHONATE"},
    "smm_on_bisphosphonate": {"MGUS_ON_BISPHOSPHONATE"},
    "dental_exam_missing": {"DENTAL_EXAM_MISSING"},
    "dental_exam_missing_denosumab": {"DENTAL_EXAM_MISSING"},
    "dental_exam_missing_new_course": {"DENTAL_EXAM_MISSING"},
    "albuminuria": {"ALBUMINURIA"},
    "urine_albumin_due": {"URINE_ALBUMIN_DUE"},
    "urine_albumin_due_new_course": {"URINE_ALBUMIN_DUE"},
}
ALL_RULES = {
    "RENAL_HOLD", "RENAL_RESUME", "DOSE_BAND", "PRE_DOSE_SCR_MISSING", "ALP_ELEVATED_START",
    "ALP_RISE_BORTEZOMIB", "ALP_MONITOR_DUE", "ALP_NONBONE_CAUSE", "HYPOCALCEMIA", "REVIEW_1Y",
    "REVIEW_2Y", "MGUS_ON_BISPHOSPHONATE", "DENTAL_EXAM_MISSING", "ALBUMINURIA",
    "URINE_ALBUMIN_DUE",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate(out, patients=60, seed=7, last_night=LAST, nights=30)
    return out


@pytest.fixture(scope="module")
def long_cohort(tmp_path_factory) -> Path:
    """A year of nights: background courses start inside the window, reviews must still be exact."""
    out = tmp_path_factory.mktemp("long")
    generate(out, patients=120, seed=3, last_night=LAST, nights=365)
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _window(manifest: dict) -> tuple[date, date]:
    return date.fromisoformat(manifest["first_night"]), date.fromisoformat(manifest["last_night"])


def _expected(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "expected_alerts.jsonl").read_text().splitlines()]


def _rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _lab_files(out: Path) -> list[Path]:
    return [out / "history" / "labs.csv", *sorted((out / "inbox").glob("*/labs.csv"))]


def _event_files(out: Path) -> list[Path]:
    return [out / "history" / "events.csv", *sorted((out / "inbox").glob("*/events.csv"))]


def _is_bad(row: dict) -> bool:
    """A lab row the ingest must quarantine: unknown code, non-number, impossible date, bad unit."""
    if row["loinc"] not in UNITS or row["unit"] not in UNITS[row["loinc"]]:
        return True
    try:
        float(row["value"])
        datetime.fromisoformat(row["collected_at"])
    except ValueError:
        return True
    return False


# --- a chart per patient, read back from the files ------------------------------------------------

@dataclass
class Chart:
    sex: str = ""
    birth: date | None = None
    diagnoses: list[tuple[date, str]] = field(default_factory=list)
    weights: list[tuple[date, float]] = field(default_factory=list)
    scr: list[tuple[str, date, float]] = field(default_factory=list)   # (collected_at, day, mg/dL)
    alp: list[tuple[str, date, float]] = field(default_factory=list)   # U/L
    ggt: list[tuple[date, float]] = field(default_factory=list)
    ca: list[tuple[datetime, date, float]] = field(default_factory=list)   # mg/dL
    alb: list[tuple[datetime, date, float]] = field(default_factory=list)  # g/dL
    doses: list[tuple[date, str, float]] = field(default_factory=list)
    therapy: list[tuple[date, str]] = field(default_factory=list)
    dental: list[date] = field(default_factory=list)
    urine: list[tuple[date, float]] = field(default_factory=list)        # 24-h events, mg
    spot: list[date] = field(default_factory=list)                      # spot urine albumin labs
    courses: dict[str, list[list[tuple[date, str, float]]]] = field(default_factory=dict)

    def weight_before(self, day: date) -> float:
        known = [kg for d, kg in sorted(self.weights) if day - timedelta(days=90) <= d <= day]
        assert known, f"no weight in the 90 days before {day}"
        return known[-1]

    def clearance(self, day: date, scr: float) -> float:
        return crcl(age_on(self.birth, day), self.weight_before(day), scr, self.sex)

    def on(self, cls: str, night: date) -> date | None:
        """Start of the course of `cls` active or held on `night` (SPEC 10), else None."""
        for course in self.courses[cls]:
            given = [d for d, _, _ in course if d <= night]
            if given and (night - given[-1]).days <= 180:
                return course[0][0]
        return None


def _cls(agent: str) -> str:
    return "bisphosphonate" if agent in BISPHOSPHONATES else "denosumab"


def _day(text: str) -> date:
    return date.fromisoformat(text[:10])


def _charts(out: Path) -> dict[str, Chart]:
    charts: dict[str, Chart] = defaultdict(Chart)
    for path in _event_files(out):
        for row in _rows(path):
            chart, kind, value = charts[row["patient_id"]], row["event_type"], row["value"]
            day = _day(row["occurred_at"])
            if kind == "sex":
                chart.sex = value
            elif kind == "birth_date":
                chart.birth = date.fromisoformat(value)
            elif kind == "diagnosis":
                chart.diagnoses.append((day, value))
            elif kind == "weight_kg":
                chart.weights.append((day, float(value)))
            elif kind == "bisphosphonate_dose":
                chart.doses.append((day, value, float(row["detail"])))
            elif kind == "myeloma_therapy_start":
                chart.therapy.append((day, value))
            elif kind == "dental_exam":
                chart.dental.append(day)
            elif kind == "albuminuria_mg_24h":
                chart.urine.append((day, float(value)))
    for path in _lab_files(out):
        for row in _rows(path):
            if _is_bad(row):
                continue
            chart, code, value = charts[row["patient_id"]], row["loinc"], float(row["value"])
            at, day = row["collected_at"][:19], _day(row["collected_at"])
            if code == "2160-0":
                chart.scr.append((at, day, value))
            elif code == "14682-9":
                chart.scr.append((at, day, value / 88.4))
            elif code == "6768-6":
                chart.alp.append((at, day, value * 60 if row["unit"] == "ukat/L" else value))
            elif code == "2324-2":
                chart.ggt.append((day, value))
            elif code == "17861-6":
                chart.ca.append((datetime.fromisoformat(at), day, value))
            elif code == "1751-7":
                chart.alb.append((datetime.fromisoformat(at), day, value))
            elif code == "29463-7":
                chart.weights.append((day, value))
            elif code in SPOT_CODES:
                chart.spot.append(day)
    for chart in charts.values():
        for values in (chart.scr, chart.alp, chart.ggt, chart.ca, chart.alb, chart.doses,
                       chart.urine, chart.spot, chart.diagnoses):
            values.sort()
        for cls in ("bisphosphonate", "denosumab"):
            # A dose with no same-class dose in the 180 days before it starts a course (SPEC 10).
            courses: list[list] = []
            for dose in (d for d in chart.doses if _cls(d[1]) == cls):
                if courses and (dose[0] - courses[-1][-1][0]).days <= 180:
                    courses[-1].append(dose)
                else:
                    courses.append([dose])
            chart.courses[cls] = courses
    return dict(charts)


# --- small oracles for every rule (SPEC 4, 5, 10; the readings in synth's "Semantics" block) ------
# Each returns (rule, the day the finding first holds); `_oracle` raises it on max(day, first
# night). The state rules at the end are evaluated night by night instead.

Held = list[tuple[date, date | None]]


def _renal(chart: Chart) -> tuple[list[tuple[str, date]], Held]:
    """RENAL_HOLD / RENAL_RESUME findings and the held spans, per bisphosphonate course."""
    found, spans = [], []
    for course in chart.courses["bisphosphonate"]:
        start, lapse = course[0][0], course[-1][0] + timedelta(days=180)
        window = [s for s in chart.scr if start - timedelta(days=30) <= s[1] <= start]
        assert window, "every course has a renal baseline"
        base_at, _, base = window[-1]
        rise = 1.0 if round(base, 2) >= 1.4 else 0.5
        held_since = None
        for at, day, value in chart.scr:
            if at <= base_at or day > lapse:
                continue
            if held_since is None and round(value - base, 2) >= rise:
                found.append(("RENAL_HOLD", day))
                held_since = day
            elif held_since is not None and value <= 1.10 * base:
                found.append(("RENAL_RESUME", day))
                spans.append((held_since, day))
                held_since = None
        if held_since is not None:
            spans.append((held_since, None))
    return found, spans


def _albuminuria(chart: Chart) -> tuple[list[tuple[str, date]], Held]:
    """ALBUMINURIA: a 24-h urine albumin > 500 mg on zoledronic acid or pamidronate; the hold
    lasts until a later result <= 500."""
    found, spans, held_since = [], [], None
    for day, value in chart.urine:
        if held_since is None and value > 500 and chart.on("bisphosphonate", day):
            found.append(("ALBUMINURIA", day))
            held_since = day
        elif held_since is not None and value <= 500:
            spans.append((held_since, day))
            held_since = None
    if held_since is not None:
        spans.append((held_since, None))
    return found, spans


def _band(mg: float) -> float | None:
    """The band a given dose belongs to (within 0.05 mg of a band's dose)."""
    return next((b for b in (4.0, 3.5, 3.3, 3.0) if abs(mg - b) <= 0.05 + 1e-9), None)


def _dose_band(chart: Chart, spans: Held) -> list[tuple[str, date]]:
    """DOSE_BAND episodes: on an active zoledronic course, latest CrCl band != last dose band."""
    doses = [d for d in chart.doses if d[1] in BISPHOSPHONATES]
    if not any(agent == "zoledronic_acid" for _, agent, _ in doses):
        return []
    # A dose sorts after a same-day SCr ("T99" > any clock time).
    timeline = sorted([(day.isoformat() + "T99", "dose", day, mg, agent) for day, agent, mg in doses]
                      + [(at, "scr", day, v, "") for at, day, v in chart.scr])
    found, latest, last_dose, open_episode = [], None, None, False
    for _, kind, day, value, agent in timeline:
        if kind == "scr":
            latest = chart.clearance(day, value)
        else:
            last_dose = value if agent == "zoledronic_acid" else None
        held = any(start <= day and (end is None or day < end) for start, end in spans)
        if last_dose is None or latest is None or held or not chart.on("bisphosphonate", day):
            continue
        differs = zoledronic_dose(latest) != _band(last_dose)
        if differs and not open_episode:
            found.append(("DOSE_BAND", day))
        open_episode = differs
    return found


def _alp_baseline(chart: Chart, start: date) -> tuple[str, float] | None:
    """The last ALP on or before therapy start, within 30 days (SPEC 4)."""
    before = [(at, v) for at, d, v in chart.alp if start - timedelta(days=30) <= d <= start]
    return before[-1] if before else None


def _alp_rise(chart: Chart) -> list[tuple[str, date]]:
    found = []
    for start, regimen in chart.therapy:
        baseline = _alp_baseline(chart, start)
        if regimen != "bortezomib" or baseline is None:
            continue
        base_at, base = baseline
        for at, day, value in chart.alp:
            rise = round((value / base - 1) * 100, 1)
            if at > base_at and day <= start + timedelta(days=42) and rise >= 25.0:
                found.append(("ALP_RISE_BORTEZOMIB", day))
                break
    return found


def _alp_elevated(chart: Chart) -> list[tuple[str, date]]:
    """ALP_ELEVATED_START and ALP_MONITOR_DUE, for a baseline ALP above 130 U/L."""
    found = []
    given = [d for d, agent, _ in chart.doses if agent in BISPHOSPHONATES]
    for start, _ in chart.therapy:
        baseline = _alp_baseline(chart, start)
        if baseline is None or baseline[1] <= 130:
            continue
        active = any(start - timedelta(days=180) <= d <= start for d in given)
        started = any(start < d <= start + timedelta(days=30) for d in given)
        if not active and not started:
            found.append(("ALP_ELEVATED_START", start + timedelta(days=31)))
        for months in (3, 6):
            due = add_months(start, months)
            if not any(abs((d - due).days) <= 14 for _, d, _ in chart.alp):
                found.append(("ALP_MONITOR_DUE", due + timedelta(days=15)))
    return found


def _reviews(chart: Chart, first_night: date, last_night: date) -> list[tuple[str, date]]:
    """REVIEW_1Y from 12 months of a running bisphosphonate course until 24; REVIEW_2Y after."""
    found = []
    for course in chart.courses["bisphosphonate"]:
        start, lapse = course[0][0], course[-1][0] + timedelta(days=180)
        one, two = add_months(start, 12), add_months(start, 24)
        for rule, due, until in (("REVIEW_1Y", one, two), ("REVIEW_2Y", two, None)):
            night = max(due, first_night)
            if night <= min(last_night, lapse) and (until is None or night < until):
                found.append((rule, due))
    return found


def _pre_dose(chart: Chart) -> list[tuple[str, date]]:
    return [("PRE_DOSE_SCR_MISSING", day) for day, agent, _ in chart.doses
            if agent in BISPHOSPHONATES
            and not any(day - timedelta(days=7) <= d <= day for _, d, _ in chart.scr)]


def _dental(chart: Chart) -> list[tuple[str, date]]:
    found = []
    for courses in chart.courses.values():
        for course in courses:
            day = course[0][0]
            seen = any(add_months(day, -6) <= exam <= day for exam in chart.dental)
            # The other way of counting 6 months gives the same answer on the planted data.
            assert seen == any(exam <= day <= add_months(exam, 6) for exam in chart.dental), day
            if not seen:
                found.append(("DENTAL_EXAM_MISSING", day))
    return found


def _mgus(chart: Chart) -> list[tuple[str, date]]:
    recorded = [d for d, value in chart.diagnoses if value in ("MGUS", "SMM")]
    given = [d for d, agent, _ in chart.doses if agent in BISPHOSPHONATES]
    if not recorded or not given:
        return []
    day = max(recorded[0], given[0])
    if any(value in ("MM", "osteoporosis") and d <= day for d, value in chart.diagnoses):
        return []
    return [("MGUS_ON_BISPHOSPHONATE", day)]


def _hypocalcemia(chart: Chart, night: date) -> bool:
    if not (chart.on("bisphosphonate", night) or chart.on("denosumab", night)):
        return False
    calcium = [c for c in chart.ca if c[1] <= night]
    if not calcium:
        return False
    at, day, value = calcium[-1]
    known = [a for a in chart.alb if a[1] <= night]
    # Nearest within 2 days, the later on a tie: by the clock and by calendar days alike.
    by_clock = [(abs(a[0] - at), -a[0].timestamp(), a[2]) for a in known
                if abs(a[0] - at) <= timedelta(days=2)]
    by_day = [(abs((a[1] - day).days), -a[0].timestamp(), a[2]) for a in known
              if abs((a[1] - day).days) <= 2]
    albumin = min(by_clock)[2] if by_clock else None
    assert albumin == (min(by_day)[2] if by_day else None), (day, night)
    if albumin is not None:
        value = round(value + 0.8 * (4.0 - albumin) + 1e-9, 2)
    return value < 8.5


def _alp_nonbone(chart: Chart, night: date) -> bool:
    alp = [a for a in chart.alp if a[1] <= night]
    if not alp or (night - alp[-1][1]).days > 30 or alp[-1][2] <= 130:
        return False
    day = alp[-1][1]
    near = sorted((abs((d - day).days), v) for d, v in chart.ggt
                  if d <= night and abs((d - day).days) <= 7)
    high = any(v > 55 for _, v in near)
    assert high == bool(near and near[0][1] > 55), (day, night)  # "nearest GGT" agrees
    return high


def _urine_due(chart: Chart, night: date) -> bool:
    start = chart.on("bisphosphonate", night)
    if start is None:
        return False
    results = [d for d, _ in chart.urine if d <= night] + [d for d in chart.spot if d <= night]
    due = (add_months(start, 6) <= night
           and not any(d >= add_months(night, -6) for d in results))
    # Counting the 6 months forward from the course start and the results gives the same.
    assert due == (start <= add_months(night, -6)
                   and not any(add_months(d, 6) >= night for d in results)), night
    return due


STATE_RULES = (("HYPOCALCEMIA", _hypocalcemia), ("ALP_NONBONE_CAUSE", _alp_nonbone),
               ("URINE_ALBUMIN_DUE", _urine_due))


def _oracle(out: Path) -> set[tuple[str, str, str]]:
    manifest = _manifest(out)
    first, last = _window(manifest)
    nights = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    alerts = set()
    for pid, chart in _charts(out).items():
        renal, renal_holds = _renal(chart)
        albuminuria, albuminuria_holds = _albuminuria(chart)
        findings = (renal + albuminuria + _dose_band(chart, renal_holds + albuminuria_holds)
                    + _alp_rise(chart) + _alp_elevated(chart) + _reviews(chart, first, last)
                    + _pre_dose(chart) + _dental(chart) + _mgus(chart))
        for rule, day in findings:
            if day <= last:
                alerts.add((pid, rule, max(day, first).isoformat()))
        for rule, holds in STATE_RULES:
            before = False   # a new episode starts each time the condition begins to hold
            for night in nights:
                now = holds(chart, night)
                if now and not before:
                    alerts.add((pid, rule, night.isoformat()))
                before = now
    return alerts


# --- tests ----------------------------------------------------------------------------------------

def test_clinical_helpers():
    assert crcl(70, 70, 1.00, "M") == 68.1
    assert crcl(70, 70, 1.20, "M") == 56.7
    assert crcl(70, 70, 1.13, "M") == 60.2
    assert crcl(65, 60, 1.39, "M") == 45.0
    assert crcl(70, 70, 1.00, "F") == round(4900 / 72 * 0.85, 1)
    assert [zoledronic_dose(c) for c in (60.1, 60.0, 50.0, 49.9, 40.0, 39.9, 30.0, 29.9)] == [
        4.0, 3.5, 3.5, 3.3, 3.3, 3.0, 3.0, None]
    assert add_months(date(2024, 8, 31), 6) == date(2025, 2, 28)
    assert add_months(date(2024, 1, 15), 12) == date(2025, 1, 15)
    assert add_months(date(2025, 6, 15), -24) == date(2023, 6, 15)
    assert age_on(date(1955, 7, 1), date(2025, 6, 30)) == 69
    assert age_on(date(1955, 6, 30), date(2025, 6, 30)) == 70


def test_too_few_nights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nights"):
        generate(tmp_path, patients=5, nights=10)


def test_same_inputs_give_byte_identical_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert generate(a, patients=40, seed=11) == generate(b, patients=40, seed=11)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    # Another seed gives another cohort, with the planted findings on other nights.
    c = tmp_path / "c"
    generate(c, patients=40, seed=12)
    assert (c / "history" / "labs.csv").read_bytes() != (a / "history" / "labs.csv").read_bytes()
    nights = {seed: {(e["scenario"], e["rule"], e["raised_on"]) for e in _expected(out)}
              for seed, out in ((11, a), (12, c))}
    assert nights[11] != nights[12]


def test_rerun_into_the_same_folder_leaves_no_stale_nights(tmp_path):
    generate(tmp_path, patients=20, nights=40)
    generate(tmp_path, patients=20, nights=20)
    nights = sorted(p.name for p in (tmp_path / "inbox").iterdir())
    assert nights[0] >= (LAST - timedelta(days=19)).isoformat()


def test_layout_headers_and_days(cohort):
    manifest = _manifest(cohort)
    first, last = _window(manifest)
    assert (first, last, manifest["nights"]) == (date(2025, 6, 1), LAST, 30)
    assert set(manifest) == {"seed", "format", "patients", "first_night", "last_night", "nights",
                             "scenarios", "bad_rows", "patient_scenarios"}
    assert sum(manifest["scenarios"].values()) == manifest["patients"] == 60
    by_patient = manifest["patient_scenarios"]
    assert list(by_patient) == sorted(by_patient) and len(by_patient) == 60
    assert {name: list(by_patient.values()).count(name) for name in SCENARIOS} == \
        manifest["scenarios"]
    assert all(by_patient[a["patient_id"]] == a["scenario"] for a in _expected(cohort))
    for path in _lab_files(cohort):
        assert path.read_text().splitlines()[0] == ",".join(LAB_HEADER)
    for path in _event_files(cohort):
        assert path.read_text().splitlines()[0] == ",".join(EVENT_HEADER)
    for path in (cohort / "history" / "labs.csv", cohort / "history" / "events.csv"):
        column = "collected_at" if path.name == "labs.csv" else "occurred_at"
        assert all(_day(r[column]) < first for r in _rows(path))
    nights = sorted((cohort / "inbox").iterdir())
    assert len(nights) >= 25
    for folder in nights:
        night = date.fromisoformat(folder.name)
        assert first <= night <= last
        files = {p.name for p in folder.iterdir()}
        # both feeds send every night, header only when they have nothing: a night without the
        # labs file would be "labs missing" (red) on the data-quality email
        assert files == {"labs.csv", "events.csv"}
        assert any(_rows(folder / name) for name in files), "a night is written only when it has rows"
        for name in files:
            for row in _rows(folder / name):
                if name == "labs.csv" and not _is_bad(row):
                    assert _day(row["collected_at"]) == night
                if name == "events.csv":
                    assert _day(row["occurred_at"]) == night
    ids = [r["result_id"] for p in _lab_files(cohort) for r in _rows(p)]
    assert len(ids) == len(set(ids))
    header_only = [folder.name for folder in nights for name in ("labs.csv", "events.csv")
                   if not _rows(folder / name)]
    assert header_only, "the cohort has nights where one feed had nothing to send"


def test_patient_ids_keep_leading_zeros(cohort):
    labs = pd.concat([pd.read_csv(p, dtype=str) for p in _lab_files(cohort)])
    events = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False)
                        for p in _event_files(cohort)])
    ids = set(events["patient_id"])
    assert len(ids) == 60
    assert all(len(i) == 9 and i.isdigit() for i in ids)
    assert all(i.startswith("0") for i in ids)
    assert set(labs["patient_id"]) <= ids


def test_expected_alerts_are_sorted_and_inside_the_window(cohort, long_cohort):
    for out in (cohort, long_cohort):
        manifest = _manifest(out)
        first, last = _window(manifest)
        alerts = _expected(out)
        assert alerts
        keys = [(a["raised_on"], a["patient_id"], a["rule"]) for a in alerts]
        assert keys == sorted(keys)
        for alert in alerts:
            assert set(alert) == {"patient_id", "rule", "raised_on", "scenario"}
            raised = date.fromisoformat(alert["raised_on"])
            assert first <= raised <= last
            if raised == first:  # only a condition that began before the window is raised there
                assert alert["rule"] == "REVIEW_1Y" and alert["scenario"] == "review_2y"
            else:
                assert first + timedelta(days=2) <= raised <= last - timedelta(days=2)


def test_every_scenario_is_planted_at_60_patients(cohort, long_cohort):
    counts = _manifest(cohort)["scenarios"]
    assert list(counts) == list(SCENARIOS)
    assert all(counts[name] >= 1 for name in SCENARIOS)
    for out in (cohort, long_cohort):
        rules_by_scenario = defaultdict(set)
        for alert in _expected(out):
            rules_by_scenario[alert["scenario"]].add(alert["rule"])
        assert dict(rules_by_scenario) == ALERTING
    assert set().union(*ALERTING.values()) == ALL_RULES


def test_every_rule_is_planted_by_a_small_cohort(tmp_path):
    generate(tmp_path, patients=len(COVERING), nights=14)
    assert {a["rule"] for a in _expected(tmp_path)} == ALL_RULES


def test_small_cohort_takes_a_prefix_of_planted_scenarios(tmp_path):
    counts = generate(tmp_path, patients=5)["scenarios"]
    assert sum(counts.values()) == 5
    assert counts["background"] == 0 and max(counts.values()) == 1


def test_bad_rows_are_counted_and_only_in_nightly_files(cohort):
    assert not [r for r in _rows(cohort / "history" / "labs.csv") if _is_bad(r)]
    nightly = [r for p in sorted((cohort / "inbox").glob("*/labs.csv")) for r in _rows(p)]
    bad = [r for r in nightly if _is_bad(r)]
    assert len(bad) == _manifest(cohort)["bad_rows"] >= 4
    assert len(bad) <= 0.02 * len(nightly)
    assert {r["value"] for r in bad} >= {"abc", ""}
    assert any(r["unit"] == "g/dL" and r["loinc"] == "2160-0" for r in bad)
    assert any("-02-30T" in r["collected_at"] for r in bad)


def test_zoledronic_doses_match_the_band_of_the_pre_dose_crcl(cohort, long_cohort):
    for out in (cohort, long_cohort):
        band_alerted = {a["patient_id"] for a in _expected(out) if a["rule"] == "DOSE_BAND"}
        scenarios = _manifest(out)["patient_scenarios"]
        checked = 0
        for pid, chart in _charts(out).items():
            if pid in band_alerted:
                continue
            # The pre-dose scenarios draw their SCr 7 or 8 days before the dose on purpose.
            gap = 8 if scenarios[pid].startswith("pre_dose_") else 3
            for day, agent, mg in chart.doses:
                if agent != "zoledronic_acid":
                    continue
                at, scr_day, scr = [s for s in chart.scr if s[1] < day][-1]
                assert day - scr_day <= timedelta(days=gap)
                assert zoledronic_dose(chart.clearance(scr_day, scr)) == mg, (pid, day)
                checked += 1
        assert checked > 100


def test_oracle_agrees_with_expected_alerts(cohort, long_cohort):
    for out in (cohort, long_cohort):
        expected = {(a["patient_id"], a["rule"], a["raised_on"]) for a in _expected(out)}
        assert _oracle(out) == expected


@pytest.mark.parametrize(("nights", "seed"), [(14, 5), (400, 9)])
def test_oracle_agrees_at_the_shortest_and_a_long_window(tmp_path, nights, seed):
    generate(tmp_path, patients=60, seed=seed, last_night=LAST, nights=nights)
    expected = {(a["patient_id"], a["rule"], a["raised_on"]) for a in _expected(tmp_path)}
    assert {rule for _, rule, _ in expected} == ALL_RULES
    assert _oracle(tmp_path) == expected
    first, last = _window(_manifest(tmp_path))
    for alert in _expected(tmp_path):
        if alert["scenario"] != "review_2y":
            assert first + timedelta(days=2) <= date.fromisoformat(alert["raised_on"]) <= last - \
                timedelta(days=2)


def test_charts_are_plausible(cohort, long_cohort):
    for out in (cohort, long_cohort):
        last = date.fromisoformat(_manifest(out)["last_night"])
        scenarios = _manifest(out)["patient_scenarios"]
        for pid, chart in _charts(out).items():
            assert chart.sex in {"F", "M"} and chart.birth
            assert 50 <= age_on(chart.birth, last) <= 80
            kinds = {value for _, value in chart.diagnoses}
            assert kinds & {"MM", "MGUS", "SMM"}, pid
            assert kinds <= {"MM", "MGUS", "SMM", "osteoporosis"}
            assert len({agent for _, agent, _ in chart.doses}) <= 1, pid
            if scenarios[pid] == "background":
                assert kinds == {"MM"} and chart.doses and chart.therapy
                assert all(v <= 500 for _, v in chart.urine)


def test_a_large_cohort_plants_every_scenario_many_times(tmp_path):
    # Speed belongs in bench/, never in a timed test; this checks a 2,000-patient year works.
    manifest = generate(tmp_path, patients=2000, nights=365)
    assert manifest["bad_rows"] > 0
    assert min(manifest["scenarios"].values()) >= 15
    assert manifest["scenarios"]["background"] >= 800
