"""Ingest isolates failures (issue 14): a file gone, unreadable or refused fails alone, with one
line naming it, and the other files still load; a row longer than `[ingest] max_row_bytes` is
quarantined with its line and the rest of its file kept; a symbolic link never leads a folder walk
(or the inbox) elsewhere. SQLite is enough: none of this depends on the store."""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import select

from bonewatch import pipeline
from bonewatch.config import with_overrides
from bonewatch.ingest.reader import too_long
from bonewatch.store.tables import deliveries, lab_results, quarantine

HEADER = "patient_id,result_id,loinc,value,unit,collected_at,status\n"


def row(n: int) -> str:
    return f"{n:06d},r{n},2160-0,1.0,mg/dL,2025-01-03T08:00:00,final\n"


@pytest.fixture
def db_url(tmp_path):
    """SQLite only (overrides the two-store fixture of conftest)."""
    return f"sqlite:///{tmp_path / 'store.db'}"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def stored(engine):
    with engine.connect() as conn:
        results = set(conn.execute(select(lab_results.c.result_id)).scalars())
        held = conn.execute(select(quarantine.c.file_name, quarantine.c.source_line, quarantine.c.reason,
                                   quarantine.c.raw)).all()
        ledger = dict(conn.execute(select(deliveries.c.file_name, deliveries.c.status)).tuples().all())
    return results, held, ledger


# ---- one file does not stop the rest ------------------------------------------------------------

def test_a_missing_path_fails_alone(engine, settings, tmp_path):
    good = write(tmp_path / "good.csv", HEADER + row(1))
    summary = pipeline.ingest(settings, [good, tmp_path / "missing.csv"])
    assert (summary.files, summary.accepted, summary.failed_files) == (2, 1, 1)
    assert summary.errors == [f"cannot read {tmp_path / 'missing.csv'}: No such file or directory"]
    assert stored(engine)[0] == {"r1"}


def test_a_file_deleted_after_listing_fails_alone(engine, settings, tmp_path, monkeypatch):
    folder = tmp_path / "night"
    for n in (1, 2, 3):
        write(folder / f"f{n}.csv", HEADER + row(n))
    listed = pipeline.walk_paths

    def list_then_delete(paths, **kwargs):
        found = listed(paths, **kwargs)
        (folder / "f2.csv").unlink()             # gone between the listing and the reading
        return found

    monkeypatch.setattr(pipeline, "walk_paths", list_then_delete)
    summary = pipeline.ingest(settings, [folder])
    assert (summary.files, summary.accepted, summary.failed_files) == (3, 2, 1)
    assert summary.errors == [f"cannot read {folder / 'f2.csv'}: No such file or directory"]
    results, _, ledger = stored(engine)
    assert results == {"r1", "r3"}
    assert ledger == {"f1.csv": "loaded", "f3.csv": "loaded"}   # nothing to hash: reported, not recorded


def test_a_file_that_turns_into_a_folder_while_read_is_recorded_failed(engine, settings, tmp_path, monkeypatch):
    """The fault comes after the file was hashed (its delivery id is known): the ledger says failed."""
    folder = tmp_path / "night"
    for n in (1, 2, 3):
        write(folder / f"f{n}.csv", HEADER + row(n))
    digest = pipeline.file_digest

    def hash_then_replace(path):
        found = digest(path)
        if path.name == "f2.csv":
            path.unlink()
            path.mkdir()                          # reading it now: IsADirectoryError
        return found

    monkeypatch.setattr(pipeline, "file_digest", hash_then_replace)
    summary = pipeline.ingest(settings, [folder])
    assert (summary.accepted, summary.failed_files) == (2, 1)
    assert summary.errors == [f"cannot read {folder / 'f2.csv'}: Is a directory"]
    assert stored(engine)[2] == {"f1.csv": "loaded", "f2.csv": "failed", "f3.csv": "loaded"}


def test_a_fifo_in_a_folder_is_refused_without_opening_it(engine, settings, tmp_path):
    folder = tmp_path / "night"
    write(folder / "a.csv", HEADER + row(1))
    os.mkfifo(folder / "b.csv")                   # opening it would wait for a writer forever
    summary = pipeline.ingest(settings, [folder])
    assert (summary.accepted, summary.failed_files) == (1, 1)
    assert summary.errors == [f"cannot read {folder / 'b.csv'}: not a regular file"]


