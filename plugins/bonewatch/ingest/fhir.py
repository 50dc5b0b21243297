"""FHIR R4 deliveries (SPEC 2.3): a Bundle (`*.json`, one document) or a bulk-export NDJSON file
(`*.ndjson`, one resource a line, streamed), read into the canonical chunks of `sources`.

Parsing uses the standard `json` module with defensive access: hostile feeds send anything, and
every resource that cannot be used becomes a bad row with a reason (never a crash, never silently
dropped; resource types that carry nothing bonewatch uses, such as Encounter, are ignored).
Numbers are kept as the text that was sent (`parse_float=str`), so `4.0` stays `4.0`.

A `subject` reference resolves within the file (Bundle: by `fullUrl` and by `Patient/<id>`;
NDJSON: Patients of the same file up to the current chunk), else through `ctx.patient_refs`, one
bulk lookup a chunk into the Patients of earlier deliveries. `subject.identifier.value` is taken
as the MRN when the reference does not resolve within the file.

`write_bundle` / `write_ndjson` are the exact inverse of the readers for lab and event CSV rows
(tests and the synthetic generator): reading what they write gives back the same rows.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pandas as pd

from bonewatch.errors import SourceUnreadable
from bonewatch.ingest.feeds import EVENT_COLUMNS, LAB_COLUMNS
from bonewatch.ingest.reader import Chunk
from bonewatch.ingest.sources import PATIENT_COLUMNS, ReadContext

LOINC_SYSTEM = "http://loinc.org"
RXNORM_SYSTEM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10CM_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED_SYSTEM = "http://snomed.info/sct"
UCUM_SYSTEM = "http://unitsofmeasure.org"
V2_0203_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBS_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
EVENT_SYSTEM = "urn:bonewatch:event"
DIAGNOSIS_SYSTEM = "urn:bonewatch:diagnosis"
LOCAL_LAB_SYSTEM = "urn:bonewatch:local"
RESULT_ID_SYSTEM = "urn:bonewatch:result"
MRN_SYSTEM = "urn:oid:1.2.3.4.5"
#: Patient extension (valueDateTime) holding when the demographics were recorded, written when that
#: moment is not a FHIR instant (a date alone) and so cannot go into `meta.lastUpdated`.
RECORDED_EXTENSION = "urn:bonewatch:recorded-at"

#: RxNorm -> (event type, value)
RXNORM_EVENTS = {
    "77655": ("bisphosphonate_dose", "zoledronic_acid"),
    "11473": ("bisphosphonate_dose", "pamidronate"),
    "993449": ("bisphosphonate_dose", "denosumab"),
    "358258": ("myeloma_therapy_start", "bortezomib"),
}
AGENT_RXNORM = {value: code for code, (kind, value) in RXNORM_EVENTS.items() if kind == "bisphosphonate_dose"}
DEFAULT_SNOMED_MAP = {"34043003": "dental_exam"}
SEX_OF_GENDER = {"female": "F", "male": "M"}
GENDER_OF_SEX = {"f": "female", "female": "female", "m": "male", "male": "male"}
LAB_STATUS = {"final": "final", "f": "final", "corrected": "corrected", "c": "corrected",
              "preliminary": "preliminary", "p": "preliminary", "cancelled": "cancelled", "x": "cancelled"}
PROCEDURE_STATUSES = {"preparation", "in-progress", "on-hold", "stopped", "completed", "unknown"}
RESOURCE_ORDER = ["Patient", "Observation", "MedicationAdministration", "Condition", "Procedure"]

_LOINC_SHAPE = re.compile(r"^\d+-\d$")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_FHIR_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
_FHIR_INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_ICD10_SHAPE = re.compile(r"^[A-Z]\d{2}(\.?[0-9A-Z]{1,4})?$")
_CENSORED = re.compile(
    r"^\s*(?P<comparator><=|>=|<|>)?\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*$")
_RAW_MAX = 65536
#: a JSON escape of a UTF-16 surrogate: alone (`"\ud800"`) it decodes to a string no UTF-8 text holds
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = "not valid Unicode text (a lone surrogate escape)"
_NOT_FOUND = "subject reference not found in this file or earlier deliveries"


# --------------------------------------------------------------------------------------------
# defensive access


def _loads(text: str):
    """JSON with every number kept as its text (no float rounding, no int-size limit)."""
    return json.loads(text, parse_float=str, parse_int=str, parse_constant=str)


def _d(value) -> dict:
    return value if isinstance(value, dict) else {}


def _l(value) -> list:
    if isinstance(value, list):
        return value
    return [value] if isinstance(value, dict) else []


def _s(value) -> str:
    """A string field (numbers arrive as text too); anything else is missing."""
    return value.strip() if isinstance(value, str) else ""


def _codings(concept) -> list[tuple[str, str]]:
    """(system, code) of a CodeableConcept's codings."""
    return [(_s(c.get("system")), _s(c.get("code"))) for c in _l(_d(concept).get("coding")) if isinstance(c, dict)]


