"""What the EHR sends with a hook call, read as bonewatch reads a FHIR delivery.

- The patient: `context.patientId` is a FHIR `Patient.id`. Its MRN is found as `ingest.fhir`
  resolves a `subject`: the prefetched Patient (same id) gives its MR identifier (else its first
  identifier); else the `Patient/<id>` a FHIR delivery recorded in the store (`patient_refs`);
  else the id itself is taken as the MRN (an EHR whose FHIR ids are the MRNs).
- The prefetched Observations (searchset Bundles or single resources) go through the FHIR reader
  and the lab parser of ingestion (`ingest.fhir.read_bundle`, `feeds.parse_labs`): the same codes,
  units, LOINC handling, conversions and checks as a nightly file. Only rows of the hook's patient
  are kept; a row that would be quarantined in a file is left out here. The prefetched Patient
  gives the birth date and sex (`ingest.fhir`'s reading of `birthDate` and `gender`).
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from bonewatch.config import Settings
from bonewatch.ingest import feeds, fhir
from bonewatch.ingest.sources import ReadContext
from bonewatch.store import reads, writes

DELIVERY = "cds-hooks-prefetch"


def patient_resource(prefetch: dict, fhir_id: str) -> dict | None:
    """The prefetched Patient of the hook (any prefetch key), if its id is the context's."""
    for value in (prefetch or {}).values():
        if isinstance(value, dict) and value.get("resourceType") == "Patient" and str(value.get("id", "")) == fhir_id:
            return value
    return None


def resolve_patient(conn, fhir_id: str, prefetch: dict) -> str:
    """bonewatch's patient id (the MRN) for a FHIR Patient.id (see the module docstring)."""
    patient = patient_resource(prefetch, fhir_id)
    if patient is not None and fhir.patient_id_of(patient):
        return fhir.patient_id_of(patient)
    known = writes.lookup_patient_refs(conn, [f"Patient/{fhir_id}"])
    return known.get(f"Patient/{fhir_id}", fhir_id)


def _resources(prefetch: dict) -> list[dict]:
    out = []
    for value in (prefetch or {}).values():
        if isinstance(value, dict) and value.get("resourceType") in ("Bundle", "Patient", "Observation"):
            out.append(value)
    return out


def prefetch_rows(settings: Settings, prefetch: dict, fhir_id: str, mrn: str,
                  received_at: datetime) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The prefetched labs and events (birth date, sex of the Patient) of the patient, in the
    frames `store.reads` returns (columns `reads.LAB_COLUMNS` / `reads.EVENT_COLUMNS`)."""
    labs = [_empty(reads.LAB_COLUMNS)]
    observations = [r for r in _resources(prefetch) if r.get("resourceType") != "Patient"]
    if observations:
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in observations]}

        def refs(wanted) -> dict[str, str]:
            # the Observations name their patient `Patient/<id>`: the hook's patient is the MRN found
            return {r: mrn for r in wanted if r == f"Patient/{fhir_id}"}

        ctx = ReadContext(settings, settings.ingest.chunk_size, received_at, refs)
        with tempfile.TemporaryDirectory(prefix="bonewatch-cds-") as folder:
            path = Path(folder) / "prefetch.json"
            path.write_text(json.dumps(bundle), "utf-8")
            for kind, chunk in fhir.read_bundle(path, ctx):
                if kind == "labs":
                    rows = feeds.parse_labs(chunk.frame, settings, DELIVERY, received_at).rows
                    labs.append(_shaped(rows, reads.LAB_COLUMNS))
    lab_frame = pd.concat([f for f in labs if len(f)] or labs[:1], ignore_index=True)
    return lab_frame[lab_frame["patient_id"] == mrn].reset_index(drop=True), _patient_events(prefetch, fhir_id, mrn,
                                                                                            received_at)


def _patient_events(prefetch: dict, fhir_id: str, mrn: str, received_at: datetime) -> pd.DataFrame:
    """Birth date and sex of the prefetched Patient, as `ingest.fhir` reads them (timeless facts:
    the day they are stamped with does not matter, SPEC 2.5). Built directly: the events parser's
    fixed cost is most of a hook call's time, for two values."""
    patient = patient_resource(prefetch, fhir_id)
    rows = []
    if patient is not None:
        birth = str(patient.get("birthDate") or "")
        if fhir._FHIR_DATE.fullmatch(birth) and len(birth) == 10:
            rows.append(("birth_date", birth))
        sex = fhir._sex_of(patient)
        if sex:
            rows.append(("sex", sex))
    at = pd.Timestamp(received_at)
    return pd.DataFrame({"patient_id": pd.Series([mrn] * len(rows), dtype="str"),
                         "event_type": pd.Series([r[0] for r in rows], dtype="str"),
                         "occurred_at": pd.Series([at] * len(rows), dtype="datetime64[ns]"),
                         "occurred_date": pd.Series([at.normalize()] * len(rows), dtype="datetime64[ns]"),
                         "value": pd.Series([r[1] for r in rows], dtype="str"),
                         "detail": pd.Series([""] * len(rows), dtype="str")})


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    kinds = {"text": "str", "float": "float64", "instant": "datetime64[ns]", "day": "datetime64[ns]"}
    return pd.DataFrame({name: pd.Series(dtype=kinds[kind]) for name, kind in columns.items()})


def _shaped(rows: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Parsed rows -> the columns and dtypes of the store's reads."""
    out: dict[str, Any] = {}
    for name, kind in columns.items():
        column = rows[name] if name in rows.columns else pd.Series("", index=rows.index)
        if kind == "text":
            out[name] = column.astype("object").where(column.notna(), "").astype("str")
        elif kind == "float":
            out[name] = pd.to_numeric(column, errors="coerce").astype("float64")
        else:
            out[name] = pd.to_datetime(column).astype("datetime64[ns]")
    return pd.DataFrame(out).reset_index(drop=True)


def merged(store: pd.DataFrame, sent: pd.DataFrame, key: str | None) -> pd.DataFrame:
    """The store's rows and the prefetched ones; a result the store holds too counts once (the
    EHR's copy: it may be a correction the nightly feed has not brought yet)."""
    if sent.empty:
        return store
    both = pd.concat([store, sent], ignore_index=True)
    if key is not None:
        both = both.drop_duplicates(key, keep="last")
    return both.reset_index(drop=True)
