"""One bench step, run in its own process so its wall time and peak RSS are its own.

    python -m bench.steps STEP '{"json": "arguments"}'

prints one JSON line: {"step", "seconds", "peak_rss_mib", ...step details}. `seconds` is the wall
time of the step's work, lazy imports it triggers included (GX is imported on the first chunk, as
in an Airflow task), the interpreter's start excluded for every step alike.

`"profile": PATH` dumps a cProfile of the step (main thread only) to PATH; `"attribute": true`
samples every thread every 10 ms (bench/attribution.py) and adds `attribution` to the report: the
step's time by part of the system (store, parsing, validation, rules, imports, idle) per thread.
The two exclude each other (asking for both is an error): cProfile's cost would be sampled.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from datetime import date
from pathlib import Path


def _peak_rss_mib() -> float:
    """This process's peak RSS. Linux's `ru_maxrss` survives exec, so a step started by a driver
    that had grown large would report the driver's peak; VmHWM belongs to this process image."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024                        # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


_PEAKS: list[float] = []


def _phase_peak() -> tuple[float, float]:
    """(peak RSS since the last call, RSS now), in MiB; then starts a new peak (Linux: writing 5
    to clear_refs resets VmHWM to the current RSS). The step's `peak_rss_mib` stays the peak of
    the whole step: `main` takes the largest of the phases' peaks and the last."""
    peak, now = _peak_rss_mib(), 0.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    _PEAKS.append(peak)
    return round(peak, 1), round(now, 1)


def duckdb_reference(args: dict) -> dict:
    """The floor: DuckDB reads the same lab CSV and computes, per patient, the baseline (first),
    latest and delta of creatinine and ALP in canonical units."""
    import duckdb

    start = time.perf_counter()
    con = duckdb.connect()
    rows = con.execute("""
        WITH labs AS (
            SELECT patient_id,
                   CASE WHEN loinc IN ('2160-0', '14682-9') THEN 'creatinine' ELSE 'alp' END AS analyte,
                   TRY_CAST(value AS DOUBLE) * CASE lower(unit) WHEN 'umol/l' THEN 1 / 88.4
                                                                WHEN 'ukat/l' THEN 60 ELSE 1 END AS v,
                   TRY_CAST(collected_at AS TIMESTAMP) AS ts
            FROM read_csv(?, header = true, all_varchar = true)
            WHERE loinc IN ('2160-0', '14682-9', '6768-6') AND status IN ('final', 'corrected'))
        SELECT count(*), sum(delta) FROM (
            SELECT patient_id, analyte, arg_min(v, ts) AS baseline, arg_max(v, ts) AS latest,
                   arg_max(v, ts) - arg_min(v, ts) AS delta
            FROM labs WHERE v IS NOT NULL GROUP BY patient_id, analyte)
    """, [args["csv"]]).fetchone()
    return {"seconds": time.perf_counter() - start, "groups": rows[0]}


def _settings(args: dict):
    os.environ["BONEWATCH_DATABASE_URL"] = args["url"]
    os.environ["BONEWATCH_DATA_DIR"] = args["data_dir"]
    from bonewatch.config import load_settings, with_overrides

    settings = load_settings()
    if args.get("chunk_size"):
        settings = with_overrides(settings, ingest__chunk_size=int(args["chunk_size"]))
    return settings


def _evaluate(settings, as_of: date, full: bool = False) -> tuple[float, dict]:
    from bonewatch import pipeline

    start = time.perf_counter()
    summary = pipeline.evaluate(settings, as_of, full=full)
    return time.perf_counter() - start, summary.as_dict()


def backfill(args: dict) -> dict:
    """A fresh store, migrated (not timed); then ingest + validate + store + evaluate."""
    settings = _settings(args)
    from bonewatch import pipeline

    pipeline.engine_for(settings, migrate=True).dispose()
    start = time.perf_counter()
    ingested = pipeline.ingest(settings, [args["labs"], args["events"]])
    ingest_s = time.perf_counter() - start
    ingest_peak, left = _phase_peak()
    evaluate_s, evaluated = _evaluate(settings, date.fromisoformat(args["as_of"]))
    evaluate_peak, _ = _phase_peak()
    return {"seconds": time.perf_counter() - start, "ingest_s": ingest_s, "evaluate_s": evaluate_s,
            "accepted": ingested.accepted, "quarantined": ingested.quarantined,
            "patients": evaluated["patients"], "findings": evaluated["findings"],
            "evaluate_parts": evaluated["seconds"], "ingest_parts": ingested.seconds,
            "rss_mib": {"ingest_peak": ingest_peak, "after_ingest": left, "evaluate_peak": evaluate_peak}}


