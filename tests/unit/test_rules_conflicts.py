"""Two results of one analyte for one patient at one instant with different values (real exports
have them): the rule uses the cautious one, the reading that would raise the alert, whatever the
order of the rows and their result ids, and the evidence names both and the one used."""

from __future__ import annotations

from datetime import date

import pytest

from bonewatch.rules import evaluate, evaluate_with_state
from tests.unit.builders import History
from tests.unit.test_rules import SETTINGS


def fired(h: History, as_of: str, *, ids: tuple[str, ...] = (), reverse: bool = False) -> dict[str, list]:
    """Findings by rule; `ids` relabels the last results (the conflicting ones), `reverse` flips the rows."""
    labs, events = h.frames()
    if ids:
        labs.loc[labs.index[-len(ids):], "result_id"] = list(ids)
    if reverse:
        labs, events = labs[::-1], events[::-1]
    out: dict[str, list] = {}
    for f in evaluate(labs, events, date.fromisoformat(as_of), SETTINGS):
        out.setdefault(f.rule, []).append(f)
    return out


ORDERS = [((), False), (("a", "b"), False), (("b", "a"), False), (("a", "b"), True), (("b", "a"), True)]


@pytest.mark.parametrize(("ids", "reverse"), ORDERS)
def test_renal_hold_uses_the_higher_of_two_same_instant_creatinines(ids, reverse):
    # baseline 1.0: 1.6 is a rise of 0.6 (hold); 1.05 is within 10 % (resume). Taken in result-id
    # order, one order held and the other resumed.
    h = History().person("p1", weight=110).scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "pamidronate", "90")
    h.scr("p1", "2025-02-10", 1.05).scr("p1", "2025-02-10", 1.6)
    found = fired(h, "2025-02-10", ids=ids, reverse=reverse)
    assert "RENAL_RESUME" not in found
    (hold,) = found["RENAL_HOLD"]
    assert hold.evidence["scr"] == {"value_mg_dl": 1.6, "date": "2025-02-10", "rise_mg_dl": 0.6, "threshold_mg_dl": 0.5}
    assert hold.evidence["conflict"] == "two creatinines at 2025-02-10 08:00: 1.6 and 1.05 mg/dL; the higher (1.6) is used"


@pytest.mark.parametrize(("ids", "reverse"), ORDERS)
def test_renal_baseline_is_the_lower_of_two_same_instant_creatinines(ids, reverse):
    """A rise is measured from the baseline: the lower one is the cautious reading there."""
    h = History().person("p1", weight=110).dose("p1", "2025-01-05", "pamidronate", "90")
    h.scr("p1", "2025-02-10", 1.45)                                  # 0.55 over 0.9; under 1.5
    h.scr("p1", "2025-01-03", 1.5).scr("p1", "2025-01-03", 0.9)
    labs, events = h.frames()
    if ids:
        labs.loc[labs.index[-2:], "result_id"] = list(ids)
    if reverse:
        labs, events = labs[::-1], events[::-1]
    findings, courses = evaluate_with_state(labs, events, date(2025, 2, 10), SETTINGS)
    (hold,) = [f for f in findings if f.rule == "RENAL_HOLD"]
    assert hold.evidence["baseline"]["scr_mg_dl"] == 0.9
    assert hold.evidence["conflict"] == ("two creatinines at 2025-01-03 08:00: 1.5 and 0.9 mg/dL; the lower (0.9) "
                                         "is the baseline")
    # the course's baseline CrCl is the lower creatinine's: (140 - 70) x 110 / (72 x 0.9)
    assert courses["renal_baseline_scr"].tolist() == [0.9] and courses["renal_baseline_crcl"].tolist() == [118.8]


@pytest.mark.parametrize("reverse", [False, True])
def test_dose_band_uses_the_lower_crcl_and_names_both(reverse):
    h = History().person("p1", birth="1955-01-01", weight=70)
    h.scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "zoledronic_acid", "4.0")
    h.scr("p1", "2025-02-10", 1.1).scr("p1", "2025-02-10", 1.2)     # CrCl 61.9 (> 60) and 56.7 (3.5 mg)
    (band,) = fired(h, "2025-02-10", reverse=reverse)["DOSE_BAND"]
    assert band.evidence["crcl"]["value_ml_min"] == 56.7 and band.evidence["target_dose"] == "3.5 mg"
    assert band.evidence["conflict"] == "two creatinines at 2025-02-10 08:00: 1.2 and 1.1 mg/dL; the higher (1.2) is used"


def test_dose_band_names_two_weights_at_one_instant():
    h = History().person("p1", birth="1955-01-01", weight=None)
    h.event("p1", "weight_kg", "2025-01-01", "80").event("p1", "weight_kg", "2025-01-01", "70")
    h.scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "zoledronic_acid", "4.0")
    h.scr("p1", "2025-02-10", 1.2)
    (band,) = fired(h, "2025-02-10", reverse=True)["DOSE_BAND"]
    assert band.evidence["crcl"]["weight_kg"] == 70
    assert band.evidence["conflict"] == "two weights at 2025-01-01 00:00: 70 and 80 kg; the lower (70) is used"


