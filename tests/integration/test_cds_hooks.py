"""The CDS Hooks 2.0 service, driven over HTTP as an EHR drives it: `bonewatch serve` runs as a
subprocess on a free port (once per store: SQLite and the real PostgreSQL), the store holds two
patients' histories loaded and evaluated by the pipeline, and every call is signed like an EHR's
(an EC P-384 key made here, its JWK Set in a file the configuration names, ES384 JWTs from pyjwt).
Requests are built from the specification's examples (`tests/data/real/cds-hooks/`), and every
response is validated against the CDS Hooks 2.0 response schema written from the specification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jsonschema
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import bonewatch
from bonewatch import pipeline
from bonewatch.config import load_settings
from bonewatch.store import db
from tests.conftest import throwaway_pg_database
from tests.integration.alerting import EVENT_HEADER, LAB_HEADER, SECRET, free_port

DATA = Path(__file__).resolve().parents[1] / "data" / "real" / "cds-hooks"
ISSUER = "https://ehr.hospital.example"
KID = "ehr-key-1"
RESPONSE_SCHEMA = json.loads((DATA / "cds-hooks-2.0-response.schema.json").read_text("utf-8"))
DISCOVERY_SCHEMA = json.loads((DATA / "cds-hooks-2.0-discovery.schema.json").read_text("utf-8"))
HOLD, BAND = "000123", "000456"          # MRNs: a renal hold; a dose band (no hold)
FHIR_REF = "fhir-ref-123"                # HOLD's Patient.id in an earlier FHIR delivery
BIRTH = "1955-01-01"
ZOLEDRONIC = {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "77655", "display": "zoledronic acid"}
MAX_BODY = 256 * 1024
SANDBOX = "https://sandbox.cds-hooks.org"
URL_ISSUER, PEM_ISSUER = "https://ehr2.hospital.example", "https://ehr3.hospital.example"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _history(folder: Path, today) -> list[Path]:
    """Patient HOLD: baseline SCr 1.00, zoledronic acid 4 mg, SCr 1.60 ten days ago (a renal hold).
    Patient BAND: SCr 1.20 (CrCl 55.9, band 3.5 mg) two days before a 4 mg dose 28 days ago."""
    def day(n: int) -> str:
        return f"{(today - timedelta(days=n)).isoformat()}T09:00:00Z"

    labs = folder / "labs.csv"
    labs.write_text(LAB_HEADER + "".join([
        f"{HOLD},h1,2160-0,1.00,mg/dL,{day(100)},final\n",
        f"{HOLD},h2,2160-0,1.60,mg/dL,{day(10)},final\n",
        f"{BAND},b1,2160-0,1.20,mg/dL,{day(30)},final\n",
    ]), "utf-8")
    events = folder / "clinic.events.csv"
    rows = []
    for mrn, dose_day in ((HOLD, 99), (BAND, 28)):
        rows += [f"{mrn},birth_date,{day(400)},{BIRTH},\n", f"{mrn},sex,{day(400)},M,\n",
                 f"{mrn},weight_kg,{day(dose_day + 3)},70,\n", f"{mrn},dental_exam,{day(dose_day + 20)},,\n",
                 f"{mrn},bisphosphonate_dose,{day(dose_day)},zoledronic_acid,4.0\n"]
    events.write_text(EVENT_HEADER + "".join(rows), "utf-8")
    # an earlier FHIR delivery named HOLD's Patient resource: the store keeps Patient/<id> -> MRN
    patients = folder / "patients.json"
    patients.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{
        "fullUrl": f"https://ehr.hospital.example/fhir/Patient/{FHIR_REF}", "resource": {
            "resourceType": "Patient", "id": FHIR_REF, "gender": "male", "birthDate": BIRTH, "identifier": [
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                 "value": HOLD}]}}]}), "utf-8")
    return [labs, events, patients]


@pytest.fixture(scope="module")
def keys():
    """The EHR's signing key (EC P-384) and an impostor's with the same kid."""
    return ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def other_ehrs():
    """Two more trusted EHRs: one publishing its JWK Set at a URL (RSA, RS384), served here over
    HTTP; one known by a PEM public key (EC P-384). Yields {issuer: private key}."""
    import http.server
    import threading

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    document = json.dumps({"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS384"}]}).encode()

    class JwksHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):                # noqa: N802 - the name http.server calls
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), JwksHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json", URL_ISSUER: rsa_key,
               PEM_ISSUER: ec.generate_private_key(ec.SECP384R1())}
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def server(request, keys, other_ehrs, tmp_path_factory):
    """`bonewatch serve` in a subprocess over a store with the two histories evaluated as of today:
    yields (base URL, path of its log, the environment of its store)."""
    folder = tmp_path_factory.mktemp(f"cds-{request.param}")
    with throwaway_pg_database("bonewatch_cds") if request.param == "postgresql" else _nothing() as pg_url:
        url = pg_url or f"sqlite:///{folder / 'store.db'}"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        jwks = folder / "ehr-jwks.json"
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys[0].public_key()))
        jwks.write_text(json.dumps({"keys": [{**public, "kid": KID, "use": "sig", "alg": "ES384"}]}), "utf-8")
        pem = folder / "ehr3.pem"
        pem.write_bytes(other_ehrs[PEM_ISSUER].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        config = folder / "bonewatch.toml"
        config.write_text(f'[site]\nack_base_url = "{base}"\n\n[cds_hooks]\nbase_url = "{base}"\n'
                          f'max_body_bytes = {MAX_BODY}\ncors_origins = ["{SANDBOX}"]\n'
                          'algorithms = ["ES384", "RS384"]\n\n'
                          f'[cds_hooks.issuers."{ISSUER}"]\njwks_file = "{jwks}"\n\n'
                          f'[cds_hooks.issuers."{URL_ISSUER}"]\njwks_url = "{other_ehrs["url"]}"\n\n'
                          f'[cds_hooks.issuers."{PEM_ISSUER}"]\npem_file = "{pem}"\n', "utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")}
        env.update(BONEWATCH_CONFIG=str(config), BONEWATCH_DATABASE_URL=url, BONEWATCH_DATA_DIR=str(folder / "data"),
                   BONEWATCH_ACK_SECRET=SECRET, PYTHONPATH=str(Path(bonewatch.__file__).resolve().parents[1]))
        settings = load_settings(env=env)
        engine = db.make_engine(settings.database_url)
        db.upgrade(engine)
        engine.dispose()
        today = _now().date()
        pipeline.ingest(settings, _history(folder, today))
        pipeline.evaluate(settings, today)
        log = folder / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "bonewatch.cli", "-v", "serve", "--port", str(port)],
                                       env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_until_up(base, process, log)
            yield base, log, env
        finally:
            process.terminate()
            process.wait(timeout=30)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _wait_until_up(base: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120      # a guard against hanging, not a measurement
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bonewatch serve exited: {log.read_text('utf-8', 'replace')[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("bonewatch serve did not come up")


def token(key, audience: str, **changes) -> str:
    """An EHR's JWT for `audience`, as the specification's example (ES384, kid, typ JWT)."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": audience, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()),
              "tenant": "2ddd6c3a-8e9a-44c6-a305-52111ad302a2"}
    headers = {"kid": KID, "typ": "JWT"}
    algorithm = changes.pop("algorithm", "ES384")
    headers.update(changes.pop("headers", {}))
    for name, value in changes.items():
        if value is None:
            claims.pop(name)
        else:
            claims[name] = value
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def call(base: str, key, service: str, body: dict, **changes) -> httpx.Response:
    url = f"{base}/cds-services/{service}"
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {token(key, url, **changes)}"}, timeout=60)


