"""HL7 v2 ORU^R01 lab deliveries (SPEC 2.2): stream a file as canonical chunks, and write one.

`read_hl7` reads the file incrementally, one message at a time, and turns every OBX segment into a
row of raw strings in `feeds.LAB_COLUMNS` ("labs" chunks) and every PID's birth date and sex into
rows in `feeds.EVENT_COLUMNS` ("events" chunks); `feeds.parse_labs` / `feeds.parse_events` then do
every value-level check (codes, units, numbers, censoring, dates, statuses) exactly as for the CSV
feeds. The mapping:

- PID-3 -> patient_id: the repetition whose identifier type (CX.5) is MR, else the first non-empty
  repetition; component 1 only, as sent (leading zeros kept);
- PID-7 -> a `birth_date` event (its date part, `YYYY-MM-DD`; a value that is not a full calendar
  date from 1900 on is a bad row whose reason does not quote it); PID-8 -> a `sex` event for F or
  M (U, O, A, N, empty: nothing). Their `occurred_at` is when the message was made (MSH-7), else the
  first OBR-7 of the message, else the day the file was received (SPEC 2.5 treats them as timeless).
  Within a chunk, one row per patient, fact and value (the last one sent): a file of a thousand
  messages for one patient gives two events, not two thousand;
- OBX-3 -> loinc: of its codings (identifier + coding system: components 1-3, the alternate 4-6
  and, in the v2.7+ CWE that some v2.5.1 profiles pre-adopt, the second alternate 10-12) the LOINC
  one (coding system `LN`, or the literal `LOINC`, any case) wherever it is; else the first whose
  code is in `[ingest] code_map`; else the first code sent (`feeds.parse_labs` decides what is
  monitored). `001370^Creatinine^L^2160-0^Creatinine^LN` (the LabCorp shape) gives `2160-0`;
- result_id: the identity of the result within its accession (below);
- OBX-14, else OBR-7 -> collected_at, `YYYYMMDD[HH[MM[SS[.S...]]]][+/-ZZZZ]` rendered as ISO-8601
  (`+HH:MM` only when an offset was sent; a date alone stays a date); a malformed timestamp is
  passed through as sent, so the canonical parser rejects it as an impossible date;
- OBX-6.1 -> unit;
- OBX-5 -> value: for value type SN (structured numeric) comparator + number (`<^5` -> `<5`,
  `>=^1000` -> `>=1000`, `^5` -> `5`); for any other type, component 1;
- OBX-11 -> status: F, C, P, X as sent; W (wrong) and D (deleted) withdraw a result -> `cancelled`;
  I, R, S (not yet final) -> `preliminary`; anything else as sent (and rejected downstream).

A result's identity (SPEC 2.2) must be unique within an accession, where labs put several OBR
groups (panels) under one filler order number and restart OBX-1 in each, and must be the same when
a later message corrects the result (OBX-11 `C`), so that the correction replaces it. It is made of:

1. the order: the filler order number (OBR-3.1, with its namespace OBR-3.2 when sent as
   `number^namespace`); when OBR-3 is empty, the filler number of the ORC before the OBR (ORC-3);
   when neither is sent, the placer order number (OBR-2, else ORC-2) prefixed `placer:`, so a
   placer number never meets a filler number of the same value;
2. the OBR's universal service id (OBR-4.1; when it is empty, the alternate identifier 4.4, else 4.10);
3. the OBX-3 code chosen above, and the OBX-4 sub-id when sent;
4. when the same test occurs again with the same sub-id under the same order and service in one
   message (a repeated OBX), its occurrence number (2, 3, ...): the n-th copy is the n-th result.

The parts are joined with `|` (each part HL7-escaped, so no two identities meet):
`9700123^LAB|CMP|2160-0`, `9700123^LAB|CMP|2160-0|1`, `9700123^LAB|CMP|2160-0||2`. An identity
longer than 120 characters keeps its first 79 and appends `#` + its SHA-1. OBX-1 (set id) is not
part of it. An OBX whose order has no number at all is still emitted, with an empty result_id
(`feeds.parse_labs` quarantines it if bonewatch monitors its code).

The structure of each message (segments, fields, repetitions, components) is parsed with
python-hl7 (`hl7.parse`): it is lenient, small and well kept. hl7apy was not chosen: it validates
every message strictly against the version's message structures (a feed's harmless deviations
would reject whole messages) and is much slower. Field values are read and unescaped here rather
than with python-hl7's `extract_field`, whose unescaping logs the field text (patient data) on an
unknown escape sequence.

Line numbers: every segment terminator (`\\r`, `\\n` or `\\r\\n`) ends a physical line, so the
`\\r`, `\\n` and `\\r\\n` forms of one file number their segments alike. MLLP framing (`<VT>` before a
message, `<FS><CR>` after it) and a UTF-8 byte-order mark are stripped; a line that held nothing
but framing bytes is framing, not data, and is not counted.

Charset: UTF-8, unless a message's MSH-18 declares ISO 8859 (`8859/1` is latin-1): that message
and the rest of the file are decoded with it. A byte that is not UTF-8 in a message that declares
nothing makes the file unreadable, unless some message of the file declares 8859/x.

What cannot become a row is a bad row `(line, segment text, reason)`; the reasons are plain lines
that never carry a patient identifier. A file that is empty, not HL7 or not decodable raises
`SourceUnreadable`.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import hl7
import pandas as pd

from bonewatch.errors import SourceUnreadable
from bonewatch.ingest.feeds import EVENT_COLUMNS, LAB_COLUMNS
from bonewatch.ingest.parsing import STATUS_MAP, quote
from bonewatch.ingest.reader import MAX_ROW_BYTES, Chunk, LongLines, cut_rows
from bonewatch.units import LOINC

if TYPE_CHECKING:
    from bonewatch.ingest.sources import ReadContext

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")
#: OBX-11 codes that bonewatch maps itself; F, C, P, X go through `parsing.parse_statuses`.
STATUS_OF_HL7 = {"W": "cancelled", "D": "cancelled", "I": "preliminary", "R": "preliminary",
                 "S": "preliminary"}
HEAD_BYTES = 64 * 1024
_BLOCK = 1 << 20
_BOM = b"\xef\xbb\xbf"
_FRAMING = b"\x0b\x1c"
_EOL = re.compile(rb"\r\n|\r|\n")
_MSH_AT_SEGMENT_START = re.compile(rb"(?:\A|[\r\n\x0b\x1c])(?:\xef\xbb\xbf)?[ \t]*MSH")
_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")
_RESULT_SEGMENTS = {"PID", "OBR", "OBX"}   # the segments parsed; ORC is read only when needed
_TS = re.compile(r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,4})?)?)?)?([+-]\d{4})?")
_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?\s*(Z|[+-]\d{2}:?\d{2})?")
_CENSORED = re.compile(r"\s*([<>]=?)\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")
_NUMBER = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")
_COMPARATORS = {"", "=", "<", ">", "<=", ">=", "<>"}
_LETTER_OF_STATUS = {"final": "F", "corrected": "C", "preliminary": "P", "cancelled": "X"}
#: coding systems that name LOINC in OBX-3 (HL7 table 0396 says `LN`; some interfaces spell it out)
LOINC_SYSTEMS = frozenset({"LN", "LOINC"})
#: (identifier, coding system) component positions of the codings of a CE / CWE (0-based)
_CODINGS = ((0, 2), (3, 5), (9, 11))
#: administrative sex (PID-8, HL7 table 0001) -> the `sex` event; U, O, A, N and the rest: nothing
SEX_OF_HL7 = {"F": "F", "M": "M"}
RESULT_ID_LONGEST = 120               # the store holds 200; a longer identity is hashed (see above)
_RESULT_ID_KEPT = RESULT_ID_LONGEST - 41
PLACER_PREFIX = "placer:"

Line = tuple[int, bytes]
Bad = tuple[int, str, str]


# --------------------------------------------------------------------------- reading: bytes -> lines


def _physical_lines(handle: BinaryIO) -> Iterator[bytes]:
    """Every physical line of the file, without its terminator (`\\r\\n`, `\\r` or `\\n`)."""
    pending = b""
    while True:
        block = handle.read(_BLOCK)
        if not block:
            break
        data = pending + block
        cut = len(data) - 1 if data.endswith(b"\r") else len(data)   # a `\r\n` may straddle blocks
        parts = _EOL.split(data[:cut])
        pending = parts.pop() + data[cut:]
        yield from parts
    if pending:
        parts = _EOL.split(pending)
        if parts[-1] == b"":
            parts.pop()
        yield from parts


class _TooLong(bytes):
    """A segment longer than `[ingest] max_row_bytes`, not read: its value is its first bytes."""


def _lines(handle: BinaryIO, limit: int = MAX_ROW_BYTES) -> Iterator[Line]:
    """(line number, content) of every non-blank line, MLLP framing and byte-order marks stripped.
    A line of nothing but framing bytes is not counted (see the module docstring). A line longer
    than `limit` bytes comes as a `_TooLong` of its first bytes (it is never held whole)."""
    stream = LongLines(handle, limit)
    number = physical = 0
    for raw in _physical_lines(stream):
        physical += 1
        if not raw and stream.cut and stream.cut[0][0] == physical:
            number += 1
            yield number, _too_long(stream.cut.pop(0)[1])
            continue
        content = raw.strip(_FRAMING)
        if raw and not content:
            continue                       # `<FS>` alone on its line: framing, not a line
        number += 1
        if content.startswith(_BOM):
            content = content[len(_BOM):].lstrip(_FRAMING)
        content = content.strip()
        if content:
            yield number, content
    for _, head in stream.cut:              # the last line, too long, without a line break after it
        yield number + 1, _too_long(head)


def _too_long(head: bytes) -> _TooLong:
    head = head.lstrip(_FRAMING)
    return _TooLong((head[len(_BOM):] if head.startswith(_BOM) else head).lstrip())


def _groups(lines: Iterable[Line]) -> Iterator[list[Line]]:
    """Group lines into messages: a group starts at an MSH segment (or is the lines before the
    first one, or after a batch envelope segment); envelope segments are dropped."""
    group: list[Line] = []
    for number, content in lines:
        head = content[:3]
        if head == b"MSH" or head in _ENVELOPE:
            if group:
                yield group
            group = [] if head in _ENVELOPE else [(number, content)]
        else:
            group.append((number, content))
    if group:
        yield group


# --------------------------------------------------------------------------- reading: charset


def _codec_of(declared: str) -> str | None:
    """The Python codec of an MSH-18 value (HL7 table 0211), None when it names no 8-bit set."""
    text = declared.strip().upper()
    match = re.fullmatch(r"(?:ISO[-_ ]?)?8859[/-](\d{1,2})", text)
    if match:
        try:
            return codecs.lookup(f"iso8859-{match.group(1)}").name
        except LookupError:
            return None
    if text in ("UNICODE UTF-8", "UTF-8", "UNICODE", "ASCII"):
        return "utf-8"
    return None


def _declared_codec(msh: bytes) -> str | None:
    """MSH-18 (first repetition, component 1), read from the raw bytes before anything is decoded."""
    if len(msh) < 4:
        return None
    fields = msh.split(msh[3:4])
    if len(fields) < 18 or not fields[17]:
        return None
    encoding = fields[1]
    value = fields[17]
    for separator in (encoding[1:2], encoding[0:1]):     # repetition, then component separator
        if separator:
            value = value.split(separator)[0]
    return _codec_of(value.decode("ascii", "replace"))


class _Charset:
    """The file's charset: UTF-8 until a message declares an ISO 8859 set (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.fallback: str | None = None     # an 8859 set declared by some message of the file
        self.scanned = False

    def decode(self, group: list[Line]) -> list[tuple[int, str]]:
        first = group[0][1]
        declared = _declared_codec(first) if first.startswith(b"MSH") else None
        if declared and declared != "utf-8":
            self.fallback = declared
        codec = declared or self.fallback or "utf-8"
        try:
            return [(number, content.decode(codec)) for number, content in group]
        except UnicodeDecodeError:
            pass
        if declared is None and not self.scanned:
            self.fallback = self._scan()
            self.scanned = True
            if self.fallback:
                return [(number, content.decode(self.fallback)) for number, content in group]
        bad = next(number for number, content in group if not _decodes(content, codec))
        raise SourceUnreadable(self.path, bad, "not UTF-8 text" if codec == "utf-8" else f"not {codec} text")

    def _scan(self) -> str | None:
        """Does any message of the file declare an ISO 8859 charset? (Only on a bad UTF-8 byte.)"""
        with self.path.open("rb") as handle:
            for _, content in _lines(handle):
                if content.startswith(b"MSH"):
                    codec = _declared_codec(content)
                    if codec and codec != "utf-8":
                        return codec
        return None


