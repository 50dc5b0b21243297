"""Corrections and cancellations through every format: a corrected result replaces the value and
the alerts evaluated after it follow the corrected value; a cancelled result removes its effect.
And local times without an offset are read in the hospital's zone, whatever the format."""

from __future__ import annotations

import csv
from datetime import date

import pytest
from sqlalchemy import select

from bonewatch import pipeline
from bonewatch.config import with_overrides
from bonewatch.ingest import fhir, hl7
from bonewatch.ingest.feeds import EVENT_COLUMNS, LAB_COLUMNS
from bonewatch.store.tables import alerts, course_states, lab_results

MRN = "000777"
EVENTS = [
    (MRN, "diagnosis", "2024-12-01", "MM", "C90.00"),
    (MRN, "birth_date", "2024-12-01", "1955-04-02", ""),
    (MRN, "sex", "2024-12-01", "M", ""),
    (MRN, "weight_kg", "2024-12-20", "80.0", ""),
    (MRN, "dental_exam", "2024-12-20", "completed", ""),
    (MRN, "bisphosphonate_dose", "2025-01-02T14:00:00+00:00", "zoledronic_acid", "4.0"),
    (MRN, "weight_kg", "2025-02-20", "80.0", ""),
]
BASELINE = (MRN, "R1", "2160-0", "0.90", "mg/dL", "2024-12-30T08:00:00+00:00", "final")
RISE = (MRN, "R2", "2160-0", "1.50", "mg/dL", "2025-03-03T08:00:00+00:00", "final")   # +0.60: hold


def _write(folder, name: str, fmt: str, labs: list[tuple], events: list[tuple] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        for rows, header, file_name in ((labs, LAB_COLUMNS, f"{name}.csv"), (events, EVENT_COLUMNS, f"{name}.events.csv")):
            if rows:
                with (folder / file_name).open("w", newline="", encoding="utf-8") as handle:
                    writer = csv.writer(handle, lineterminator="\n")
                    writer.writerow(header)
                    writer.writerows(rows)
    elif fmt == "hl7":
        hl7.write_hl7(folder / f"{name}.hl7", labs)
        if events:
            _write(folder, name, "csv", [], events)
    elif fmt == "fhir":
        fhir.write_bundle(folder / f"{name}.json", labs, events)
    else:
        fhir.write_ndjson(folder / name, labs, events)


def _renal(engine) -> tuple[list[tuple], str]:
    with engine.connect() as conn:
        found = conn.execute(select(alerts.c.rule, alerts.c.status).order_by(alerts.c.rule)).all()
        status = conn.execute(select(course_states.c.status)).scalar()
    return [tuple(r) for r in found], status


@pytest.mark.parametrize("fmt", ["csv", "hl7", "fhir", "ndjson"])
@pytest.mark.parametrize("change", ["corrected", "cancelled"])
def test_a_correction_or_cancellation_changes_the_alerts_after_it(fmt, change, settings, engine, tmp_path):
    _write(tmp_path / "d1", "history", fmt, [BASELINE], EVENTS)
    _write(tmp_path / "d2", "night", fmt, [RISE])
    assert pipeline.ingest(settings, [tmp_path / "d1"]).failed_files == 0
    assert pipeline.ingest(settings, [tmp_path / "d2"]).failed_files == 0
    pipeline.evaluate(settings, date(2025, 3, 3))
    assert ("RENAL_HOLD", "open") in _renal(engine)[0]
    assert _renal(engine)[1] == "held"

    value = "1.00" if change == "corrected" else "1.50"       # a cancelled result keeps its value
    fixed = (MRN, "R2", "2160-0", value, "mg/dL", RISE[5], change)
    _write(tmp_path / "d3", "fix", fmt, [fixed])
    assert pipeline.ingest(settings, [tmp_path / "d3"]).failed_files == 0
    pipeline.evaluate(settings, date(2025, 3, 4))

    with engine.connect() as conn:
        stored = conn.execute(select(lab_results.c.value, lab_results.c.status)
                              .where(lab_results.c.collected_date == date(2025, 3, 3))).all()
    assert [(round(v, 2), s) for v, s in stored] == [(float(value), change)]
    found, status = _renal(engine)
    assert ("RENAL_HOLD", "open") not in found, "the hold was built on a value that is no longer there"
    assert ("RENAL_HOLD", "resolved") in found
    assert status == "active"


@pytest.mark.parametrize("fmt", ["csv", "hl7", "fhir", "ndjson"])
def test_local_time_without_offset_is_hospital_time(fmt, settings, engine, tmp_path):
    local = with_overrides(settings, site__timezone="America/New_York")
    # 23:30 in New York on 1 March is 04:30 UTC on 2 March: the calendar day is the local one
    row = (MRN, "T1", "6768-6", "120", "U/L", "2025-03-01T23:30:00", "final")
    _write(tmp_path / "d", "labs", fmt, [row], [(MRN, "sex", "2025-03-01", "F", "")])
    assert pipeline.ingest(local, [tmp_path / "d"]).failed_files == 0
    with engine.connect() as conn:
        at, day = conn.execute(select(lab_results.c.collected_at, lab_results.c.collected_date)).one()
    assert str(at).startswith("2025-03-02 04:30:00")
    assert str(day) == "2025-03-01"

