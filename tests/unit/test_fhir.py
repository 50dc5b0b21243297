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
        assert list(chunk.frame.columns) == {"labs": feeds.LAB_COLUMNS, "events": feeds.EVENT_COLUMNS,
                                             "patients": sources.PATIENT_COLUMNS}[kind]
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
    assert len(got[0]) == len(events) - 1 and got[1] == ["unknown response value 'XYZ'"]
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
    assert labs[2] == ("M1", "o1", "6768-6", "<5", "U/L", "2024-03-01T08:00:00+00:00", "final")
    assert labs[3][-1] == "entered-in-error"
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
    assert reasons(items) == {6: "administration not done", 7: "unknown medication code '12345'",
                              11: "unknown diagnosis code 'I10'", 15: "unknown procedure code '80146002'"}
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
    assert [r[0] for r in rows(items, "labs")] == [2, 11, 13]
    assert reasons(items) == {
        3: "line is not JSON: Expecting property name enclosed in double quotes",
        4: "resource is not a JSON object",
        6: "resource without resourceType",
        7: "Observation without id",
        8: fhir._NOT_FOUND,
        9: "resource without subject",
        10: "not UTF-8 text",
        12: "unknown observation code 'HR'",
    }
    assert all("MRN-SECRET" not in reason for reason in reasons(items).values())
    parsed = feeds.parse_labs(pd.concat(frames(items, "labs")), settings, "d", RECEIVED)
    assert list(parsed.rejected.reason) == ["unknown code '8867-4'"]


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
                              4: "resource without resourceType", 6: "unknown medication code '1191'",
                              7: "unknown diagnosis code 'I10'", 8: fhir._NOT_FOUND}
    assert all("MRN-SECRET" not in reason for reason in reasons(items).values())


# ---------------------------------------------------------------------------------------------
# unreadable files


def test_unreadable_bundles_name_their_line(tmp_path, settings):
    good = tmp_path / "good.json"
    fhir.write_bundle(good, LABS, EVENTS)
    text = good.read_text()
    cases = {
        "truncated.json": text[: len(text) // 2],
        "patient.json": "\n\n" + json.dumps(patient("p", "M"), indent=1),
        "list.json": "[]",
    }
    lines = {}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(SourceUnreadable) as caught:
            list(fhir.read_bundle(tmp_path / name, ctx_of(settings)))
        lines[name] = caught.value.line
        assert caught.value.path.endswith(name)
    assert lines["truncated.json"] == text[: len(text) // 2].count("\n") + 1
    assert lines["patient.json"] == 4          # where its resourceType is
    assert lines["list.json"] == 1
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
