"""Table-driven tests of the monitoring, ALP, calcium and albuminuria rules (SPEC 5 and 10):
exactly at each threshold, just inside, just outside, and with missing data."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from bonewatch.rules import evaluate
from tests.unit.builders import History
from tests.unit.test_rules import SETTINGS, rules_fired


def on_pamidronate(first="2025-01-05", scr_day="2025-01-03"):
    h = History().person("p1", weight=80)
    h.scr("p1", scr_day, 0.9).event("p1", "dental_exam", "2024-12-01")
    return h.dose("p1", first, "pamidronate", "90")


# ---- PRE_DOSE_SCR_MISSING --------------------------------------------------------------------

@pytest.mark.parametrize(("scr_day", "fires"), [
    ("2024-12-29", False),   # dose day - 7: inside the window
    ("2024-12-28", True),    # dose day - 8: outside
    ("2025-01-05", False),   # the dose day itself counts
    (None, True),            # no creatinine at all
])
def test_pre_dose_scr(scr_day, fires):
    h = History().person("p1").event("p1", "dental_exam", "2024-12-01")
    if scr_day:
        h.scr("p1", scr_day, 0.9)
    h.dose("p1", "2025-01-05", "pamidronate", "90")
    found = rules_fired(h, "2025-01-05")
    assert ("PRE_DOSE_SCR_MISSING" in found) is fires
    if fires:
        assert found["PRE_DOSE_SCR_MISSING"][0].episode == "dose 2025-01-05"


@pytest.mark.parametrize(("earlier", "said"), [
    (True, "no serum creatinine in the 7 days before the dose (2024-12-29 to 2025-01-05); the last before it "
           "was 1.10 mg/dL on 2022-01-02."),
    (False, "no serum creatinine in the 7 days before the dose (2024-12-29 to 2025-01-05); no creatinine "
            "before the dose is on file."),
])
def test_pre_dose_scr_names_the_last_creatinine_before_the_dose(earlier, said):
    """Issue 13: it took the latest creatinine overall (one after the dose) and said that no earlier
    one was on file while one from years before was stored."""
    h = History().person("p1").event("p1", "dental_exam", "2024-12-01")
    if earlier:
        h.scr("p1", "2021-12-30", 0.95).scr("p1", "2022-01-02", 1.1)
    h.dose("p1", "2025-01-05", "pamidronate", "90").scr("p1", "2025-01-10", 0.9)
    (found,) = rules_fired(h, "2025-01-10")["PRE_DOSE_SCR_MISSING"]
    assert found.evidence["summary"] == "Pamidronate was given on 2025-01-05: " + said
    assert found.evidence["last_scr_before"] == ({"value_mg_dl": 1.1, "date": "2022-01-02"} if earlier else None)


def test_pre_dose_scr_not_for_denosumab():
    h = History().person("p1").event("p1", "dental_exam", "2024-12-01").dose("p1", "2025-01-05", "denosumab", "120")
    assert "PRE_DOSE_SCR_MISSING" not in rules_fired(h, "2025-01-05")


# ---- DENTAL_EXAM_MISSING ---------------------------------------------------------------------

@pytest.mark.parametrize(("exam", "agent", "fires"), [
    ("2024-07-05", "pamidronate", False),   # exactly 6 calendar months before
    ("2024-07-04", "pamidronate", True),    # one day more
    ("2025-01-05", "pamidronate", False),   # the same day
    (None, "denosumab", True),              # denosumab too (ONJ)
    ("2024-07-04", "zoledronic_acid", True),
])
def test_dental_exam(exam, agent, fires):
    h = History().person("p1").scr("p1", "2025-01-03", 0.9)
    if exam:
        h.event("p1", "dental_exam", exam)
    h.dose("p1", "2025-01-05", agent, {"pamidronate": "90", "denosumab": "120"}.get(agent, "4.0"))
    found = rules_fired(h, "2025-01-05")
    assert ("DENTAL_EXAM_MISSING" in found) is fires


def test_dental_exam_month_end_clamp():
    # 6 months before 31 August is 28 February (2025): an exam that day counts
    h = History().person("p1").scr("p1", "2025-08-30", 0.9).event("p1", "dental_exam", "2025-02-28")
    h.dose("p1", "2025-08-31", "pamidronate", "90")
    assert "DENTAL_EXAM_MISSING" not in rules_fired(h, "2025-08-31")


# ---- URINE_ALBUMIN_DUE -----------------------------------------------------------------------

def monthly(h: History, first: str, n: int, agent="pamidronate"):
    for day in pd.date_range(first, periods=n, freq="28D"):
        d = day.date().isoformat()
        h.scr("p1", (day - pd.Timedelta(days=2)).date().isoformat(), 0.9).dose("p1", d, agent, "90")
    return h


@pytest.mark.parametrize(("result_day", "as_of", "fires"), [
    (None, "2025-07-04", False),           # course not yet 6 months old (started 2025-01-05)
    (None, "2025-07-05", True),            # 6 months old, never tested
    ("2025-01-20", "2025-07-20", False),   # exactly 6 months back: still inside the window
    ("2025-01-20", "2025-07-21", True),
])
def test_urine_albumin_due(result_day, as_of, fires):
    h = monthly(History().person("p1").event("p1", "dental_exam", "2024-12-01"), "2025-01-05", 8)
    if result_day:
        h.event("p1", "albuminuria_mg_24h", result_day, "120")
    assert ("URINE_ALBUMIN_DUE" in rules_fired(h, as_of)) is fires


@pytest.mark.parametrize("result_day", [None, "2025-01-20"])
def test_urine_albumin_due_evidence_does_not_depend_on_the_night(result_day):
    """Incremental nights carry a finding over without recomputing it: its words come from the data."""
    h = monthly(History().person("p1").event("p1", "dental_exam", "2024-12-01"), "2025-01-05", 8)
    if result_day:
        h.event("p1", "albuminuria_mg_24h", result_day, "120")
    (first,) = rules_fired(h, "2025-07-25")["URINE_ALBUMIN_DUE"]
    (later,) = rules_fired(h, "2025-08-20")["URINE_ALBUMIN_DUE"]
    assert first.alert_id == later.alert_id and first.evidence == later.evidence
    assert ("the last urine albumin result was on 2025-01-20" if result_day else "no urine albumin result on file") \
        in first.evidence["summary"]


@pytest.mark.parametrize("analyte", ["urine_albumin_spot", "urine_albumin_ratio"])
def test_urine_albumin_spot_test_counts(analyte):
    # an albumin/creatinine ratio (14959-1, mg/g) is its own analyte now: a ratio is not a mg/L
    # concentration; it counts as a result, and never against the 24-h limit
    h = monthly(History().person("p1").event("p1", "dental_exam", "2024-12-01"), "2025-01-05", 8)
    h.lab("p1", analyte, "2025-06-01", 900)
    found = rules_fired(h, "2025-07-20")
    assert "URINE_ALBUMIN_DUE" not in found and "ALBUMINURIA" not in found


# ---- ALBUMINURIA -----------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "fires"), [("500", False), ("501", True), ("1200", True)])
def test_albuminuria(value, fires):
    h = on_pamidronate().event("p1", "albuminuria_mg_24h", "2025-02-01", value)
    assert ("ALBUMINURIA" in rules_fired(h, "2025-02-01")) is fires


def test_albuminuria_hold_ends_at_or_below_limit_and_blocks_dose_band():
    h = History().person("p1", birth="1955-01-01", weight=70).event("p1", "dental_exam", "2024-12-01")
    h.scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "zoledronic_acid", "4.0")
    h.event("p1", "albuminuria_mg_24h", "2025-02-01", "800")
    h.scr("p1", "2025-02-02", 1.2)   # CrCl 56.7: a band change, but the course is held
    found = rules_fired(h, "2025-02-02")
    assert "ALBUMINURIA" in found and "DOSE_BAND" not in found
    h.event("p1", "albuminuria_mg_24h", "2025-02-20", "500")
    found = rules_fired(h, "2025-02-20")
    assert "ALBUMINURIA" not in found and "DOSE_BAND" in found


def test_albuminuria_only_on_a_bisphosphonate():
    h = History().person("p1").event("p1", "dental_exam", "2024-12-01").dose("p1", "2025-01-05", "denosumab", "120")
    h.event("p1", "albuminuria_mg_24h", "2025-02-01", "900")
    assert "ALBUMINURIA" not in rules_fired(h, "2025-02-01")


# ---- HYPOCALCEMIA ----------------------------------------------------------------------------

@pytest.mark.parametrize(("calcium", "albumin", "albumin_day", "fires", "compared", "corrected"), [
    (8.9, 3.5, "2025-02-01", False, 9.30, True),
    (8.1, 3.5, "2025-02-01", False, 8.50, True),    # exactly 8.50 is not below
    (8.09, 3.5, "2025-02-01", True, 8.49, True),
    (8.0, 3.6, "2025-02-03", True, 8.32, True),     # albumin 2 days later still counts
    (8.4, 2.0, "2025-02-04", True, 8.40, False),    # 3 days: uncorrected
    (8.6, 2.0, "2025-02-04", False, 8.60, False),
    (8.4, 4.4, "2025-02-03", True, 8.40, False),    # albumin not below 4.0: the measured calcium
])
def test_hypocalcemia(calcium, albumin, albumin_day, fires, compared, corrected):
    h = on_pamidronate().lab("p1", "calcium", "2025-02-01", calcium).lab("p1", "albumin", albumin_day, albumin)
    found = rules_fired(h, "2025-02-04")
    assert ("HYPOCALCEMIA" in found) is fires
    if fires:
        evidence = found["HYPOCALCEMIA"][0].evidence
        assert evidence["corrected_mg_dl"] == compared
        assert evidence["corrected"] is corrected


def test_hypocalcemia_high_albumin_does_not_correct_a_normal_calcium_down():
    """The false alarm of issue 13: 9.5 + 0.8 x (4.0 - 5.4) = 8.38 fired a high-severity alert."""
    h = on_pamidronate().lab("p1", "calcium", "2025-02-01", 9.5).lab("p1", "albumin", "2025-02-01", 5.4)
    assert "HYPOCALCEMIA" not in rules_fired(h, "2025-02-01")


@pytest.mark.parametrize(("albumin", "fires", "corrected"), [
    (4.0, True, False),    # exactly 4.0: not below it, the measured 8.45 is compared
    (3.9, False, True),    # below 4.0: 8.45 + 0.8 x 0.1 = 8.53
])
def test_hypocalcemia_corrects_only_below_albumin_4(albumin, fires, corrected):
    h = on_pamidronate().lab("p1", "calcium", "2025-02-01", 8.45).lab("p1", "albumin", "2025-02-01", albumin)
    found = rules_fired(h, "2025-02-01")
    assert ("HYPOCALCEMIA" in found) is fires
    if fires:
        evidence = found["HYPOCALCEMIA"][0].evidence
        assert evidence["corrected"] is corrected and evidence["corrected_mg_dl"] == 8.45
        assert evidence["albumin"] == {"value_g_dl": 4.0, "date": "2025-02-01"}
        assert evidence["arithmetic"] == "albumin 4.0 g/dL is not below 4.0: the measured calcium is used"
        assert "albumin 4.0 g/dL on 2025-02-01 is not below 4.0 g/dL: the measured calcium is used" \
            in evidence["summary"]


def test_hypocalcemia_nearest_albumin_later_on_tie_and_denosumab():
    h = History().person("p1").event("p1", "dental_exam", "2024-12-01").dose("p1", "2025-01-05", "denosumab", "120")
    h.lab("p1", "calcium", "2025-02-02", 8.3)
    h.lab("p1", "albumin", "2025-02-01", 4.6).lab("p1", "albumin", "2025-02-03", 3.8)   # equally near: the later
    found = rules_fired(h, "2025-02-03")
    assert found["HYPOCALCEMIA"][0].evidence["corrected_mg_dl"] == 8.46


def test_hypocalcemia_needs_an_agent_and_the_latest_value():
    h = History().person("p1").lab("p1", "calcium", "2025-02-01", 7.5)
    assert "HYPOCALCEMIA" not in rules_fired(h, "2025-02-01")
    h = on_pamidronate().lab("p1", "calcium", "2025-02-01", 7.5).lab("p1", "calcium", "2025-02-10", 9.2)
    assert "HYPOCALCEMIA" not in rules_fired(h, "2025-02-10")


# ---- MGUS_ON_BISPHOSPHONATE ------------------------------------------------------------------

@pytest.mark.parametrize(("diagnoses", "fires"), [
    (["MGUS"], True), (["SMM"], True), (["MGUS", "MM"], False), (["MGUS", "osteoporosis"], False), (["MM"], False),
])
def test_mgus(diagnoses, fires):
    h = on_pamidronate()
    for dx in diagnoses:
        h.event("p1", "diagnosis", "2024-06-01", dx)
    assert ("MGUS_ON_BISPHOSPHONATE" in rules_fired(h, "2025-01-05")) is fires


# ---- ALP_ELEVATED_START / ALP_MONITOR_DUE / ALP_NONBONE_CAUSE ---------------------------------

def therapy(alp_baseline: float, start="2025-01-10"):
    return History().event("p1", "myeloma_therapy_start", start, "bortezomib").lab("p1", "alp", "2025-01-08", alp_baseline)


@pytest.mark.parametrize(("baseline", "dose_day", "as_of", "fires"), [
    (131, None, "2025-02-10", True),           # start + 31: the first night after the 30 days
    (131, None, "2025-02-09", False),          # start + 30: still inside the window
    (130, None, "2025-02-10", False),          # exactly the upper limit of normal
    (131, "2025-02-09", "2025-02-10", False),  # a dose on day 30
])
def test_alp_elevated_start(baseline, dose_day, as_of, fires):
    h = therapy(baseline)
    if dose_day:
        h.scr("p1", "2025-02-08", 0.9).dose("p1", dose_day, "zoledronic_acid", "4.0")
    found = rules_fired(h, as_of)
    assert ("ALP_ELEVATED_START" in found) is fires
    if fires:
        assert found["ALP_ELEVATED_START"][0].observed_on.isoformat() == "2025-02-10"


def test_alp_elevated_start_not_when_already_on_a_bisphosphonate():
    h = therapy(200).scr("p1", "2024-12-01", 0.9).dose("p1", "2024-12-03", "pamidronate", "90")
    assert "ALP_ELEVATED_START" not in rules_fired(h, "2025-03-01")


@pytest.mark.parametrize(("alp_day", "as_of", "fires"), [
    (None, "2025-04-24", False),          # 3 months = 2025-04-10; window closes after 04-24
    (None, "2025-04-25", True),
    ("2025-04-24", "2025-04-25", False),  # an ALP on due + 14 is inside
    ("2025-03-27", "2025-04-25", False),  # due - 14 is inside
    ("2025-03-26", "2025-04-25", True),   # due - 15 is not
])
def test_alp_monitor_due(alp_day, as_of, fires):
    h = therapy(150)
    if alp_day:
        h.lab("p1", "alp", alp_day, 140)
    found = rules_fired(h, as_of)
    assert ("ALP_MONITOR_DUE" in found) is fires


def test_alp_monitor_due_only_for_elevated_baseline_and_at_six_months():
    assert "ALP_MONITOR_DUE" not in rules_fired(therapy(120), "2025-05-01")
    found = rules_fired(therapy(150).lab("p1", "alp", "2025-04-10", 140), "2025-07-25")   # 6 months: 07-10
    assert [f.episode for f in found["ALP_MONITOR_DUE"]] == ["therapy 2025-01-10; month 6"]


@pytest.mark.parametrize(("alp", "ggt", "ggt_day", "as_of", "fires"), [
    (140, 56, "2025-02-08", "2025-02-08", True),
    (140, 55, "2025-02-08", "2025-02-08", False),    # GGT exactly at its limit
    (130, 80, "2025-02-08", "2025-02-08", False),    # ALP exactly at its limit
    (140, 80, "2025-02-09", "2025-02-09", False),    # 8 days apart
    (140, 80, "2025-01-25", "2025-02-01", True),     # 7 days before the ALP
    (140, 80, "2025-02-01", "2025-03-04", False),    # the ALP is more than 30 days old
])
def test_alp_nonbone(alp, ggt, ggt_day, as_of, fires):
    h = History().lab("p1", "alp", "2025-02-01", alp).lab("p1", "ggt", ggt_day, ggt)
    assert ("ALP_NONBONE_CAUSE" in rules_fired(h, as_of)) is fires


def test_alp_alert_with_nonbone_cause_carries_the_hepatic_note():
    h = therapy(100).lab("p1", "alp", "2025-02-01", 140).lab("p1", "ggt", "2025-02-01", 90)
    found = rules_fired(h, "2025-02-01")
    assert "ALP_NONBONE_CAUSE" in found
    assert "hepatic" in found["ALP_RISE_BORTEZOMIB"][0].evidence["note"]
    assert "liver disease" in found["ALP_RISE_BORTEZOMIB"][0].evidence["caveat"]


def test_alp_nonbone_names_the_latest_high_ggt_by_time():
    """Two high GGTs on the ALP's day: the evidence names the later one by collection time (sorted by
    day alone, the pick among them was the sort's)."""
    h = History()
    for i in range(40):
        h.lab(f"p{i:02d}", "alp", "2025-02-01", 140).lab(f"p{i:02d}", "ggt", "2025-02-01", 90)
        h.lab(f"p{i:02d}", "ggt", "2025-02-01", 70)
    labs, events = h.frames()
    labs.loc[labs.index[2::3], "collected_at"] = pd.Timestamp("2025-02-01 15:00")   # the 70s, later that day
    found = [f for f in evaluate(labs, events, date(2025, 2, 1), SETTINGS) if f.rule == "ALP_NONBONE_CAUSE"]
    assert len(found) == 40 and {f.evidence["ggt"]["value_u_l"] for f in found} == {70}


def test_albuminuria_names_the_result_over_the_limit_not_the_first_of_its_day():
    h = on_pamidronate().event("p1", "albuminuria_mg_24h", "2025-02-01", "300")   # 00:00
    h.lab("p1", "urine_albumin_24h", "2025-02-01", 800)                           # 08:00
    (found,) = rules_fired(h, "2025-02-01")["ALBUMINURIA"]
    assert found.evidence["first_over"] == {"value_mg_24h": 800, "date": "2025-02-01"}
    assert found.evidence["summary"].startswith("Urine albumin 800 mg/24 h on 2025-02-01 is above 500 mg/24 h")


@pytest.mark.parametrize("values", [("1200", "300"), ("300", "1200")])
def test_albuminuria_two_results_at_one_instant_the_higher_counts(values):
    """Events sorted by their text value put '1200' before '300': the 300 came last and cleared the hold."""
    h = on_pamidronate()
    for value in values:
        h.event("p1", "albuminuria_mg_24h", "2025-02-01", value)
    (found,) = rules_fired(h, "2025-02-01")["ALBUMINURIA"]
    assert found.evidence["first_over"]["value_mg_24h"] == 1200