def _decodes(content: bytes, codec: str) -> bool:
    try:
        content.decode(codec)
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------- reading: fields


class _Fields:
    """Field access on python-hl7 segments: 1-based, missing parts read as "", values unescaped."""

    def __init__(self, message: hl7.Message):
        separators, self.esc = message.separators, message.esc
        self.table = {"F": separators[1], "R": separators[2], "S": separators[3], "T": separators[4],
                      "E": self.esc}
        self.escape = re.compile(re.escape(self.esc) + "([^" + re.escape(self.esc) + "]*)" + re.escape(self.esc))

    def repetitions(self, segment, field: int) -> int:
        if field >= len(segment):
            return 0
        value = segment[field]
        return len(value) if value and not isinstance(value[0], str) else 1

    def get(self, segment, field: int, repetition: int = 1, component: int = 1) -> str:
        if field >= len(segment):
            return ""
        node = segment[field]
        for index in (repetition, component):
            if isinstance(node, str):
                if index != 1:
                    return ""
                break
            if index > len(node):
                return ""
            node = node[index - 1]
        while not isinstance(node, str):             # sub-components: the first one
            if not node:
                return ""
            node = node[0]
        return self.unescape(node).strip()

    def components(self, segment, field: int) -> list[str]:
        """The components of a field's first repetition (each its first sub-component), unescaped:
        one `get` for all of them, for the coded fields whose every coding is looked at."""
        if field >= len(segment) or not segment[field]:
            return []
        first = segment[field][0]
        if isinstance(first, str):
            return [self.unescape(first).strip()]
        out = []
        for node in first:
            while not isinstance(node, str):
                node = node[0] if node else ""
            out.append(self.unescape(node).strip())
        return out

    def split_components(self, text: str, field: int) -> list[str]:
        """The same from a segment's raw text (a segment that was not parsed: ORC)."""
        fields = text.split(self.table["F"])
        if field >= len(fields):
            return []
        value = fields[field].split(self.table["R"])[0]
        return [self.unescape(c.split(self.table["T"])[0]).strip() for c in value.split(self.table["S"])]

    def unescape(self, text: str) -> str:
        if self.esc not in text:
            return text
        return self.escape.sub(self._replace, text)

    def _replace(self, match: re.Match) -> str:
        code = match.group(1)
        if code in self.table:
            return self.table[code]
        if code[:1] == "X" and len(code) > 1:
            try:
                raw = bytes.fromhex(code[1:])
            except ValueError:
                return ""
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("latin-1")
        if code[:3] in (".br", ".sp", ".in", ".ti", ".sk", ".ce"):
            return " "
        return ""                                       # highlighting, charset switches: dropped


