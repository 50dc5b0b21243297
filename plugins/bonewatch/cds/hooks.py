"""The two CDS services: `patient-view` (the patient's open alerts as cards) and `order-sign` (a
draft zoledronic acid or pamidronate order checked against the patient's history at that instant).

`order-sign` re-uses the rules, it does not restate them: the patient's whole history from the
store, plus the prefetched Observations (and Patient), plus the ordered dose as a bisphosphonate
dose given now, go through the rule functions as of today (hospital time; `order_findings`, the
order-relevant part of `rules.evaluate_with_state`); the findings about that dose are the answer:

- `RENAL_HOLD` / `ALBUMINURIA`: the course is held -> critical ("do not give");
- `DOSE_BAND` (zoledronic acid): the ordered dose is not the dose of the current CrCl band ->
  critical when it is above the band (or the band is < 30 mL/min), warning when below; a
  suggestion replaces the order's dose with the band's;
- `PRE_DOSE_SCR_MISSING` for this dose: no creatinine in the 7 days before it -> warning;
- `DENTAL_EXAM_MISSING` for the bisphosphonate course this dose belongs to -> warning.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from datetime import UTC, date, datetime
from typing import Any

import pandas as pd
from sqlalchemy import select

from bonewatch import rules
from bonewatch.cds import cards, prefetch
from bonewatch.config import Settings
from bonewatch.ingest.fhir import RXNORM_EVENTS, RXNORM_SYSTEMS, _medication_concept
from bonewatch.model import Finding
from bonewatch.rules.derive import prepare
from bonewatch.rules.monitoring import check_dental_exam, check_pre_dose_scr
from bonewatch.rules.renal import check_albuminuria, check_dose_band, check_renal
from bonewatch.store import reads, silences
from bonewatch.store.alerts import LISTED
from bonewatch.store.tables import alerts as alerts_table

PATIENT_VIEW = "bonewatch-patient-view"
ORDER_SIGN = "bonewatch-order-sign"
BISPHOSPHONATE_RXNORM = {code: agent for code, (kind, agent) in RXNORM_EVENTS.items()
                         if kind == "bisphosphonate_dose" and agent != "denosumab"}
AGENT_NAMES = {"zoledronic_acid": "zoledronic acid", "pamidronate": "pamidronate"}
_OBSERVATIONS = {"creatinine": "2160-0,http://loinc.org|14682-9", "albumin": "1751-7",
                 "calcium": "17861-6,http://loinc.org|2000-8", "weight": "29463-7"}
PREFETCH_PATIENT = {"patient": "Patient/{{context.patientId}}"}
PREFETCH_ORDER = {**PREFETCH_PATIENT, **{
    name: f"Observation?patient={{{{context.patientId}}}}&code=http://loinc.org|{codes}&_sort=-date&_count=50"
    for name, codes in _OBSERVATIONS.items()}}
OPEN_STATUSES = ["open", "notified", "acknowledged"]


def discovery() -> dict:
    """The discovery document (`GET /cds-services`)."""
    return {"services": [
        {"hook": "patient-view", "id": PATIENT_VIEW, "title": "bonewatch: bone-agent monitoring alerts",
         "description": "The patient's open bonewatch alerts (renal hold, dose band, missing pre-dose creatinine, "
                        "dental examination, calcium, reviews) with their evidence, rule version and source.",
         "prefetch": PREFETCH_PATIENT},
        {"hook": "order-sign", "id": ORDER_SIGN, "title": "bonewatch: zoledronic acid and pamidronate orders",
         "description": "Checks a draft zoledronic acid or pamidronate order (RxNorm 77655, 11473) against the "
                        "patient's history at signing: renal hold, the dose for the current CrCl band, a creatinine "
                        "within 7 days and a dental examination within 6 months.",
         "prefetch": PREFETCH_ORDER,
         "usageRequirements": "Send the draft MedicationRequest with its dose in mg; prefetch the recent creatinine, "
                              "albumin, calcium and weight Observations (the service falls back to its own store)."},
    ]}


def _silences_for(conn, patient_id: str, now: datetime) -> dict[str, dict]:
    """The patient's silenced alerts at `now` (naive UTC): alert id -> {until, reason, by, silence_id}."""
    return silences.active_for_patient(conn, patient_id, now)


