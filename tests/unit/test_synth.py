"""The synthetic cohort generator: layout, determinism, and that its ground truth is consistent.

The consistency tests read the written files back and re-derive, with small independent oracles
(the generator's own CrCl/band/month helpers, never `bonewatch.rules`), which findings the data
supports; they must equal `expected_alerts.jsonl`, and the data must give no other rule a reason
to fire.
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
}
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
    diagnoses: list[str] = field(default_factory=list)
    weights: list[tuple[date, float]] = field(default_factory=list)
    scr: list[tuple[str, date, float]] = field(default_factory=list)   # (collected_at, day, mg/dL)
    alp: list[tuple[date, float]] = field(default_factory=list)        # U/L
    ggt: list[float] = field(default_factory=list)
    ca: dict[str, float] = field(default_factory=dict)                 # collected_at -> mg/dL
    alb: dict[str, float] = field(default_factory=dict)
    doses: list[tuple[date, str, float]] = field(default_factory=list)
    therapy: list[tuple[date, str]] = field(default_factory=list)
    dental: list[date] = field(default_factory=list)
    urine: list[tuple[date, float]] = field(default_factory=list)

    def weight_before(self, day: date) -> float:
        known = [kg for d, kg in sorted(self.weights) if day - timedelta(days=90) <= d <= day]
        assert known, f"no weight in the 90 days before {day}"
        return known[-1]

    def clearance(self, day: date, scr: float) -> float:
        return crcl(age_on(self.birth, day), self.weight_before(day), scr, self.sex)


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
                chart.diagnoses.append(value)
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
            at = row["collected_at"]
            if code == "2160-0":
                chart.scr.append((at[:19], _day(at), value))
            elif code == "14682-9":
                chart.scr.append((at[:19], _day(at), value / 88.4))
            elif code == "6768-6":
                chart.alp.append((_day(at), value * 60 if row["unit"] == "ukat/L" else value))
            elif code == "2324-2":
                chart.ggt.append(value)
            elif code == "17861-6":
                chart.ca[at[:19]] = value
            elif code == "1751-7":
                chart.alb[at[:19]] = value
            elif code == "29463-7":
                chart.weights.append((_day(at), value))
    for chart in charts.values():
        chart.scr.sort()
        chart.alp.sort()
        chart.doses.sort()
    return dict(charts)


# --- small oracles for the planted rules (SPEC 4, 5, 10) ------------------------------------------

def _renal(chart: Chart) -> tuple[list[tuple[str, date]], list[tuple[date, date | None]]]:
    """RENAL_HOLD / RENAL_RESUME findings and the held spans, for the patient's single course."""
    first = chart.doses[0][0]
    window = [s for s in chart.scr if first - timedelta(days=30) <= s[1] <= first]
    assert window, "every course has a renal baseline"
    base_at, _, base = window[-1]
    rise = 1.0 if round(base, 2) >= 1.4 else 0.5
    found, spans, held_since = [], [], None
    for at, day, value in chart.scr:
        if at <= base_at:
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


def _band(mg: float) -> float | None:
    """The band a given dose belongs to (within 0.05 mg of a band's dose)."""
    return next((b for b in (4.0, 3.5, 3.3, 3.0) if abs(mg - b) <= 0.05 + 1e-9), None)


def _dose_band(chart: Chart, spans) -> list[tuple[str, date]]:
    """DOSE_BAND episodes: on an active zoledronic course, latest CrCl band != last dose band."""
    if chart.doses[0][1] != "zoledronic_acid":
        return []
    # A dose sorts after a same-day SCr ("T99" > any clock time).
    timeline = sorted([(day.isoformat() + "T99", "dose", day, mg) for day, _, mg in chart.doses]
                      + [(at, "scr", day, v) for at, day, v in chart.scr])
    found, latest, last_dose, open_episode = [], None, None, False
    for _, kind, day, value in timeline:
        if kind == "scr":
            latest = chart.clearance(day, value)
        else:
            last_dose = value
        held = any(start <= day and (end is None or day < end) for start, end in spans)
        if last_dose is None or latest is None or held:
            continue
        differs = zoledronic_dose(latest) != _band(last_dose)
        if differs and not open_episode:
            found.append(("DOSE_BAND", day))
        open_episode = differs
    return found


def _alp_rise(chart: Chart) -> list[tuple[str, date]]:
    found = []
    for start, regimen in chart.therapy:
        if regimen != "bortezomib":
            continue
        before = [(d, v) for d, v in chart.alp if start - timedelta(days=30) <= d <= start]
        if not before:
            continue
        base_day, base = before[-1]
        for day, value in chart.alp:
            rise = round((value / base - 1) * 100, 1)
            if base_day < day <= start + timedelta(days=42) and rise >= 25.0:
                found.append(("ALP_RISE_BORTEZOMIB", day))
                break
    return found


def _reviews(chart: Chart, first_night: date, last_night: date) -> list[tuple[str, date]]:
    start = chart.doses[0][0]
    one, two = add_months(start, 12), add_months(start, 24)
    found = []
    if one <= last_night and two > first_night:
        found.append(("REVIEW_1Y", one))
    if two <= last_night:
        found.append(("REVIEW_2Y", two))
    return found


