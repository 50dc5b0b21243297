"""FHIR R4 Bundle / NDJSON readers and writers (SPEC 2.3): the writers validate as R4B, a round
trip gives the canonical values of the CSV rows, subjects resolve in bulk, bad resources are
quarantined with a reason while the rest of the file is kept, unreadable files name their line."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from bonewatch.config import load_settings
from bonewatch.errors import SourceUnreadable
from bonewatch.ingest import feeds, fhir, sources

RECEIVED = datetime(2024, 6, 1, 12, 0)
A, B = "000123", "000456"     # MRNs (leading zeros matter)

# Every timestamp carries an offset or is a date: valid R4B dateTimes.
LABS = [
    (A, "L1", "2160-0", "1.10", "mg/dL", "2024-03-01T08:00:00+00:00", "final"),
    (A, "L2", "6768-6", "<5", "U/L", "2024-03-01T08:00:00+01:00", "F"),
    (A, "L3", "17861-6", "9.4", "mg/dL", "2024-03-01", "corrected"),
    (B, "L4", "ALP", "130", "U/L", "2024-03-02T09:30:00Z", "P"),
    (B, "L5", "14682-9", "97.2", "umol/L", "2024-03-02T09:30:00+00:00", "X"),
    (B, "L6", "29463-7", "160", "lb", "2024-03-02T09:30:00+00:00", "final"),
    (B, "L7", "17838-4", ">1000", "ug/L", "2024-03-02T09:30:00+00:00", "final"),
    (B, "L8", "99999-9", "12.3", "mg/dL", "2024-03-02T09:30:00+00:00", "final"),    # unknown code
    (B, "L9", "17861-6", "abc", "mg/dL", "2024-03-02T09:30:00+00:00", "final"),     # not a number
]
EVENTS = [
    (A, "birth_date", "2023-12-01", "1950-04-02", ""),
    (A, "sex", "2023-12-01", "F", ""),
    (A, "diagnosis", "2023-12-01", "MM", "C90.00"),
    (A, "diagnosis", "2023-12-05", "osteoporosis", "M81.0"),
    (A, "bone_disease", "2023-12-01", "active", ""),
    (A, "weight_kg", "2023-12-01", "72.5", ""),
    (A, "myeloma_therapy_start", "2024-01-02", "bortezomib", ""),
    (A, "myeloma_therapy_start", "2024-01-03", "VRd", "second line"),
    (A, "dental_exam", "2024-01-10", "completed", ""),
    (A, "bisphosphonate_dose", "2024-02-01T14:00:00+00:00", "zoledronic_acid", "4.0"),
    (A, "bisphosphonate_dose", "2024-03-01T14:00:00+00:00", "zoledronic_acid", "3.5"),
    (A, "albuminuria_mg_24h", "2024-03-05", "120", ""),
    (A, "response", "2024-04-01", "VGPR", "bone marrow"),
    (A, "bisphosphonate_stop", "2024-05-01", "zoledronic_acid", ""),
    (A, "care_team", "2024-05-02", "haematology-2", ""),
    (A, "response", "2024-05-03", "XYZ", ""),                 # quarantined by the events parser
    (B, "diagnosis", "2024-01-01T10:00:00+00:00", "MGUS", "D47.2"),
    (B, "bisphosphonate_dose", "2024-02-01", "pamidronate", "90"),
    (B, "bisphosphonate_dose", "2024-02-02", "denosumab", "120"),
]
# Local times without an offset (the hospital's zone) and a hostile date: read back the same,
# though not valid R4B (a FHIR dateTime with a time needs an offset).
LABS_LOCAL = [
    (A, "L10", "2160-0", "1.4", "mg/dL", "2024-03-03T08:00:00", "final"),
    (B, "L11", "6768-6", "85", "U/L", "2024-02-30T08:00:00", "final"),
]
EVENTS_LOCAL = [
    (B, "birth_date", "2024-01-01T09:00:00", "1948-07-30", ""),
    (B, "sex", "2024-01-01T09:00:00", "male", ""),
    (B, "dental_exam", "2024-01-10T10:15:00", "completed", ""),
]


def pid_ref(mrn: str) -> str:
    return "Patient/p" + hashlib.sha1(mrn.encode()).hexdigest()[:12]


@pytest.fixture
def settings():
    return load_settings()


def ctx_of(settings, chunk_rows=1000, refs=None, calls=None):
    def lookup(wanted):
        wanted = list(wanted)
        if calls is not None:
            calls.append(sorted(wanted))
        return {r: (refs or {})[r] for r in wanted if r in (refs or {})}

    return sources.ReadContext(settings, chunk_rows, received_at=RECEIVED, patient_refs=lookup)


def items_of(reader, path, ctx):
    items = list(reader(path, ctx))
    for kind, chunk in items:
        assert list(chunk.frame.columns) == {"labs": fhir.FHIR_LAB_COLUMNS, "events": feeds.EVENT_COLUMNS,
                                             "patients": sources.PATIENT_COLUMNS, "codes": ["code"]}[kind]
        assert chunk.frame.index.is_unique and chunk.frame.index.name == "line"
        assert all(isinstance(v, str) for v in chunk.frame.to_numpy().ravel())
    return items


def rows(items, kind):
    out = []
    for k, chunk in items:
        if k == kind:
            pairs = zip(chunk.frame.index, chunk.frame.itertuples(index=False), strict=True)
            out.extend((int(i), *r) for i, r in pairs)
    return sorted(out)


def bad(items):
    return sorted(b for _, chunk in items for b in chunk.bad_rows)


def skipped_codes(items) -> list[str]:
    """Codes of Conditions, Procedures and administrations bonewatch does not follow: counted, not bad."""
    return sorted(code for kind, chunk in items if kind == "codes" for code in chunk.frame["code"])


def reasons(items):
    return {line: reason for line, _, reason in bad(items)}


def write_lines(path: Path, lines: list) -> Path:
    data = b"".join((line if isinstance(line, bytes) else
                     (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n" for line in lines)
    path.write_bytes(data)
    return path


def patient(rid, mrn, **extra):
    return {"resourceType": "Patient", "id": rid,
            "identifier": [{"type": {"coding": [{"system": fhir.V2_0203_SYSTEM, "code": "MR"}]}, "value": mrn}],
            **extra}


def observation(rid, subject, code="2160-0", value=1.2, unit="mg/dL", status="final", **extra):
    return {"resourceType": "Observation", "id": rid, "status": status,
            "code": {"coding": [{"system": fhir.LOINC_SYSTEM, "code": code}]},
            "subject": subject, "effectiveDateTime": "2024-03-01T08:00:00+00:00",
            "valueQuantity": {"value": value, "unit": unit, "system": fhir.UCUM_SYSTEM, "code": unit}, **extra}


# ---------------------------------------------------------------------------------------------
# canonical comparison


def canonical_labs(frames, settings):
    good, rejected = [], []
    for frame in frames:
        parsed = feeds.parse_labs(frame, settings, "d", RECEIVED)
        r = parsed.rows
        good += list(zip(r.patient_id, r.result_id, r.analyte, r.value.round(6), r.censor, r.unit,
                         r.collected_at, r.status, strict=True))
        rejected += list(parsed.rejected.reason)
    return sorted(good), sorted(rejected)


def canonical_events(frames, settings, skip_detail=("myeloma_therapy_start",)):
    good, rejected = [], []
    for frame in frames:   # parsed chunk by chunk, as the pipeline does
        parsed = feeds.parse_events(frame, settings, "d", RECEIVED)
        r = parsed.rows
        for row in r.itertuples(index=False):
            detail = "" if row.event_type in skip_detail and row.value == "bortezomib" else row.detail
            number = None if math.isnan(row.number) else round(row.number, 6)
            good.append((row.patient_id, row.event_type, row.occurred_at, row.occurred_date, row.value,
                         number, detail))
        rejected += list(parsed.rejected.reason)
    return sorted(good, key=repr), sorted(rejected)


def csv_frame(tuples, columns):
    return pd.DataFrame(tuples, columns=columns, index=pd.Index(range(2, len(tuples) + 2), name="line"), dtype=object)


def frames(items, kind):
    return [chunk.frame for k, chunk in items if k == kind]


# ---------------------------------------------------------------------------------------------
# writers


def test_bundle_validates_as_r4b_and_is_deterministic(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    fhir.write_bundle(first, LABS, EVENTS)
    fhir.write_bundle(second, list(LABS), list(EVENTS))
    assert first.read_bytes() == second.read_bytes()
    bundle = Bundle.model_validate(json.loads(first.read_text()))
    types = [e.resource.get_resource_type() for e in bundle.entry]
    assert types[:2] == ["Patient", "Patient"]
    assert {"Observation", "MedicationAdministration", "Condition", "Procedure"} <= set(types)
    urls = [e.fullUrl for e in bundle.entry]
    assert len(set(urls)) == len(urls) and all(u.startswith("urn:uuid:") for u in urls)
    text = first.read_text()
    assert f'"value": "{A}"' in text and f'"id": "{A}"' not in text   # resource ids are not MRNs


def test_ndjson_lines_validate_as_r4b(tmp_path):
    paths = fhir.write_ndjson(tmp_path / "out", LABS, EVENTS)
    assert [p.name for p in paths] == ["Patient.ndjson", "Observation.ndjson", "MedicationAdministration.ndjson",
                                       "Condition.ndjson", "Procedure.ndjson"]
    again = fhir.write_ndjson(tmp_path / "again", LABS, EVENTS)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    for path in paths:
        for line in path.read_text().splitlines():
            resource = json.loads(line)
            assert resource["resourceType"] == path.stem
            get_fhir_model_class(path.stem).model_validate(resource)
    # B has no birth_date/sex event: no Patient resource, referenced all the same
    patients = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert [p["identifier"][0]["value"] for p in patients] == [A]
    assert pid_ref(B) in paths[1].read_text()


# ---------------------------------------------------------------------------------------------
# round trips


def test_bundle_round_trip_gives_the_csv_values(tmp_path, settings):
    labs, events = LABS + LABS_LOCAL, EVENTS + EVENTS_LOCAL
    path = tmp_path / "bundle.json"
    fhir.write_bundle(path, labs, events)
    items = items_of(fhir.read_bundle, path, ctx_of(settings))
    assert items[0][0] == "patients"
    assert rows(items, "patients") == [(1, pid_ref(A), A), (2, pid_ref(B), B)]
    assert bad(items) == []
    want_labs = canonical_labs([csv_frame(labs, feeds.LAB_COLUMNS)], settings)
    assert canonical_labs(frames(items, "labs"), settings) == want_labs
    got = canonical_events(frames(items, "events"), settings)
    want = canonical_events([csv_frame(events, feeds.EVENT_COLUMNS)], settings)
    assert got == want
    assert len(got[0]) == len(events) - 1 and got[1] == ["unknown response value «XYZ»"]
    therapy = [r for r in rows(items, "events") if r[2] == "myeloma_therapy_start"]
    assert [(r[4], r[5]) for r in therapy] == [("bortezomib", "administration"), ("VRd", "second line")]


def test_ndjson_round_trip_resolves_through_earlier_deliveries(tmp_path, settings):
    labs, events = LABS + LABS_LOCAL, EVENTS + EVENTS_LOCAL
    sent = [e for e in events if e[0] == A or e[1] not in ("birth_date", "sex")]
    paths = fhir.write_ndjson(tmp_path / "export", labs, sent)
    store = {pid_ref(B): B}            # B was delivered (as a Patient) before this export
    items = []
    for path in paths:                 # Patient.ndjson first, as the pipeline orders a folder
        got = items_of(fhir.read_ndjson, path, ctx_of(settings, refs=store))
        store.update({ref: mrn for _, ref, mrn in rows(got, "patients")})
        items += got
    assert bad(items) == []
    assert rows(items, "patients") == [(1, pid_ref(A), A)]
    want_labs = canonical_labs([csv_frame(labs, feeds.LAB_COLUMNS)], settings)
    assert canonical_labs(frames(items, "labs"), settings) == want_labs
    assert canonical_events(frames(items, "events"), settings) == canonical_events(
        [csv_frame(sent, feeds.EVENT_COLUMNS)], settings)


@pytest.mark.parametrize("reader, writer", [(fhir.read_bundle, "bundle"), (fhir.read_ndjson, "ndjson")])
def test_small_chunks_give_the_same_rows(tmp_path, settings, reader, writer):
    labs, events = LABS + LABS_LOCAL, EVENTS + EVENTS_LOCAL
    if writer == "bundle":
        fhir.write_bundle(tmp_path / "b.json", labs, events)
        paths = [tmp_path / "b.json"]
    else:
        paths = fhir.write_ndjson(tmp_path / "nd", labs, events)
    refs = {pid_ref(A): A, pid_ref(B): B}
    for path in paths:
        big = items_of(reader, path, ctx_of(settings, 10_000, refs))
        small = items_of(reader, path, ctx_of(settings, 2, refs))
        for kind in ("patients", "labs", "events"):
            assert rows(small, kind) == rows(big, kind)
            assert all(len(c.frame) <= 2 for k, c in small if k != "events")
        assert bad(small) == bad(big)
        kinds = [k for k, _ in small]
        if "patients" in kinds and writer == "bundle":
            assert kinds[: kinds.count("patients")] == ["patients"] * kinds.count("patients")


# ---------------------------------------------------------------------------------------------
# subjects and patients


def test_ndjson_subjects_resolve_in_bulk_once_per_chunk(tmp_path, settings):
    lines = [
        observation("o1", {"reference": "Patient/a"}),
        observation("o2", {"reference": "Patient/b"}),
        observation("o3", {"reference": "Patient/c"}),
        observation("o4", {"reference": "Patient/a"}),                 # known since chunk 1
        observation("o5", {"reference": "Patient/local"}),
        patient("local", "M-LOCAL"),                                   # same chunk, later line
        observation("o6", {"reference": "Patient/x"}),                 # not known anywhere
        observation("o7", {"reference": "Patient/x"}),                 # asked once only
    ]
    path = write_lines(tmp_path / "obs.ndjson", lines)
    calls = []
    items = items_of(fhir.read_ndjson, path, ctx_of(settings, 2, {"Patient/a": "MA", "Patient/b": "MB",
                                                                 "Patient/c": "MC"}, calls))
    assert calls == [["Patient/a", "Patient/b"], ["Patient/c"], ["Patient/x"]]
    assert [(r[0], r[1]) for r in rows(items, "labs")] == [(1, "MA"), (2, "MB"), (3, "MC"), (4, "MA"), (5, "M-LOCAL")]
    assert reasons(items) == {7: fhir._NOT_FOUND, 8: fhir._NOT_FOUND}
    assert rows(items, "patients") == [(6, "Patient/local", "M-LOCAL")]


def test_patient_identifier_choice_and_demographics(tmp_path, settings):
    lines = [
        {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1950-01-02",
         "meta": {"lastUpdated": "2024-02-03T04:05:06Z"},
         "identifier": [{"system": "urn:ssn", "value": "SSN-1"},
                        {"type": {"coding": [{"system": fhir.V2_0203_SYSTEM, "code": "MR"}]}, "value": "MRN-1"}]},
        {"resourceType": "Patient", "id": "p2", "gender": "other", "birthDate": "1960-01-02",
         "identifier": [{"system": "urn:x", "value": "FIRST-2"}, {"system": "urn:y", "value": "SECOND-2"}]},
        {"resourceType": "Patient", "id": "p3", "gender": "male"},
        {"resourceType": "Patient"},
    ]
    items = items_of(fhir.read_ndjson, write_lines(tmp_path / "Patient.ndjson", lines), ctx_of(settings))
    assert rows(items, "patients") == [(1, "Patient/p1", "MRN-1"), (2, "Patient/p2", "FIRST-2"),
                                       (3, "Patient/p3", "p3")]
    assert rows(items, "events") == [
        (1, "MRN-1", "birth_date", "2024-02-03T04:05:06Z", "1950-01-02", ""),
        (1, "MRN-1", "sex", "2024-02-03T04:05:06Z", "F", ""),
        (2, "FIRST-2", "birth_date", "2024-06-01", "1960-01-02", ""),   # received_at date; no sex for "other"
        (3, "p3", "sex", "2024-06-01", "M", ""),
    ]
    assert reasons(items) == {4: "Patient without an identifier or id"}


def test_bundle_subjects_by_full_url_identifier_and_absolute_reference(tmp_path, settings):
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"fullUrl": "urn:uuid:0b8b1e43-0000-4000-8000-000000000001", "resource": patient("uu", "MRN-UU")},
        {"resource": observation("o2", {"reference": "http://fhir.example/r4/Patient/pp/_history/3"})},
        {"resource": observation("o3", {"identifier": {"system": "urn:mrn", "value": "MRN-DIRECT"}})},
        {"resource": observation("o4", {"reference": "Patient/earlier"})},
        {"fullUrl": "http://fhir.example/r4/Patient/pp", "resource": patient("pp", "MRN-PP")},
    ]}
    bundle["entry"].append({"resource": observation("o5", {"reference": bundle["entry"][0]["fullUrl"]})})
    path = tmp_path / "b.json"
    path.write_text(json.dumps(bundle, indent=2))
    calls = []
    items = items_of(fhir.read_bundle, path, ctx_of(settings, refs={"Patient/earlier": "MRN-E"}, calls=calls))
    assert [k for k, _ in items][0] == "patients"
    assert rows(items, "patients") == [(1, "Patient/uu", "MRN-UU"), (5, "Patient/pp", "MRN-PP")]
    assert [(r[0], r[1], r[2]) for r in rows(items, "labs")] == [
        (2, "MRN-PP", "o2"), (3, "MRN-DIRECT", "o3"), (4, "MRN-E", "o4"), (6, "MRN-UU", "o5")]
    assert calls == [["Patient/earlier"]]
    assert bad(items) == []


# ---------------------------------------------------------------------------------------------
# mapping details


def test_observation_values_censoring_status_and_events(tmp_path, settings):
    subject = {"reference": "Patient/p"}
    lines = [
        patient("p", "M1"),
        observation("o1", subject, value=5, unit="U/L", code="6768-6",
                    valueQuantity={"value": 5, "comparator": "<", "unit": "U/L", "code": "U/L"}),
        observation("o2", subject, status="entered-in-error"),
        json.dumps(observation("o3", subject, code="29463-7", value=72.5, unit="kg")).replace("72.5", "72.50"),
        {**observation("o4", subject, code="CREA"), "code": {"coding": [{"system": "urn:lab", "code": "CREA"}]}},
        {"resourceType": "Observation", "status": "final", "subject": subject, "issued": "2024-03-04T00:00:00Z",
         "code": {"coding": [{"system": fhir.EVENT_SYSTEM, "code": "response"}]},
         "valueCodeableConcept": {"coding": [{"system": "urn:imwg", "code": "VGPR"}]}},
        {"resourceType": "Observation", "status": "final", "subject": subject,
         "effectivePeriod": {"start": "2024-03-05"}, "note": [{"text": "MRI"}],
         "code": {"coding": [{"system": fhir.EVENT_SYSTEM, "code": "bone_disease"}]},
         "valueCodeableConcept": {"text": "none"}},
        {"resourceType": "Observation", "status": "final", "subject": subject, "effectiveDateTime": "2024-03-06",
         "code": {"coding": [{"system": fhir.EVENT_SYSTEM, "code": "dental_exam"}]}, "valueBoolean": True},
        {"resourceType": "Observation", "status": "entered-in-error", "subject": subject,
         "effectiveDateTime": "2024-03-06", "code": {"coding": [{"system": fhir.EVENT_SYSTEM, "code": "response"}]},
         "valueString": "PD"},
    ]
    items = items_of(fhir.read_ndjson, write_lines(tmp_path / "o.ndjson", lines), ctx_of(settings))
    labs = {r[0]: r[1:] for r in rows(items, "labs")}
    assert labs[2] == ("M1", "o1", "6768-6", "<5", "U/L", "2024-03-01T08:00:00+00:00", "final", "")
    assert labs[3][-2:] == ("entered-in-error", "")
    assert labs[4][3] == "72.50"                                   # the number as sent
    assert labs[5][2] == "CREA"                                    # a code_map code in any system
    events = {r[0]: r[1:] for r in rows(items, "events") if r[2] not in ("birth_date", "sex")}
    assert events == {6: ("M1", "response", "2024-03-04T00:00:00Z", "VGPR", ""),
                      7: ("M1", "bone_disease", "2024-03-05", "none", "MRI"),
                      8: ("M1", "dental_exam", "2024-03-06", "true", "")}
    assert reasons(items) == {9: "observation entered-in-error"}
    parsed = feeds.parse_labs(frames(items, "labs")[0], settings, "d", RECEIVED)
    by_id = parsed.rows.set_index("result_id")
    assert by_id.loc["o1", "censor"] == "<" and by_id.loc["o1", "value"] == 5
    assert by_id.loc["o2", "status"] == "cancelled"
    assert by_id.loc["o3", "analyte"] == "weight"


def test_medications_conditions_procedures(tmp_path, settings):
    subject = {"reference": "Patient/p"}

    def med(code, status="completed", dose=None, **extra):
        resource = {"resourceType": "MedicationAdministration", "status": status, "subject": subject,
                    "medicationCodeableConcept": {"coding": [{"system": fhir.RXNORM_SYSTEM, "code": code}]},
                    "effectiveDateTime": "2024-02-01T14:00:00+00:00", **extra}
        if dose:
            resource["dosage"] = {"dose": dose}
        return resource

    def condition(system, code, **extra):
        return {"resourceType": "Condition", "subject": subject, "recordedDate": "2024-01-01",
                "code": {"coding": [{"system": system, "code": code}]}, **extra}

    def procedure(system, code, status="completed"):
        return {"resourceType": "Procedure", "status": status, "subject": subject,
                "performedPeriod": {"start": "2024-01-10T10:00:00+00:00"},
                "code": {"coding": [{"system": system, "code": code}]}}

    lines = [
        patient("p", "M1"),
        med("77655", dose={"value": 0.004, "unit": "g"}),
        med("11473", dose={"value": 90, "code": "mg"}),
        med("993449", effectiveDateTime=None, effectivePeriod={"start": "2024-02-02"}),
        med("358258"),
        med("77655", status="not-done"),
        med("12345"),
        condition(fhir.ICD10CM_SYSTEM, "C90.01", onsetDateTime="2023-11-30"),
        condition(fhir.ICD10CM_SYSTEM, "D47.2"),
        condition(fhir.ICD10CM_SYSTEM, "M80.08XA"),
        condition(fhir.ICD10CM_SYSTEM, "I10"),
        {**condition(fhir.ICD10CM_SYSTEM, "D47.2"),
         "code": {"coding": [{"system": fhir.ICD10CM_SYSTEM, "code": "D47.2"},
                             {"system": fhir.DIAGNOSIS_SYSTEM, "code": "SMM"}]}},
        procedure(fhir.SNOMED_SYSTEM, "34043003"),
        procedure(fhir.EVENT_SYSTEM, "dental_exam", status="in-progress"),
        procedure(fhir.SNOMED_SYSTEM, "80146002"),
        {"resourceType": "Encounter", "id": "enc", "status": "finished"},
        {"resourceType": "Practitioner", "id": "dr"},
    ]
    items = items_of(fhir.read_ndjson, write_lines(tmp_path / "m.ndjson", lines), ctx_of(settings))
    events = {r[0]: r[2:] for r in rows(items, "events")}
    assert events[2] == ("bisphosphonate_dose", "2024-02-01T14:00:00+00:00", "zoledronic_acid", "4")
    assert events[3] == ("bisphosphonate_dose", "2024-02-01T14:00:00+00:00", "pamidronate", "90")
    assert events[4] == ("bisphosphonate_dose", "2024-02-02", "denosumab", "")
    assert events[5] == ("myeloma_therapy_start", "2024-02-01T14:00:00+00:00", "bortezomib", "administration")
    assert events[8] == ("diagnosis", "2023-11-30", "MM", "C90.01")
    assert events[9] == ("diagnosis", "2024-01-01", "MGUS", "D47.2")
    assert events[10] == ("diagnosis", "2024-01-01", "osteoporosis", "M80.08XA")
    assert events[12] == ("diagnosis", "2024-01-01", "SMM", "D47.2")           # urn:bonewatch:diagnosis wins
    assert events[13] == ("dental_exam", "2024-01-10T10:00:00+00:00", "completed", "")
    assert events[14] == ("dental_exam", "2024-01-10T10:00:00+00:00", "in-progress", "")
    assert reasons(items) == {6: "administration not done"}
    # SPEC 2.5: a diagnosis, drug or procedure bonewatch does not follow is counted, not quarantined
    assert skipped_codes(items) == ["Condition:I10", "Medication:12345", "Procedure:80146002"]
    assert not any(k in (16, 17) for k in events)                            # ignored resource types


def test_bad_lines_are_quarantined_and_the_rest_kept(tmp_path, settings):
    subject = {"reference": "Patient/p"}
    lines = [
        patient("p", "MRN-SECRET"),
        observation("o1", subject),
        "{not json",
        "[1, 2]",
        "",                                                      # blank: skipped
        {"id": "x", "status": "final"},
        {**observation("o2", subject), "id": None},
        observation("o3", {"reference": "Patient/nobody"}),
        {**observation("o4", subject), "subject": None},
        b'{"resourceType": "Observation", "id": "o5", "valueString": "caf\xe9"}',
        observation("o6", subject, code="8867-4"),              # LOINC not ours: the lab parser says so
        {**observation("o7", subject), "code": {"coding": [{"system": "urn:other", "code": "HR"}]}},
        observation("o8", subject),
    ]
    items = items_of(fhir.read_ndjson, write_lines(tmp_path / "bad.ndjson", lines), ctx_of(settings, 3))
    # without an id the result id is empty, and a code outside LOINC and the map is sent on as it
    # is: the lab parser decides (BRIEF interfaces 1 and 6)
    assert [(r[0], r[2], r[3]) for r in rows(items, "labs")] == [
        (2, "o1", "2160-0"), (7, "", "2160-0"), (11, "o6", "8867-4"), (12, "o7", "HR"), (13, "o8", "2160-0")]
    assert reasons(items) == {
        3: "line is not JSON: Expecting property name enclosed in double quotes",
        4: "resource is not a JSON object",
        6: "resource without resourceType",
        8: fhir._NOT_FOUND,
        9: "resource without subject",
        10: "not UTF-8 text",
    }
    assert all("MRN-SECRET" not in reason for reason in reasons(items).values())


def test_bad_bundle_entries_are_quarantined_and_the_rest_kept(tmp_path, settings):
    subject = {"reference": "urn:uuid:p"}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:p", "resource": patient("p", "MRN-SECRET", birthDate="1950-01-01"),
         "request": {"method": "PUT", "url": "Patient/p"}},
        "not an entry",
        {"request": {"method": "DELETE", "url": "Observation/z"}},
        {"resource": {"id": "x"}},
        {"resource": {**observation("o1", subject), "id": "", "identifier": [{"value": "RID-1"}]}},
        {"resource": {"resourceType": "MedicationAdministration", "status": "completed", "subject": subject,
                      "medicationCodeableConcept": {"coding": [{"system": fhir.RXNORM_SYSTEM, "code": "1191"}]},
                      "effectiveDateTime": "2024-01-01"}},
        {"resource": {"resourceType": "Condition", "subject": subject, "recordedDate": "2024-01-01",
                      "code": {"coding": [{"system": fhir.ICD10CM_SYSTEM, "code": "I10"}]}}},
        {"resource": observation("o2", {"reference": "Patient/gone"})},
        {"resource": {"resourceType": "Encounter", "id": "e"}},
        {"resource": observation("o3", subject)},
    ]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(bundle))
    items = items_of(fhir.read_bundle, path, ctx_of(settings, 4))
    assert [(r[0], r[1], r[2]) for r in rows(items, "labs")] == [(5, "MRN-SECRET", "RID-1"), (10, "MRN-SECRET", "o3")]
    assert [r[:3] for r in rows(items, "events")] == [(1, "MRN-SECRET", "birth_date")]
    assert reasons(items) == {2: "entry is not a JSON object", 3: "entry without resource",
                              4: "resource without resourceType", 8: fhir._NOT_FOUND}
    assert skipped_codes(items) == ["Condition:I10", "Medication:1191"]
    assert all("MRN-SECRET" not in reason for reason in reasons(items).values())


# ---------------------------------------------------------------------------------------------
# unreadable files


def test_unreadable_bundles_name_their_line(tmp_path, settings):
    good = tmp_path / "good.json"
    fhir.write_bundle(good, LABS, EVENTS)
    text = good.read_text()
    cases = {
        "truncated.json": text[: len(text) // 2],
        "outcome.json": "\n\n" + json.dumps({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "processing", "diagnostics": "search failed"}]}, indent=1),
        "list.json": "[]",
        "no_type.json": json.dumps({"entry": [{"resource": patient("p", "M")}]}, indent=1),
    }
    lines = {}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(SourceUnreadable) as caught:
            list(fhir.read_bundle(tmp_path / name, ctx_of(settings)))
        lines[name] = caught.value.line
        assert caught.value.path.endswith(name)
    assert lines["truncated.json"] == text[: len(text) // 2].count("\n") + 1
    assert lines["outcome.json"] == 4          # where its resourceType is
    assert lines["list.json"] == 1
    assert lines["no_type.json"] == 1          # the document: its top object is no resource
    (tmp_path / "latin1.json").write_bytes(b'{\n"resourceType": "Bundle",\n"id": "caf\xe9"\n}')
    with pytest.raises(SourceUnreadable) as caught:
        list(fhir.read_bundle(tmp_path / "latin1.json", ctx_of(settings)))
    assert (caught.value.line, caught.value.reason) == (3, "not UTF-8 text")


@pytest.mark.parametrize("reader, name", [(fhir.read_bundle, "empty.json"), (fhir.read_ndjson, "empty.ndjson")])
def test_empty_files_are_unreadable(tmp_path, settings, reader, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(SourceUnreadable) as caught:
        list(reader(tmp_path / name, ctx_of(settings)))
    assert (caught.value.line, caught.value.reason) == (1, "the file is empty")


def test_an_empty_bundle_reads_as_nothing(tmp_path, settings):
    (tmp_path / "b.json").write_text('{"resourceType": "Bundle", "type": "searchset", "total": 0}')
    assert list(fhir.read_bundle(tmp_path / "b.json", ctx_of(settings))) == []


# ---------------------------------------------------------------------------------------------
# what real servers and exports send (issue 13; the files are described in their README)

SHAPES = Path(__file__).resolve().parents[1] / "data" / "shapes" / "fhir"


def labs_of(items):
    """line -> (patient_id, result_id, code, value, unit, collected_at, status, collected_basis)"""
    return {r[0]: r[1:] for r in rows(items, "labs")}


def test_nested_bundles_are_read_depth_first(settings):
    # 1 searchset Bundle, 2 its Patient, 3 its creatinine; 4 collection Bundle, 5 the transaction
    # Bundle inside it, 6 its calcium; 7 a response without a body; 8 an ALP at the top
    items = items_of(fhir.read_bundle, SHAPES / "nested_bundle.json", ctx_of(settings))
    labs = labs_of(items)
    assert sorted(labs) == [3, 6, 8]
    assert [(labs[n][0], labs[n][1], labs[n][2]) for n in (3, 6, 8)] == [
        ("MRN-N1", "crea-1", "2160-0"), ("MRN-N1", "ca-1", "17861-6"), ("MRN-N1", "alp-1", "6768-6")]
    assert rows(items, "patients") == [(2, "Patient/123", "MRN-N1")]
    assert [r[:4] for r in rows(items, "events")] == [(2, "MRN-N1", "birth_date", "2024-01-05T10:00:00Z"),
                                                      (2, "MRN-N1", "sex", "2024-01-05T10:00:00Z")]
    assert bad(items) == []
    small = items_of(fhir.read_bundle, SHAPES / "nested_bundle.json", ctx_of(settings, 1))
    assert rows(small, "labs") == rows(items, "labs") and rows(small, "events") == rows(items, "events")


def test_a_nested_bundle_whose_entry_is_not_a_list_is_a_bad_row(tmp_path, settings):
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Bundle", "type": "searchset", "entry": {"resource": patient("p", "M")}}},
        {"resource": observation("o1", {"identifier": {"value": "M2"}})}]}
    (tmp_path / "b.json").write_text(json.dumps(bundle))
    items = items_of(fhir.read_bundle, tmp_path / "b.json", ctx_of(settings))
    assert reasons(items) == {1: "Bundle.entry is not a list"}
    assert [(r[0], r[1]) for r in rows(items, "labs")] == [(2, "M2")]


def test_a_file_holding_one_bare_resource_is_read_as_a_bundle_of_one(settings):
    items = items_of(fhir.read_bundle, SHAPES / "bare_observation.json", ctx_of(settings, refs={"Patient/example": "M-EX"}))
    assert rows(items, "labs") == [(1, "M-EX", "crea-bare", "14682-9", "8.84E1", "umol/L", "2024-03-01", "final", "")]
    parsed = feeds.parse_labs(frames(items, "labs")[0], settings, "d", RECEIVED).rows
    assert parsed.value.round(6).tolist() == [1.0] and parsed.analyte.tolist() == ["creatinine"]
    assert parsed.collected_date.astype(str).tolist() == ["2024-03-01"]   # a date alone: local midnight


def test_a_bare_patient_gives_its_demographics(tmp_path, settings):
    resource = patient("p1", "MRN-B", birthDate="1950-01-02", gender="male", meta={"lastUpdated": "2024-02-03T04:05:06Z"})
    (tmp_path / "patient.json").write_text(json.dumps(resource, indent=1))
    items = items_of(fhir.read_bundle, tmp_path / "patient.json", ctx_of(settings))
    assert rows(items, "patients") == [(1, "Patient/p1", "MRN-B")]
    assert [r[1:5] for r in rows(items, "events")] == [("MRN-B", "birth_date", "2024-02-03T04:05:06Z", "1950-01-02"),
                                                       ("MRN-B", "sex", "2024-02-03T04:05:06Z", "M")]


def test_ndjson_under_a_json_name_is_read_as_ndjson(tmp_path, settings):
    path = write_lines(tmp_path / "export.json", [patient("p", "M1"), observation("o1", {"reference": "Patient/p"})])
    items = items_of(fhir.read_bundle, path, ctx_of(settings))
    assert [(r[0], r[1], r[2]) for r in rows(items, "labs")] == [(2, "M1", "o1")]


def test_contained_medication_gives_the_dose(settings):
    # 1 Patient, 2 MedicationAdministration, 3 its Medication; 4 MedicationAdministration, 5 its
    # Practitioner, 6 its Medication (a formulary code; RxNorm in the ingredient); 7 `#missing`
    items = items_of(fhir.read_bundle, SHAPES / "contained_medication.json", ctx_of(settings))
    assert [r[:6] for r in rows(items, "events") if r[2] != "birth_date"] == [
        (2, "MRN-C1", "bisphosphonate_dose", "2024-02-01T14:00:00+00:00", "zoledronic_acid", "4"),
        (4, "MRN-C1", "bisphosphonate_dose", "2024-03-01T14:00:00+00:00", "zoledronic_acid", "3.5")]
    assert reasons(items) == {7: "medication reference not found in this file"}


def test_medication_reference_to_a_medication_of_the_bundle(settings):
    items = items_of(fhir.read_bundle, SHAPES / "bundle_medication_reference.json", ctx_of(settings))
    assert [r[:6] for r in rows(items, "events")] == [
        (1, "MRN-M1", "bisphosphonate_dose", "2024-02-02T09:00:00+00:00", "pamidronate", "90"),
        (2, "MRN-M1", "bisphosphonate_dose", "2024-02-03T09:00:00+00:00", "denosumab", "")]
    assert reasons(items) == {5: "medication reference not found in this file"}


def test_ndjson_medication_reference_to_an_earlier_line(tmp_path, settings):
    medication = {"resourceType": "Medication", "id": "zol",
                  "code": {"coding": [{"system": fhir.RXNORM_SYSTEM, "code": "77655"}]}}
    administration = {"resourceType": "MedicationAdministration", "status": "completed",
                      "medicationReference": {"reference": "Medication/zol"}, "subject": {"reference": "Patient/p"},
                      "effectiveDateTime": "2024-02-01", "dosage": {"dose": {"value": 4, "unit": "mg"}}}
    path = write_lines(tmp_path / "m.ndjson", [patient("p", "M1"), medication, administration])
    items = items_of(fhir.read_ndjson, path, ctx_of(settings))
    assert rows(items, "events")[-1][:6] == (3, "M1", "bisphosphonate_dose", "2024-02-01", "zoledronic_acid", "4")


def test_observation_without_effective_takes_its_reports_time(settings):
    items = items_of(fhir.read_bundle, SHAPES / "report_effective.json", ctx_of(settings))
    labs = labs_of(items)
    # (result id, collected_at, collected_basis); line 2 is the report, 6 the second, 7 the
    # Observation it contains (its id qualified by the report's, its subject the report's)
    assert {n: (labs[n][1], labs[n][5], labs[n][7]) for n in labs} == {
        3: ("crea-2", "2024-03-01T07:30:00+01:00", "DiagnosticReport.effective"),   # its own issued loses
        4: ("ca-2", "2024-03-01T07:30:00+01:00", "DiagnosticReport.effective"),
        5: ("alb-2", "2024-03-01T07:00:00+01:00", ""),                              # its own time
        7: ("bone#alp", "2024-03-02T08:00:00+01:00", "DiagnosticReport.effective"),
    }
    assert {labs[n][0] for n in labs} == {"MRN-R1"} and bad(items) == []


def test_observation_without_any_effective_falls_back_to_issued(settings):
    items = items_of(fhir.read_bundle, SHAPES / "issued_fallback.json", ctx_of(settings))
    labs = labs_of(items)
    assert {n: (labs[n][1], labs[n][5], labs[n][7]) for n in labs} == {
        2: ("crea-3", "2024-03-05T11:00:00Z", "issued"),      # no report: its own issued
        4: ("ca-3", "2024-03-06T12:00:00Z", "issued"),        # a report without effective: its issued
        5: ("crea-4", "2024-03-06T10:00:00Z", "issued"),      # the Observation's issued first
        6: ("alb-3", "", ""),                                 # nothing: the lab parser says "missing date"
    }
    parsed = feeds.parse_labs(pd.concat(frames(items, "labs")), settings, "d", RECEIVED)
    assert list(parsed.rejected.reason) == ["missing date"]


def test_ndjson_takes_a_reports_time_within_the_chunk_else_issued(tmp_path, settings):
    subject = {"reference": "Patient/p"}

    def untimed(rid, issued=None):
        resource = {**observation(rid, subject), "effectiveDateTime": None}
        return {k: v for k, v in {**resource, "issued": issued}.items() if v is not None}

    report = {"resourceType": "DiagnosticReport", "id": "r", "status": "final", "subject": subject,
              "code": {"coding": [{"system": fhir.LOINC_SYSTEM, "code": "24362-6"}]},
              "effectiveDateTime": "2024-03-01T07:30:00Z",
              "result": [{"reference": "Observation/a"}, {"reference": "Observation/b"}, {"reference": "Observation/c"}]}
    lines = [patient("p", "M1"), untimed("a", "2024-03-02T00:00:00Z"), report, untimed("b"),
             untimed("c", "2024-03-03T00:00:00Z"), untimed("d", "2024-03-04T00:00:00Z")]
    path = write_lines(tmp_path / "obs.ndjson", lines)
    whole = labs_of(items_of(fhir.read_ndjson, path, ctx_of(settings)))
    assert {n: (whole[n][1], whole[n][5], whole[n][7]) for n in whole} == {
        2: ("a", "2024-03-01T07:30:00Z", "DiagnosticReport.effective"),   # the report comes later, in the chunk
        4: ("b", "2024-03-01T07:30:00Z", "DiagnosticReport.effective"),
        5: ("c", "2024-03-01T07:30:00Z", "DiagnosticReport.effective"),
        6: ("d", "2024-03-04T00:00:00Z", "issued"),                       # no report lists it
    }
    # a chunk of two lines: Observation `a` is converted before the report is read
    small = labs_of(items_of(fhir.read_ndjson, path, ctx_of(settings, 2)))
    assert (small[2][5], small[2][7]) == ("2024-03-02T00:00:00Z", "issued")
    assert {n: small[n] for n in (4, 5, 6)} == {n: whole[n] for n in (4, 5, 6)}


def test_ndjson_report_with_contained_observations(tmp_path, settings):
    report = {"resourceType": "DiagnosticReport", "id": "r7", "status": "final", "subject": {"reference": "Patient/p"},
              "effectiveDateTime": "2024-03-01", "result": [{"reference": "#c1"}, {"reference": "#c2"}],
              "contained": [{**observation("c1", None), "effectiveDateTime": None, "subject": None},
                            {**observation("c2", None, code="17861-6"), "effectiveDateTime": None, "subject": None},
                            {**observation("c3", None, code="6768-6"), "subject": None}]}
    path = write_lines(tmp_path / "r.ndjson", [patient("p", "M1"), report])
    items = items_of(fhir.read_ndjson, path, ctx_of(settings))
    assert sorted(r[1:] for r in rows(items, "labs")) == [
        ("M1", "r7#c1", "2160-0", "1.2", "mg/dL", "2024-03-01", "final", "DiagnosticReport.effective"),
        ("M1", "r7#c2", "17861-6", "1.2", "mg/dL", "2024-03-01", "final", "DiagnosticReport.effective"),
        ("M1", "r7#c3", "6768-6", "1.2", "mg/dL", "2024-03-01T08:00:00+00:00", "final", "")]
    assert {r[0] for r in rows(items, "labs")} == {2}      # one line: three chunks of one row each


def test_unit_is_the_code_only_when_the_system_is_ucum(settings):
    items = items_of(fhir.read_ndjson, SHAPES / "units.ndjson", ctx_of(settings))
    assert {n: r[4] for n, r in labs_of(items).items()} == {
        2: "umol/L",      # SNOMED CT unit code 258814008, unit text umol/L
        3: "mg/dL",       # no system: the text, not the code MGDL
        4: "mg/dL",       # no system, no text: the code
        5: "mmol/L",      # UCUM: the code, not the text
        6: "g/L",         # UCUM by its OID
    }
    parsed = feeds.parse_labs(frames(items, "labs")[0], settings, "d", RECEIVED)
    assert parsed.rejected.empty
    assert parsed.rows.set_index("result_id").value.round(4).to_dict() == {
        "u1": round(97 / 88.4, 4), "u2": 1.1, "u3": 1.2, "u4": round(2.3 * 4.008, 4), "u5": 3.8}


def test_every_coded_observation_is_a_lab_row(settings):
    # 1 Patient; 2-5 CBC (haemoglobin 718-7, WBC, platelets, haematocrit); 6 the panel; 7 a blood
    # pressure (components only); 8 a local code only; 9 a local code and LOINC; 10 no code;
    # 11 text only; 12 no id; 13 the DiagnosticReport
    items = items_of(fhir.read_bundle, SHAPES / "cbc_panel.json", ctx_of(settings))
    labs = labs_of(items)
    assert labs[2] == ("MRN-CBC", "cbc-1", "718-7", "13.2", "g/dL", "2024-03-03T09:45:50+01:00", "final", "")
    assert {n: (r[1], r[2], r[3]) for n, r in labs.items()} == {
        2: ("cbc-1", "718-7", "13.2"), 3: ("cbc-2", "6690-2", "6.1"), 4: ("cbc-3", "777-3", "250"),
        5: ("cbc-4", "4544-3", "40.1"),
        6: ("panel", "58410-2", ""), 7: ("bp", "85354-9", ""),            # no value: a row all the same
        8: ("hgb-local", "HGB", "13.1"),                                  # the local code, for the data team
        9: ("crea-local", "2160-0", "1.0"),                               # LOINC wins over the local code
        12: ("", "2951-2", "139"),                                        # no id: the lab parser decides
    }
    assert reasons(items) == {10: "Observation without a code", 11: "Observation code without a coding (text only)"}


def test_without_loinc_the_mapped_local_code_else_the_first_code(tmp_path, settings):
    settings.ingest.code_map["CREA"] = "2160-0"
    mapped, unmapped = (observation(rid, {"identifier": {"value": "M1"}}) for rid in ("o1", "o2"))
    mapped["code"] = {"coding": [{"system": "urn:lab:a", "code": "X1"}, {"system": "urn:lab:b", "code": "CREA"}]}
    unmapped["code"] = {"coding": [{"system": "urn:lab:a", "display": "no code"}, {"system": "urn:lab:a", "code": "X2"},
                                   {"system": "urn:lab:b", "code": "X3"}]}
    items = items_of(fhir.read_ndjson, write_lines(tmp_path / "o.ndjson", [mapped, unmapped]), ctx_of(settings))
    assert [r[3] for r in rows(items, "labs")] == ["CREA", "X2"]


def test_subjects_as_real_systems_write_them(tmp_path, settings):
    contained = {**observation("o1", {"reference": "#pat"}),
                 "contained": [patient("pat", "MRN-CONTAINED")]}
    conditional = observation("o2", {"reference": "Patient?identifier=urn:oid:1.2.3.4.5|MRN-COND"})
    uuid_ref = observation("o3", {"reference": "urn:uuid:7f0c0000-0000-4000-8000-000000000001"})
    nowhere = observation("o4", {"reference": "#nobody"})
    path = write_lines(tmp_path / "s.ndjson", [contained, conditional, uuid_ref, nowhere])
    calls = []
    items = items_of(fhir.read_ndjson, path, ctx_of(
        settings, refs={"Patient/7f0c0000-0000-4000-8000-000000000001": "MRN-UUID"}, calls=calls))
    assert [(r[0], r[1]) for r in rows(items, "labs")] == [(1, "MRN-CONTAINED"), (2, "MRN-COND"), (3, "MRN-UUID")]
    assert calls == [["Patient/7f0c0000-0000-4000-8000-000000000001"]]
    assert reasons(items) == {4: fhir._NOT_FOUND}


def test_patient_sex_from_us_core_extensions_when_gender_is_absent(tmp_path, settings):
    individual = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-individual-sex"
    birth = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
    lines = [
        patient("p1", "M1", extension=[{"url": individual, "valueCoding": {"system": fhir.SNOMED_SYSTEM,
                                                                           "code": "248152002"}}]),
        patient("p2", "M2", extension=[{"url": birth, "valueCode": "M"}]),
        patient("p3", "M3", gender="unknown", extension=[{"url": birth, "valueCode": "F"}]),   # gender decides
    ]
    items = items_of(fhir.read_ndjson, write_lines(tmp_path / "p.ndjson", lines), ctx_of(settings))
    assert [(r[1], r[4]) for r in rows(items, "events") if r[2] == "sex"] == [("M1", "F"), ("M2", "M")]


def test_a_bundle_on_an_ndjson_line_is_quarantined(tmp_path, settings):
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient("p", "M")}]}
    path = write_lines(tmp_path / "b.ndjson", [bundle, observation("o1", {"identifier": {"value": "M1"}})])
    items = items_of(fhir.read_ndjson, path, ctx_of(settings))
    assert reasons(items) == {1: "a Bundle on an NDJSON line (one resource a line; send a Bundle as a .json file)"}
    assert [r[0] for r in rows(items, "labs")] == [2]


def test_a_condition_coded_by_text_only_is_quarantined_without_quoting_it(tmp_path, settings):
    """The codes list is shown to the data team: free text (which may name the patient) never goes on it."""
    lines = [patient("p", "M1"),
             {"resourceType": "Condition", "subject": {"reference": "Patient/p"}, "recordedDate": "2024-01-01",
              "code": {"text": "DOE JOHN fell at home"}}]
    items = items_of(fhir.read_ndjson, write_lines(tmp_path / "t.ndjson", lines), ctx_of(settings))
    assert skipped_codes(items) == []
    assert reasons(items) == {2: "Condition without a code (text only)"}