def _code_in(concept, system: str) -> str:
    for sys_, code in _codings(concept):
        if sys_ == system and code:
            return code
    return ""


def _first_code(concept) -> str:
    for _, code in _codings(concept):
        if code:
            return code
    return _s(_d(concept).get("text"))


def _quoted(code: str) -> str:
    return "'" + code[:32].replace("\n", " ").replace("\r", " ") + "'"


def _lone_surrogate(value) -> bool:
    """Does a parsed JSON value hold a lone surrogate (a `\\ud800` escape without its pair)? Such a
    string cannot be encoded as UTF-8, so it can be neither stored nor shown. Iterative: the value
    may be nested as deeply as the JSON parser allowed."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _note(resource: dict) -> str:
    for note in _l(resource.get("note")):
        text = _s(_d(note).get("text"))
        if text:
            return text
    return ""


def _patient_key(reference: str) -> str:
    """'Patient/<id>' from a relative or absolute reference (with or without `_history`), or ""."""
    parts = reference.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "Patient" and parts[i + 1]:
            return "Patient/" + parts[i + 1]
    return ""


def _raw(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text[:_RAW_MAX]


# --------------------------------------------------------------------------------------------
# resources -> rows


@dataclass
class _Subject:
    keys: tuple[str, ...] = ()     # tried within the file (fullUrl, Patient/<id>)
    lookup: str = ""               # asked of earlier deliveries (Patient/<id>)
    mrn: str = ""                  # subject.identifier.value
    missing: bool = False          # no subject at all


@dataclass
class _Out:
    kind: str                      # "labs" | "events" | "bad"
    fields: tuple[str, ...] = ()   # the row without patient_id (or (reason,) for "bad")
    subject: _Subject | None = None  # None: fields already hold the patient_id first


def _subject_of(resource: dict) -> _Subject:
    subject = resource.get("subject")
    if not isinstance(subject, dict):
        return _Subject(missing=True)
    reference = _s(subject.get("reference"))
    mrn = _s(_d(subject.get("identifier")).get("value"))
    if not reference and not mrn:
        return _Subject(missing=True)
    key = _patient_key(reference) if reference else ""
    keys = tuple(k for k in dict.fromkeys((reference, key)) if k)
    return _Subject(keys, key, mrn)


def patient_id_of(resource: dict) -> str:
    """The MRN of a Patient: its MR identifier, else its first identifier, else the resource id."""
    identifiers = [i for i in _l(resource.get("identifier")) if isinstance(i, dict) and _s(i.get("value"))]
    for identifier in identifiers:
        for system, code in _codings(identifier.get("type")):
            if code == "MR" and system in (V2_0203_SYSTEM, ""):
                return _s(identifier.get("value"))
    if identifiers:
        return _s(identifiers[0].get("value"))
    return _s(resource.get("id"))


@dataclass
class _State:
    ctx: ReadContext
    patients: dict[str, str] = field(default_factory=dict)   # fullUrl / Patient/<id> -> MRN
    missing: set[str] = field(default_factory=set)           # refs earlier deliveries do not know
    code_map: dict[str, str] = field(default_factory=dict)
    snomed_map: dict[str, str] = field(default_factory=dict)
    received_date: str = ""

    @classmethod
    def of(cls, ctx: ReadContext) -> _State:
        ingest = ctx.settings.ingest
        snomed = getattr(ingest, "snomed_map", None)
        received = ctx.received_at
        if received.tzinfo is None:
            received = received.replace(tzinfo=UTC)     # the pipeline stamps arrivals in naive UTC
        return cls(ctx, code_map=dict(ingest.code_map),
                   snomed_map=dict(DEFAULT_SNOMED_MAP if snomed is None else snomed),
                   received_date=received.astimezone(ctx.settings.tz).date().isoformat())


def _patient_events(resource: dict, state: _State) -> list[_Out]:
    mrn = patient_id_of(resource)
    if not mrn:
        return [_Out("bad", ("Patient without an identifier or id",))]
    recorded = ""
    for extension in _l(resource.get("extension")):
        if _s(_d(extension).get("url")) == RECORDED_EXTENSION:
            recorded = _s(extension.get("valueDateTime"))
            break
    occurred = recorded or _s(_d(resource.get("meta")).get("lastUpdated")) or state.received_date
    out = []
    birth = _s(resource.get("birthDate"))
    if birth:
        out.append(_Out("events", (mrn, "birth_date", occurred, birth, "")))
    sex = SEX_OF_GENDER.get(_s(resource.get("gender")).lower())
    if sex:
        out.append(_Out("events", (mrn, "sex", occurred, sex, "")))
    return out


def _number_text(value) -> str:
    """A JSON number (kept as text by `_loads`) or a numeric string; booleans and objects are not."""
    return value.strip() if isinstance(value, str) else ""


def _observation(resource: dict, state: _State) -> list[_Out]:
    code = resource.get("code")
    codings = _codings(code)
    subject = _subject_of(resource)
    status = _s(resource.get("status"))
    event_type = _code_in(code, EVENT_SYSTEM)
    if event_type:
        if status.lower() in ("entered-in-error", "cancelled"):
            return [_Out("bad", (f"observation {status.lower()}",))]
        quantity = _d(resource.get("valueQuantity"))
        concept = _d(resource.get("valueCodeableConcept"))
        boolean = resource.get("valueBoolean")
        value = (_s(resource.get("valueString")) or _first_code(concept)
                 or _number_text(quantity.get("value")) or _number_text(resource.get("valueInteger"))
                 or _s(resource.get("valueDateTime"))
                 or ({True: "true", False: "false"}.get(boolean, "") if isinstance(boolean, bool) else ""))
        occurred = (_s(resource.get("effectiveDateTime")) or _s(_d(resource.get("effectivePeriod")).get("start"))
                    or _s(resource.get("effectiveInstant")) or _s(resource.get("issued")))
        return [_Out("events", (event_type, occurred, value, _note(resource)), subject)]
    lab_code = next((c for s, c in codings if s == LOINC_SYSTEM and c in _KNOWN_LOINC), "")
    lab_code = (lab_code or next((c for s, c in codings if s == LOINC_SYSTEM and c), "")
                or next((c for _, c in codings if c in state.code_map), "")
                or _code_in(code, LOCAL_LAB_SYSTEM))
    if not lab_code:
        return [_Out("bad", (f"unknown observation code {_quoted(_first_code(code))}",))]
    result_id = _s(resource.get("id"))
    if not result_id:
        identifiers = _l(resource.get("identifier"))
        result_id = _s(_d(identifiers[0]).get("value")) if identifiers else ""
    if not result_id:
        return [_Out("bad", ("Observation without id",))]
    quantity = _d(resource.get("valueQuantity"))
    if quantity:
        number = _number_text(quantity.get("value"))
        value = (_s(quantity.get("comparator")) + number) if number else ""
        unit = _s(quantity.get("code")) or _s(quantity.get("unit"))
    else:
        value = _s(resource.get("valueString")) or _number_text(resource.get("valueInteger"))
        unit = ""
    collected = (_s(resource.get("effectiveDateTime")) or _s(_d(resource.get("effectivePeriod")).get("start"))
                 or _s(resource.get("effectiveInstant")) or _s(resource.get("issued")))
    return [_Out("labs", (result_id, lab_code, value, unit, collected, status), subject)]


def _mg_text(value: str, unit: str) -> str:
    if unit.lower() != "g" or not value:
        return value
    try:
        return format((Decimal(value) * 1000).normalize(), "f")
    except InvalidOperation:
        return value


def _medication(resource: dict, state: _State) -> list[_Out]:
    status = _s(resource.get("status")).lower()
    if status == "not-done":
        return [_Out("bad", ("administration not done",))]
    if status == "entered-in-error":
        return [_Out("bad", ("administration entered in error",))]
    concept = resource.get("medicationCodeableConcept")
    code = _code_in(concept, RXNORM_SYSTEM)
    if code not in RXNORM_EVENTS:
        shown = code or _first_code(concept)
        if not shown:
            return [_Out("bad", ("administration without a medication code",))]
        return [_Out("bad", (f"unknown medication code {_quoted(shown)}",))]
    event_type, value = RXNORM_EVENTS[code]
    occurred = _s(resource.get("effectiveDateTime")) or _s(_d(resource.get("effectivePeriod")).get("start"))
    if event_type == "bisphosphonate_dose":
        dose = _d(_d(resource.get("dosage")).get("dose"))
        detail = _mg_text(_number_text(dose.get("value")), _s(dose.get("code")) or _s(dose.get("unit")))
    else:
        detail = "administration"
    return [_Out("events", (event_type, occurred, value, detail), _subject_of(resource))]


def _icd_diagnosis(code: str) -> str:
    flat = code.upper().replace(".", "")
    if flat.startswith("C900"):
        return "MM"
    if flat == "D472":
        return "MGUS"
    if flat.startswith(("M80", "M81")):
        return "osteoporosis"
    return ""


def _condition(resource: dict, state: _State) -> list[_Out]:
    verification = {c.lower() for _, c in _codings(resource.get("verificationStatus"))}
    for status in ("entered-in-error", "refuted"):
        if status in verification:
            return [_Out("bad", (f"condition {status}",))]
    code = resource.get("code")
    icd = _code_in(code, ICD10CM_SYSTEM)
    value = _code_in(code, DIAGNOSIS_SYSTEM) or (_icd_diagnosis(icd) if icd else "")
    if not value:
        shown = icd or _first_code(code)
        if not shown:
            return [_Out("bad", ("Condition without a code",))]
        return [_Out("bad", (f"unknown diagnosis code {_quoted(shown)}",))]
    occurred = _s(resource.get("onsetDateTime")) or _s(resource.get("recordedDate"))
    detail = icd or _note(resource)
    return [_Out("events", ("diagnosis", occurred, value, detail), _subject_of(resource))]


def _procedure(resource: dict, state: _State) -> list[_Out]:
    status = _s(resource.get("status"))
    if status.lower() == "not-done":
        return [_Out("bad", ("procedure not done",))]
    if status.lower() == "entered-in-error":
        return [_Out("bad", ("procedure entered in error",))]
    code = resource.get("code")
    dental = _code_in(code, EVENT_SYSTEM) == "dental_exam" or any(
        system == SNOMED_SYSTEM and state.snomed_map.get(c) == "dental_exam" for system, c in _codings(code))
    if not dental:
        shown = _first_code(code)
        return [_Out("bad", (f"unknown procedure code {_quoted(shown)}" if shown else "Procedure without a code",))]
    occurred = _s(resource.get("performedDateTime")) or _s(_d(resource.get("performedPeriod")).get("start"))
    return [_Out("events", ("dental_exam", occurred, status, ""), _subject_of(resource))]


_HANDLERS = {
    "Observation": _observation,
    "MedicationAdministration": _medication,
    "Condition": _condition,
    "Procedure": _procedure,
}


def _known_loinc() -> frozenset[str]:
    from bonewatch.units import LOINC

    return frozenset(LOINC)


_KNOWN_LOINC = _known_loinc()


def _resource_outputs(resource, state: _State) -> list[_Out]:
    if not isinstance(resource, dict):
        return [_Out("bad", ("resource is not a JSON object",))]
    resource_type = _s(resource.get("resourceType"))
    if not resource_type:
        return [_Out("bad", ("resource without resourceType",))]
    if resource_type == "Patient":
        return _patient_events(resource, state)
    handler = _HANDLERS.get(resource_type)
    return handler(resource, state) if handler else []   # Encounter, Practitioner, ...: nothing we use


# --------------------------------------------------------------------------------------------
# a chunk of resources -> items


@dataclass
class _Entry:
    index: int
    resource: object = None
    raw: str = ""
    bad: str = ""           # decided before mapping (not JSON, not UTF-8, entry without resource)
    outputs: list | None = None   # already mapped (NDJSON maps each line as it reads it: no dicts kept)


def _frame(rows: list[tuple[int, tuple[str, ...]]], columns: list[str]) -> pd.DataFrame:
    index = pd.Index([i for i, _ in rows], name="line", dtype="int64")
    return pd.DataFrame([r for _, r in rows], columns=columns, index=index, dtype=object)


def _patients_item(rows: list[tuple[int, tuple[str, str]]]) -> Iterator[tuple[str, Chunk]]:
    if rows:
        yield "patients", Chunk(_frame(rows, PATIENT_COLUMNS))


def _register_patient(resource, full_url: str, state: _State) -> tuple[str, str] | None:
    """Remember a Patient's MRN under its references; return (Patient/<id>, MRN) when it has an id."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        return None
    mrn = patient_id_of(resource)
    if not mrn:
        return None
    rid = _s(resource.get("id"))
    ref = f"Patient/{rid}" if rid else ""
    for key in (full_url, ref, _patient_key(full_url)):
        if key:
            state.patients[key] = mrn
    return (ref, mrn) if ref else None


