"""HL7 v2 shapes that real laboratory systems send, through the whole ingest into the store
(`tests/data/shapes/hl7/`, described in its README): panels sharing an accession, a correction
sent alone in a later message, and the patient's birth date and sex from PID-7 / PID-8."""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select

from bonewatch import pipeline
from bonewatch.store.tables import clinical_events, lab_results

SHAPES = Path(__file__).resolve().parents[1] / "data" / "shapes" / "hl7"


def _ingest(settings, tmp_path, *names: str) -> None:
    """Each file as its own delivery, in order."""
    for n, name in enumerate(names):
        folder = tmp_path / f"d{n}"
        folder.mkdir()
        shutil.copy(SHAPES / name, folder / Path(name).name)
        summary = pipeline.ingest(settings, [folder])
        assert (summary.failed_files, summary.errors) == (0, [])


def _labs(engine) -> list[tuple]:
    with engine.connect() as conn:
        rows = conn.execute(select(lab_results.c.patient_id, lab_results.c.analyte, lab_results.c.value,
                                   lab_results.c.status)).all()
    return sorted((p, a, round(v, 2), s) for p, a, v, s in rows)


def test_two_panels_under_one_accession_are_all_stored(settings, engine, tmp_path):
    _ingest(settings, tmp_path, "two_panels_one_accession.hl7")
    assert _labs(engine) == [("000456", "albumin", 3.6, "final"), ("000456", "albumin", 3.7, "final"),
                             ("000456", "alp", 180.0, "final"), ("000456", "calcium", 8.9, "final"),
                             ("000456", "creatinine", 1.4, "final"), ("000456", "ggt", 45.0, "final")]


def test_a_correction_sent_alone_later_replaces_its_original(settings, engine, tmp_path):
    _ingest(settings, tmp_path, "correction/1_original.hl7", "correction/2_corrected.hl7")
    assert _labs(engine) == [("000777", "albumin", 4.2, "final"), ("000777", "calcium", 9.4, "final"),
                             ("000777", "creatinine", 1.0, "corrected")]


def test_pid7_and_pid8_are_stored_as_birth_date_and_sex(settings, engine, tmp_path):
    _ingest(settings, tmp_path, "pid_demographics.hl7")
    with engine.connect() as conn:
        facts = conn.execute(select(clinical_events.c.patient_id, clinical_events.c.event_type,
                                    clinical_events.c.value)).all()
    assert sorted(tuple(f) for f in facts) == [("000123", "birth_date", "1955-04-02"), ("000123", "sex", "F"),
                                               ("000456", "birth_date", "1948-07-11"), ("000789", "sex", "M")]
    assert [p for p, *_ in _labs(engine)] == ["000123", "000123", "000789"]
