"""FHIR R4 deliveries (SPEC 2.3): a Bundle or a single resource (`*.json`, one document), or a
bulk-export NDJSON file (`*.ndjson`, one resource a line, streamed), read into the canonical chunks
of `sources`.

Parsing uses the standard `json` module with defensive access: hostile feeds send anything, and
every resource that cannot be used becomes a bad row with a reason (never a crash, never silently
dropped; resource types that carry nothing bonewatch uses, such as Encounter, are ignored).
Numbers are kept as the text that was sent (`parse_float=str`), so `4.0` stays `4.0`.

What a row's "line" is (the index of every frame and bad row, unique within a file):
- NDJSON: the line number. Rows of one line (a Patient's birth date and sex, the Observations a
  DiagnosticReport contains) share it and go into successive chunks, one row of the line a chunk.
- `*.json`: the resource's ordinal in a depth-first walk of the document. The top Bundle's entries
  count 1, 2, 3...; a resource's contained resources count right after it; an entry holding a
  Bundle (of any type) counts once, then its own entries count, before the next entry of the outer
  Bundle. So a flat Bundle without contained resources is indexed by entry number, and a file
  holding one bare resource is line 1.

References resolve within the file, then through earlier deliveries:
- `subject`: `#id` to a contained Patient; `fullUrl`, `Patient/<id>` (relative or absolute, with
  or without `_history`), `urn:uuid:<id>` and `Patient?identifier=<system>|<value>` (the value is
  the MRN) to a Patient anywhere in the file (NDJSON: in the file so far), else through
  `ctx.patient_refs`, one bulk lookup a chunk into the Patients of earlier deliveries;
  `subject.identifier.value` is taken as the MRN when the reference does not resolve in the file.
  A contained resource without a subject has its container's.
- `MedicationAdministration.medicationReference`: `#id` to a contained Medication, else a
  Medication of the file (Bundle: anywhere; NDJSON: an earlier line, the last
  `_REMEMBERED` Medications); its `code` and its ingredients' codes are searched for the RxNorm code.
- An Observation without `effective[x]` takes the effective time of the DiagnosticReport of the
  file whose `result` lists it (by `fullUrl`, `Observation/<id>` or, for an Observation contained
  in the report, `#id`), else its own `issued`, else that report's `issued`; the lab row's 8th
  column `collected_basis` says which ("" when it had its own time). A Bundle sees every report in
  the file; NDJSON sees the reports of the lines read so far and of the rest of the current chunk
  (the last `_REMEMBERED` result references): a report further down the file comes too late, and
  the Observation falls back to its `issued`. A DiagnosticReport itself gives no row; the
  Observations it contains do (their result id is `<the report's id>#<their id>`: a contained id
  is only unique within its container).

`write_bundle` / `write_ndjson` are the exact inverse of the readers for lab and event CSV rows
(tests and the synthetic generator): reading what they write gives back the same rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from bonewatch.errors import SourceUnreadable
from bonewatch.ingest.feeds import CODE_SHAPE, EVENT_COLUMNS, LAB_COLUMNS
from bonewatch.ingest.reader import Chunk, LongLines, cut_rows
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
#: the spellings real systems use for one code system (the canonical URL, its OID, a trailing slash;
#: HL7 table 0203 under its pre-R4 URL)
LOINC_SYSTEMS = frozenset({LOINC_SYSTEM, "http://loinc.org/", "https://loinc.org", "urn:oid:2.16.840.1.113883.6.1"})
RXNORM_SYSTEMS = frozenset({RXNORM_SYSTEM, "urn:oid:2.16.840.1.113883.6.88"})
UCUM_SYSTEMS = frozenset({UCUM_SYSTEM, "http://unitsofmeasure.org/", "urn:oid:2.16.840.1.113883.6.8"})
ICD10CM_SYSTEMS = frozenset({ICD10CM_SYSTEM, "urn:oid:2.16.840.1.113883.6.90"})
MR_TYPE_SYSTEMS = frozenset({V2_0203_SYSTEM, "http://hl7.org/fhir/v2/0203", ""})

#: the 8th column of a FHIR lab frame (after `feeds.LAB_COLUMNS`): where `collected_at` came from
BASIS_COLUMN = "collected_basis"
FHIR_LAB_COLUMNS = [*LAB_COLUMNS, BASIS_COLUMN]
BASIS_REPORT = "DiagnosticReport.effective"
BASIS_ISSUED = "issued"

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
#: a Patient without `gender` (US Core 9 examples) may carry its sex in an extension: US Core's
#: individual sex (SNOMED CT female / male findings) or birth sex (F / M)
SEX_EXTENSIONS = {
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-individual-sex": {"248152002": "F", "248153007": "M"},
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex": {"F": "F", "M": "M"},
}
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
#: NDJSON: how many DiagnosticReport result references and Medications are remembered for the lines
#: that follow (the oldest are forgotten first: a bulk export is larger than memory)
_REMEMBERED = 100_000
#: a JSON escape of a UTF-16 surrogate: alone (`"\ud800"`) it decodes to a string no UTF-8 text holds
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = "not valid Unicode text (a lone surrogate escape)"
_NOT_FOUND = "subject reference not found in this file or earlier deliveries"
_NO_CONTAINED: Mapping[str, dict] = MappingProxyType({})


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


def _typed_key(reference: str, resource_type: str) -> str:
    """'<Type>/<id>' from a relative or absolute reference (with or without `_history`), or from a
    `urn:uuid:` reference (Synthea and most exporters use the resource id as the uuid), or ""."""
    parts = reference.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == resource_type and parts[i + 1]:
            return f"{resource_type}/{parts[i + 1]}"
    if reference.startswith("urn:uuid:") and len(reference) > 9:
        return f"{resource_type}/{reference[9:]}"
    return ""


def _patient_key(reference: str) -> str:
    return _typed_key(reference, "Patient")


def _raw(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text[:_RAW_MAX]


def _effective(resource: dict) -> str:
    """effectiveDateTime, effectivePeriod.start or effectiveInstant (Observation, DiagnosticReport)."""
    return (_s(resource.get("effectiveDateTime")) or _s(_d(resource.get("effectivePeriod")).get("start"))
            or _s(resource.get("effectiveInstant")))


def _contained_of(resource: dict) -> Mapping[str, dict]:
    """'#id' -> the resources a resource contains."""
    contained = resource.get("contained")
    if not contained:
        return _NO_CONTAINED
    return {"#" + _s(c.get("id")): c for c in _l(contained) if isinstance(c, dict) and _s(c.get("id"))}


def _quantity_unit(quantity: dict) -> str:
    """A Quantity's unit: its `code` when the code is UCUM, else the human-readable `unit` (a SNOMED
    or local unit code means nothing to the unit table; its text usually does), else the code."""
    code, text = _s(quantity.get("code")), _s(quantity.get("unit"))
    if _s(quantity.get("system")) in UCUM_SYSTEMS:
        return code or text
    return text or code


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
    kind: str                      # "labs" | "events" | "bad" | "codes" (counted per code, not read)
    fields: tuple[str, ...] = ()   # the row without patient_id (or (reason,) for "bad")
    subject: _Subject | None = None  # None: fields already hold the patient_id first
    #: a lab row whose time comes from a DiagnosticReport of the file: (the Observation's keys, its
    #: own `issued`); resolved when the chunk is converted (`_timed`)
    pending: tuple[tuple[str, ...], str] | None = None


class _Where:
    """Where a resource sits in the file: what its references resolve against. (A plain class with
    slots: one is made for every resource of a Bundle.)"""

    __slots__ = ("full_url", "contained", "container", "container_key", "report")

    def __init__(self, full_url: str = "", contained: Mapping[str, dict] = _NO_CONTAINED,
                 container: dict | None = None, container_key: str = "",
                 report: tuple[str, str] | None = None):
        self.full_url = full_url
        #: '#id' -> contained resources: the resource's own, or, for a contained resource, its container's
        self.contained = contained
        self.container = container            # a contained resource's container
        self.container_key = container_key    # the container's id (else identifier, else fullUrl)
        self.report = report                  # (effective, issued) of the report listing a contained Observation


_NOWHERE = _Where()


def _subject_of(resource: dict, where: _Where) -> _Subject:
    subject = resource.get("subject")
    if not isinstance(subject, dict) and where.container is not None:
        return _subject_of(where.container, _Where(contained=where.contained))
    if not isinstance(subject, dict):
        return _Subject(missing=True)
    reference = _s(subject.get("reference"))
    mrn = _s(_d(subject.get("identifier")).get("value"))
    if not reference and not mrn:
        return _Subject(missing=True)
    if reference.startswith("#"):
        target = where.contained.get(reference)
        if isinstance(target, dict) and target.get("resourceType") == "Patient":
            mrn = patient_id_of(target) or mrn
        return _Subject((), "", mrn)
    if reference.startswith("Patient?"):
        # a conditional reference (transaction Bundles): Patient?identifier=<system>|<value>
        for part in reference[8:].split("&"):
            name, _, value = part.partition("=")
            if name == "identifier" and value:
                mrn = value.rpartition("|")[2] or mrn
        return _Subject((), "", mrn)
    key = _patient_key(reference) if reference else ""
    keys = tuple(k for k in dict.fromkeys((reference, key)) if k)
    return _Subject(keys, key, mrn)


def patient_id_of(resource: dict) -> str:
    """The MRN of a Patient: its MR identifier, else its first identifier, else the resource id."""
    identifiers = [i for i in _l(resource.get("identifier")) if isinstance(i, dict) and _s(i.get("value"))]
    for identifier in identifiers:
        for system, code in _codings(identifier.get("type")):
            if code == "MR" and system in MR_TYPE_SYSTEMS:
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
    #: an Observation's reference (fullUrl, Observation/<id>) -> (effective, issued) of the report listing it
    reports: OrderedDict[str, tuple[str, str]] = field(default_factory=OrderedDict)
    #: fullUrl / Medication/<id> -> a CodeableConcept of the Medication's codes and ingredient codes
    medications: OrderedDict[str, dict] = field(default_factory=OrderedDict)
    remembered: int | None = None   # NDJSON: how many of each to keep (None: a Bundle keeps all)

    @classmethod
    def of(cls, ctx: ReadContext, remembered: int | None = None) -> _State:
        ingest = ctx.settings.ingest
        snomed = getattr(ingest, "snomed_map", None)
        received = ctx.received_at
        if received.tzinfo is None:
            received = received.replace(tzinfo=UTC)     # the pipeline stamps arrivals in naive UTC
        return cls(ctx, code_map=dict(ingest.code_map),
                   snomed_map=dict(DEFAULT_SNOMED_MAP if snomed is None else snomed),
                   received_date=received.astimezone(ctx.settings.tz).date().isoformat(),
                   remembered=remembered)

    def remember(self, table: OrderedDict, key: str, value) -> None:
        """Keep the first value a key is given; forget the oldest keys beyond `remembered`."""
        if not key or key in table:
            return
        table[key] = value
        if self.remembered is not None and len(table) > self.remembered:
            table.popitem(last=False)


def _patient_events(resource: dict, state: _State, where: _Where) -> list[_Out]:
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
    sex = _sex_of(resource)
    if sex:
        out.append(_Out("events", (mrn, "sex", occurred, sex, "")))
    return out


def _sex_of(resource: dict) -> str:
    """F / M from `gender`; when the Patient has no `gender`, from a sex extension; else ""."""
    gender = _s(resource.get("gender")).lower()
    if gender:
        return SEX_OF_GENDER.get(gender, "")     # other / unknown: no sex (BRIEF interface 2)
    for extension in _l(resource.get("extension")):
        codes = SEX_EXTENSIONS.get(_s(_d(extension).get("url")))
        if codes:
            sex = codes.get(_s(_d(extension.get("valueCoding")).get("code")) or _s(extension.get("valueCode")), "")
            if sex:
                return sex
    return ""


def _number_text(value) -> str:
    """A JSON number (kept as text by `_loads`) or a numeric string; booleans and objects are not."""
    return value.strip() if isinstance(value, str) else ""


def _lab_code(codings: list[tuple[str, str]], state: _State) -> str:
    """The code a lab row carries (BRIEF interface 1): a LOINC coding (one bonewatch monitors or
    maps first), else the first coding whose code is in the hospital's map, else the first code."""
    loinc = [c for s, c in codings if s in LOINC_SYSTEMS and c]
    for code in loinc:
        if code in _KNOWN_LOINC or code in state.code_map:
            return code
    if loinc:
        return loinc[0]
    return (next((c for _, c in codings if c and c in state.code_map), "")
            or next((c for _, c in codings if c), ""))


