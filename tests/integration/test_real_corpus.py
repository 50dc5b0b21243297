"""The conformance corpus of real public sample files (`tests/data/real/`, described in its README):
each file, loaded alone into a fresh SQLite store (after the Patient file it refers to, where it
names one), gives exactly what `expected.json` says, which was derived by hand from the file and
the SPEC (2.2, 2.3, 2.5, 3): the monitored rows, the birth-date and sex events, the results counted
per code as not monitored or as unmapped local codes, the quarantined rows and their reasons;
never an exception, never a file silently dropped.

Each file is ingested once (cached for the module); each aspect is its own test, so a report
says which aspect of which file is wrong."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from bonewatch import pipeline
from bonewatch.config import load_settings
from bonewatch.ingest.codes import RESOURCE_PREFIXES
from bonewatch.store import db
from bonewatch.store.tables import (
    clinical_events,
    deliveries,
    delivery_codes,
    lab_results,
    patient_refs,
    quarantine,
)

CORPUS = Path(__file__).resolve().parents[1] / "data" / "real"
EXPECTED = json.loads((CORPUS / "expected.json").read_text("utf-8"))
FILES: dict[str, dict] = EXPECTED["files"]
TOLERANCE = EXPECTED["value_tolerance"]


def data_folder() -> Path:
    """The folder of the data files (this one; they are committed beside the README, see it),
    once every file of `expected.json` is there; fails (never skips) naming the missing ones."""
    missing = sorted(name for name in FILES if not (CORPUS / name).is_file())
    if missing:
        pytest.fail(f"real-corpus data files missing from {CORPUS}: {', '.join(missing)}; "
                    "see tests/data/real/README.md")
    return CORPUS


# --------------------------------------------------------------------------------------------
# what the store holds for one delivery


def code_counts(conn, delivery_id: str) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(not monitored, unmapped local, not used) counts per code of this delivery (`delivery_codes`);
    "not used": Conditions, Procedures and administrations of codes bonewatch does not follow,
    stored as `<Resource>:<code>`."""
    not_monitored: dict[str, int] = {}
    unmapped: dict[str, int] = {}
    not_used: dict[str, int] = {}
    c = delivery_codes.c
    for code, kind, n in conn.execute(select(c.code, c.kind, c.rows).where(c.delivery_id == delivery_id)):
        target = not_used if code.startswith(RESOURCE_PREFIXES) else not_monitored if kind == "not_monitored" \
            else unmapped
        target[code] = target.get(code, 0) + int(n)
    return not_monitored, unmapped, not_used


def _resource_code(label: str) -> str:
    """expected.json's "Condition sct 410429000" -> the stored "Condition:410429000"."""
    kind, _, code = label.split(" ", 2)
    return f"{'Medication' if kind.startswith('Medication') else kind}:{code}"


def stored_events(conn, delivery_id: str) -> set[tuple[str, str, str]]:
    """(patient, event type, value) of the events this delivery stored (birth date and sex too:
    the store keeps the latest delivery's, SPEC 2.5)."""
    rows = conn.execute(select(clinical_events.c.patient_id, clinical_events.c.event_type,
                               clinical_events.c.value).where(clinical_events.c.delivery_id == delivery_id))
    return {tuple(row) for row in rows}


@dataclass
class Loaded:
    """One corpus file after ingestion: the summary (or the exception ingestion raised) and what
    the store holds for its delivery."""
    summary: pipeline.IngestSummary | None = None
    exception: str = ""
    delivery: tuple | None = None                    # (delivery_id, status) of the file
    labs: list[dict] = field(default_factory=list)
    events: set[tuple[str, str, str]] = field(default_factory=set)
    refs: set[str] = field(default_factory=set)      # MRNs of the FHIR Patients it delivered
    quarantined: list[str] = field(default_factory=list)
    counts: tuple[dict[str, int], dict[str, int]] | None = None


_LOADED: dict[str, Loaded] = {}


def _read_store(engine, name: str, loaded: Loaded) -> None:
    with engine.connect() as conn:
        delivery = conn.execute(select(deliveries.c.delivery_id, deliveries.c.status)
                                .where(deliveries.c.file_name == name)).first()
        if delivery is None:
            return
        loaded.delivery = tuple(delivery)
        delivery_id = delivery[0]
        loaded.labs = [dict(row._mapping) for row in conn.execute(
            select(lab_results.c.patient_id, lab_results.c.code, lab_results.c.analyte, lab_results.c.value,
                   lab_results.c.unit, lab_results.c.collected_date, lab_results.c.status)
            .where(lab_results.c.delivery_id == delivery_id))]
        loaded.events = stored_events(conn, delivery_id)
        loaded.refs = set(conn.execute(select(patient_refs.c.patient_id)
                                       .where(patient_refs.c.delivery_id == delivery_id)).scalars())
        loaded.quarantined = list(conn.execute(select(quarantine.c.reason)
                                               .where(quarantine.c.delivery_id == delivery_id)).scalars())
        loaded.counts = code_counts(conn, delivery_id)