# ---- symbolic links ----------------------------------------------------------------------------

@pytest.fixture
def secret(tmp_path) -> Path:
    """A readable CSV outside every folder ingested: its rows must never load through a link."""
    return write(tmp_path / "elsewhere" / "secret.csv", HEADER + row(666))


def test_links_out_of_a_folder_walked_are_refused(engine, settings, tmp_path, secret):
    folder = tmp_path / "night"
    write(folder / "a.csv", HEADER + row(1))
    (folder / "out.csv").symlink_to(secret)
    (folder / "out_dir").symlink_to(secret.parent, target_is_directory=True)
    (folder / "in.csv").symlink_to(folder / "a.csv")          # stays inside: read (same bytes: skipped)
    (folder / "dangling.csv").symlink_to(folder / "nothing.csv")
    summary = pipeline.ingest(settings, [folder])
    results, _, ledger = stored(engine)
    assert results == {"r1"}, "nothing read through a link leading out"
    assert sorted(summary.errors) == sorted([
        f"cannot read {folder / 'out.csv'}: {pipeline.LEAVES_FOLDER}",
        f"cannot read {folder / 'out_dir'}: {pipeline.LEAVES_FOLDER}",
        f"cannot read {folder / 'dangling.csv'}: No such file or directory"])
    assert (summary.failed_files, summary.skipped_files) == (3, 1)
    assert set(ledger) == {"a.csv"}, "a refused path is never hashed"


def test_the_nightly_inbox_does_not_follow_links_out_of_it(engine, settings, tmp_path, secret):
    inbox = tmp_path / "inbox"
    settings = with_overrides(settings, site__inbox=str(inbox))
    night = date(2025, 1, 4)
    write(inbox / "loose.csv", HEADER + row(1))
    (inbox / "loose_out.csv").symlink_to(secret)
    write(tmp_path / "outside_night" / "x.csv", HEADER + row(667))
    (inbox / night.isoformat()).symlink_to(tmp_path / "outside_night", target_is_directory=True)
    summary = pipeline.ingest(settings, pipeline.partition_paths(settings, night), partition=night.isoformat())
    assert stored(engine)[0] == {"r1"}
    assert sorted(summary.errors) == sorted([f"cannot read {inbox / 'loose_out.csv'}: {pipeline.LEAVES_INBOX}",
                                             f"cannot read {inbox / night.isoformat()}: {pipeline.LEAVES_INBOX}"])
    # a link named on the command line outside the inbox is followed: someone typed it
    typed = tmp_path / "typed.csv"
    typed.symlink_to(secret)
    assert pipeline.ingest(settings, [typed]).accepted == 1


def test_a_fifo_or_a_broken_link_loose_in_the_inbox_is_named_not_dropped(engine, settings, tmp_path):
    inbox = tmp_path / "inbox"
    settings = with_overrides(settings, site__inbox=str(inbox))
    night = date(2025, 1, 4)
    write(inbox / "loose.csv", HEADER + row(1))
    os.mkfifo(inbox / "pipe.csv")
    (inbox / "gone.csv").symlink_to(tmp_path / "nowhere.csv")
    summary = pipeline.ingest(settings, pipeline.partition_paths(settings, night), partition=night.isoformat())
    assert stored(engine)[0] == {"r1"}
    assert summary.failed_files == 2
    assert sorted(e.split(": ", 1)[0] for e in summary.errors) == [f"cannot read {inbox / 'gone.csv'}",
                                                                   f"cannot read {inbox / 'pipe.csv'}"]


def test_the_quality_check_does_not_read_through_links_out_of_the_inbox(tmp_path, secret):
    inbox = tmp_path / "inbox"
    write(inbox / "loose.csv", HEADER + row(1))
    (inbox / "loose_out.csv").symlink_to(secret)
    assert pipeline.expand_paths([inbox / "loose.csv", inbox / "loose_out.csv"], inbox=inbox) == [inbox / "loose.csv"]


# ---- rows too long -----------------------------------------------------------------------------

