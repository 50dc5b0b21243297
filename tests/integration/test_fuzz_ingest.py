"""Fuzzing the readers and ingest (issue: "a fuzz test feeds random mutations of valid HL7, FHIR and
CSV to ingest: no unhandled exception").

Seeds are small valid deliveries written with the package's own writers (`hl7.write_hl7`,
`fhir.write_bundle`, `fhir.write_ndjson`) and as canonical lab / event CSV. Hypothesis applies one
to three mutations to each: byte-level ones (delete a slice, insert separator, framing and
non-UTF-8 bytes, replace a byte, truncate, duplicate or swap lines) and structure-aware ones (an
HL7 field, a JSON value replaced by another type, a CSV field). Two levels:

1. the reader contract, many examples: `detect_format` + `sources.read` + `pipeline._parse_chunk` +
   `feeds.implausible` either succeed, every rejected row carrying a one-line reason and a line
   number >= 1, and every row fitting the store (column lengths, no NUL, valid Unicode), or raise
   `SourceUnreadable` in one line naming the file; nothing else;
2. the whole `pipeline.ingest`, fewer examples (GX validates every chunk), into one store a test
   (SQLite, and PostgreSQL, the stricter): the summary always comes back, a file fails in one
   line naming it or loads, and the ledger holds exactly the summary's counts.

Derandomised and without an example database, so every run (and CI) tries the same inputs. The
inputs the fuzzing found crashing ingest are pinned at the end, on both stores.
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from bonewatch import pipeline
from bonewatch.config import load_settings
from bonewatch.errors import SourceUnreadable
from bonewatch.ingest import feeds, fhir, hl7, sources
from bonewatch.store.tables import clinical_events, deliveries, lab_results, patient_refs, quarantine

# --------------------------------------------------------------------------------------------
# seeds

LABS = [
    ("000101", "R1", "2160-0", "85", "umol/L", "2025-03-01T08:00:00", "final"),
    ("000101", "R2", "17861-6", "2.3", "mmol/L", "2025-03-01T08:00:00", "final"),
    ("000101", "R3", "6768-6", "<5", "U/L", "2025-03-01T08:00:00", "corrected"),
    ("000101", "R3", "6768-6", "7", "U/L", "2025-03-01T08:00:00", "final"),
    ("000102", "R4", "1751-7", "38", "g/L", "2025-03-02", "cancelled"),
    ("000102", "R5", "17838-4", ">1000", "ng/mL", "2025-03-02T09:30:00+01:00", "final"),
    ("000102", "R6", "2324-2", "0.5", "ukat/L", "2025-03-02T09:30:00+01:00", "preliminary"),
    ("000103", "R7", "14956-7", "<=30", "mg/(24.h)", "2025-03-03T07:15:00Z", "final"),
]
EVENTS = [
    ("000101", "birth_date", "2025-01-01", "1950-04-02", ""),
    ("000101", "sex", "2025-01-01", "F", ""),
    ("000101", "diagnosis", "2024-06-01", "MM", "C90.00"),
    ("000101", "bisphosphonate_dose", "2025-02-01T10:00:00", "zoledronic_acid", "4"),
    ("000101", "dental_exam", "2024-12-01", "completed", ""),
    ("000102", "birth_date", "2025-01-02T09:00:00+01:00", "1948-11-30", ""),
    ("000102", "sex", "2025-01-02T09:00:00+01:00", "male", ""),
    ("000102", "weight_kg", "2025-02-01", "72.5", ""),
    ("000102", "response", "2025-02-15", "VGPR", ""),
    ("000102", "bisphosphonate_dose", "2025-02-20", "denosumab", "120"),
    ("000103", "sex", "2025-01-03", "f", ""),
    ("000103", "albuminuria_mg_24h", "2025-02-10", "<30", ""),
    ("000103", "myeloma_therapy_start", "2025-01-10", "bortezomib", ""),
]

#: format -> the file name each example is written under (the suffix picks the reader)
NAMES = {"hl7": "delivery.hl7", "fhir_bundle": "bundle.json", "fhir_ndjson": "export.ndjson",
         "labs_csv": "labs.csv", "events_csv": "clinic.events.csv"}
FORMATS = list(NAMES)


def _csv(columns: list[str], rows: list[tuple]) -> bytes:
    return ("\n".join([",".join(columns), *(",".join(row) for row in rows)]) + "\n").encode()


@cache
def seeds() -> dict[str, bytes]:
    """The valid deliveries every mutation starts from, built once with the package's writers."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        hl7.write_hl7(folder / "seed.hl7", LABS)
        fhir.write_bundle(folder / "seed.json", LABS, EVENTS)
        # one bulk-export file holding every resource type, Patients first (as a folder loads)
        ndjson = b"".join(p.read_bytes() for p in fhir.write_ndjson(folder / "ndjson", LABS, EVENTS))
        return {"hl7": (folder / "seed.hl7").read_bytes(), "fhir_bundle": (folder / "seed.json").read_bytes(),
                "fhir_ndjson": ndjson, "labs_csv": _csv(feeds.LAB_COLUMNS, LABS),
                "events_csv": _csv(feeds.EVENT_COLUMNS, EVENTS)}