def _result_id(resource: dict, where: _Where) -> str:
    """The lab's id of a result: the resource id (qualified by its container's when contained: a
    contained id is only unique within its container), else the first identifier's value, else ""."""
    rid = _s(resource.get("id"))
    if where.container is not None:
        rid = f"{where.container_key}#{rid}" if rid and where.container_key else ""
    if rid:
        return rid
    for identifier in _l(resource.get("identifier")):
        value = _s(_d(identifier).get("value"))
        if value:
            return value
    return ""


def _fallback_time(report: tuple[str, str] | None, issued: str) -> tuple[str, str]:
    """(collected_at, basis) of an Observation without effective[x]: the report's effective time,
    else the Observation's `issued`, else the report's `issued` (SPEC 2.3)."""
    if report is not None and report[0]:
        return report[0], BASIS_REPORT
    if issued:
        return issued, BASIS_ISSUED
    if report is not None and report[1]:
        return report[1], BASIS_ISSUED
    return "", ""


def _observation(resource: dict, state: _State, where: _Where) -> list[_Out]:
    code = resource.get("code")
    codings = _codings(code)
    subject = _subject_of(resource, where)
    status = _s(resource.get("status"))
    event_type = next((c for s, c in codings if s == EVENT_SYSTEM and c), "")
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
        occurred = _effective(resource) or _s(resource.get("issued"))
        return [_Out("events", (event_type, occurred, value, _note(resource)), subject)]
    lab_code = _lab_code(codings, state)
    if not lab_code:
        text = _s(_d(code).get("text"))
        return [_Out("bad", ("Observation code without a coding (text only)" if text else "Observation without a code",))]
    # Not monitored codes (a CBC, a panel, a blood pressure with only components) are rows all the
    # same: `feeds.parse_labs` counts them and skips them before it asks for a value or a unit.
    quantity = _d(resource.get("valueQuantity"))
    if quantity:
        number = _number_text(quantity.get("value"))
        value = (_s(quantity.get("comparator")) + number) if number else ""
        unit = _quantity_unit(quantity)
    else:
        value = _s(resource.get("valueString")) or _number_text(resource.get("valueInteger"))
        unit = ""
    row = (_result_id(resource, where), lab_code, value, unit)
    collected = _effective(resource)
    if collected:
        return [_Out("labs", (*row, collected, status, ""), subject)]
    issued = _s(resource.get("issued"))
    if where.container is not None:
        collected, basis = _fallback_time(where.report, issued)
        return [_Out("labs", (*row, collected, status, basis), subject)]
    rid = _s(resource.get("id"))
    keys = tuple(k for k in dict.fromkeys((where.full_url, f"Observation/{rid}" if rid else "",
                                           _typed_key(where.full_url, "Observation"))) if k)
    return [_Out("labs", (*row, "", status, ""), subject, pending=(keys, issued))]


