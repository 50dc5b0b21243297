"""The bad-input corpus (`tests/data/bad/`, described in its README), file by file: each file
either loads its good rows and quarantines the rest with a reason naming the file and line (or
Bundle entry), or fails with one line naming the file; never a traceback, never a lost good row."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from bonewatch import pipeline
from bonewatch.store.tables import clinical_events, deliveries, lab_results, quarantine

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad"

#: file -> ("fails", text the one-line error must hold)
FAILS = {
    "empty.csv": "empty.csv: the file is empty",
    "wrong_header.csv": "wrong_header.csv, line 1: header lacks column(s)",
    "not_utf8.csv": "not_utf8.csv, line 3: not UTF-8 text",
    "unsupported.xml": "unsupported.xml: unsupported format",
    "not_hl7.hl7": "not_hl7.hl7, line 1: no MSH segment",
    "empty.hl7": "empty.hl7",
    "truncated.json": "truncated.json, line ",
    "not_a_bundle.json": "not_a_bundle.json, line ",
    "empty.json": "empty.json",
}

#: file -> the feed the ledger records it under: from its format, else its name; "unreadable" when
#: neither tells (the data-quality email names the feed, not "unknown")
FAILED_FEED = {"empty.csv": "labs", "wrong_header.csv": "labs", "not_utf8.csv": "labs",
               "unsupported.xml": "unreadable", "not_hl7.hl7": "hl7", "empty.hl7": "hl7",
               "truncated.json": "fhir", "not_a_bundle.json": "fhir", "empty.json": "fhir"}

#: file -> (lab result ids kept, events kept, quarantined rows, a reason each quarantined row may give)
LOADS = {
    "impossible_dates.csv": ({"B1", "B2"}, 0, 3, ("impossible date", "date out of range")),
    "unknown_codes.csv": ({"B1", "B2"}, 0, 0, ()),
    "unconvertible_units.csv": ({"B1", "B2"}, 0, 2, ("cannot be converted",)),
    "ragged_rows.csv": ({"B1", "B2"}, 0, 2, ("fields",)),
    "censored_and_statuses.csv": ({"B1", "B2", "B3"}, 0, 2, ("unparseable value", "unknown status")),
    "events_bad.events.csv": (set(), 2, 5, ("unknown event type", "unknown sex value", "unparseable value",
                                             "unparseable dose", "impossible birth date")),
    # HL7: the good messages' PID-7 / PID-8 give the birth date and sex (once a file per patient)
    "no_pid.hl7": ({"ORD1|BMP|2160-0"}, 2, 1, ("no PID segment",)),
    "unknown_code_and_unit.hl7": ({"ORD2|BMP|2160-0"}, 2, 2, ("cannot be converted", "impossible date")),
    "truncated.hl7": ({"ORD1|BMP|2160-0"}, 2, 1, ("missing",)),
    "adt_not_oru.hl7": ({"ORD1|BMP|2160-0"}, 2, 1, ("not an ORU^R01 message",)),
    # the 2.1 message's OBX and its PID's birth date and sex are quarantined
    "old_version.hl7": ({"ORD1|BMP|2160-0"}, 2, 2, ("unsupported HL7 version",)),
    "bad_entries.json": ({"F1", "F7"}, 2, 5, ("subject reference not found", "impossible date",
                                              "without resourceType", "entry without resource", "cannot be converted")),
    "bad_lines.ndjson": ({"N1", "N5"}, 2, 4, ("not JSON", "subject reference not found", "subject",
                                              "unknown observation code", "without")),
    "not_utf8.ndjson": ({"U1"}, 2, 1, ("UTF-8",)),
}


#: file -> results skipped for their code (SPEC 2.5: not monitored, not bad): the others skip none
NOT_MONITORED = {"unknown_codes.csv": 2, "unknown_code_and_unit.hl7": 1, "bad_entries.json": 1}


def _store(engine):
    with engine.connect() as conn:
        results = dict(conn.execute(select(lab_results.c.result_id, lab_results.c.value)).tuples().all())
        events = conn.execute(select(clinical_events.c.event_key)).scalars().all()
        quarantined = conn.execute(select(quarantine.c.file_name, quarantine.c.source_line,
                                          quarantine.c.reason)).all()
        ledger = conn.execute(select(deliveries.c.file_name, deliveries.c.status)).all()
    return results, events, quarantined, ledger


def test_every_corpus_file_is_covered():
    files = {p.name for p in CORPUS.iterdir() if p.is_file() and p.name != "README.md"}
    assert files == set(FAILS) | set(LOADS) | {"correction_first.csv", "correction_before_original.hl7"}


@pytest.mark.parametrize("name", sorted(FAILS))
def test_unreadable_file_fails_in_one_line_naming_it(name, settings, engine, tmp_path):
    shutil.copy(CORPUS / name, tmp_path / name)
    summary = pipeline.ingest(settings, [tmp_path / name])
    assert (summary.failed_files, summary.accepted) == (1, 0)
    (error,) = summary.errors
    assert FAILS[name] in error and "\n" not in error and "Traceback" not in error
    assert "000101" not in error, "no patient identifier in errors"
    results, events, quarantined, ledger = _store(engine)
    assert (results, events, quarantined) == ({}, [], [])
    assert [tuple(row) for row in ledger] == [(name, "failed")]
    with engine.connect() as conn:
        assert conn.execute(select(deliveries.c.feed)).scalars().all() == [FAILED_FEED[name]]


@pytest.mark.parametrize("name", sorted(LOADS))
def test_bad_rows_are_quarantined_and_good_rows_kept(name, settings, engine, tmp_path):
    kept, n_events, n_bad, reasons = LOADS[name]
    shutil.copy(CORPUS / name, tmp_path / name)
    summary = pipeline.ingest(settings, [tmp_path / name])
    assert (summary.failed_files, summary.errors) == (0, [])
    results, events, quarantined, _ = _store(engine)
    assert set(results) == kept, "every good lab row of the file is kept, no bad one"
    assert len(events) == n_events
    assert len(quarantined) == summary.quarantined == n_bad
    assert summary.not_monitored == NOT_MONITORED.get(name, 0)
    for file_name, line, reason in quarantined:
        assert file_name == name and line >= 1
        assert reason and "\n" not in reason and "000101" not in reason
        assert any(r in reason for r in reasons), reason
    # a second delivery of the same bytes changes nothing
    again = pipeline.ingest(settings, [tmp_path / name])
    assert again.skipped_files == 1 and _store(engine)[:3] == (results, events, quarantined)


def test_duplicate_delivery_is_loaded_once(settings, engine):
    summary = pipeline.ingest(settings, [CORPUS / "duplicate"])
    assert (summary.files, summary.skipped_files, summary.accepted) == (2, 1, 2)
    results, _, _, ledger = _store(engine)
    assert set(results) == {"B1", "B2"} and len(ledger) == 1


@pytest.mark.parametrize("name, result_id", [("correction_first.csv", "B9"),
                                             ("correction_before_original.hl7", "ORD5|BMP|2160-0")])
def test_a_correction_before_its_original_still_wins(name, result_id, settings, engine):
    summary = pipeline.ingest(settings, [CORPUS / name])
    assert summary.failed_files == 0
    results, _, _, _ = _store(engine)
    assert results == {result_id: pytest.approx(1.1)}


def test_cli_reports_each_unreadable_file_in_one_line(settings, engine, tmp_path):
    folder = tmp_path / "night"
    folder.mkdir()
    for name in ("truncated.json", "no_pid.hl7", "wrong_header.csv"):
        shutil.copy(CORPUS / name, folder / name)
    cli = subprocess.run([sys.executable, "-m", "bonewatch.cli", "ingest", str(folder)], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 1
    assert "Traceback" not in cli.stderr
    errors = cli.stderr.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: cannot read ") for line in errors)
    assert "truncated.json, line " in cli.stderr and "wrong_header.csv, line 1" in cli.stderr
    # a result, a birth date, a sex
    assert "3 file(s): 3 rows accepted, 0 not monitored, 1 quarantined, 2 unreadable" in cli.stdout