def local_day(now: datetime, settings: Settings) -> date:
    """Today in the hospital's time zone (`now` is naive UTC)."""
    return now.replace(tzinfo=UTC).astimezone(settings.tz).date()


def patient_view(conn, settings: Settings, request: dict, now: datetime, ack_url) -> dict:
    """Cards of the patient's alerts that are not resolved, urgent first. `ack_url(alert)` gives the
    acknowledgement link of an alert."""
    context = request["context"]
    mrn = prefetch.resolve_patient(conn, context["patientId"], request.get("prefetch") or {})
    alerts = patient_alerts(conn, mrn)
    silences = _silences_for(conn, mrn, now)
    return {"cards": [cards.alert_card(a, settings, ack_url=ack_url(a), silence=silences.get(a["alert_id"]))
                      for a in alerts]}


def patient_alerts(conn, patient_id: str) -> list[dict]:
    """The patient's alerts that are not resolved (as `store.alerts.list_alerts` gives them: evidence
    parsed, urgent first), read through the patient index, not the whole table."""
    c = alerts_table.c
    query = select(*[c[name] for name in LISTED]).where(c.patient_id == patient_id, c.status.in_(OPEN_STATUSES))
    rank = {"high": 0, "medium": 1, "info": 2}
    rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        row["evidence"] = json.loads(row["evidence"])
    return sorted(rows, key=lambda r: (rank.get(r["severity"], 9), str(r["raised_on"]), r["rule"]))


@dataclasses.dataclass(frozen=True)
class Order:
    """A draft bisphosphonate order: the MedicationRequest, its agent and dose (mg, None if not given)."""

    resource: dict
    agent: str
    dose_mg: float | None


def orders_of(draft_orders: Any) -> list[Order]:
    """The zoledronic acid and pamidronate MedicationRequests of `context.draftOrders`."""
    entries = draft_orders.get("entry") if isinstance(draft_orders, dict) else None
    out = []
    for entry in entries if isinstance(entries, list) else []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "MedicationRequest":
            continue
        agent = _agent(resource)
        if agent:
            out.append(Order(resource, agent, _dose_mg(resource)))
    return out


def _agent(resource: dict) -> str:
    concept = resource.get("medicationCodeableConcept")
    reference = (resource.get("medicationReference") or {}).get("reference", "")
    if not isinstance(concept, dict) and isinstance(reference, str) and reference.startswith("#"):
        contained = [c for c in resource.get("contained") or [] if isinstance(c, dict)
                     and c.get("resourceType") == "Medication" and f"#{c.get('id')}" == reference]
        concept = _medication_concept(contained[0]) if contained else None
    codings = concept.get("coding") if isinstance(concept, dict) else None
    for coding in codings if isinstance(codings, list) else []:
        if isinstance(coding, dict) and coding.get("system") in RXNORM_SYSTEMS:
            agent = BISPHOSPHONATE_RXNORM.get(str(coding.get("code", "")))
            if agent:
                return agent
    return ""


def _dose_mg(resource: dict) -> float | None:
    """The dose of the first dosage instruction (R4 `doseAndRate[].doseQuantity`, or STU3
    `doseQuantity`), in mg (g and ug converted); None when absent or in another unit."""
    for dosage in resource.get("dosageInstruction") or []:
        if not isinstance(dosage, dict):
            continue
        quantities = [d.get("doseQuantity") for d in dosage.get("doseAndRate") or [] if isinstance(d, dict)]
        quantities.append(dosage.get("doseQuantity"))
        for quantity in quantities:
            if not isinstance(quantity, dict):
                continue
            try:
                value = float(quantity.get("value"))
            except (TypeError, ValueError):
                continue
            unit = str(quantity.get("code") or quantity.get("unit") or "").strip().lower()
            factor = {"mg": 1.0, "g": 1000.0, "ug": 0.001, "mcg": 0.001}.get(unit)
            if factor is not None:
                return round(value * factor, 4)
    return None