def hl7_timestamp(text: str) -> str:
    """An HL7 DTM/TS value -> ISO-8601 (see the module docstring); malformed text as sent."""
    text = text.strip()
    match = _TS.fullmatch(text)
    if not match:
        return text
    year, month, day, hour, minute, second, offset = match.groups()
    try:
        datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    except ValueError:
        return text
    if hour is None:
        return f"{year}-{month}-{day}"
    iso = f"{year}-{month}-{day}T{hour}:{minute or '00'}:{second or '00'}"
    if offset:
        if int(offset[1:3]) > 14 or int(offset[3:5]) > 59:
            return text
        iso += f"{offset[:3]}:{offset[3:]}"
    return iso


def _structured_numeric(fields: _Fields, segment) -> str:
    comparator, number = fields.get(segment, 5, 1, 1), fields.get(segment, 5, 1, 2)
    separator, second = fields.get(segment, 5, 1, 3), fields.get(segment, 5, 1, 4)
    if comparator not in _COMPARATORS and number == "":
        return comparator                               # a plain number sent without components
    value = ("" if comparator == "=" else comparator) + number
    return value + separator + second if separator and second else value


def _patient_id(fields: _Fields, pid) -> str:
    ids = [(fields.get(pid, 3, r, 1), fields.get(pid, 3, r, 5).upper())
           for r in range(1, fields.repetitions(pid, 3) + 1)]
    for identifier, kind in ids:
        if kind == "MR" and identifier:
            return identifier
    return next((identifier for identifier, _ in ids if identifier), "")