def valid(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    jsonschema.Draft202012Validator(RESPONSE_SCHEMA).validate(body)
    return body


def patient_view(patient_id: str, mrn: str | None = None) -> dict:
    """The specification's patient-view example, for another patient (its Patient prefetched with
    the MRN as its MR identifier when `mrn` is given)."""
    body = json.loads((DATA / "spec_patient-view_request.json").read_text("utf-8"))
    body["hookInstance"] = str(uuid.uuid4())
    body["context"]["patientId"] = patient_id
    patient = body["prefetch"].pop("patientToGreet")
    if mrn is not None:
        body["prefetch"]["patient"] = {**patient, "id": patient_id, "birthDate": BIRTH, "identifier": [
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
             "value": mrn}]}
    return body


def order_sign(patient_id: str, dose_mg: float, prefetch: dict | None = None) -> dict:
    """The specification's order-sign (R4) example with its MedicationRequest turned into a
    zoledronic acid order of `dose_mg` mg for `patient_id`."""
    context = json.loads((DATA / "spec_order-sign_context_r4.json").read_text("utf-8"))["context"]
    context["patientId"] = patient_id
    request = next(e["resource"] for e in context["draftOrders"]["entry"]
                   if e["resource"]["resourceType"] == "MedicationRequest")
    request["subject"] = {"reference": f"Patient/{patient_id}"}
    request["medicationCodeableConcept"] = {"coding": [ZOLEDRONIC], "text": "zoledronic acid"}
    dosage = request["dosageInstruction"][0]
    dosage.pop("doseQuantity")
    dosage.update(text=f"{dose_mg:g} mg IV over 15 minutes", doseAndRate=[{"doseQuantity": {
        "value": dose_mg, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}])
    body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "fhirServer": "https://ehr.hospital.example/fhir",
            "context": context}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body


