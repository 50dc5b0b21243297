"""Input formats (SPEC 2): what a delivery is, and how it is read as a stream of canonical chunks.

Every reader turns its format into the same thing: `(kind, Chunk)` items, where `kind` says which
canonical parser takes the chunk and `Chunk.frame` holds raw strings in that parser's columns,
indexed by the row's place in the file (a line number; for a FHIR `.json`, the resource's ordinal in
a depth-first walk of the document, see `fhir`):

- `"labs"`: `feeds.LAB_COLUMNS` (patient_id, result_id, loinc, value, unit, collected_at, status);
  a FHIR lab frame has an 8th column, `collected_basis` (where `collected_at` came from, see `fhir`);
- `"events"`: `feeds.EVENT_COLUMNS` (patient_id, event_type, occurred_at, value, detail);
- `"patients"`: `PATIENT_COLUMNS` (ref, patient_id): FHIR Patient references seen in the file
  (`Patient/<id>`), kept so that later deliveries can resolve a `subject` to the MRN.

`Chunk.bad_rows` carries what the reader itself could not turn into a row (a message without a
PID, a resource that is not JSON): `(line, raw text, reason)`, quarantined as they are. A file that
cannot be read at all raises `SourceUnreadable` naming the file and the first bad line.

The canonical parsers (`feeds.parse_labs`, `feeds.parse_events`) then do every value-level check
(codes, units, numbers, censoring, dates, statuses) once, for every format alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bonewatch.config import Settings
from bonewatch.errors import SourceUnreadable
from bonewatch.ingest.reader import Chunk

PATIENT_COLUMNS = ["ref", "patient_id"]

#: format -> the feed its deliveries belong to (the data-quality record and the ledger use feeds).
FEED_OF_FORMAT = {
    "labs_csv": "labs",
    "events_csv": "events",
    "hl7": "hl7",
    "fhir_bundle": "fhir",
    "fhir_ndjson": "fhir",
}
#: the ledger's short format name
FMT_OF_FORMAT = {"labs_csv": "csv", "events_csv": "csv", "hl7": "hl7", "fhir_bundle": "json",
                 "fhir_ndjson": "ndjson"}
SUFFIXES = ".csv, .events.csv, .hl7, .json (FHIR Bundle or resource) or .ndjson (FHIR bulk export)"
#: The ledger's feed of a file that could not be read and whose feed neither its format nor its
#: name tells (`bonewatch.dashboard.metrics.UNREADABLE_FEED` reads it).
UNREADABLE_FEED = "unreadable"


def feed_of_name(name: str) -> str | None:
    """The feed a delivery was meant for, from its file name alone (for a file that cannot be
    opened or recognised): `.events.csv` events, other `.csv` labs (the canonical lab CSV),
    `.hl7`/`.oru`/`.hl7v2` hl7, `.json`/`.ndjson` fhir; None when the name does not tell."""
    name = name.lower()
    if name.endswith(".events.csv"):
        return "events"
    if name.endswith(".csv"):
        return "labs"
    if name.endswith((".hl7", ".oru", ".hl7v2")):
        return "hl7"
    if name.endswith((".json", ".ndjson")):
        return "fhir"
    return None


def _no_refs(refs: Collection[str]) -> dict[str, str]:
    return {}


@dataclass
class ReadContext:
    settings: Settings
    chunk_rows: int
    received_at: datetime
    #: earlier deliveries' FHIR Patient references -> MRN, looked up in bulk (`Patient/<id>` keys)
    patient_refs: Callable[[Collection[str]], dict[str, str]] = field(default=_no_refs)

    @property
    def max_row_bytes(self) -> int:
        """A row (CSV line, HL7 segment, NDJSON line) longer than this is quarantined, not read."""
        return self.settings.ingest.max_row_bytes


Item = tuple[str, Chunk]


def _peek(path: Path, size: int = 4096) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def _csv_format(header: bytes) -> str:
    """A CSV delivery's feed from its header row: events carry `event_type`, labs do not."""
    return "events_csv" if b"event_type" in header.lower() else "labs_csv"


def detect_format(path: Path) -> str:
    """The format of a delivery, from its name and, where the name is not enough, its content."""
    name = path.name.lower()
    if name.endswith(".events.csv"):
        return "events_csv"
    if name.endswith(".csv"):
        return _csv_format(_peek(path).split(b"\n", 1)[0])
    if name.endswith((".hl7", ".oru", ".hl7v2")):
        return "hl7"
    if name.endswith(".ndjson"):
        return "fhir_ndjson"
    if name.endswith(".json"):
        return "fhir_bundle"
    head = _peek(path).lstrip(b"\xef\xbb\xbf\x0b \t\r\n")
    if head.startswith(b"MSH"):
        return "hl7"
    if head.startswith(b"{"):
        first = head.split(b"\n", 1)[0]
        try:
            json.loads(first)
            return "fhir_ndjson"      # a whole JSON object on the first line: one resource a line
        except ValueError:
            return "fhir_bundle"
    header = head.split(b"\n", 1)[0]
    if b"patient_id" in header.lower():
        return _csv_format(header)
    raise SourceUnreadable(path, None, f"unsupported format (expected {SUFFIXES})")


def read(path: Path, fmt: str, ctx: ReadContext) -> Iterator[Item]:
    """Stream a delivery as `(kind, Chunk)` items (see the module docstring)."""
    from bonewatch.ingest import feeds, reader

    if fmt == "labs_csv":
        for chunk in reader.read_chunks(path, feeds.LAB_COLUMNS, ctx.chunk_rows, ctx.max_row_bytes):
            yield "labs", chunk
    elif fmt == "events_csv":
        for chunk in reader.read_chunks(path, feeds.EVENT_COLUMNS, ctx.chunk_rows, ctx.max_row_bytes):
            yield "events", chunk
    elif fmt == "hl7":
        from bonewatch.ingest import hl7

        yield from hl7.read_hl7(path, ctx)
    elif fmt == "fhir_bundle":
        from bonewatch.ingest import fhir

        yield from fhir.read_bundle(path, ctx)
    elif fmt == "fhir_ndjson":
        from bonewatch.ingest import fhir

        yield from fhir.read_ndjson(path, ctx)
    else:
        raise SourceUnreadable(path, None, f"unsupported format {fmt!r}")


def first_resource_type(path: Path) -> str | None:
    """For ordering a folder: the resourceType of an NDJSON file's first line (Patients load first,
    so the other resources of the same export can resolve their subject)."""
    try:
        first = _peek(path, 1 << 16).split(b"\n", 1)[0]
        return json.loads(first).get("resourceType")
    except (ValueError, AttributeError, OSError):
        return None