def _timed(out: _Out, state: _State) -> _Out:
    """A lab row waiting for its DiagnosticReport's time, given the time (or its fallback)."""
    keys, issued = out.pending
    report = next((state.reports[k] for k in keys if k in state.reports), None)
    collected, basis = _fallback_time(report, issued)
    result_id, code, value, unit, _, status, _ = out.fields
    return _Out("labs", (result_id, code, value, unit, collected, status, basis), out.subject)


def _mg_text(value: str, unit: str) -> str:
    if unit.lower() != "g" or not value:
        return value
    try:
        return format((Decimal(value) * 1000).normalize(), "f")
    except InvalidOperation:
        return value


def _medication_concept(medication: dict) -> dict:
    """A Medication's codes as one CodeableConcept: its `code`, then its ingredients' codes (a
    product coded as a clinical drug names its active ingredient there)."""
    code = _d(medication.get("code"))
    codings = [c for c in _l(code.get("coding")) if isinstance(c, dict)]
    for ingredient in _l(medication.get("ingredient")):
        codings += [c for c in _l(_d(_d(ingredient).get("itemCodeableConcept")).get("coding")) if isinstance(c, dict)]
    return {"coding": codings, "text": _s(code.get("text"))}


def _medication(resource: dict, state: _State, where: _Where) -> list[_Out]:
    status = _s(resource.get("status")).lower()
    if status == "not-done":
        return [_Out("bad", ("administration not done",))]
    if status == "entered-in-error":
        return [_Out("bad", ("administration entered in error",))]
    concept = resource.get("medicationCodeableConcept")
    reference = _s(_d(resource.get("medicationReference")).get("reference"))
    if not _codings(concept) and reference:
        if reference.startswith("#"):
            target = where.contained.get(reference)
            concept = (_medication_concept(target) if isinstance(target, dict)
                       and target.get("resourceType") == "Medication" else None)
        else:
            concept = state.medications.get(reference) or state.medications.get(_typed_key(reference, "Medication"))
        if concept is None:
            return [_Out("bad", ("medication reference not found in this file",))]
    rxnorm = [c for s, c in _codings(concept) if s in RXNORM_SYSTEMS and c]
    code = next((c for c in rxnorm if c in RXNORM_EVENTS), rxnorm[0] if rxnorm else "")
    if code not in RXNORM_EVENTS:
        shown = code or _first_code(concept)
        if not shown:
            return [_Out("bad", ("administration without a medication code",))]
        return [_not_monitored("Medication", shown)]
    event_type, value = RXNORM_EVENTS[code]
    occurred = _s(resource.get("effectiveDateTime")) or _s(_d(resource.get("effectivePeriod")).get("start"))
    if event_type == "bisphosphonate_dose":
        dose = _d(_d(resource.get("dosage")).get("dose"))
        detail = _mg_text(_number_text(dose.get("value")), _quantity_unit(dose))
    else:
        detail = "administration"
    return [_Out("events", (event_type, occurred, value, detail), _subject_of(resource, where))]


