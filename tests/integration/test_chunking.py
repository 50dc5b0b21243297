"""Streamed ingest on both stores: a tiny chunk size gives exactly the store that one chunk gives.

Chunk borders must lose nothing and change nothing: not a correction whose original sits in an
earlier chunk, not a late copy of an original after its correction, not a bad row, a blank line or
a row with the wrong number of fields, and not the line numbers quarantine records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import delete, select

from bonewatch import pipeline
from bonewatch.config import with_overrides
from bonewatch.store.tables import (
    clinical_events,
    deliveries,
    delivery_codes,
    lab_results,
    patient_index,
    quarantine,
)

LAB_HEADER = "patient_id,result_id,loinc,value,unit,collected_at,status\n"
LABS = LAB_HEADER + "".join([
    "0001,r1,2160-0,0.9,mg/dL,2025-01-03T08:00:00,final\n",
    "0001,r2,6768-6,120,U/L,2025-01-03T08:00:00,preliminary\n",
    "0002,r3,14682-9,79.56,umol/L,2025-01-04T08:00:00+02:00,F\n",
    "0002,r4,9999-9,1.0,mg/dL,2025-01-04T08:00:00,final\n",              # unmapped local code: skipped
    "\n",                                                                 # blank line
    "0001,r1,2160-0,1.0,mg/dL,2025-01-03T08:00:00,corrected\n",           # corrects r1 (earlier chunk)
    "0003,r5,17861-6,<5,mg/dL,2025-01-05T08:00:00,final\n",               # censored, kept as censored
    "0003,r6,2160-0,55,mg/dL,2025-01-05T08:00:00,final\n",                # implausible creatinine
    "0001,r2,6768-6,125,U/L,2025-01-03T08:00:00,final\n",                 # preliminary -> final
    "0003,r7,2160-0,1.1,mg/dL,2025-01-05T08:00:00,final,surplus\n",       # wrong number of fields
    "0001,r1,2160-0,0.9,mg/dL,2025-01-03T08:00:00,final\n",               # late original: ignored
    "0004,r8,6768-6,3,ukat/L,2025-01-06T08:00:00,final\n",
    "0004,r9,2160-0,abc,mg/dL,2025-01-06T08:00:00,final\n",               # unparseable value
    "0002,r3,14682-9,88.4,umol/L,2025-01-04T08:00:00+02:00,C\n",          # corrects r3
    "0005,r10,2160-0,1.3,mg/dL,2025-02-30T08:00:00,final\n",              # impossible date
    "0004,r11,2160-0,1.2,mg/dL,2025-01-07,final\n",
])
EVENTS = "patient_id,event_type,occurred_at,value,detail\n" + "".join([
    "0001,birth_date,2020-01-01,1950-02-03,\n",
    "0001,sex,2020-01-01,female,\n",
    "0001,bisphosphonate_dose,2025-01-02,zoledronic_acid,4.0\n",
    "0001,weight_kg,2025-01-02,700,\n",                  # implausible weight
    "0002,teleport,2025-01-02,x,\n",                     # unknown event type
    "0001,bisphosphonate_dose,2025-01-02,zoledronic_acid,4.0\n",   # the same event again
    "0002,weight_kg,2025-01-02,71.5,\n",
])


def snapshot(engine) -> dict:
    with engine.connect() as conn:
        results = sorted(tuple(r) for r in conn.execute(select(lab_results)))
        events = sorted(tuple(r) for r in conn.execute(select(clinical_events)))
        held = sorted(tuple(r) for r in conn.execute(select(quarantine)))
        ledger = sorted((r.file_name, r.rows_total, r.rows_accepted, r.rows_quarantined, r.rows_not_monitored, r.units)
                        for r in conn.execute(select(deliveries)))
        marks = sorted((r.patient_id, r.dirty_from) for r in conn.execute(select(patient_index)))
        codes = sorted(tuple(r) for r in conn.execute(select(delivery_codes)))
    return {"results": results, "events": events, "quarantine": held, "ledger": ledger, "marks": marks,
            "codes": codes}


def reset(engine) -> None:
    with engine.begin() as conn:
        for table in (lab_results, clinical_events, quarantine, deliveries, patient_index, delivery_codes):
            conn.execute(delete(table))


def write(folder: Path) -> list[Path]:
    labs, events = folder / "labs.csv", folder / "x.events.csv"
    labs.write_text(LABS)
    events.write_text(EVENTS)
    return [labs, events]


def test_tiny_chunks_give_exactly_the_store_of_one_chunk(engine, settings, tmp_path):
    files = write(tmp_path)
    whole = pipeline.ingest(with_overrides(settings, ingest__chunk_size=100_000), files)
    expected = snapshot(engine)
    # every usable row counts, duplicates too; the unmapped local code is skipped, not quarantined
    assert (whole.accepted, whole.not_monitored, whole.quarantined) == (15, 1, 6)
    values = {r[0]: (r[4], r[11]) for r in expected["results"]}
    assert values["r1"] == (1.0, "corrected")          # the late original did not undo the correction
    assert values["r2"] == (125.0, "final")
    assert values["r3"] == (pytest.approx(1.0), "corrected")
    for size in (1, 2, 3):
        reset(engine)
        summary = pipeline.ingest(with_overrides(settings, ingest__chunk_size=size), files)
        assert (summary.accepted, summary.not_monitored, summary.quarantined) == (
            whole.accepted, whole.not_monitored, whole.quarantined), size
        assert snapshot(engine) == expected, f"chunk size {size} changed the store"


def test_chunks_are_as_large_as_the_setting_says(tmp_path):
    from bonewatch.ingest import feeds, reader

    path = write(tmp_path)[0]
    chunks = list(reader.read_chunks(path, feeds.LAB_COLUMNS, 4))
    assert [len(c.frame) for c in chunks] == [4, 4, 4, 2]
    assert [line for c in chunks for line, _, _ in c.bad_rows] == [11]
    assert [int(i) for c in chunks for i in c.frame.index] == [2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