def _segment_id(segment) -> str:
    head = segment[0] if len(segment) else ""
    while not isinstance(head, str):                    # its first string, not `str()` of the tree
        head = head[0] if head else ""
    return head.strip().upper()


def observation_code(components: list[str], code_map: Mapping[str, str]) -> str:
    """The code of a CE / CWE (its components, as `_Fields.components` gives them): the LOINC coding
    wherever it is, else the first coding whose code is in `code_map`, else the first code sent."""
    codings = [(components[i], components[s].upper() if s < len(components) else "")
               for i, s in _CODINGS if i < len(components) and components[i]]
    for code, system in codings:
        if system in LOINC_SYSTEMS:
            return code
    for code, _ in codings:
        if code in code_map:
            return code
    return codings[0][0] if codings else ""


def _id_part(text: str) -> str:
    """A part of a result identity, HL7-escaped so that the `|` and `^` joining parts stay unique."""
    if "\\" in text or "|" in text or "^" in text:
        text = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    return text


def order_number(entity: list[str]) -> str:
    """An order number (EI: number ^ namespace ...) as it enters a result identity: `number^namespace`
    when a namespace is sent, else `number`; "" without a number."""
    if not entity or not entity[0]:
        return ""
    number = _id_part(entity[0])
    return number + "^" + _id_part(entity[1]) if len(entity) > 1 and entity[1] else number


def result_identity(order: str, service: str, code: str, sub_id: str, occurrence: int = 1) -> str:
    """The result_id of an OBX (see the module docstring): `order` as `order_number` gives it;
    "" when there is no order number. Deterministic: a correction sent later gets the same id."""
    if not order:
        return ""
    parts = [order, _id_part(service), _id_part(code)]
    if sub_id or occurrence > 1:
        parts.append(_id_part(sub_id))
    if occurrence > 1:
        parts.append(str(occurrence))
    identity = "|".join(parts)
    if len(identity) > RESULT_ID_LONGEST:
        identity = identity[:_RESULT_ID_KEPT] + "#" + hashlib.sha1(identity.encode()).hexdigest()
    return identity