def _not_monitored(kind: str, code: str) -> _Out:
    """A diagnosis, procedure or drug bonewatch does not follow (a SNOMED burn, a vancomycin
    infusion): not a bad row (SPEC 2.5), counted per code for the data team (`bonewatch codes --all`)
    so that a myeloma diagnosis or a bisphosphonate sent under another code is seen, not lost."""
    if not CODE_SHAPE.match(code):    # text, not a code: it may be anything, patient data included
        return _Out("bad", (f"{kind} without a code (text only)",))
    return _Out("codes", (f"{kind}:{code}"[:32],))


def _icd_diagnosis(code: str) -> str:
    flat = code.upper().replace(".", "")
    if flat.startswith("C900"):
        return "MM"
    if flat == "D472":
        return "MGUS"
    if flat.startswith(("M80", "M81")):
        return "osteoporosis"
    return ""


def _condition(resource: dict, state: _State, where: _Where) -> list[_Out]:
    verification = {c.lower() for _, c in _codings(resource.get("verificationStatus"))}
    for status in ("entered-in-error", "refuted"):
        if status in verification:
            return [_Out("bad", (f"condition {status}",))]
    code = resource.get("code")
    icd = next((c for s, c in _codings(code) if s in ICD10CM_SYSTEMS and c), "")
    value = _code_in(code, DIAGNOSIS_SYSTEM) or (_icd_diagnosis(icd) if icd else "")
    if not value:
        shown = icd or _first_code(code)
        if not shown:
            return [_Out("bad", ("Condition without a code",))]
        return [_not_monitored("Condition", shown)]
    occurred = _s(resource.get("onsetDateTime")) or _s(resource.get("recordedDate"))
    detail = icd or _note(resource)
    return [_Out("events", ("diagnosis", occurred, value, detail), _subject_of(resource, where))]