def observation(oid: str, patient_id: str, loinc: str, value: float, unit: str, at: datetime) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}


def searchset(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"https://ehr.hospital.example/fhir/Observation/{r['id']}", "resource": r}
                      for r in resources]}


def band_prefetch(patient_id: str) -> dict:
    """What the EHR prefetches for BAND: the Patient, and today's creatinine 1.60 mg/dL and weight
    70 kg (CrCl (140 - 71) x 70 / (72 x 1.60) = 41.9 mL/min: band 40-<50, 3.3 mg)."""
    at = _now() - timedelta(hours=1)
    return {"patient": {"resourceType": "Patient", "id": patient_id, "gender": "male", "birthDate": BIRTH,
                        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                             "code": "MR"}]}, "value": BAND}]},
            "creatinine": searchset(observation("scr-today", patient_id, "2160-0", 1.6, "mg/dL", at)),
            "weight": searchset(observation("wt-today", patient_id, "29463-7", 70, "kg", at)),
            "albumin": searchset(), "calcium": searchset()}


def test_discovery_lists_both_services_to_a_signed_caller_only(server, keys):
    base, *_ = server
    url = f"{base}/cds-services"
    assert httpx.get(url).status_code == 401
    shown = httpx.get(url, headers={"Authorization": f"Bearer {token(keys[0], url)}"})
    assert shown.status_code == 200
    body = shown.json()
    jsonschema.Draft202012Validator(DISCOVERY_SCHEMA).validate(body)
    services = {s["hook"]: s for s in body["services"]}
    assert set(services) == {"patient-view", "order-sign"}
    assert services["order-sign"]["prefetch"]["creatinine"].startswith("Observation?patient={{context.patientId}}")
    assert {"patient", "creatinine", "albumin", "calcium", "weight"} <= set(services["order-sign"]["prefetch"])


def test_patient_view_shows_the_renal_hold_with_evidence_version_and_citation(server, keys):
    base, *_ = server
    body = valid(call(base, keys[0], "bonewatch-patient-view", patient_view("fhir-hold-1", HOLD)))
    (hold,) = [c for c in body["cards"] if c["source"]["topic"]["code"] == "RENAL_HOLD"]
    assert hold["indicator"] == "critical"
    assert hold["summary"].startswith("Renal hold: Hold the bisphosphonate")
    assert "1.60 - 1.00 = 0.60 mg/dL >= 0.50" in hold["detail"]          # the arithmetic
    assert "Serum creatinine 1.60 mg/dL" in hold["detail"]                 # the evidence
    assert "RENAL\\_HOLD version 1" in hold["detail"]
    assert hold["source"]["topic"]["display"] == "RENAL_HOLD version 1"
    assert hold["source"]["label"].startswith("Zoledronic acid label (US PI 2.2")
    assert hold["source"]["url"].startswith("https://dailymed.nlm.nih.gov/")
    (link,) = hold["links"]
    assert link["type"] == "absolute" and link["url"].startswith(f"{base}/alerts/")
    assert HOLD not in json.dumps(body)      # the EHR has the chart open: the MRN is not repeated
    page = httpx.get(link["url"])       # the acknowledgement page of that alert opens
    assert page.status_code == 200 and "Acknowledge this alert" in page.text and "RENAL_HOLD" in page.text