def _first_code(components: list[str]) -> str:
    """The universal service id's identifier (OBR-4.1, else the alternate 4.4, else 4.10)."""
    return next((components[i] for i, _ in _CODINGS if i < len(components) and components[i]), "")


def birth_date(text: str) -> str | None:
    """PID-7 (TS / DTM) -> `YYYY-MM-DD`; None when it is not a full calendar date from 1900 on
    (a year or month alone cannot give an age in whole years)."""
    match = _TS.fullmatch(text)
    if not match:
        return None
    year, month, day = (int(g) for g in match.groups()[:3])
    try:
        born = datetime(year, month, day)
    except ValueError:
        return None
    return born.strftime("%Y-%m-%d") if year >= 1900 else None


def _valid_timestamp(text: str) -> str:
    """An HL7 timestamp as ISO-8601, or "" when it is empty or malformed."""
    iso = hl7_timestamp(text)
    return iso if text and iso != text.strip() else ""


_BIRTH_DATE_BAD = "PID-7 (birth date) is not a full calendar date from 1900 on"


class _Message:
    """What one message gives: lab rows and event rows, each `(line, row)`, and bad rows."""

    __slots__ = ("rows", "events", "bad", "bad_births")

    def __init__(self):
        self.rows: list[tuple[int, tuple]] = []
        self.events: list[tuple[int, tuple]] = []
        self.bad: list[Bad] = []
        #: unusable birth dates, keyed (patient, PID-7): one bad row a patient and value a chunk
        self.bad_births: list[tuple[tuple[str, str], Bad]] = []


def _message_rows(group: list[tuple[int, str]], code_map: Mapping[str, str], received_date: str) -> _Message:
    """One message (its decoded lines, the first being MSH) -> its lab rows, events and bad rows."""
    out = _Message()
    msh_line, msh_text = group[0]
    # Only the segments that carry results are parsed (python-hl7 builds every field's tree; NTE,
    # PV1, ORC... would cost time and give nothing). Each kept line stays paired with its segment.
    # An ORC is kept as text beside the OBR after it: its order numbers are read only when that
    # OBR sends none of its own.
    kept = [group[0]]
    orc_before: dict[int, str] = {}
    orc = ""
    for item in group[1:]:
        head = item[1][:3].upper()
        if head == "ORC":
            orc = item[1]
        elif head in _RESULT_SEGMENTS:
            kept.append(item)
            if head == "OBR" and orc:
                orc_before[item[0]] = orc
            if head != "OBX":
                orc = ""                                # an ORC belongs to the OBR right after it
    group = kept
    try:
        message = hl7.parse("\r".join(text for _, text in group))
        fields = _Fields(message)
    except Exception as exc:  # any parser failure quarantines the message, never the run
        # python-hl7's own ParseException describes the structure, but may quote a few characters
        # of a segment: quoted (only the operator sees it); any other exception's text may quote a
        # field (patient data): its type only
        detail = (str(exc).splitlines() or [""])[0] if isinstance(exc, hl7.ParseException) else ""
        reason = f"the HL7 message cannot be parsed ({type(exc).__name__}{': ' + quote(detail, 120) if detail else ''})"
        out.bad.append((msh_line, msh_text, reason[:200]))
        return out
    segments = list(zip(group, message, strict=False))
    msh = message[0]
    kind = [fields.get(msh, 9, 1, 1), fields.get(msh, 9, 1, 2)]
    if [k.upper() for k in kind] != ["ORU", "R01"]:
        shown = quote("^".join(k[:16] for k in kind if k), 33) if any(kind) else "MSH-9 empty"
        out.bad.append((msh_line, msh_text, f"not an ORU^R01 message ({shown})"))
        return out
    version = fields.get(msh, 12, 1, 1)
    message_reason = ""
    if version not in SUPPORTED_VERSIONS:
        message_reason = f"unsupported HL7 version {quote(version, 16)}" if version else "missing HL7 version (MSH-12)"
    has_pid = any(_segment_id(segment) == "PID" for _, segment in segments)
    patient: str | None = None
    order = service = observed_at = ""
    in_order = False
    first_observed = ""
    occurrences: Counter[tuple[str, str, str, str]] = Counter()
    demographics: list[tuple[int, str, str, str, str]] = []     # line, text, patient, PID-7, PID-8
    for (line, text), segment in segments:
        name = _segment_id(segment)
        if name == "PID":
            patient = _patient_id(fields, segment)
            order, service, observed_at, in_order = "", "", "", False  # a new patient result group
            born, sex = fields.get(segment, 7, 1, 1), fields.get(segment, 8, 1, 1)
            if born or sex:
                demographics.append((line, text, patient, born, sex))
        elif name == "OBR":
            in_order = True
            order = order_number(fields.components(segment, 3))
            orc_text = orc_before.get(line, "")
            if not order and orc_text:
                order = order_number(fields.split_components(orc_text, 3))
            if not order:
                placer = order_number(fields.components(segment, 2))
                if not placer and orc_text:
                    placer = order_number(fields.split_components(orc_text, 2))
                order = PLACER_PREFIX + placer if placer else ""
            service = _first_code(fields.components(segment, 4))
            observed_at = fields.get(segment, 7, 1, 1)
            if not first_observed:
                first_observed = _valid_timestamp(observed_at)
        elif name == "OBX":
            if message_reason:
                reason = message_reason
            elif not has_pid:
                reason = f"message at line {msh_line} has no PID segment"
            elif patient is None:
                reason = f"OBX before the PID segment of the message at line {msh_line}"
            elif patient == "":
                reason = "PID-3 (patient id) is empty"
            else:
                reason = ""
            if reason:
                out.bad.append((line, text, reason))
                continue
            code = observation_code(fields.components(segment, 3), code_map)
            if not in_order and LOINC.get(code_map.get(code, code)) is not None:
                # without an order a result has no identity; one of an analyte bonewatch does not
                # monitor goes on with none and is counted as such (SPEC 2.5), never quarantined
                out.bad.append((line, text, "OBX without an OBR before it"))
                continue
            sub_id = fields.get(segment, 4, 1, 1)
            key = (order, service, code, sub_id)
            occurrences[key] += 1
            value = (_structured_numeric(fields, segment) if fields.get(segment, 2, 1, 1).upper() == "SN"
                     else fields.get(segment, 5, 1, 1))
            status = fields.get(segment, 11, 1, 1)
            status = STATUS_OF_HL7.get(status.upper(), status)
            collected = fields.get(segment, 14, 1, 1) or observed_at
            identity = result_identity(*key, occurrences[key]) if in_order else ""
            out.rows.append((line, (patient, identity, code, value,
                                    fields.get(segment, 6, 1, 1), hl7_timestamp(collected), status)))
    if demographics:
        recorded = _valid_timestamp(fields.get(msh, 7, 1, 1)) or first_observed or received_date
        for line, text, mrn, born, sex in demographics:
            _demographic_events(out, line, text, mrn, born, sex, recorded, message_reason)
    return out