def _procedure(resource: dict, state: _State, where: _Where) -> list[_Out]:
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
        return [_not_monitored("Procedure", shown) if shown else _Out("bad", ("Procedure without a code",))]
    occurred = _s(resource.get("performedDateTime")) or _s(_d(resource.get("performedPeriod")).get("start"))
    return [_Out("events", ("dental_exam", occurred, status, ""), _subject_of(resource, where))]


_HANDLERS = {
    "Patient": _patient_events,
    "Observation": _observation,
    "MedicationAdministration": _medication,
    "Condition": _condition,
    "Procedure": _procedure,
}


def _known_loinc() -> frozenset[str]:
    from bonewatch.units import LOINC

    return frozenset(LOINC)


_KNOWN_LOINC = _known_loinc()


def _resource_outputs(resource, state: _State, where: _Where) -> list[_Out]:
    if not isinstance(resource, dict):
        return [_Out("bad", ("resource is not a JSON object",))]
    resource_type = _s(resource.get("resourceType"))
    if not resource_type:
        return [_Out("bad", ("resource without resourceType",))]
    handler = _HANDLERS.get(resource_type)
    # DiagnosticReport (its Observations are read), Encounter, Practitioner, ...: nothing we use
    return handler(resource, state, where) if handler else []


def _where_of(resource: dict, full_url: str) -> _Where:
    if not full_url and not resource.get("contained"):
        return _NOWHERE
    return _Where(full_url, _contained_of(resource))