def _oracle(out: Path) -> set[tuple[str, str, str]]:
    manifest = _manifest(out)
    first, last = _window(manifest)
    alerts = set()
    for pid, chart in _charts(out).items():
        renal, spans = _renal(chart)
        findings = _dose_band(chart, spans) + _alp_rise(chart) + _reviews(chart, first, last)
        for rule, day in renal + findings:
            if day <= last:
                alerts.add((pid, rule, max(day, first).isoformat()))
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
    # Another seed gives another cohort.
    c = tmp_path / "c"
    generate(c, patients=40, seed=12)
    assert (c / "history" / "labs.csv").read_bytes() != (a / "history" / "labs.csv").read_bytes()


def test_rerun_into_the_same_folder_leaves_no_stale_nights(tmp_path):
    generate(tmp_path, patients=20, nights=40)
    generate(tmp_path, patients=20, nights=20)
    nights = sorted(p.name for p in (tmp_path / "inbox").iterdir())
    assert nights[0] >= (LAST - timedelta(days=19)).isoformat()


def test_layout_headers_and_days(cohort):
    manifest = _manifest(cohort)
    first, last = _window(manifest)
    assert (first, last, manifest["nights"]) == (date(2025, 6, 1), LAST, 30)
    assert set(manifest) == {"seed", "patients", "first_night", "last_night", "nights",
                             "scenarios", "bad_rows"}
    assert sum(manifest["scenarios"].values()) == manifest["patients"] == 60
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
        assert files and files <= {"labs.csv", "events.csv"}
        for name in files:
            rows = _rows(folder / name)
            assert rows, "a night's file is written only when it has rows"
            for row in rows:
                if name == "labs.csv" and not _is_bad(row):
                    assert _day(row["collected_at"]) == night
                if name == "events.csv":
                    assert _day(row["occurred_at"]) == night
    ids = [r["result_id"] for p in _lab_files(cohort) for r in _rows(p)]
    assert len(ids) == len(set(ids))


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


def test_every_scenario_is_planted_at_60_patients(cohort):
    counts = _manifest(cohort)["scenarios"]
    assert list(counts) == list(SCENARIOS)
    assert all(counts[name] >= 1 for name in SCENARIOS)
    assert counts["background"] >= 15
    rules_by_scenario = defaultdict(set)
    for alert in _expected(cohort):
        rules_by_scenario[alert["scenario"]].add(alert["rule"])
    assert dict(rules_by_scenario) == ALERTING


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
    assert {r["loinc"] for r in bad} >= {"99999-9"}
    assert {r["value"] for r in bad} >= {"abc"}
    assert any(r["unit"] == "g/dL" and r["loinc"] == "2160-0" for r in bad)
    assert any("-02-30T" in r["collected_at"] for r in bad)


def test_zoledronic_doses_match_the_band_of_the_pre_dose_crcl(cohort, long_cohort):
    for out in (cohort, long_cohort):
        band_alerted = {a["patient_id"] for a in _expected(out) if a["rule"] == "DOSE_BAND"}
        checked = 0
        for pid, chart in _charts(out).items():
            if pid in band_alerted:
                continue
            for day, agent, mg in chart.doses:
                if agent != "zoledronic_acid":
                    continue
                at, scr_day, scr = [s for s in chart.scr if s[1] < day][-1]
                assert day - scr_day <= timedelta(days=3)
                assert zoledronic_dose(chart.clearance(scr_day, scr)) == mg, (pid, day)
                checked += 1
        assert checked > 100


def test_oracle_agrees_with_expected_alerts(cohort, long_cohort):
    for out in (cohort, long_cohort):
        expected = {(a["patient_id"], a["rule"], a["raised_on"]) for a in _expected(out)}
        assert _oracle(out) == expected


def test_no_other_rule_has_a_reason_to_fire(cohort, long_cohort):
    for out in (cohort, long_cohort):
        last = date.fromisoformat(_manifest(out)["last_night"])
        for pid, chart in _charts(out).items():
            assert chart.diagnoses == ["MM"] and chart.sex in {"F", "M"} and chart.birth
            assert 50 <= age_on(chart.birth, last) <= 80
            for day, _, _ in chart.doses:  # PRE_DOSE_SCR_MISSING
                assert any(day - timedelta(days=7) <= d <= day for _, d, _ in chart.scr), (pid, day)
            first = chart.doses[0][0]  # DENTAL_EXAM_MISSING
            assert any(add_months(first, -6) <= d <= first for d in chart.dental), pid
            gaps = [b[0] - a[0] for a, b in zip(chart.doses, chart.doses[1:], strict=False)]
            assert all(g <= timedelta(days=180) for g in gaps)  # one course per patient
            for at, ca in chart.ca.items():  # HYPOCALCEMIA
                assert round(ca + 0.8 * (4.0 - chart.alb[at]), 2) >= 8.5
            assert all(g <= 55 for g in chart.ggt)  # ALP_NONBONE_CAUSE
            for start, _ in chart.therapy:  # ALP_ELEVATED_START, ALP_MONITOR_DUE
                base = [v for d, v in chart.alp if start - timedelta(days=30) <= d <= start]
                assert base and base[-1] <= 130
            urine = sorted(d for d, v in chart.urine)  # ALBUMINURIA, URINE_ALBUMIN_DUE
            assert all(v <= 500 for _, v in chart.urine)
            assert urine[0] <= first
            ends = [*urine[1:], last]
            assert all(b - a <= timedelta(days=180) for a, b in zip(urine, ends, strict=True))


def test_a_large_cohort_generates(tmp_path):
    # Speed belongs in bench/, never in a timed test; this only checks a year-long cohort works.
    manifest = generate(tmp_path, patients=500, nights=365)
    assert manifest["bad_rows"] > 0