def _convert(entries: list[_Entry], state: _State) -> Iterator[tuple[str, Chunk]]:
    """Map a chunk of entries; resolve subjects (one bulk lookup); yield labs, then events."""
    bad: list[tuple[int, str, str]] = []
    pending: list[tuple[_Entry, _Out]] = []
    for entry in entries:
        if entry.bad:
            bad.append((entry.index, entry.raw, entry.bad))
            continue
        outputs = entry.outputs if entry.outputs is not None else _resource_outputs(entry.resource, state)
        for out in outputs:
            if out.kind == "bad":
                bad.append((entry.index, _raw(entry.raw or entry.resource), out.fields[0]))
            else:
                pending.append((entry, out))
    unresolved = set()
    for _, out in pending:
        subject = out.subject
        if subject is not None and not any(k in state.patients for k in subject.keys) and not subject.mrn \
                and subject.lookup and subject.lookup not in state.missing:
            unresolved.add(subject.lookup)
    if unresolved:
        found = state.ctx.patient_refs(sorted(unresolved)) or {}
        for ref in unresolved:
            mrn = found.get(ref)
            if isinstance(mrn, str) and mrn:
                state.patients[ref] = mrn
            else:
                state.missing.add(ref)
    labs: list[tuple[int, tuple[str, ...]]] = []
    events: list[tuple[int, tuple[str, ...]]] = []
    for entry, out in pending:
        if out.subject is None:
            row = out.fields
        else:
            subject = out.subject
            mrn = next((state.patients[k] for k in subject.keys if k in state.patients), "") or subject.mrn
            if not mrn and subject.lookup:
                mrn = state.patients.get(subject.lookup, "")
            if not mrn:
                reason = "resource without subject" if subject.missing else _NOT_FOUND
                bad.append((entry.index, _raw(entry.raw or entry.resource), reason))
                continue
            row = (mrn, *out.fields)
        (labs if out.kind == "labs" else events).append((entry.index, row))
    items: list[tuple[str, Chunk]] = []
    if labs:
        items.append(("labs", Chunk(_frame(labs, LAB_COLUMNS))))
    # One frame may not hold two rows of one line (a Patient gives birth_date and sex): the k-th
    # event of each line goes into the k-th events chunk.
    seen: Counter[int] = Counter()
    groups: dict[int, list[tuple[int, tuple[str, ...]]]] = {}
    for index, row in events:
        groups.setdefault(seen[index], []).append((index, row))
        seen[index] += 1
    for k in sorted(groups):
        items.append(("events", Chunk(_frame(groups[k], EVENT_COLUMNS))))
    if bad:
        bad.sort(key=lambda b: b[0])
        if items:
            items[0][1].bad_rows.extend(bad)
        else:
            items.append(("events", Chunk(_frame([], EVENT_COLUMNS), bad)))
    yield from items