def _contained(resource: dict, full_url: str, where: _Where) -> Iterator[tuple[object, _Where | None]]:
    """A resource's contained resources in order, each with where it sits when it gives rows (an
    Observation), None when it does not. An Observation a DiagnosticReport lists (`#id`) carries the
    report's times."""
    key = _result_id(resource, _NOWHERE) or full_url
    listed: set[str] = set()
    times = None
    if resource.get("resourceType") == "DiagnosticReport":
        listed = {_s(_d(r).get("reference")) for r in _l(resource.get("result"))}
        times = (_effective(resource), _s(resource.get("issued")))
    for item in _l(resource.get("contained")):
        if isinstance(item, dict) and item.get("resourceType") == "Observation":
            listed_here = "#" + _s(item.get("id")) in listed
            yield item, _Where(full_url, where.contained, resource, key, times if listed_here else None)
        else:
            yield item, None


def _register(resource, full_url: str, state: _State) -> tuple[str, str] | None:
    """Remember what other resources of the file refer to: a Patient's MRN, a DiagnosticReport's
    times for the Observations it lists, a Medication's codes. Return (Patient/<id>, MRN) for a
    Patient with an id (the `patients` rows)."""
    if not isinstance(resource, dict):
        return None
    resource_type = resource.get("resourceType")
    if resource_type == "Patient":
        return _register_patient(resource, full_url, state)
    if resource_type == "DiagnosticReport":
        times = (_effective(resource), _s(resource.get("issued")))
        if any(times):
            for result in _l(resource.get("result")):
                reference = _s(_d(result).get("reference"))
                if reference and not reference.startswith("#"):
                    state.remember(state.reports, reference, times)
                    state.remember(state.reports, _typed_key(reference, "Observation"), times)
    elif resource_type == "Medication":
        concept = _medication_concept(resource)
        rid = _s(resource.get("id"))
        for key in (full_url, f"Medication/{rid}" if rid else "", _typed_key(full_url, "Medication")):
            state.remember(state.medications, key, concept)
    return None


# --------------------------------------------------------------------------------------------
# a chunk of resources -> items


@dataclass
class _Entry:
    index: int
    resource: object = None
    raw: object = ""        # what a bad row shows: the line, or the Bundle entry (serialised when needed)
    bad: str = ""           # decided before mapping (not JSON, not UTF-8, entry without resource)
    outputs: list | None = None   # already mapped (NDJSON maps each line as it reads it: no dicts kept)
    where: _Where = _NOWHERE


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


def _by_occurrence(rows: list[tuple[int, tuple[str, ...]]]) -> list[list[tuple[int, tuple[str, ...]]]]:
    """One frame may not hold two rows of one line (a Patient gives birth_date and sex; an NDJSON
    report gives the Observations it contains): the k-th row of each line goes into the k-th frame."""
    seen: Counter[int] = Counter()
    groups: dict[int, list[tuple[int, tuple[str, ...]]]] = {}
    for index, row in rows:
        groups.setdefault(seen[index], []).append((index, row))
        seen[index] += 1
    return [groups[k] for k in sorted(groups)]