@pytest.fixture
def loaded(request, tmp_path_factory) -> Loaded:
    """The corpus file of the test's parameter, ingested once into its own fresh SQLite store."""
    name = request.param
    if name not in _LOADED:
        source = data_folder()
        work = tmp_path_factory.mktemp("real")
        env = {"BONEWATCH_DATABASE_URL": f"sqlite:///{work / 'store.db'}", "BONEWATCH_DATA_DIR": str(work / "data"),
               "BONEWATCH_TIMEZONE": EXPECTED["settings"]["timezone"]}
        settings = load_settings(env=env)
        engine = db.make_engine(settings.database_url)
        db.upgrade(engine)
        result = Loaded()
        try:
            for preload in FILES[name].get("preload", []):
                shutil.copy(source / preload, work / preload)
                pipeline.ingest(settings, [work / preload])
            shutil.copy(source / name, work / name)
            result.summary = pipeline.ingest(settings, [work / name])
        except Exception as exc:  # noqa: BLE001 - the test reports it: bad input must never raise
            result.exception = f"{type(exc).__name__}: {exc}"
        _read_store(engine, name, result)
        engine.dispose()
        _LOADED[name] = result
    return _LOADED[name]


def each_file(test):
    """Parametrise a test over every corpus file (the `loaded` fixture reads the parameter)."""
    return pytest.mark.parametrize("loaded", sorted(FILES), indirect=True)(test)


# --------------------------------------------------------------------------------------------
# the corpus itself


def test_readme_names_every_file_with_its_origin():
    readme = (CORPUS / "README.md").read_text("utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(FILES), "README.md and expected.json list the same files"
    for name, row in rows.items():
        origin = row.split("|")[2]
        assert "/" in origin and "@ `" in origin, f"{name}: the README gives its repository, path and commit"


def test_files_match_their_sha256():
    folder = data_folder()
    changed = [name for name, expected in FILES.items()
               if hashlib.sha256((folder / name).read_bytes()).hexdigest() != expected["sha256"]]
    assert changed == [], "changed since taken from their origin (line endings?)"


# --------------------------------------------------------------------------------------------
# each file


@each_file
def test_ingests_without_an_error(loaded):
    assert loaded.exception == "", loaded.exception
    assert (loaded.summary.failed_files, loaded.summary.errors) == (0, [])
    assert loaded.delivery is not None and loaded.delivery[1] == "loaded"


@each_file
def test_monitored_rows_are_stored(loaded, request):
    expected = FILES[request.node.callspec.params["loaded"]]["labs"]

    def key(row):
        return (row["patient_id"], row["analyte"], str(row["collected"])[:10], row["value"])

    got = sorted(({**row, "collected": str(row["collected_date"])[:10]} for row in loaded.labs), key=key)
    want = sorted(expected, key=key)
    assert [(r["patient_id"], r["code"], r["analyte"], r["unit"], r["collected"], r["status"]) for r in got] == \
           [(r["patient_id"], r["code"], r["analyte"], r["unit"], r["collected"], r["status"]) for r in want]
    assert [r["value"] for r in got] == pytest.approx([r["value"] for r in want], abs=TOLERANCE)


@each_file
def test_demographics_and_events(loaded, request):
    expected = FILES[request.node.callspec.params["loaded"]]["events"]
    assert loaded.events == {(e["patient_id"], e["event_type"], e["value"]) for e in expected}


@each_file
def test_patients(loaded, request):
    stored = {row["patient_id"] for row in loaded.labs} | {e[0] for e in loaded.events} | loaded.refs
    assert stored == set(FILES[request.node.callspec.params["loaded"]]["patients"])


@each_file
def test_quarantined_rows_and_reasons(loaded, request):
    expected = FILES[request.node.callspec.params["loaded"]]
    assert len(loaded.quarantined) == expected["quarantined"]["count"], loaded.quarantined
    if loaded.summary is not None:
        assert loaded.summary.quarantined == expected["quarantined"]["count"]
    words = [word for alternatives in expected["quarantined"]["reasons"] for word in alternatives]
    # MRNs of a few characters ("14") could match any text: the check is for identifiers
    patient_data = ({mrn for mrn in expected["patients"] if len(mrn) >= 4}
                    | {e["value"] for e in expected["events"] if e["event_type"] == "birth_date"})
    for reason in loaded.quarantined:
        assert any(word in reason for word in words), reason
        assert "\n" not in reason and not any(item in reason for item in patient_data), "no patient data in a reason"


@each_file
def test_not_monitored_and_unmapped_codes_are_counted(loaded, request):
    expected = FILES[request.node.callspec.params["loaded"]]
    not_used = {_resource_code(label): n for label, n in expected.get("not_used", {}).items()
                 if label.split(" ", 1)[0] in ("Condition", "Procedure", "MedicationAdministration")}
    assert loaded.counts == (expected["not_monitored"], expected["unmapped_local"], not_used)


@each_file
def test_file_is_not_silently_dropped(loaded):
    not_monitored, unmapped, not_used = loaded.counts
    outcome = (len(loaded.labs) + len(loaded.events) + len(loaded.refs) + sum(not_monitored.values())
               + sum(unmapped.values()) + sum(not_used.values()) + len(loaded.quarantined))
    assert outcome > 0, "nothing stored, counted or quarantined: the file vanished without a word"