def test_patient_view_without_prefetch_takes_the_id_as_the_mrn_and_answers_from_the_store(server, keys):
    base, *_ = server
    body = valid(call(base, keys[0], "bonewatch-patient-view", patient_view(BAND)))
    assert [c["source"]["topic"]["code"] for c in body["cards"]] == ["DOSE_BAND"]
    # the specification's example patient is unknown here: no cards, and still a valid answer
    example = json.loads((DATA / "spec_patient-view_request.json").read_text("utf-8"))
    assert valid(call(base, keys[0], "bonewatch-patient-view", example)) == {"cards": []}


def test_a_patient_id_known_from_an_earlier_fhir_delivery_is_mapped_to_its_mrn(server, keys):
    base, *_ = server
    body = valid(call(base, keys[0], "bonewatch-patient-view", patient_view(FHIR_REF)))
    assert "RENAL_HOLD" in [c["source"]["topic"]["code"] for c in body["cards"]]


def test_order_sign_above_the_band_is_critical_and_suggests_the_band_dose(server, keys):
    base, *_ = server
    body = valid(call(base, keys[0], "bonewatch-order-sign", order_sign("fhir-band-1", 4.0, band_prefetch("fhir-band-1"))))
    rules = [c["source"]["topic"]["code"] for c in body["cards"]]
    assert rules == ["DOSE_BAND"]       # today's creatinine came with the call: none missing before the dose
    (band,) = body["cards"]
    assert band["indicator"] == "critical"
    assert "exceeds the 3.3 mg" in band["summary"]
    assert "(140 - 71) x 70.0 / (72 x 1.60)" in band["detail"] and "41.9 mL/min" in band["detail"]
    (suggestion,) = band["suggestions"]
    assert band["selectionBehavior"] == "at-most-one" and suggestion["label"] == "Change the dose to 3.3 mg"
    (action,) = suggestion["actions"]
    assert action["type"] == "update"
    changed = action["resource"]
    assert changed["resourceType"] == "MedicationRequest" and changed["id"] == "smart-MedicationRequest-103"
    assert changed["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 3.3


def test_order_sign_without_prefetch_answers_from_the_store_alone(server, keys):
    base, *_ = server
    body = valid(call(base, keys[0], "bonewatch-order-sign", order_sign(BAND, 4.0)))
    cards = {c["source"]["topic"]["code"]: c for c in body["cards"]}
    # the store's latest creatinine is 1.20 mg/dL of 30 days ago: CrCl 55.9, band 50-60 (3.5 mg), and
    # no creatinine in the 7 days before a dose given now
    assert set(cards) == {"DOSE_BAND", "PRE_DOSE_SCR_MISSING"}
    assert "3.5 mg" in cards["DOSE_BAND"]["summary"] and cards["DOSE_BAND"]["indicator"] == "critical"
    assert cards["PRE_DOSE_SCR_MISSING"]["indicator"] == "warning"
    # the dose of the band is not flagged
    assert valid(call(base, keys[0], "bonewatch-order-sign", order_sign(BAND, 3.5)))["cards"][0][
        "source"]["topic"]["code"] == "PRE_DOSE_SCR_MISSING"


def test_order_sign_during_a_renal_hold_is_critical(server, keys):
    base, *_ = server
    body = valid(call(base, keys[0], "bonewatch-order-sign", order_sign(HOLD, 4.0)))
    first = body["cards"][0]
    assert first["source"]["topic"]["code"] == "RENAL_HOLD" and first["indicator"] == "critical"
    assert first["summary"].startswith("Do not give zoledronic acid 4 mg: the bisphosphonate is on hold")


def test_order_sign_of_other_orders_gives_no_cards(server, keys):
    base, *_ = server
    context = json.loads((DATA / "spec_order-sign_context_r4.json").read_text("utf-8"))["context"]
    body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": context}
    assert valid(call(base, keys[0], "bonewatch-order-sign", body)) == {"cards": []}


def test_calls_without_a_valid_token_get_401(server, keys):
    base, *_ = server
    url = f"{base}/cds-services/bonewatch-patient-view"
    body = patient_view("fhir-hold-1", HOLD)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "no header": httpx.post(url, json=body),
        "not bearer": httpx.post(url, json=body, headers={"Authorization": "Basic dXNlcjpwYXNz"}),
        "garbage": httpx.post(url, json=body, headers={"Authorization": "Bearer not.a.jwt"}),
        "impostor key": call(base, keys[1], "bonewatch-patient-view", body),
        "other service's aud": httpx.post(url, json=body, headers={
            "Authorization": f"Bearer {token(keys[0], f'{base}/cds-services')}"}),
        "untrusted issuer": call(base, keys[0], "bonewatch-patient-view", body, iss="https://other.example"),
        "expired": call(base, keys[0], "bonewatch-patient-view", body, exp=int(time.time()) - 600,
                        iat=int(time.time()) - 900),
        "no jti": call(base, keys[0], "bonewatch-patient-view", body, jti=None),
        "HMAC": call(base, SECRET.encode() * 2, "bonewatch-patient-view", body, algorithm="HS384"),
        "RS384 with an unknown key": call(base, rsa_key, "bonewatch-patient-view", body, algorithm="RS384"),
    }
    for name, response in cases.items():
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"].startswith("Bearer"), name
        assert "cards" not in response.json(), name
    # a token is good once: the same jti again is a replay
    replayed = token(keys[0], url)
    first = httpx.post(url, json=body, headers={"Authorization": f"Bearer {replayed}"})
    again = httpx.post(url, json=body, headers={"Authorization": f"Bearer {replayed}"})
    assert (first.status_code, again.status_code) == (200, 401)
    assert "already used" in again.json()["error"]