def with_dose(resource: dict, mg: float) -> dict:
    """A copy of the MedicationRequest whose dose is `mg` mg (every dose quantity it has; R4
    `doseAndRate` when it had none)."""
    out = copy.deepcopy(resource)
    quantity = {"value": mg, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}
    dosages = [d for d in out.get("dosageInstruction") or [] if isinstance(d, dict)]
    if not dosages:
        dosages = out["dosageInstruction"] = [{}]
    for dosage in dosages:
        rates = [r for r in dosage.get("doseAndRate") or [] if isinstance(r, dict) and "doseQuantity" in r]
        for rate in rates:
            rate["doseQuantity"] = dict(quantity)
        if "doseQuantity" in dosage:
            dosage["doseQuantity"] = dict(quantity)
        elif not rates:
            dosage["doseAndRate"] = [{"doseQuantity": dict(quantity)}]
        if isinstance(dosage.get("text"), str):
            dosage["text"] = f"{mg:g} mg"
    return out


def order_sign(conn, settings: Settings, request: dict, now: datetime) -> dict:
    """Cards for the draft bisphosphonate orders of an order-sign call (none: no cards)."""
    context = request["context"]
    orders = orders_of(context.get("draftOrders"))
    if not orders:
        return {"cards": []}
    fhir_id = context["patientId"]
    sent = request.get("prefetch") or {}
    mrn = prefetch.resolve_patient(conn, fhir_id, sent)
    today = local_day(now, settings)
    store_labs, store_events = reads.load_patients(conn, [mrn])
    sent_labs, sent_events = prefetch.prefetch_rows(settings, sent, fhir_id, mrn, now)
    labs = prefetch.merged(store_labs, sent_labs, "result_id")
    labs = labs[labs["collected_date"] <= pd.Timestamp(today)].reset_index(drop=True)
    events = reads.visible_events(prefetch.merged(store_events, sent_events, None), today)
    out = []
    for number, order in enumerate(orders):
        dose = pd.DataFrame({"patient_id": [mrn], "event_type": ["bisphosphonate_dose"],
                             "occurred_at": [pd.Timestamp(now)], "occurred_date": [pd.Timestamp(today)],
                             "value": [order.agent],
                             "detail": ["" if order.dose_mg is None else f"{order.dose_mg:g}"]})
        findings = order_findings(labs, pd.concat([events, dose], ignore_index=True), today, settings)
        key = f"{request.get('hookInstance', '')}\x1f{number}"
        out += [_order_card(f, order, today, key, settings) for f in _about_the_order(findings, mrn, today)]
    return {"cards": out}


#: the rules an order is checked against (`order_findings`)
ORDER_RULES = ("RENAL_HOLD", "RENAL_RESUME", "ALBUMINURIA", "DOSE_BAND", "PRE_DOSE_SCR_MISSING", "DENTAL_EXAM_MISSING")


def order_findings(labs: pd.DataFrame, events: pd.DataFrame, as_of: date, settings: Settings) -> list[Finding]:
    """The findings of ORDER_RULES as `rules.evaluate_with_state` makes them: the same derivation
    (`prepare`), the same rule functions in the same order (the holds of both renal rules and
    albuminuria decide DOSE_BAND), the same evidence notes; the other rules are not asked (they
    say nothing about an order, and a call has to answer in well under a second)."""
    facts = prepare(labs, events, as_of, settings)
    renal, renal_held, _ = check_renal(facts, settings)
    albuminuria, albumin_held = check_albuminuria(facts, settings)
    held = rules._combine_holds(renal_held, albumin_held)
    found = [*renal, *albuminuria, *check_dose_band(facts, held, settings),
             *check_pre_dose_scr(facts, settings), *check_dental_exam(facts, settings)]
    return sorted(rules._note_time_basis(found, facts.labs), key=lambda f: (f.patient_id, f.rule, f.episode))