# --------------------------------------------------------------------------------------------
# mutations

SPECIAL = [b"\r", b"\n", b"\r\n", b"\x0b", b"\x1c", b"\x1c\r", b"|", b"^", b"~", b"\\", b"&", b"{", b"}",
           b"[", b"]", b'"', b",", b":", b"\x00", b"\xff", b"\xfe", b"\xc3", b"\xc3\x28", b"\xe9", b"\xed\xa0\x80",
           b"\xef\xbb\xbf", b"\xc2\x85", b"\xe2\x80\xa8", b"MSH|^~\\&|", b"PID|1||", b"OBR|1||", b"OBX|1|NM|",
           b"\\X0D0A\\", b"\\E\\", b"\\F\\", b"BHS|", b"FHS|", b"-", b".", b"e", b"9" * 30]
insert_bytes = st.lists(st.sampled_from(SPECIAL) | st.binary(min_size=1, max_size=4), min_size=1,
                        max_size=4).map(b"".join)
_LINE_END = re.compile(rb"(?<=\r(?!\n))|(?<=\n)")


def _lines(data: bytes) -> list[bytes]:
    """Lines (HL7 segments) with their terminators, so that joining them gives the bytes back."""
    return [part for part in _LINE_END.split(data) if part]


@st.composite
def delete_slice(draw, data: bytes) -> bytes:
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, min(len(data), start + 80)))
    return data[:start] + data[end:]


@st.composite
def insert(draw, data: bytes) -> bytes:
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(insert_bytes) + data[at:]


@st.composite
def replace_byte(draw, data: bytes) -> bytes:
    if not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]


@st.composite
def truncate(draw, data: bytes) -> bytes:
    return data[:draw(st.integers(0, len(data)))]


@st.composite
def duplicate_line(draw, data: bytes) -> bytes:
    lines = _lines(data)
    if not lines:
        return data
    i = draw(st.integers(0, len(lines) - 1))
    j = draw(st.integers(0, len(lines)))
    lines.insert(j, lines[i])
    return b"".join(lines)


@st.composite
def swap_lines(draw, data: bytes) -> bytes:
    lines = _lines(data)
    if len(lines) < 2:
        return data
    i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
    lines[i], lines[j] = lines[j], lines[i]
    return b"".join(lines)


BYTE_MUTATIONS = [delete_slice, insert, replace_byte, truncate, duplicate_line, swap_lines]