def test_request_size_limits_and_bad_calls(server, keys):
    base, *_ = server
    # a call with a realistic prefetch is over the ack pages' 8 KiB and within the CDS limit
    big = patient_view("fhir-hold-1", HOLD)
    big["prefetch"]["creatinine"] = searchset(*[observation(f"scr-{n}", "fhir-hold-1", "2160-0", 1.0, "mg/dL",
                                                            _now() - timedelta(days=n + 1)) for n in range(60)])
    assert len(json.dumps(big)) > 8 * 1024
    assert valid(call(base, keys[0], "bonewatch-patient-view", big))["cards"]
    # ... while the acknowledgement pages keep their 8 KiB
    assert httpx.post(f"{base}/alerts/A0/ack", content=b"t=" + b"x" * 9000).status_code == 413
    huge = patient_view("fhir-hold-1", HOLD)
    huge["prefetch"]["padding"] = "x" * (MAX_BODY + 1)
    assert call(base, keys[0], "bonewatch-patient-view", huge).status_code == 413
    wrong_hook = patient_view("fhir-hold-1", HOLD)
    wrong_hook["hook"] = "order-sign"
    refused = call(base, keys[0], "bonewatch-patient-view", wrong_hook)
    assert refused.status_code == 400 and "patient-view" in refused.json()["error"]
    assert call(base, keys[0], "no-such-service", patient_view("x")).status_code == 404


def test_no_patient_identifiers_in_the_server_log(server, keys):
    base, log, _ = server
    call(base, keys[0], "bonewatch-order-sign", order_sign("fhir-band-1", 4.0, band_prefetch("fhir-band-1")))
    httpx.post(f"{base}/cds-services/bonewatch-patient-view", json=patient_view("fhir-hold-1", HOLD))
    text = log.read_text("utf-8", "replace")
    assert "refused" in text and "card(s) in" in text     # calls and refusals are logged ...
    for phi in (HOLD, BAND, FHIR_REF, "fhir-hold-1", "fhir-band-1", BIRTH):
        assert phi not in text        # ... and no patient id or birth date, ever


