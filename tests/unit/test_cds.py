"""The CDS Hooks service's pure parts: the order's rules are the nightly rules, cards keep to the
specification (summary length, indicator, silenced alerts), draft orders are read and re-dosed."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from bonewatch import rules
from bonewatch.cds import cards, hooks
from bonewatch.config import load_settings
from bonewatch.errors import ConfigError
from tests.unit.builders import History

DATA = Path(__file__).resolve().parents[1] / "data" / "real" / "cds-hooks"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _histories() -> History:
    h = History()
    # p1: a renal hold; p2: a dose out of band with no creatinine in the week before the last dose;
    # p3: albuminuria hold; p4: a first dose without a dental examination
    h.person("p1").scr("p1", "2024-12-30", 1.0).dose("p1", "2025-01-02").scr("p1", "2025-03-01", 1.6)
    h.dose("p1", "2025-03-05")
    h.person("p2", weight_day="2024-12-01").scr("p2", "2024-12-30", 1.2).dose("p2", "2025-01-02").dose("p2", "2025-02-20")
    h.person("p3").scr("p3", "2024-12-30", 0.9).dose("p3", "2025-01-02", "pamidronate", "90")
    h.event("p3", "albuminuria_mg_24h", "2025-02-01", "800")
    h.person("p4").event("p4", "dental_exam", "2023-01-01").scr("p4", "2025-02-27", 1.0).dose("p4", "2025-03-01")
    return h


@pytest.mark.parametrize("as_of", ["2025-03-01", "2025-03-05", "2025-04-01"])
def test_the_order_rules_find_what_the_nightly_evaluation_finds(as_of):
    settings = load_settings()
    labs, events = _histories().frames()
    nightly = [f for f in rules.evaluate(labs, events, date.fromisoformat(as_of), settings)
               if f.rule in hooks.ORDER_RULES]
    ours = hooks.order_findings(labs, events, date.fromisoformat(as_of), settings)
    assert {f.rule for f in ours} >= {"RENAL_HOLD", "DOSE_BAND", "ALBUMINURIA", "DENTAL_EXAM_MISSING"}
    assert [(f.alert_id, f.evidence, f.action) for f in ours] == [(f.alert_id, f.evidence, f.action) for f in nightly]


def _alert(**changes) -> dict:
    row = {"alert_id": "A0123456789abcde", "rule": "RENAL_HOLD", "rule_version": "1", "severity": "high",
           "action": "Hold the bisphosphonate. Recheck serum creatinine before the next dose.",
           "citation": "Zoledronic acid label (US PI 2.2)", "status": "notified", "raised_on": date(2025, 3, 1),
           "evidence": json.dumps({"summary": "Serum creatinine 1.60 mg/dL is 0.60 above <the> baseline_1",
                                   "arithmetic": "1.60 - 1.00 = 0.60 mg/dL >= 0.50",
                                   "baseline": {"scr_mg_dl": 1.0, "date": "2024-12-30"}})}
    return {**row, **changes}


def test_an_alert_card_carries_evidence_arithmetic_version_source_and_link():
    settings = load_settings()
    card = cards.alert_card(_alert(), settings, ack_url="https://bonewatch.example/alerts/A1?t=x")
    assert card["indicator"] == "critical" and card["summary"].startswith("Renal hold: Hold the bisphosphonate.")
    assert "    1.60 - 1.00 = 0.60 mg/dL >= 0.50" in card["detail"]             # a code block: shown as is
    assert "0.60 above \\<the\\> baseline\\_1" in card["detail"]               # text cannot become markup
    assert "scr mg dl 1, date 2024-12-30" in card["detail"]
    assert card["source"]["topic"] == {"system": cards.RULE_SYSTEM, "code": "RENAL_HOLD",
                                       "display": "RENAL_HOLD version 1"}
    assert card["source"]["url"] == settings.cds_hooks.source_urls["RENAL_HOLD"]
    assert card["links"] == [{"label": "Acknowledge in bonewatch", "url": "https://bonewatch.example/alerts/A1?t=x",
                              "type": "absolute"}]
    # the same occurrence, the same card uuid; another night's occurrence, another
    assert cards.alert_card(_alert(), settings)["uuid"] == card["uuid"]
    assert cards.alert_card(_alert(raised_on=date(2025, 4, 1)), settings)["uuid"] != card["uuid"]
    assert {cards.alert_card(_alert(severity=s), settings)["indicator"] for s in ("medium", "info")} == {"warning",
                                                                                                         "info"}


def test_a_silenced_alert_is_an_info_card_saying_so():
    settings = load_settings()
    silence = {"until": date(2025, 3, 15), "reason": "dose held by the renal team", "by": "Dr Stone"}
    card = cards.alert_card(_alert(), settings, silence=silence)
    assert card["indicator"] == "info"
    assert "silenced until 2025-03-15 by Dr Stone: dose held by the renal team" in card["summary"]
    assert card["detail"].startswith("**Silenced until 2025-03-15 by Dr Stone: dose held by the renal team.**")


def test_summaries_stay_under_140_characters():
    settings = load_settings()
    card = cards.alert_card(_alert(action="Recheck " + "serum creatinine " * 20), settings)
    assert len(card["summary"]) <= 139 and card["summary"].endswith("\N{HORIZONTAL ELLIPSIS}")
    assert cards.shorten("short") == "short"


def _request(concept=None, dosage=None, **extra) -> dict:
    resource = {"resourceType": "MedicationRequest", "id": "mr1", "status": "draft", "intent": "order",
                "dosageInstruction": [dosage] if dosage is not None else [], **extra}
    if concept is not None:
        resource["medicationCodeableConcept"] = concept
    return {"resourceType": "Bundle", "entry": [{"resource": resource}]}


def test_draft_orders_of_zoledronic_acid_and_pamidronate_are_read_with_their_dose():
    zol = {"coding": [{"system": RXNORM, "code": "77655"}]}
    r4 = {"doseAndRate": [{"doseQuantity": {"value": 4, "unit": "mg", "code": "mg"}}]}
    (order,) = hooks.orders_of(_request(zol, r4))
    assert (order.agent, order.dose_mg) == ("zoledronic_acid", 4.0)
    stu3 = {"doseQuantity": {"value": 0.09, "unit": "g"}}
    assert hooks.orders_of(_request({"coding": [{"system": RXNORM, "code": "11473"}]}, stu3))[0].dose_mg == 90.0
    contained = _request(None, r4, medicationReference={"reference": "#med"}, contained=[
        {"resourceType": "Medication", "id": "med", "code": {"coding": [{"system": RXNORM, "code": "1114085"}]},
         "ingredient": [{"itemCodeableConcept": {"coding": [{"system": RXNORM, "code": "77655"}]}}]}])
    assert hooks.orders_of(contained)[0].agent == "zoledronic_acid"
    # denosumab, other drugs, and the specification's example order: not ours
    assert hooks.orders_of(_request({"coding": [{"system": RXNORM, "code": "993449"}]}, r4)) == []
    example = json.loads((DATA / "spec_order-sign_context_r4.json").read_text("utf-8"))["context"]["draftOrders"]
    assert hooks.orders_of(example) == []
    assert hooks.orders_of(_request(zol, {"doseAndRate": [{"doseQuantity": {"value": 4, "unit": "mL"}}]}))[0].dose_mg \
        is None


def test_the_suggested_order_is_the_draft_with_the_band_dose():
    draft = _request({"coding": [{"system": RXNORM, "code": "77655"}]},
                     {"text": "4 mg IV", "doseAndRate": [{"doseQuantity": {"value": 4, "unit": "mg"}}]})
    resource = draft["entry"][0]["resource"]
    changed = hooks.with_dose(resource, 3.3)
    assert changed["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 3.3
    assert changed["dosageInstruction"][0]["text"] == "3.3 mg"
    assert resource["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 4     # untouched
    bare = hooks.with_dose({"resourceType": "MedicationRequest"}, 3.0)
    assert bare["dosageInstruction"] == [{"doseAndRate": [{"doseQuantity": {
        "value": 3.0, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}]}]


def test_cds_configuration_refuses_symmetric_algorithms_and_ambiguous_keys(tmp_path):
    config = tmp_path / "bonewatch.toml"
    config.write_text('[cds_hooks]\nalgorithms = ["HS256"]\n', "utf-8")
    with pytest.raises(ConfigError, match="cds_hooks.algorithms"):
        load_settings(config)
    config.write_text('[cds_hooks.issuers."https://ehr.example"]\njwks_file = "a.json"\npem_file = "b.pem"\n', "utf-8")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_settings(config)


def test_the_schemas_accept_the_specifications_examples_and_refuse_what_it_forbids():
    import jsonschema

    response = json.loads((DATA / "cds-hooks-2.0-response.schema.json").read_text("utf-8"))
    discovery = json.loads((DATA / "cds-hooks-2.0-discovery.schema.json").read_text("utf-8"))
    example = json.loads((DATA / "spec_response_example.json").read_text("utf-8"))
    jsonschema.Draft202012Validator(response).validate(example)
    jsonschema.Draft202012Validator(discovery).validate(
        json.loads((DATA / "spec_discovery_example.json").read_text("utf-8")))
    jsonschema.Draft202012Validator(discovery).validate(hooks.discovery())
    card = example["cards"][1]
    for bad in ({**card, "summary": "x" * 140}, {**card, "indicator": "urgent"}, {**card, "source": {}},
                {**card, "suggestions": [{"label": "Do it"}]}):
        assert not jsonschema.Draft202012Validator(response).is_valid({"cards": [bad]})