@pytest.mark.parametrize(("ids", "reverse"), ORDERS)
def test_hypocalcemia_uses_the_lower_calcium_and_the_higher_albumin(ids, reverse):
    # 8.0 + 0.8 x (4.0 - 3.5) = 8.40 fires; with the other readings: 8.0 + 0.8 = 8.80, 8.6 + ... no
    h = History().person("p1").event("p1", "dental_exam", "2024-12-01").dose("p1", "2025-01-05", "denosumab", "120")
    h.lab("p1", "albumin", "2025-02-01", 3.0).lab("p1", "albumin", "2025-02-01", 3.5)
    h.lab("p1", "calcium", "2025-02-01", 8.6).lab("p1", "calcium", "2025-02-01", 8.0)
    (low,) = fired(h, "2025-02-01", ids=ids, reverse=reverse)["HYPOCALCEMIA"]
    assert low.evidence["corrected_mg_dl"] == 8.4
    assert low.evidence["conflict"] == ("two calciums at 2025-02-01 08:00: 8 and 8.6 mg/dL; the lower (8) is used; "
                                        "two albumins at 2025-02-01 08:00: 3.5 and 3 g/dL; the higher (3.5) is used")


@pytest.mark.parametrize("reverse", [False, True])
def test_alp_nonbone_uses_the_higher_alp_and_ggt(reverse):
    h = History().lab("p1", "alp", "2025-02-01", 140).lab("p1", "alp", "2025-02-01", 120)
    h.lab("p1", "ggt", "2025-02-01", 50).lab("p1", "ggt", "2025-02-01", 60)
    (nonbone,) = fired(h, "2025-02-01", reverse=reverse)["ALP_NONBONE_CAUSE"]
    assert nonbone.evidence["alp"]["value_u_l"] == 140 and nonbone.evidence["ggt"]["value_u_l"] == 60
    assert nonbone.evidence["conflict"] == ("two ALPs at 2025-02-01 08:00: 140 and 120 U/L; the higher (140) is used; "
                                            "two GGTs at 2025-02-01 08:00: 60 and 50 U/L; the higher (60) is used")


def test_values_equal_at_reporting_precision_are_no_conflict_and_time_is_local():
    """1.2 and 1.204 mg/dL read the same (SPEC 10); the instant is shown in the hospital's zone."""
    settings = SETTINGS.model_copy(update={"site": SETTINGS.site.model_copy(update={"timezone": "Europe/Paris"})})
    h = History().person("p1", birth="1955-01-01", weight=70)
    h.scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "zoledronic_acid", "4.0")
    h.scr("p1", "2025-02-10", 1.2).scr("p1", "2025-02-10", 1.204)
    labs, events = h.frames()
    (band,) = [f for f in evaluate(labs, events, date(2025, 2, 10), settings) if f.rule == "DOSE_BAND"]
    assert "conflict" not in band.evidence
    h.scr("p1", "2025-02-11", 1.2).scr("p1", "2025-02-11", 1.1).scr("p1", "2025-02-11", 1.15)
    labs, events = h.frames()
    (band,) = [f for f in evaluate(labs, events, date(2025, 2, 11), settings) if f.rule == "DOSE_BAND"]
    assert band.evidence["conflict"] == ("three creatinines at 2025-02-11 09:00: 1.2, 1.15 and 1.1 mg/dL; "
                                         "the highest (1.2) is used")


def test_pre_dose_scr_missing_names_a_conflict_at_the_last_creatinine():
    h = History().person("p1").event("p1", "dental_exam", "2024-12-01")
    h.scr("p1", "2024-11-02", 1.1).scr("p1", "2024-11-02", 1.3).dose("p1", "2025-01-05", "pamidronate", "90")
    (missing,) = fired(h, "2025-01-05", reverse=True)["PRE_DOSE_SCR_MISSING"]
    assert missing.evidence["last_scr_before"] == {"value_mg_dl": 1.3, "date": "2024-11-02"}
    assert missing.evidence["conflict"] == "two creatinines at 2024-11-02 08:00: 1.3 and 1.1 mg/dL; the higher (1.3) is used"


def test_identical_duplicates_are_one_result():
    h = History().person("p1", weight=110).scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "pamidronate", "90")
    h.scr("p1", "2025-02-10", 1.6).scr("p1", "2025-02-10", 1.6)
    (hold,) = fired(h, "2025-02-10")["RENAL_HOLD"]
    assert hold.evidence["scr"]["value_mg_dl"] == 1.6 and "conflict" not in hold.evidence