def _demographic_events(out: _Message, line: int, text: str, patient: str, born: str, sex: str,
                        recorded: str, message_reason: str) -> None:
    """A PID's birth date and sex -> `birth_date` / `sex` events of `out` (or its bad row)."""
    sex = SEX_OF_HL7.get(sex.upper(), "")
    born_iso = birth_date(born) if born else None
    if not (sex or born):
        return                                          # PID-8 U / O / A / N alone: nothing to say
    if message_reason or not patient:
        out.bad.append((line, text, message_reason or "PID-3 (patient id) is empty"))
        return
    if born and born_iso is None:
        # the value is not quoted: it is patient data
        out.bad_births.append(((patient, born), (line, text, _BIRTH_DATE_BAD)))
    elif born_iso:
        out.events.append((line, (patient, "birth_date", recorded, born_iso, "")))
    if sex:
        out.events.append((line, (patient, "sex", recorded, sex, "")))


def _orphans(group: list[tuple[int, str]]) -> list[Bad]:
    """Lines outside any message: an OBX there cannot be attributed; other segments are ignored."""
    return [(line, text, "OBX outside a message (no MSH segment before it)")
            for line, text in group if text[:3].upper() == "OBX"]


# --------------------------------------------------------------------------- reading: the file


def _check_head(path: Path) -> None:
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    if not head:
        raise SourceUnreadable(path, None, "the file is empty")
    if len(head) < HEAD_BYTES and not head.replace(_BOM, b"").strip(b" \t\r\n\x0b\x1c"):
        raise SourceUnreadable(path, 1, "the file is empty")
    if not _MSH_AT_SEGMENT_START.search(head):
        raise SourceUnreadable(path, 1, "no MSH segment: not an HL7 v2 file")


#: segments a message's results depend on: when one is too long to read, no OBX of the message is
#: attributed (to the wrong patient, order or collection time); a long OBX (an embedded report)
#: is set aside alone
_HEADER_SEGMENTS = ("MSH", "PID", "OBR", "ORC")
_HEADER_SEGMENTS_TEXT = "MSH, PID, OBR or ORC"


def _without_long_segments(group: list[Line], limit: int) -> tuple[list[Line], list[Bad]]:
    """A message's lines without its `_TooLong` segments, and a bad row for each of those."""
    if not any(isinstance(content, _TooLong) for _, content in group):
        return group, []
    long = [(number, content) for number, content in group if isinstance(content, _TooLong)]
    return ([(number, content) for number, content in group if not isinstance(content, _TooLong)],
            cut_rows(long, limit))