def _about_the_order(findings: list[Finding], mrn: str, today: date) -> list[Finding]:
    wanted = []
    for f in findings:
        if f.patient_id != mrn:
            continue
        if (f.rule in ("RENAL_HOLD", "ALBUMINURIA", "DOSE_BAND")
                or (f.rule == "PRE_DOSE_SCR_MISSING" and f.episode == f"dose {today.isoformat()}")
                or (f.rule == "DENTAL_EXAM_MISSING" and f.episode.startswith("bisphosphonate course"))):
            wanted.append(f)
    order = {"RENAL_HOLD": 0, "ALBUMINURIA": 1, "DOSE_BAND": 2, "PRE_DOSE_SCR_MISSING": 3, "DENTAL_EXAM_MISSING": 4}
    return sorted(wanted, key=lambda f: order[f.rule])


def _order_card(f: Finding, order: Order, today: date, key: str, settings: Settings) -> dict:
    agent = AGENT_NAMES[order.agent]
    ordered = "no dose given" if order.dose_mg is None else f"{order.dose_mg:g} mg"
    common = {"key": f"{key}\x1f{f.rule}", "rule": f.rule, "rule_version": f.rule_version,
              "severity": f.severity.value, "action": f.action, "citation": f.citation,
              "evidence": {**f.evidence, "order": f"{agent} {ordered}, to be signed {today.isoformat()}"},
              "settings": settings}
    if f.rule in ("RENAL_HOLD", "ALBUMINURIA"):
        why = "renal deterioration" if f.rule == "RENAL_HOLD" else "albuminuria"
        return cards.card(**common, indicator="critical",
                          summary=f"Do not give {agent} {ordered}: the bisphosphonate is on hold for {why}.")
    if f.rule == "DOSE_BAND":
        _, mg = _band(f)
        if mg is None:
            return cards.card(**common, indicator="critical",
                              summary=f"CrCl below 30 mL/min: do not give {agent} {ordered}; consider denosumab.")
        above = order.dose_mg is not None and order.dose_mg > mg
        suggestion = {"label": f"Change the dose to {mg:g} mg", "isRecommended": True,
                      "uuid": cards.uuid_of(f"{common['key']}\x1fsuggestion"),
                      "actions": [{"type": "update", "description": f"Set the {agent} dose to {mg:g} mg "
                                                                     f"(CrCl band {_band(f)[0]})",
                                   "resource": with_dose(order.resource, mg)}]}
        return cards.card(**common, indicator="critical" if above else "warning", suggestions=[suggestion],
                          summary=f"{agent.capitalize()} {ordered} {'exceeds' if above else 'differs from'} the "
                                  f"{mg:g} mg of the current CrCl band ({_band(f)[0]}).")
    if f.rule == "PRE_DOSE_SCR_MISSING":
        days = settings.rule("PRE_DOSE_SCR_MISSING").params["days"]
        return cards.card(**common, summary=f"No serum creatinine in the {days} days before this {agent} dose: "
                                            "check it before the infusion.")
    months = settings.rule("DENTAL_EXAM_MISSING").params["months"]
    return cards.card(**common, summary=f"No dental examination in the {months} months before this "
                                        f"{agent} course began.")


def _band(f: Finding) -> tuple[str, float | None]:
    """(band label, dose mg or None) of a DOSE_BAND finding, from its episode and evidence."""
    from bonewatch.rules.renal import BANDS

    label = f.episode.rsplit("band ", 1)[-1]
    return label, dict(BANDS).get(label)