HL7_VALUES = [b"", b"^", b"~", b"~~", b"^^^^^", b"&&", b"\\", b"\\X0D0A\\", b"\\X41\\", b"\\XZZ\\", b"\\E\\",
              b"\\F\\", b"\\.br\\", b"\\H\\x\\N\\", b"ORU^R01", b"ADT^A01", b"ORU", b"2.9", b"2.5.1", b"2.3",
              b"8859/1", b"UNICODE UTF-8", b"8859/99", b"20250230", b"20250301120000+9999", b"2025030112",
              b"99999999999999", b"19000101", b"<^5", b">=^1000", b"^5", b"=^", b"<>^1^-^2", b"SN", b"NM", b"ST",
              b"F", b"C", b"P", b"X", b"W", b"D", b"I", b"", b"1e999", b"-0", b"NaN", b"2160-0^^LN", b"17861-6",
              b"umol/L", b"mg/dL", b"0001", b"\xe9\xe8", b"\xc3\xa9", b"\x00", b"-1", b"x" * 300]
CSV_VALUES = ["", " ", '"', '""', '"a,b"', '"unterminated', "<5", ">=1000", "<>", "1e400", "-1e400", "nan", "inf",
              "-0", "0", "1" * 400, "2025-02-30", "2025-13-01", "99999-01-01", "0001-01-01", "1677-09-21",
              "2262-04-12", "2025-03-01T25:00:00", "2025-03-01T08:00:00+99:99", "2025-03-01T08:00:00Z",
              "2099-01-01", "final", "x", "F", "entered-in-error", "maybe", "diagnosis", "sex", "weight_kg",
              "birth_date", "bisphosphonate_dose", "response", "care_team", "zoledronic_acid", "-4", "5000",
              "2160-0", "6768-6", "ukat/L", "µmol/L", "[IU]/L", "mg/(24.h)", "é", "\u2028", "\x85", "\x00", "-1",
              "x" * 300]
JSON_SCALARS = ["null", "true", "false", "0", "-1", "1.5", "1e999999", "-1e999999", "NaN", "Infinity", "-Infinity",
                "1" * 5000, "0." + "1" * 5000, '""', '" "', '"\\u0000"', '"\\ud800"', '"a\\nb\\rc"', '"\\u2028"',
                '"<5"', '"Patient/"', '"Patient/x"', '"urn:uuid:"', '"2025-02-30"', '"final"', '"cancelled"',
                '"x"', '"' + "x" * 70000 + '"', "[]", "{}", "[null]", '{"resourceType": "Patient"}',
                '{"resourceType": "Bundle"}', '[{"coding": 5}]', '{"coding": [{"system": "http://loinc.org"}]}',
                "[" * 3000 + "]" * 3000, '{"a":' * 1500 + "1" + "}" * 1500]


def _json_paths(value, path=()):
    """Every (path) of a parsed JSON document, containers included."""
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _json_paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _json_paths(child, (*path, index))


_PLACEHOLDER = "\x00fuzz-placeholder\x00"