def test_a_browser_client_of_a_configured_origin_may_call_the_cds_paths_only(server):
    base, *_ = server
    ask = {"Origin": SANDBOX, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{base}/cds-services/bonewatch-order-sign", headers=ask)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == SANDBOX
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{base}/cds-services/bonewatch-order-sign", headers={**ask, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # the acknowledgement pages stay same-origin
    page = httpx.get(f"{base}/healthz", headers={"Origin": SANDBOX})
    assert "access-control-allow-origin" not in page.headers


def test_keys_from_a_jwks_url_and_a_pem_file_are_trusted_for_their_issuer_only(server, keys, other_ehrs):
    base, *_ = server
    body = patient_view("fhir-hold-1", HOLD)
    by_url = call(base, other_ehrs[URL_ISSUER], "bonewatch-patient-view", body, iss=URL_ISSUER, algorithm="RS384")
    by_pem = call(base, other_ehrs[PEM_ISSUER], "bonewatch-patient-view", body, iss=PEM_ISSUER)
    assert valid(by_url)["cards"] and valid(by_pem)["cards"]
    # a key is good for its own issuer only
    assert call(base, other_ehrs[PEM_ISSUER], "bonewatch-patient-view", body).status_code == 401
    assert call(base, keys[0], "bonewatch-patient-view", body, iss=PEM_ISSUER).status_code == 401


def test_discovery_can_be_made_public(engine, monkeypatch):
    """`[cds_hooks] public_discovery = true`: discovery answers without a JWT; the services do not."""
    from bonewatch.config import with_overrides
    from bonewatch.web import create_app
    from tests.integration.alerting import served

    monkeypatch.setenv("BONEWATCH_ACK_SECRET", SECRET)
    settings = with_overrides(load_settings(), cds_hooks__public_discovery=True)
    with served(create_app(settings, engine=engine)) as base:
        shown = httpx.get(f"{base}/cds-services")
        assert shown.status_code == 200 and len(shown.json()["services"]) == 2
        assert httpx.post(f"{base}/cds-services/bonewatch-patient-view", json=patient_view("x")).status_code == 401


def test_serve_with_unreadable_ehr_keys_fails_at_start_with_one_line(engine, monkeypatch, tmp_path):
    from tests.integration.alerting import run_cli

    config = tmp_path / "bonewatch.toml"
    config.write_text(f'[cds_hooks.issuers."{ISSUER}"]\njwks_file = "{tmp_path / "missing.json"}"\n', "utf-8")
    monkeypatch.setenv("BONEWATCH_CONFIG", str(config))
    monkeypatch.setenv("BONEWATCH_ACK_SECRET", SECRET)
    done = run_cli("serve", "--port", "1")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("bonewatch: [cds_hooks.issuers") and "missing.json cannot be read" in line
    assert "Traceback" not in done.stderr


def test_a_silenced_alert_is_an_info_card_saying_until_when_by_whom_and_why(server, keys):
    base, _, env = server
    cli = [sys.executable, "-m", "bonewatch.cli"]
    made = subprocess.run([*cli, "silence", "--patient", BAND, "--rule", "DOSE_BAND", "--for", "2d",
                           "--reason", "infusion cancelled", "--by", "R. Nurse"],
                          env=env, capture_output=True, text=True, check=True)
    silence_id = made.stdout.split()[1].rstrip(":")
    try:
        body = valid(call(base, keys[0], "bonewatch-patient-view", patient_view(BAND)))
        (card,) = body["cards"]
        assert card["source"]["topic"]["code"] == "DOSE_BAND"
        assert card["indicator"] == "info"
        assert "silenced until" in card["summary"] and "R. Nurse" in card["summary"]
        assert "infusion cancelled" in card["detail"]
    finally:
        subprocess.run([*cli, "unsilence", silence_id, "--by", "R. Nurse"], env=env, check=True,
                       capture_output=True)
    # ended: the card is the dose band's warning again
    body = valid(call(base, keys[0], "bonewatch-patient-view", patient_view(BAND)))
    assert [c["indicator"] for c in body["cards"]] != ["info"]