def _convert(entries: list[_Entry], state: _State) -> Iterator[tuple[str, Chunk]]:
    """Map a chunk of entries; resolve subjects (one bulk lookup); yield labs, then events."""
    bad: list[tuple[int, str, str]] = []
    pending: list[tuple[_Entry, _Out]] = []
    skipped: list[str] = []
    for entry in entries:
        if entry.bad:
            bad.append((entry.index, _raw(entry.raw), entry.bad))
            continue
        outputs = (entry.outputs if entry.outputs is not None
                   else _resource_outputs(entry.resource, state, entry.where))
        for out in outputs:
            if out.kind == "bad":
                bad.append((entry.index, _raw(entry.raw or entry.resource), out.fields[0]))
            elif out.kind == "codes":
                skipped.append(out.fields[0])
            else:
                pending.append((entry, _timed(out, state) if out.pending else out))
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
    items += [("labs", Chunk(_frame(group, FHIR_LAB_COLUMNS))) for group in _by_occurrence(labs)]
    items += [("events", Chunk(_frame(group, EVENT_COLUMNS))) for group in _by_occurrence(events)]
    if bad:
        bad.sort(key=lambda b: b[0])
        if items:
            items[0][1].bad_rows.extend(bad)
        else:
            items.append(("events", Chunk(_frame([], EVENT_COLUMNS), bad)))
    if skipped:
        # counted per code, not stored: one row a resource, indexed by its place in the chunk
        items.append(("codes", Chunk(pd.DataFrame({"code": skipped}, index=pd.RangeIndex(1, len(skipped) + 1, name="line")))))
    yield from items


def _chunk_size(ctx: ReadContext) -> int:
    return max(1, int(ctx.chunk_rows))


# --------------------------------------------------------------------------------------------
# readers


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _line_of_text(text: str, pattern: str) -> int:
    match = re.search(pattern, text)
    return text.count("\n", 0, match.start()) + 1 if match else 1