def _replace_json(text: str, draw) -> str | None:
    """One JSON document with a random value (or container) replaced by a random JSON text; None
    when the text is not JSON (an earlier mutation broke it)."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):     # an earlier mutation broke it, or nested it deeply
        return None
    paths = list(_json_paths(document))
    path = draw(st.sampled_from(paths))
    replacement = draw(st.sampled_from(JSON_SCALARS) | st.text(max_size=12).map(json.dumps)
                       | st.integers(-10**30, 10**30).map(str))
    if not path:
        return replacement
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = _PLACEHOLDER
    return json.dumps(document).replace(json.dumps(_PLACEHOLDER), replacement, 1)   # ASCII: lone surrogates too


@st.composite
def json_value(draw, data: bytes) -> bytes:
    text = data.decode("utf-8", "replace")
    if text.lstrip().startswith("{") and "\n{" in text.strip():        # NDJSON: one resource a line
        lines = text.split("\n")
        candidates = [i for i, line in enumerate(lines) if line.strip()]
        if not candidates:
            return data
        i = draw(st.sampled_from(candidates))
        replaced = _replace_json(lines[i], draw)
        if replaced is None:
            return data
        lines[i] = replaced
        return "\n".join(lines).encode()
    replaced = _replace_json(text, draw)
    return data if replaced is None else replaced.encode()


@st.composite
def hl7_field(draw, data: bytes) -> bytes:
    lines = _lines(data)
    if not lines:
        return data
    i = draw(st.integers(0, len(lines) - 1))
    body = lines[i].rstrip(b"\r\n")
    fields = body.split(b"|")
    j = draw(st.integers(0, len(fields) - 1))
    fields[j] = draw(st.sampled_from(HL7_VALUES) | st.text(max_size=8).map(str.encode))
    lines[i] = b"|".join(fields) + lines[i][len(body):]
    return b"".join(lines)


@st.composite
def csv_field(draw, data: bytes) -> bytes:
    lines = _lines(data)
    if not lines:
        return data
    # mostly a data row: a damaged header only makes the file unreadable (byte mutations do that too)
    i = 0 if len(lines) == 1 or draw(st.integers(0, 9)) == 0 else draw(st.integers(1, len(lines) - 1))
    body = lines[i].rstrip(b"\r\n")
    fields = body.split(b",")
    j = draw(st.integers(0, len(fields) - 1))
    fields[j] = draw(st.sampled_from(CSV_VALUES) | st.text(max_size=8)).encode()
    lines[i] = b",".join(fields) + lines[i][len(body):]
    return b"".join(lines)


STRUCTURE_MUTATIONS = {"hl7": [hl7_field], "fhir_bundle": [json_value], "fhir_ndjson": [json_value],
                       "labs_csv": [csv_field], "events_csv": [csv_field]}


@st.composite
def mutated(draw, fmt: str) -> bytes:
    """A seed delivery with one to three mutations; three in four are structure-aware (they mostly
    keep the file readable, so they reach the parsers and the store; a byte-level one mostly breaks
    a JSON document or a CSV header)."""
    data = seeds()[fmt]
    structural = STRUCTURE_MUTATIONS[fmt]
    for _ in range(draw(st.integers(1, 3))):
        byte_level = draw(st.integers(0, 3)) == 0
        mutation = draw(st.sampled_from(BYTE_MUTATIONS if byte_level else structural))
        data = draw(mutation(data))
    return data


# --------------------------------------------------------------------------------------------
# checks


def _one_line(text: str) -> bool:
    """One line as Python (and so the CLI, logs and exports) splits lines."""
    return isinstance(text, str) and text != "" and text.splitlines() == [text]


def _check_unreadable(exc: SourceUnreadable, path: Path) -> None:
    message = str(exc)
    assert path.name in message, message
    assert _one_line(message), repr(message)
    assert exc.line is None or exc.line >= 1, message


def _check_rejected(rejected, where: str) -> None:
    for line, reason in zip(rejected["line"], rejected["reason"], strict=True):
        assert int(line) >= 1, f"{where}: quarantined row without a line ({line}, {reason!r})"
        assert _one_line(reason), f"{where}: reason is not one line: {reason!r}"
    _check_storable(rejected, quarantine, where)


TABLE_OF_KIND = {"labs": lab_results, "events": clinical_events, "patients": patient_refs}


def _check_storable(frame, table, where: str) -> None:
    """What either store refuses, checked here already so that the many SQLite-free examples catch
    it: text longer than its column (PostgreSQL), a NUL (PostgreSQL), a lone surrogate (both)."""
    for column in frame.columns:
        values = [v for v in frame[column].tolist() if isinstance(v, str)]
        limit = getattr(table.c[column].type, "length", None) if column in table.c else None
        for value in values:
            assert "\x00" not in value, f"{where}: NUL in {column}"
            value.encode("utf-8")                      # UnicodeEncodeError: a lone surrogate
            assert limit is None or len(value) <= limit, f"{where}: {column} longer than {limit}"


def read_everything(path: Path, app_settings, chunk_rows: int) -> None:
    """The reader contract on one file, as `pipeline._load` drives it (without the store and GX)."""
    received_at = datetime.now(UTC).replace(tzinfo=None)
    ctx = sources.ReadContext(app_settings, chunk_rows, received_at)
    try:
        fmt = sources.detect_format(path)
        for kind, chunk in sources.read(path, fmt, ctx):
            assert kind in ("labs", "events", "patients", "codes"), kind
            frame = chunk.frame
            assert frame.index.is_unique, f"{kind}: two rows of one line in a chunk"
            assert len(frame) == 0 or frame.index.min() >= 1, f"{kind}: a row without a line"
            for line, _raw, reason in chunk.bad_rows:
                assert line >= 1, f"{kind}: bad row without a line ({line}, {reason!r})"
                assert isinstance(reason, str) and reason.strip(), f"{kind}: bad row without a reason"
            rows, rejected, skipped = pipeline._parse_chunk(app_settings, kind, chunk, "fuzz", received_at)
            # every row is stored, quarantined or counted as not monitored (SPEC 2.5)
            counted = int(skipped["rows"].sum()) if skipped is not None and len(skipped) else 0
            assert len(rows) + len(rejected) + counted == len(frame) + len(chunk.bad_rows)
            if kind == "codes":
                continue
            _check_rejected(rejected, kind)
            _check_storable(rows, TABLE_OF_KIND[kind], kind)
            if kind in ("labs", "events") and len(rows):
                reasons = feeds.implausible(kind, rows, app_settings.ingest.plausible)
                assert all(r == "" or _one_line(r) for r in reasons)
    except SourceUnreadable as exc:
        _check_unreadable(exc, path)


# --------------------------------------------------------------------------------------------
# level 1: the readers


def test_seeds_are_valid(tmp_path):
    """The seeds themselves load whole: the mutations start from good deliveries."""
    app_settings = load_settings()
    received_at = datetime.now(UTC).replace(tzinfo=None)
    for fmt, data in seeds().items():
        path = tmp_path / NAMES[fmt]
        path.write_bytes(data)
        assert sources.detect_format(path) == fmt
        rows = rejected = 0
        for kind, chunk in sources.read(path, fmt, sources.ReadContext(app_settings, 1000, received_at)):
            parsed, bad, _ = pipeline._parse_chunk(app_settings, kind, chunk, "seed", received_at)
            rows += len(parsed) if kind != "patients" else 0
            rejected += len(bad)
        assert rejected == 0, fmt
        assert rows == {"hl7": len(LABS), "labs_csv": len(LABS), "events_csv": len(EVENTS)}.get(
            fmt, len(LABS) + len(EVENTS)), fmt


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_readers_survive_mutations(fmt, data, tmp_path):
    app_settings = load_settings()
    path = tmp_path / NAMES[fmt]
    path.write_bytes(data.draw(mutated(fmt), label="delivery"))
    # one example in four in tiny chunks (every chunk boundary of a reader is crossed; parsing many
    # small chunks is what costs), the others whole as the default chunk size reads them
    tiny = data.draw(st.integers(0, 3), label="tiny chunks") == 0
    read_everything(path, app_settings, 6 if tiny else 50_000)


# --------------------------------------------------------------------------------------------
# level 2: the whole ingest into one store


#: examples a format on each store: PostgreSQL is the stricter one (identifier lengths, no NUL in
#: text), SQLite the faster
INGEST_EXAMPLES = {"sqlite": 10, "postgresql": 6}


def _store_settings(db_url: str, tmp_path: Path, monkeypatch):
    """Settings on a migrated store, with small chunks (several chunks, and writer hand-overs, a file)."""
    config = tmp_path / "bonewatch.toml"
    config.write_text("[ingest]\nchunk_size = 4\n")
    monkeypatch.setenv("BONEWATCH_CONFIG", str(config))
    monkeypatch.setenv("BONEWATCH_DATABASE_URL", db_url)
    app_settings = load_settings()
    return app_settings, pipeline.engine_for(app_settings, migrate=True)


def check_ingest(app_settings, engine, path: Path, fmt: str):
    """Ingest one file; check the summary against the ledger and the quarantine; return the summary."""
    summary = pipeline.ingest(app_settings, [path])
    assert summary.files == 1
    assert summary.failed_files in (0, 1)
    assert len(summary.errors) == summary.failed_files
    for error in summary.errors:
        assert path.name in error and _one_line(error), repr(error)
    digest = pipeline.file_digest(path)
    with engine.connect() as conn:
        ledger = conn.execute(select(deliveries).where(deliveries.c.delivery_id == digest)).mappings().one()
        stored = conn.execute(select(func.count()).select_from(quarantine)
                              .where(quarantine.c.delivery_id == digest)).scalar_one()
        bad_lines = conn.execute(select(quarantine.c.source_line, quarantine.c.reason)
                                 .where(quarantine.c.delivery_id == digest)).all()
    if summary.failed_files:
        assert (ledger["status"], summary.accepted, summary.quarantined, stored) == ("failed", 0, 0, 0)
        assert ledger["error"] == summary.errors[0]
        return summary
    assert ledger["status"] == "loaded"
    if summary.skipped_files:                              # the same bytes came up before
        return summary
    assert (ledger["rows_accepted"], ledger["rows_quarantined"], ledger["rows_not_monitored"]) == (
        summary.accepted, summary.quarantined, summary.not_monitored)
    # two reasons for one line (a FHIR Patient's birth date and sex) keep one quarantine row
    assert stored <= summary.quarantined
    assert (stored == 0) == (summary.quarantined == 0)
    if fmt not in ("fhir_bundle", "fhir_ndjson"):          # FHIR also counts the Patient references
        assert ledger["rows_total"] == summary.accepted + summary.quarantined + summary.not_monitored
    for line, reason in bad_lines:
        assert line >= 1 and _one_line(reason), (line, reason)
    return summary


@pytest.mark.parametrize("fmt", FORMATS)
def test_ingest_survives_mutations(fmt, db_url, tmp_path, monkeypatch):
    app_settings, engine = _store_settings(db_url, tmp_path, monkeypatch)
    counter = itertools.count()
    store = "postgresql" if db_url.startswith("postgresql") else "sqlite"

    @settings(max_examples=INGEST_EXAMPLES[store], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(delivery=mutated(fmt))
    def ingest_one(delivery: bytes) -> None:
        folder = tmp_path / f"example{next(counter)}"
        folder.mkdir()
        path = folder / NAMES[fmt]
        path.write_bytes(delivery)
        check_ingest(app_settings, engine, path, fmt)

    try:
        ingest_one()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# what the fuzzing found, pinned: each file loads its good rows and quarantines the bad one with
# its reason (before the fixes, each raised out of ingest)

_LAB_HEADER = ",".join(feeds.LAB_COLUMNS) + "\n"
_EVENT_HEADER = ",".join(feeds.EVENT_COLUMNS) + "\n"
_GOOD_LAB = "000101,G1,2160-0,0.9,mg/dL,2025-03-01T08:00:00,final\n"
_WHEN = "2025-03-01T08:00:00"


def _observation(rid: str, code: str = "2160-0", patient: str = "000101", when: str = _WHEN) -> str:
    """A lab Observation as JSON text (ASCII: a lone surrogate or a NUL is written as its escape)."""
    return json.dumps({"resourceType": "Observation", "id": rid, "status": "final",
                       "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                       "subject": {"identifier": {"value": patient}}, "effectiveDateTime": when,
                       "valueQuantity": {"value": 0.9, "unit": "mg/dL", "code": "mg/dL"}})


def _bundle(*resources: str) -> str:
    entries = ",".join('{"resource": ' + resource + "}" for resource in resources)
    return '{"resourceType": "Bundle", "type": "collection", "entry": [' + entries + "]}"


def _patient(rid: str, mrn: str, **fields: str) -> str:
    return json.dumps({"resourceType": "Patient", "id": rid, "identifier": [{"value": mrn}], **fields})


def _hl7(code: str) -> bytes:
    rows = [("000101", "G1", "2160-0", "0.9", "mg/dL", _WHEN, "final"),
            ("000101", "G1", "CODE", "0.9", "mg/dL", _WHEN, "final")]
    with tempfile.TemporaryDirectory() as folder:
        hl7.write_hl7(Path(folder) / "x.hl7", rows)
        return (Path(folder) / "x.hl7").read_bytes().replace(b"CODE", code.encode())


PINNED = {
    # a date with a leading minus: a year before 1, beyond pandas' timestamps (OutOfBoundsDatetime)
    "minus_year.csv": (_LAB_HEADER + _GOOD_LAB + "000101,G2,2160-0,0.9,mg/dL,-1,final\n", "date out of range «-1»"),
    "minus_year.events.csv": (_EVENT_HEADER + "000101,sex,2025-01-01,F,\n000101,sex,-0001-01-01,F,\n",
                              "date out of range"),
    "minus_year.json": (_bundle(_observation("G1"), _observation("G2", when="-0")), "date out of range"),
    # a line break in a code (a JSON escape, an HL7 hex escape): the reason was two lines; such a
    # field is no code at all, and the reason does not quote it
    "newline_code.json": (_bundle(_observation("G1"), _observation("G2", code="2160\n-0")),
                          "malformed code"),
    "newline_code.hl7": (_hl7("21\\X0D0A\\60-0"), "malformed code"),
    # a lone surrogate escape: a string pandas, SQLite and PostgreSQL cannot encode (UnicodeEncodeError)
    "surrogate.json": (_bundle(_observation("G1"), _observation("G2", patient="\ud800")), "lone surrogate"),
    "surrogate.ndjson": (_observation("G1") + "\n" + _observation("G2", patient="0\udc00") + "\n", "lone surrogate"),
    # PostgreSQL: no NUL in text, identifiers as long as their columns (DataError, StringDataRightTruncation)
    "nul.csv": (_LAB_HEADER + _GOOD_LAB + "000101,G2,2160-0,0.9,mg/\x00dL,2025-03-01T08:00:00,final\n",
                "NUL character in the row"),
    "nul.events.csv": (_EVENT_HEADER + "000101,sex,2025-01-01,F,\n000101,care_team,2025-01-01,te\x00am,\n",
                       "NUL character in the row"),
    "nul.json": (_bundle(_observation("G1"), _observation("G2", patient="00\x001")), "NUL character in the row"),
    "long_patient.csv": (_LAB_HEADER + _GOOD_LAB + "9" * 65 + ",G2,2160-0,0.9,mg/dL,2025-03-01T08:00:00,final\n",
                         "patient_id longer than 64 characters"),
    "long_result.csv": (_LAB_HEADER + _GOOD_LAB + "000101," + "G" * 201 + ",2160-0,0.9,mg/dL,2025-03-01,final\n",
                        "result_id longer than 200 characters"),
    "long_patient.events.csv": (_EVENT_HEADER + "000101,sex,2025-01-01,F,\n" + "9" * 65 + ",sex,2025-01-01,F,\n",
                                "patient_id longer than 64 characters"),
    "long_patient.ndjson": (_patient("p1", "000101", gender="female") + "\n" + _patient("p2", "9" * 65) + "\n",
                            "Patient id or identifier too long"),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_inputs_quarantine_their_bad_row(name, db_url, tmp_path, monkeypatch):
    text, reason = PINNED[name]
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    read_everything(path, load_settings(), 3)
    app_settings, engine = _store_settings(db_url, tmp_path, monkeypatch)
    try:
        summary = check_ingest(app_settings, engine, path, sources.detect_format(path))
        with engine.connect() as conn:
            reasons = conn.execute(select(quarantine.c.reason)).scalars().all()
    finally:
        engine.dispose()
    assert (summary.failed_files, summary.accepted, summary.quarantined) == (0, 1, 1), summary
    assert len(reasons) == 1 and reason in reasons[0], reasons