def _frame(rows: list[tuple[int, tuple]], columns: list[str] = LAB_COLUMNS) -> pd.DataFrame:
    index = pd.Index([line for line, _ in rows], dtype="int64", name="line")
    return pd.DataFrame([row for _, row in rows], columns=columns, index=index, dtype=object)


class _Demographics:
    """The birth date and sex events of a chunk, one per (patient, fact, value): the last one sent
    (its line and `occurred_at`), so that F, then M, then F again still ends on F."""

    def __init__(self):
        self.events: dict[tuple[str, str, str], tuple[int, tuple]] = {}
        self.bad: dict[tuple[str, str], Bad] = {}

    def __len__(self) -> int:
        return len(self.events) + len(self.bad)

    def add(self, message: _Message) -> None:
        for line, row in message.events:
            key = (row[0], row[1], row[3])
            self.events.pop(key, None)                  # re-inserted: dict order is the order sent
            self.events[key] = (line, row)
        for key, bad in message.bad_births:
            self.bad.setdefault(key, bad)

    def items(self) -> Iterator[tuple[str, Chunk]]:
        """("events", Chunk) items: the k-th event of a line in the k-th chunk (a frame may not hold
        two rows of one line, and a PID line gives a birth date and a sex)."""
        events = sorted(self.events.values(), key=lambda item: item[0])
        bad = sorted(self.bad.values(), key=lambda item: item[0])
        seen: Counter[int] = Counter()
        layers: list[list[tuple[int, tuple]]] = []
        for line, row in events:
            if seen[line] == len(layers):
                layers.append([])
            layers[seen[line]].append((line, row))
            seen[line] += 1
        for k, layer in enumerate(layers or ([[]] if bad else [])):
            yield "events", Chunk(_frame(layer, EVENT_COLUMNS), bad if k == 0 else [])


def read_hl7(path: Path, ctx: ReadContext) -> Iterator[tuple[str, Chunk]]:
    """Stream an HL7 v2 ORU^R01 file as ("labs", Chunk) items of `ctx.chunk_rows` rows (the last
    one fewer), each frame indexed by the OBX segment's line, and ("events", Chunk) items of the
    PIDs' birth dates and sexes, indexed by the PID segment's line. See the module docstring."""
    path = Path(path)
    _check_head(path)
    size = max(1, int(ctx.chunk_rows))
    code_map = ctx.settings.ingest.code_map
    received = ctx.received_at
    if received.tzinfo is None:
        received = received.replace(tzinfo=UTC)         # the pipeline stamps arrivals in naive UTC
    received_date = received.astimezone(ctx.settings.tz).date().isoformat()
    charset = _Charset(path)
    rows: list[tuple[int, tuple]] = []
    bad: list[Bad] = []
    demographics = _Demographics()
    limit = ctx.max_row_bytes
    with path.open("rb") as handle:
        for group in _groups(_lines(handle, limit)):
            group, too_long = _without_long_segments(group, limit)
            bad.extend(too_long)
            if not group:
                continue
            decoded = charset.decode(group)
            if too_long and any(text[:3].upper() in _HEADER_SEGMENTS for _, text, _ in too_long):
                # an MSH, PID, OBR or ORC not read: the message's results cannot be attributed
                bad.extend((line, text, f"in a message with a {_HEADER_SEGMENTS_TEXT} segment not read (too long)")
                           for line, text in decoded if text[:3].upper() == "OBX")
            elif group[0][1].startswith(b"MSH"):
                message = _message_rows(decoded, code_map, received_date)
                rows.extend(message.rows)
                bad.extend(message.bad)
                demographics.add(message)
            else:
                bad.extend(_orphans(decoded))
            while len(rows) >= size:
                yield "labs", Chunk(_frame(rows[:size]), bad)
                rows, bad = rows[size:], []
            if len(demographics) >= size:
                yield from demographics.items()
                demographics = _Demographics()
    if rows or bad:
        yield "labs", Chunk(_frame(rows), bad)
    yield from demographics.items()


# --------------------------------------------------------------------------- writing


def _escape(text: str) -> str:
    text = str(text).replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    text = text.replace("~", "\\R\\").replace("&", "\\T\\")
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def _hl7_time(iso: str) -> str:
    """ISO-8601 -> HL7 DTM (`YYYYMMDD[HHMM[SS[.SSSS]]][+ZZZZ]`); anything else as it is."""
    text = str(iso).strip()
    match = _ISO.fullmatch(text)
    if not match:
        return _escape(text)
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    out = f"{year}{month}{day}"
    if hour is not None:
        out += f"{hour}{minute}" + (second or "") + (f".{fraction[:4]}" if second and fraction else "")
        if offset:
            out += "+0000" if offset == "Z" else offset[:3] + offset[-2:]
    return out


