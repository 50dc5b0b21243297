"""`bonewatch explain` and the persisted course state, on both stores, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from datetime import date

from sqlalchemy import select

from bonewatch import pipeline
from bonewatch.store.tables import alerts, course_states

LABS = """patient_id,result_id,loinc,value,unit,collected_at,status
0007,r1,2160-0,1.00,mg/dL,2025-01-03T08:00:00,final
0007,r2,2160-0,1.20,mg/dL,2025-02-10T08:00:00,final
0008,r3,2160-0,0.90,mg/dL,2024-12-01T08:00:00,final
"""
EVENTS = """patient_id,event_type,occurred_at,value,detail
0007,birth_date,2000-01-01,1955-01-01,
0007,sex,2000-01-01,M,
0007,weight_kg,2025-01-03,70,
0007,dental_exam,2024-12-20,,
0007,bisphosphonate_dose,2025-01-05,zoledronic_acid,4.0
0008,dental_exam,2024-12-20,,
0008,bisphosphonate_dose,2025-01-05,pamidronate,90
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonewatch.cli", *args], capture_output=True, text=True, timeout=300)


def test_explain_shows_evidence_arithmetic_and_course_state(engine, settings, tmp_path):
    (tmp_path / "labs.csv").write_text(LABS)
    (tmp_path / "x.events.csv").write_text(EVENTS)
    pipeline.ingest(settings, [tmp_path / "labs.csv", tmp_path / "x.events.csv"])
    pipeline.evaluate(settings, date(2025, 2, 10))
    with engine.connect() as conn:
        dose_band = conn.execute(select(alerts.c.alert_id).where(alerts.c.rule == "DOSE_BAND")).scalar_one()
        states = {r.patient_id: r for r in conn.execute(select(course_states))}
    assert states["0007"].status == "active" and states["0007"].renal_baseline_scr == 1.0
    assert states["0008"].renal_baseline_scr is None and "no renal baseline" in states["0008"].baseline_note

    out = cli("explain", dose_band)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "DOSE_BAND (version 1, high) for MRN 0007" in text
    assert "CrCl = (140 - 70) x 70.0 / (72 x 1.20) (male) = 56.7 mL/min (Cockcroft-Gault)" in text
    assert "renal baseline SCr 1.00 mg/dL on 2025-01-03" in text
    assert "Zoledronic acid label" in text and "does not replace, clinical judgement" in text

    missing = cli("explain", "Anope")
    assert missing.returncode == 1 and missing.stderr.strip() == "bonewatch: no alert Anope"