def night(args: dict) -> dict:
    """The night's deliveries, then the night's evaluation (incremental)."""
    settings = _settings(args)
    from bonewatch import pipeline

    start = time.perf_counter()
    ingested = pipeline.ingest(settings, [args["night_dir"]], partition=args["as_of"])
    ingest_s = time.perf_counter() - start
    evaluate_s, evaluated = _evaluate(settings, date.fromisoformat(args["as_of"]))
    return {"seconds": time.perf_counter() - start, "ingest_s": ingest_s, "evaluate_s": evaluate_s,
            "accepted": ingested.accepted, "skipped_files": ingested.skipped_files,
            "patients": evaluated["patients"], "findings": evaluated["findings"],
            "new_alerts": evaluated["new_alerts"], "evaluate_parts": evaluated["seconds"],
            "ingest_parts": ingested.seconds}


def rerun(args: dict) -> dict:
    """The same night again: every file is in the ledger, no patient is dirty or due. Timed from
    before the package is imported (a rerun's cost is what its fresh process imports: issue 16);
    `data_stack` lists the heavy packages the process imported all the same."""
    start = time.perf_counter()
    result = night(args)
    heavy = ("pandas", "numpy", "pyarrow", "great_expectations", "matplotlib", "plotly")
    return {**result, "seconds": time.perf_counter() - start,
            "data_stack": [name for name in heavy if name in sys.modules]}


def evaluate_full(args: dict) -> dict:
    """A full evaluation of every patient (the scaling measurement: 1 k, 10 k, 100 k patients)."""
    settings = _settings(args)
    seconds, evaluated = _evaluate(settings, date.fromisoformat(args["as_of"]), full=True)
    return {"seconds": seconds, "patients": evaluated["patients"], "findings": evaluated["findings"]}


def ingest_format(args: dict) -> dict:
    """The backfill's labs in another format (HL7 v2, a FHIR Bundle, FHIR NDJSON), ingested into a
    fresh store: the reader's and parser's cost beside the CSV's."""
    settings = _settings(args)
    from bonewatch import pipeline

    pipeline.engine_for(settings, migrate=True).dispose()
    start = time.perf_counter()
    ingested = pipeline.ingest(settings, [args["path"]])
    return {"seconds": time.perf_counter() - start, "accepted": ingested.accepted,
            "quarantined": ingested.quarantined, "failed_files": ingested.failed_files}


def write_formats(args: dict) -> dict:
    """Write the backfill's labs as HL7, a FHIR Bundle and NDJSON (untimed preparation, in its own
    process so the bench driver stays small: a child's peak RSS counts its parent's before exec)."""
    from bench.generate import generate, other_formats

    paths = other_formats(generate(Path(args["out"]), int(args["rows"])))
    return {"seconds": 0.0, "paths": {fmt: str(path) for fmt, path in paths.items()}}


def small_files(args: dict) -> dict:
    """`files` one-row lab CSVs in one folder, ingested into a fresh store: what a file costs
    (ledger check, format sniffing, hashing, reader, parser, GX, one transaction) apart from its
    rows. One more file is ingested first, untimed, so that imports and GX's context are not
    counted: a nightly worker pays them once, not once a file. `cpu_seconds` counts every thread."""
    import shutil

    settings = _settings(args)
    from bonewatch import pipeline

    n = int(args["files"])
    folder = Path(args["data_dir"]) / f"small-files-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    header = "patient_id,result_id,loinc,value,unit,collected_at,status\n"
    for i in range(n + 1):
        target = folder if i else folder.parent
        name = f"f{i:05d}.csv" if i else f"small-files-warm-{n}.csv"
        (target / name).write_text(header + f"{i:06d},s{i},2160-0,1.0,mg/dL,2025-01-03T08:00:00,final\n")
    pipeline.engine_for(settings, migrate=True).dispose()
    pipeline.ingest(settings, [folder.parent / f"small-files-warm-{n}.csv"])
    start, cpu = time.perf_counter(), time.process_time()
    ingested = pipeline.ingest(settings, [folder])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(folder, ignore_errors=True)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "files": n, "accepted": ingested.accepted,
            "failed_files": ingested.failed_files, "ms_per_file": 1000 * seconds / n,
            "cpu_ms_per_file": 1000 * cpu_seconds / n}