def _chunk_size(ctx: ReadContext) -> int:
    return max(1, int(ctx.chunk_rows))


# --------------------------------------------------------------------------------------------
# readers


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_bundle(path: Path, ctx: ReadContext) -> Iterator[tuple[str, Chunk]]:
    """A FHIR R4 Bundle (loaded whole: one document). Rows are indexed by 1-based entry number."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise SourceUnreadable(path, 1, "the file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceUnreadable(path, _line_of(data, exc.start), "not UTF-8 text") from None
    try:
        bundle = _loads(text)
    except json.JSONDecodeError as exc:
        raise SourceUnreadable(path, exc.lineno, f"not valid JSON: {exc.msg}") from None
    except (ValueError, RecursionError):
        raise SourceUnreadable(path, 1, "not valid JSON (nested too deeply or a number too long)") from None
    resource_type = _s(bundle.get("resourceType")) if isinstance(bundle, dict) else ""
    if resource_type != "Bundle":
        match = re.search(r'"resourceType"', text)
        line = text.count("\n", 0, match.start()) + 1 if match else 1
        what = f"resourceType {_quoted(resource_type)}" if resource_type else "no resourceType"
        raise SourceUnreadable(path, line, f"not a FHIR Bundle ({what})")
    raw_entries = bundle.get("entry")
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        match = re.search(r'"entry"', text)
        raise SourceUnreadable(path, text.count("\n", 0, match.start()) + 1 if match else 1,
                               "Bundle.entry is not a list")
    state = _State.of(ctx)
    entries: list[_Entry] = []
    patients: list[tuple[int, tuple[str, str]]] = []
    suspect = _SURROGATE_ESCAPE.search(text) is not None
    for number, item in enumerate(raw_entries, start=1):
        if suspect and _lone_surrogate(item):
            entries.append(_Entry(number, raw=json.dumps(item)[:_RAW_MAX], bad=_LONE_SURROGATE))   # ASCII escapes
            continue
        if not isinstance(item, dict):
            entries.append(_Entry(number, raw=_raw(item), bad="entry is not a JSON object"))
            continue
        resource = item.get("resource")
        if resource is None:
            entries.append(_Entry(number, raw=_raw(item), bad="entry without resource"))
            continue
        registered = _register_patient(resource, _s(item.get("fullUrl")), state)
        if registered:
            patients.append((number, registered))
        entries.append(_Entry(number, resource, _raw(item)))
    size = _chunk_size(ctx)
    for start in range(0, len(patients), size):
        yield from _patients_item(patients[start:start + size])
    for start in range(0, len(entries), size):
        yield from _convert(entries[start:start + size], state)


def read_ndjson(path: Path, ctx: ReadContext) -> Iterator[tuple[str, Chunk]]:
    """Bulk-export NDJSON, streamed: about `ctx.chunk_rows` resources a chunk, indexed by line number.
    Patients of each chunk are yielded first; blank lines are skipped."""
    state = _State.of(ctx)
    size = _chunk_size(ctx)
    entries: list[_Entry] = []
    patients: list[tuple[int, tuple[str, str]]] = []
    any_line = False

    def flush() -> Iterator[tuple[str, Chunk]]:
        yield from _patients_item(patients)
        yield from _convert(entries, state)

    with Path(path).open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            any_line = True
            try:
                text = line.decode("utf-8").strip()
            except UnicodeDecodeError:
                entries.append(_Entry(number, raw=line.decode("utf-8", "replace").strip()[:_RAW_MAX],
                                      bad="not UTF-8 text"))
            else:
                try:
                    resource = _loads(text)
                except json.JSONDecodeError as exc:
                    entries.append(_Entry(number, raw=text[:_RAW_MAX], bad=f"line is not JSON: {exc.msg}"))
                except (ValueError, RecursionError):
                    entries.append(_Entry(number, raw=text[:_RAW_MAX],
                                          bad="line is not JSON: nested too deeply or a number too long"))
                else:
                    if _SURROGATE_ESCAPE.search(text) and _lone_surrogate(resource):
                        entries.append(_Entry(number, raw=text[:_RAW_MAX], bad=_LONE_SURROGATE))
                        resource = None             # nothing of it is read
                    registered = _register_patient(resource, "", state)
                    if registered:
                        patients.append((number, registered))
                    # map now and keep the small output rows, not the resource's dict (the heavy part)
                    if resource is not None:
                        entries.append(_Entry(number, None, text[:_RAW_MAX],
                                              outputs=list(_resource_outputs(resource, state))))
            if len(entries) >= size:
                yield from flush()
                entries, patients = [], []
    if not any_line:
        raise SourceUnreadable(path, 1, "the file is empty")
    if entries:
        yield from flush()


# --------------------------------------------------------------------------------------------
# writers (tests, synthetic cohort)


def _text(value) -> str:
    return "" if value is None else str(value)


def _json_number(text: str) -> int | float | None:
    text = text.strip()
    if not text:
        return None
    try:
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        number = float(text)
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None


def _hash(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()


def _patient_rid(mrn: str) -> str:
    return "p" + _hash(mrn)[:12]


def _full_url(resource_type: str, rid: str, n: int) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:bonewatch:{resource_type}/{rid}/{n}"))


def _compact(resource: dict) -> dict:
    """Drop empty fields (FHIR forbids empty strings, objects and arrays)."""
    out = {}
    for key, value in resource.items():
        if isinstance(value, dict):
            value = _compact(value)
        elif isinstance(value, list):
            value = [_compact(v) if isinstance(v, dict) else v for v in value]
            value = [v for v in value if v not in ("", {}, None)]
        if value in ("", {}, [], None):
            continue
        out[key] = value
    return out


class _Writer:
    """Lab and event CSV rows -> FHIR resources (the inverse of the readers)."""

    def __init__(self, labs: Iterable[tuple], events: Iterable[tuple], bundle: bool):
        self.bundle = bundle
        self.labs = [tuple((*(_text(v) for v in row), *[""] * 7)[:7]) for row in labs]
        self.events = [tuple((*(_text(v) for v in row), *[""] * 5)[:5]) for row in events]
        self.order: dict[str, None] = {}
        for row in self.labs:
            self.order.setdefault(row[0], None)
        for row in self.events:
            self.order.setdefault(row[0], None)
        self.order.pop("", None)
        self.ids: Counter[str] = Counter()
        self.demographics: dict[str, dict[str, tuple[str, str]]] = {}   # MRN -> {type: (value, at)}
        self.in_patient: set[int] = set()        # positions of events written into the Patient
        self._demographics()

    def _demographics(self) -> None:
        for n, (mrn, kind, at, value, detail) in enumerate(self.events):
            kind = kind.strip().lower()
            if not mrn or kind not in ("birth_date", "sex"):
                continue
            if kind == "sex" and value.strip().lower() not in GENDER_OF_SEX:
                continue
            if kind == "birth_date" and not _FHIR_DATE.match(value):
                continue
            held = self.demographics.setdefault(mrn, {})
            if kind in held:
                continue
            recorded = next(iter(held.values()))[1] if held else at
            if at != recorded or detail:
                continue          # kept as an Observation so that nothing changes on the way back
            held[kind] = (value, at)
            self.in_patient.add(n)

    def subject(self, mrn: str) -> dict:
        if not mrn:
            return {}
        if self.bundle:
            return {"reference": _full_url("Patient", _patient_rid(mrn), 0)}
        return {"reference": f"Patient/{_patient_rid(mrn)}"}

    def rid(self, *row: str) -> str:
        base = "e" + _hash(*row)[:16]
        self.ids[base] += 1
        return base if self.ids[base] == 1 else f"{base}-{self.ids[base]}"

    def patients(self) -> list[dict]:
        out = []
        for mrn in self.order:
            held = self.demographics.get(mrn, {})
            if not held and not self.bundle:
                continue
            resource: dict = {"resourceType": "Patient", "id": _patient_rid(mrn)}
            if held:
                at = next(iter(held.values()))[1]
                if _FHIR_INSTANT.match(at):
                    resource["meta"] = {"lastUpdated": at}
                else:
                    resource["extension"] = [{"url": RECORDED_EXTENSION, "valueDateTime": at}]
            resource["identifier"] = [{"type": {"coding": [{"system": V2_0203_SYSTEM, "code": "MR"}]},
                                       "system": MRN_SYSTEM, "value": mrn}]
            if "sex" in held:
                resource["gender"] = GENDER_OF_SEX[held["sex"][0].strip().lower()]
            if "birth_date" in held:
                resource["birthDate"] = held["birth_date"][0]
            out.append(_compact(resource))
        return out

    def lab(self, row: tuple[str, ...]) -> dict:
        mrn, result_id, code, value, unit, collected_at, status = row
        system = LOINC_SYSTEM if _LOINC_SHAPE.match(code) else LOCAL_LAB_SYSTEM
        resource: dict = {"resourceType": "Observation", "id": result_id if _FHIR_ID.match(result_id) else "",
                          "identifier": [{"system": RESULT_ID_SYSTEM, "value": result_id}],
                          "status": LAB_STATUS.get(status.strip().lower(), status),
                          "category": [{"coding": [{"system": OBS_CATEGORY_SYSTEM, "code": "laboratory"}]}],
                          "code": {"coding": [{"system": system, "code": code}]},
                          "subject": self.subject(mrn), "effectiveDateTime": collected_at}
        match = _CENSORED.match(value)
        number = _json_number(match["number"]) if match else None
        if number is not None:
            resource["valueQuantity"] = {"value": number, "comparator": match["comparator"] or "", "unit": unit,
                                         "system": UCUM_SYSTEM if unit else "", "code": unit}
        else:
            resource["valueString"] = value
        return _compact(resource)

    def event_observation(self, row: tuple[str, ...], kind: str) -> dict:
        mrn, _, at, value, detail = row
        resource: dict = {"resourceType": "Observation", "id": self.rid("Observation", *row), "status": "final",
                          "code": {"coding": [{"system": EVENT_SYSTEM, "code": kind}]},
                          "subject": self.subject(mrn), "effectiveDateTime": at}
        number = _json_number(value) if kind in ("weight_kg", "albuminuria_mg_24h") else None
        if number is not None:
            unit = "kg" if kind == "weight_kg" else "mg/(24.h)"
            resource["valueQuantity"] = {"value": number, "unit": unit, "system": UCUM_SYSTEM, "code": unit}
        else:
            resource["valueString"] = value
        resource["note"] = [{"text": detail}] if detail else []
        return _compact(resource)

    def event(self, row: tuple[str, ...]) -> dict:
        mrn, kind, at, value, detail = row
        kind_key = kind.strip().lower()
        if kind_key == "bisphosphonate_dose" and value.strip().lower() in AGENT_RXNORM:
            dose = _json_number(detail)
            if dose is not None or not detail.strip():
                agent = value.strip().lower()
                return _compact({
                    "resourceType": "MedicationAdministration", "id": self.rid("MedicationAdministration", *row),
                    "status": "completed",
                    "medicationCodeableConcept": {"coding": [{"system": RXNORM_SYSTEM, "code": AGENT_RXNORM[agent],
                                                              "display": agent}]},
                    "subject": self.subject(mrn), "effectiveDateTime": at,
                    "dosage": {"dose": {"value": dose, "unit": "mg", "system": UCUM_SYSTEM, "code": "mg"}}
                    if dose is not None else {}})
        if kind_key == "myeloma_therapy_start" and value == "bortezomib" and not detail:
            return _compact({
                "resourceType": "MedicationAdministration", "id": self.rid("MedicationAdministration", *row),
                "status": "completed",
                "medicationCodeableConcept": {"coding": [{"system": RXNORM_SYSTEM, "code": "358258",
                                                          "display": "bortezomib"}]},
                "subject": self.subject(mrn), "effectiveDateTime": at})
        if kind_key == "diagnosis" and value.strip():
            icd = detail.strip() if _ICD10_SHAPE.match(detail.strip()) else ""
            return _compact({
                "resourceType": "Condition", "id": self.rid("Condition", *row),
                "code": {"coding": [{"system": DIAGNOSIS_SYSTEM, "code": value},
                                    {"system": ICD10CM_SYSTEM, "code": icd} if icd else {}]},
                "subject": self.subject(mrn), "recordedDate": at,
                "note": [{"text": detail}] if detail and not icd else []})
        if kind_key == "dental_exam" and value in PROCEDURE_STATUSES and not detail:
            return _compact({
                "resourceType": "Procedure", "id": self.rid("Procedure", *row), "status": value,
                "code": {"coding": [{"system": EVENT_SYSTEM, "code": "dental_exam"}]},
                "subject": self.subject(mrn), "performedDateTime": at})
        return self.event_observation(row, kind)

    def resources(self) -> list[dict]:
        out = self.patients()
        out.extend(self.lab(row) for row in self.labs)
        out.extend(self.event(row) for n, row in enumerate(self.events) if n not in self.in_patient)
        return out


def write_bundle(path: Path, labs: Iterable[tuple], events: Iterable[tuple]) -> None:
    """A collection Bundle: a Patient entry per patient (referenced by its urn:uuid fullUrl), then
    an Observation per lab row, then a resource per event. Deterministic (byte-identical output)."""
    writer = _Writer(labs, events, bundle=True)
    entries = []
    for n, resource in enumerate(writer.resources(), start=1):
        rid = resource.get("id", "")
        full_url = (_full_url("Patient", rid, 0) if resource["resourceType"] == "Patient"
                    else _full_url(resource["resourceType"], rid, n))
        entries.append({"fullUrl": full_url, "resource": resource})
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bundle, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_ndjson(folder: Path, labs: Iterable[tuple], events: Iterable[tuple]) -> list[Path]:
    """Bulk-export files, one per resource type present (`<Type>.ndjson`). A patient without a
    birth_date/sex event gets no Patient resource: its references resolve from earlier deliveries."""
    writer = _Writer(labs, events, bundle=False)
    by_type: dict[str, list[str]] = {name: [] for name in RESOURCE_ORDER}
    for resource in writer.resources():
        by_type[resource["resourceType"]].append(json.dumps(resource, ensure_ascii=False, separators=(",", ":")))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in RESOURCE_ORDER:
        if by_type[name]:
            target = folder / f"{name}.ndjson"
            target.write_text("".join(line + "\n" for line in by_type[name]), encoding="utf-8")
            paths.append(target)
    return paths