def _status_letter(status: str) -> str:
    text = str(status).strip()
    canonical = STATUS_MAP.get(text.lower())
    return _LETTER_OF_STATUS[canonical] if canonical else _escape(text)


def _observation_value(value: str) -> tuple[str, str]:
    """(OBX-2 value type, OBX-5) of a CSV value."""
    text = str(value).strip()
    censored = _CENSORED.fullmatch(text)
    if censored:
        return "SN", f"{censored.group(1)}^{censored.group(2)}"
    if text == "" or _NUMBER.fullmatch(text):
        return "NM", text
    return "ST", _escape(text)


def _message_groups(rows: Iterable[tuple]) -> list[list[tuple]]:
    groups: dict[tuple[str, str], list[tuple]] = {}
    for row in rows:
        row = tuple("" if v is None else str(v) for v in row)
        groups.setdefault((row[0], row[5]), []).append(row)
    return list(groups.values())


def _pid(patient: str, demographics: Mapping[str, tuple[str, str]] | None) -> str:
    """PID-3 (the MRN as an MR identifier), and PID-7 / PID-8 when `demographics` has the patient."""
    pid = f"PID|1||{_escape(patient)}^^^HOSP^MR"
    if demographics and patient in demographics:
        born, sex = ("" if v is None else str(v) for v in demographics[patient])
        pid += f"||||{_hl7_time(born)}|{_escape(sex)}"
    return pid


def write_hl7(path: Path, rows: Iterable[tuple],
              demographics: Mapping[str, tuple[str, str]] | None = None) -> None:
    """Write lab CSV rows (patient_id, result_id, loinc, value, unit, collected_at, status) as HL7
    v2.5.1 ORU^R01: one message per (patient, collection time), in order of first appearance;
    `\\r` ends each segment and a `\\n` follows each message. Same rows -> the same bytes.

    One OBR a message: OBR-3 is the result_id of its first row, OBR-4 that row's code; so a result's
    identity as read back is `hl7_result_ids`' (a lone corrected row in a later file, as CSV sends
    a correction, gets the same identity as its original when the original was alone at its time).
    `demographics` (MRN -> (birth date `YYYY-MM-DD`, sex `F`/`M`), either may be "") adds PID-7 and
    PID-8 for the patients it holds, for a cohort that arrives by HL7 alone."""
    out: list[str] = []
    for group in _message_groups(rows):
        patient, first_id, first_code, _, _, collected_at, _ = group[0]
        stamp = _hl7_time(collected_at)
        digest = hashlib.sha256("\x1f".join("\x1e".join(r) for r in group).encode()).hexdigest()
        segments = [
            f"MSH|^~\\&|BONEWATCH|HOSP|BONEWATCH|HOSP|{stamp}||ORU^R01^ORU_R01|BW{digest[:18].upper()}|P|2.5.1",
            _pid(patient, demographics),
            "|".join(["OBR", "1", "", _escape(first_id), f"{_escape(first_code)}^^LN", "", "", stamp]),
        ]
        for set_id, (_, _, code, value, unit, _, status) in enumerate(group, start=1):
            value_type, observation = _observation_value(value)
            fields = ["OBX", str(set_id), value_type, f"{_escape(code)}^^LN", "", observation, _escape(unit),
                      "", "", "", "", _status_letter(status), "", "", stamp]
            segments.append("|".join(fields))
        out.append("\r".join(segments) + "\r\n")
    Path(path).write_bytes("".join(out).encode("utf-8"))


def _as_read(text: str) -> str:
    """A value as `read_hl7` gives it back after `write_hl7` wrote it (`_escape`, then unescaped)."""
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ").strip()


def hl7_result_ids(rows: Iterable[tuple]) -> list[str]:
    """For each input row of `write_hl7`, the result_id `read_hl7` assigns it: the order is the
    message's first result_id, the service its first code, then the row's code (and, for the n-th
    row of one code in a message, n)."""
    rows = [tuple("" if v is None else str(v) for v in row) for row in rows]
    ids: dict[int, str] = {}
    seen: dict[tuple[str, str], list[int]] = {}
    for position, row in enumerate(rows):
        seen.setdefault((row[0], row[5]), []).append(position)
    for positions in seen.values():
        first = rows[positions[0]]
        order, service = order_number([_as_read(first[1])]), _as_read(first[2])
        occurrences: Counter[str] = Counter()
        for position in positions:
            code = _as_read(rows[position][2])
            occurrences[code] += 1
            ids[position] = result_identity(order, service, code, "", occurrences[code])
    return [ids[position] for position in range(len(rows))]