def cds_hooks(args: dict) -> dict:
    """The CDS Hooks service on the bench's store: one patient with five years of history added
    (monthly creatinine, ALP, calcium, albumin and weight, a zoledronic acid dose every 4 weeks,
    ending in a renal hold; ingested and evaluated for today, untimed), then `calls` patient-view
    and order-sign calls (4 mg zoledronic acid, today's creatinine and weight prefetched) through
    the app (`web.create_app`, security middleware, JWT check, JSON) with an in-process HTTP
    client. The first call of each pays the imports; `*_ms` are the medians of the others (wall),
    `*_cpu_ms` their CPU time (every thread: steadier than wall time on a shared machine)."""
    import statistics
    import uuid as uuid_
    from datetime import UTC, datetime, timedelta

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    os.environ.setdefault("BONEWATCH_ACK_SECRET", "bench-ack-secret-" + "x" * 32)
    settings = _settings(args)
    from bonewatch import pipeline, rules
    from bonewatch.config import with_overrides
    from bonewatch.store import alerts, reads

    folder = Path(args["data_dir"]) / "cds-bench"
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).replace(tzinfo=None)
    today = now.date()
    mrn = "CDS0000001"
    labs, events = ["patient_id,result_id,loinc,value,unit,collected_at,status\n"], \
        ["patient_id,event_type,occurred_at,value,detail\n"]
    events += [f"{mrn},birth_date,2020-01-01T00:00:00Z,1950-03-01,\n", f"{mrn},sex,2020-01-01T00:00:00Z,F,\n",
               f"{mrn},dental_exam,{(today - timedelta(days=5 * 365 + 30)).isoformat()}T09:00:00Z,,\n"]
    for month in range(61, 0, -1):     # from 12 days before the first dose (the renal baseline)
        day = (today - timedelta(days=30 * month)).isoformat()
        scr = 1.0 + (0.6 if month == 1 else 0.05 * (month % 3))
        for n, (loinc, value, unit) in enumerate((("2160-0", scr, "mg/dL"), ("6768-6", 90 + month % 7, "U/L"),
                                                  ("17861-6", 9.2, "mg/dL"), ("1751-7", 3.9, "g/dL"),
                                                  ("29463-7", 68 + month % 3, "kg"))):
            labs.append(f"{mrn},cds-{month}-{n},{loinc},{value},{unit},{day}T08:00:00Z,final\n")
    for week in range(5 * 52, 0, -4):
        day = (today - timedelta(weeks=week) + timedelta(days=2)).isoformat()
        events.append(f"{mrn},bisphosphonate_dose,{day}T10:00:00Z,zoledronic_acid,4.0\n")
    (folder / "cds-labs.csv").write_text("".join(labs))
    (folder / "cds.events.csv").write_text("".join(events))
    engine = pipeline.engine_for(settings, migrate=True)     # the backfill's store (migrated already)
    pipeline.ingest(settings, [folder / "cds-labs.csv", folder / "cds.events.csv"])
    with engine.begin() as conn:
        history = reads.load_patients(conn, [mrn])
        found = rules.evaluate(*history, today, settings)
        alerts.sync_findings(conn, found, today, patients={mrn})

    key = ec.generate_private_key(ec.SECP384R1())
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())),
                                          "kid": "bench", "alg": "ES384"}]}))
    issuer = "https://ehr.bench.example"
    settings = with_overrides(settings, cds_hooks__base_url="http://testserver",
                              cds_hooks__issuers={issuer: {"jwks_file": str(jwks)}})
    from fastapi.testclient import TestClient

    from bonewatch.web import create_app

    client = TestClient(create_app(settings, engine=engine))

    def signed(service: str) -> dict:
        url = f"http://testserver/cds-services/{service}"
        stamp = int(time.time())
        claims = {"iss": issuer, "aud": url, "exp": stamp + 300, "iat": stamp, "jti": str(uuid_.uuid4())}
        return {"Authorization": "Bearer " + jwt.encode(claims, key, algorithm="ES384", headers={"kid": "bench"})}

    at = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    def obs(oid, loinc, value, unit):
        return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {
            "resourceType": "Observation", "id": oid, "status": "final", "effectiveDateTime": at,
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "subject": {"reference": "Patient/cds-bench"},
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}}]}
    patient = {"resourceType": "Patient", "id": "cds-bench", "gender": "female", "birthDate": "1950-03-01",
               "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                    "code": "MR"}]}, "value": mrn}]}
    order = {"resourceType": "MedicationRequest", "id": "draft-1", "status": "draft", "intent": "order",
             "subject": {"reference": "Patient/cds-bench"},
             "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                       "code": "77655"}]},
             "dosageInstruction": [{"doseAndRate": [{"doseQuantity": {"value": 4, "unit": "mg", "code": "mg"}}]}]}
    bodies = {
        "bonewatch-patient-view": {"hook": "patient-view", "context": {"userId": "Practitioner/1",
                                                                       "patientId": "cds-bench"},
                                   "prefetch": {"patient": patient}},
        "bonewatch-order-sign": {"hook": "order-sign", "context": {
            "userId": "Practitioner/1", "patientId": "cds-bench",
            "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": order}]}},
            "prefetch": {"patient": patient, "creatinine": obs("scr", "2160-0", 1.7, "mg/dL"),
                         "weight": obs("wt", "29463-7", 68, "kg")}},
    }
    timings: dict[str, list[float]] = {name: [] for name in bodies}
    cpu: dict[str, list[float]] = {name: [] for name in bodies}
    cards: dict[str, list[str]] = {}
    for _ in range(int(args.get("calls", 7))):
        for name, body in bodies.items():
            headers = signed(name)
            started, cpu_started = time.perf_counter(), time.process_time()
            response = client.post(f"/cds-services/{name}", json={**body, "hookInstance": str(uuid_.uuid4())},
                                   headers=headers)
            timings[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - cpu_started)
            if response.status_code != 200:
                raise RuntimeError(f"{name}: HTTP {response.status_code}")
            cards[name] = [c["source"]["topic"]["code"] for c in response.json()["cards"]]
    result = {"seconds": sum(sum(t) for t in timings.values()), "labs": len(labs) - 1, "events": len(events) - 1}
    for name, short in (("bonewatch-patient-view", "patient_view"), ("bonewatch-order-sign", "order_sign")):
        result[f"{short}_first_ms"] = round(timings[name][0] * 1000, 1)
        result[f"{short}_ms"] = round(statistics.median(timings[name][1:]) * 1000, 1)
        result[f"{short}_cpu_ms"] = round(statistics.median(cpu[name][1:]) * 1000, 1)
        result[f"{short}_cards"] = cards[name]
    return result


STEPS = {"duckdb": duckdb_reference, "backfill": backfill, "night": night, "rerun": rerun,
         "evaluate_full": evaluate_full, "ingest_format": ingest_format,
         "write_formats": write_formats, "small_files": small_files,
         "cds_hooks": cds_hooks}


def main() -> None:
    step, args = sys.argv[1], json.loads(sys.argv[2])
    profile = args.get("profile")
    if profile and args.get("attribute"):
        # cProfile's hook on every call would be most of what the sampler sees
        raise SystemExit("bench.steps: 'profile' and 'attribute' exclude each other; ask for one")
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(STEPS[step], args)
        profiler.dump_stats(profile)
    elif args.get("attribute"):
        from bench import attribution

        with attribution.sampling() as sampler:
            result = STEPS[step](args)
        result["attribution"] = sampler.report()
    else:
        result = STEPS[step](args)
    result.update({"step": step, "peak_rss_mib": round(max([_peak_rss_mib(), *_PEAKS]), 1)})
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