def test_a_50_mb_csv_row_is_quarantined_and_the_rest_of_the_file_kept(engine, settings, tmp_path):
    path = tmp_path / "long.csv"
    with path.open("wb") as handle:
        handle.write((HEADER + row(1)).encode())
        handle.write(b"000002,r2,2160-0," + b"9" * (50 << 20) + b",mg/dL,2025-01-03T08:00:00,final\r\n")
        handle.write(row(3).encode())
    summary = pipeline.ingest(settings, [path])
    assert (summary.failed_files, summary.accepted, summary.quarantined) == (0, 2, 1), summary.errors
    results, held, _ = stored(engine)
    assert results == {"r1", "r3"}
    ((file_name, line, reason, raw),) = held
    assert (file_name, line, reason) == ("long.csv", 3, too_long(1 << 20))
    assert raw.startswith("000002,r2,2160-0,999") and len(raw) < 2000


@pytest.fixture
def small_rows(settings):
    """A 1,024-byte row limit: rows of a few kB are "too long" (fast to write in every format)."""
    return with_overrides(settings, ingest__max_row_bytes=1024)


def test_long_csv_rows_at_any_place(engine, small_rows, tmp_path):
    long = "000009,r9,2160-0,1.0,mg/dL,2025-01-03T08:00:00," + "x" * 3000
    labs = write(tmp_path / "labs.csv", HEADER + long + "\n" + row(1).rstrip() + "\r" + long)   # ends without a line break
    summary = pipeline.ingest(small_rows, [labs])
    results, held, _ = stored(engine)
    assert (summary.failed_files, results) == (0, {"r1"})
    assert sorted((line, reason) for _, line, reason, _ in held) == [(2, too_long(1024)), (4, too_long(1024))]


HL7_MESSAGE = ("MSH|^~\\&|LIS|HOSP|BONEWATCH|HOSP|20250301090000||ORU^R01|{id}|P|2.5.1\r"
               "PID|1||{mrn}^^^HOSP^MR||DOE^JANE||19500101|F{pad_pid}\r"
               "OBR|1||ORD{id}|BMP^Basic panel|||20250301080000+0000\r"
               "OBX|1|NM|2160-0^Creatinine^LN||0.9|mg/dL|||||F|||20250301080000+0000\r"
               "OBX|2|ED|PDF^Report^L||{pad_obx}||||||F\r"
               "OBX|3|NM|6768-6^ALP^LN||120|U/L|||||F|||20250301080000+0000\r")


def test_long_hl7_segments(engine, small_rows, tmp_path):
    """A long OBX (an embedded report) is set aside alone; a long PID takes its message's results
    with it (they cannot be attributed), and the next message is read."""
    text = (HL7_MESSAGE.format(id=1, mrn="000101", pad_pid="", pad_obx="A" * 5000)
            + HL7_MESSAGE.format(id=2, mrn="000102", pad_pid="|" + "B" * 5000, pad_obx="")
            + HL7_MESSAGE.format(id=3, mrn="000103", pad_pid="", pad_obx=""))
    summary = pipeline.ingest(small_rows, [write(tmp_path / "feed.hl7", text)])
    results, held, _ = stored(engine)
    assert summary.failed_files == 0
    assert {r.split("|")[0] for r in results} == {"ORD1", "ORD3"}
    reasons = sorted((line, reason) for _, line, reason, _ in held)
    assert (5, too_long(1024)) in reasons and (8, too_long(1024)) in reasons
    assert [line for line, reason in reasons if "segment not read" in reason] == [10, 11, 12]
    assert all("000102" not in reason and "BBBB" not in reason for _, reason in reasons)


def test_long_ndjson_lines(engine, small_rows, tmp_path):
    patient = ('{"resourceType": "Patient", "id": "p1", "identifier": [{"type": {"coding": [{"system": '
               '"http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}, "value": "000101"}]}')

    def observation(n: int, note: str = "") -> str:
        resource = {"resourceType": "Observation", "id": f"N{n}", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
                    "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2025-03-01T08:00:00+00:00",
                    "valueQuantity": {"value": 0.9, "unit": "mg/dL"}}
        return json.dumps({**resource, "note": [{"text": note}]} if note else resource)

    lines = [patient, observation(1), observation(2, "C" * 5000), observation(3), observation(4, "D" * 5000)]
    summary = pipeline.ingest(small_rows, [write(tmp_path / "obs.ndjson", "\n".join(lines))])
    results, held, _ = stored(engine)
    assert (summary.failed_files, results) == (0, {"N1", "N3"})
    assert sorted((line, reason) for _, line, reason, _ in held) == [(3, too_long(1024)), (5, too_long(1024))]