def _walk(top: dict, is_bundle: bool, state: _State, suspect: bool,
          patients: list[tuple[int, tuple[str, str]]]) -> list[_Entry]:
    """The resources of a `*.json` document in depth-first order, numbered as the module docstring
    says; Patients, reports and Medications are registered on the way (the whole file is known
    before any row is made, so references resolve whatever their order)."""
    entries: list[_Entry] = []
    number = 0

    def visit(resource, full_url: str, raw: object) -> None:
        nonlocal number
        if not isinstance(resource, dict):
            entries.append(_Entry(number, resource, raw))     # "resource is not a JSON object"
            return
        where = _where_of(resource, full_url)
        registered = _register(resource, full_url, state)
        if registered:
            patients.append((number, registered))
        entries.append(_Entry(number, resource, raw, where=where))
        if resource.get("contained"):
            for item, inner in _contained(resource, full_url, where):
                number += 1
                if inner is not None:
                    entries.append(_Entry(number, item, item, where=inner))

    if not is_bundle:
        number = 1
        if suspect and _lone_surrogate(top):
            return [_Entry(number, raw=json.dumps(top)[:_RAW_MAX], bad=_LONE_SURROGATE)]   # ASCII escapes
        visit(top, "", top)
        return entries
    # an explicit stack of entry iterators: a Bundle may nest Bundles as deeply as JSON allows
    stack: list[Iterator] = [iter(_l(top.get("entry")))]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
            continue
        number += 1
        resource = item.get("resource") if isinstance(item, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
            inner = resource.get("entry")
            if inner is None or isinstance(inner, list):
                stack.append(iter(inner or []))
            else:
                entries.append(_Entry(number, raw=_raw(item), bad="Bundle.entry is not a list"))
            continue
        if suspect and _lone_surrogate(item):
            entries.append(_Entry(number, raw=json.dumps(item)[:_RAW_MAX], bad=_LONE_SURROGATE))   # ASCII escapes
            continue
        if not isinstance(item, dict):
            entries.append(_Entry(number, raw=item, bad="entry is not a JSON object"))
            continue
        if resource is None:
            if "response" in item and "request" not in item:
                continue        # a batch / transaction response without a body: no data to read
            entries.append(_Entry(number, raw=item, bad="entry without resource"))
            continue
        visit(resource, _s(item.get("fullUrl")), item)
    return entries


_END = object()


def read_bundle(path: Path, ctx: ReadContext) -> Iterator[tuple[str, Chunk]]:
    """A `*.json` document: a FHIR R4 Bundle of any type (nested Bundles read recursively) or one
    bare resource (read as a Bundle of one), loaded whole. Rows are indexed as the module docstring
    says. A file of one resource a line (NDJSON under a `.json` name) is read as NDJSON."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise SourceUnreadable(path, 1, "the file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceUnreadable(path, _line_of(data, exc.start), "not UTF-8 text") from None
    try:
        top = _loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _ndjson_head(text):
            yield from read_ndjson(path, ctx)
            return
        raise SourceUnreadable(path, exc.lineno, f"not valid JSON: {exc.msg}") from None
    except (ValueError, RecursionError):
        raise SourceUnreadable(path, 1, "not valid JSON (nested too deeply or a number too long)") from None
    resource_type = _s(top.get("resourceType")) if isinstance(top, dict) else ""
    if not resource_type:
        what = "a JSON array" if isinstance(top, list) else "no resourceType"
        raise SourceUnreadable(path, 1, f"not a FHIR Bundle or resource ({what})")
    if resource_type == "OperationOutcome":
        # what a server sends instead of data when a search or an export failed
        raise SourceUnreadable(path, _line_of_text(text, r'"resourceType"'),
                               "an OperationOutcome (a server's error report), not data")
    is_bundle = resource_type == "Bundle"
    if is_bundle and top.get("entry") is not None and not isinstance(top.get("entry"), list):
        raise SourceUnreadable(path, _line_of_text(text, r'"entry"'), "Bundle.entry is not a list")
    state = _State.of(ctx)
    patients: list[tuple[int, tuple[str, str]]] = []
    entries = _walk(top, is_bundle, state, _SURROGATE_ESCAPE.search(text) is not None, patients)
    size = _chunk_size(ctx)
    for start in range(0, len(patients), size):
        yield from _patients_item(patients[start:start + size])
    for start in range(0, len(entries), size):
        yield from _convert(entries[start:start + size], state)


def _ndjson_head(text: str) -> bool:
    """Does a text start with one FHIR resource on its first line (NDJSON)?"""
    first = text.lstrip().split("\n", 1)[0]
    try:
        resource = _loads(first)
    except (ValueError, RecursionError):
        return False
    return isinstance(resource, dict) and bool(_s(resource.get("resourceType")))


def _line_outputs(resource: dict, state: _State) -> list[_Out]:
    """One NDJSON resource's rows: its own, then those of the Observations it contains."""
    if not isinstance(resource, dict):
        return _resource_outputs(resource, state, _NOWHERE)
    if resource.get("resourceType") == "Bundle":
        return [_Out("bad", ("a Bundle on an NDJSON line (one resource a line; send a Bundle as a .json file)",))]
    where = _where_of(resource, "")
    outputs = _resource_outputs(resource, state, where)
    if resource.get("contained"):
        for item, inner in _contained(resource, "", where):
            if inner is not None:
                outputs += _resource_outputs(item, state, inner)
    return outputs


def read_ndjson(path: Path, ctx: ReadContext) -> Iterator[tuple[str, Chunk]]:
    """Bulk-export NDJSON, streamed: about `ctx.chunk_rows` resources a chunk, indexed by line number.
    Patients of each chunk are yielded first; blank lines are skipped."""
    state = _State.of(ctx, remembered=_REMEMBERED)
    size = _chunk_size(ctx)
    entries: list[_Entry] = []
    patients: list[tuple[int, tuple[str, str]]] = []
    any_line = False

    def flush() -> Iterator[tuple[str, Chunk]]:
        yield from _patients_item(patients)
        yield from _convert(entries, state)

    with LongLines(Path(path).open("rb"), ctx.max_row_bytes, cr=False) as stream:
        for number, line in enumerate(io.BufferedReader(stream), start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                if stream.cut and stream.cut[0][0] == number:     # a line too long, not read
                    any_line = True
                    ((_, raw, reason),) = cut_rows([stream.cut.pop(0)], stream.limit)
                    entries.append(_Entry(number, raw=raw, bad=reason))
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
                    registered = _register(resource, "", state)
                    if registered:
                        patients.append((number, registered))
                    # map now and keep the small output rows, not the resource's dict (the heavy part)
                    if resource is not None:
                        entries.append(_Entry(number, None, text[:_RAW_MAX], outputs=_line_outputs(resource, state)))
            if len(entries) >= size:
                yield from flush()
                entries, patients = [], []
        for line, raw, reason in cut_rows(stream.cut, stream.limit):   # the last line, without a line break
            any_line = True
            entries.append(_Entry(line, raw=raw, bad=reason))
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
