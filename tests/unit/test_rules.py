"""Table-driven boundary tests of the six first rules: exactly at the threshold, just below it,
and with missing data. Pure functions on tiny hand-built histories; no store, no clock."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bonewatch.config import load_settings
from bonewatch.rules import evaluate
from tests.unit.builders import History

SETTINGS = load_settings(env={})


def rules_fired(history: History, as_of: str) -> dict[str, list]:
    labs, events = history.frames()
    out: dict[str, list] = {}
    for f in evaluate(labs, events, date.fromisoformat(as_of), SETTINGS):
        out.setdefault(f.rule, []).append(f)
    return out


def renal_history(baseline: float, later: float, *, later_day: str = "2025-02-10", agent="pamidronate", mg="90"):
    h = History().person("p1", weight=110)
    h.scr("p1", "2025-01-03", baseline).dose("p1", "2025-01-05", agent, mg)
    h.scr("p1", later_day, later)
    return h


@pytest.mark.parametrize(("baseline", "later", "fires"), [
    (0.90, 1.40, True),    # 1.4 - 0.9 = 0.5 exactly (floating point says 0.4999...)
    (0.90, 1.39, False),   # just below
    (1.39, 1.89, True),    # normal baseline just under 1.4: needs 0.5
    (1.40, 2.40, True),    # exactly 1.4 counts as abnormal: rise 1.0 exactly
    (1.40, 2.39, False),   # abnormal baseline: 0.99 is not enough
    (1.40, 1.90, False),   # abnormal baseline: 0.5 is not enough
    (1.50, 2.49, False),
    (1.50, 2.50, True),
])
def test_renal_hold_threshold(baseline, later, fires):
    found = rules_fired(renal_history(baseline, later), "2025-02-10")
    assert ("RENAL_HOLD" in found) is fires
    if fires:
        hold = found["RENAL_HOLD"][0]
        assert hold.observed_on == date(2025, 2, 10)
        assert hold.evidence["baseline"]["scr_mg_dl"] == baseline


def test_renal_hold_needs_a_baseline_within_30_days():
    h = History().person("p1").scr("p1", "2024-12-05", 0.9).dose("p1", "2025-01-05", "pamidronate", "90")
    h.scr("p1", "2025-02-10", 2.0)
    assert "RENAL_HOLD" not in rules_fired(h, "2025-02-10")   # 31 days before: no baseline
    h2 = History().person("p1").scr("p1", "2024-12-06", 0.9).dose("p1", "2025-01-05", "pamidronate", "90")
    h2.scr("p1", "2025-02-10", 2.0)
    assert "RENAL_HOLD" in rules_fired(h2, "2025-02-10")      # 30 days before: the window's edge


def test_renal_hold_only_on_a_bisphosphonate():
    h = History().person("p1").scr("p1", "2025-01-03", 0.9).dose("p1", "2025-01-05", "denosumab", "120")
    h.scr("p1", "2025-02-10", 2.0)
    assert "RENAL_HOLD" not in rules_fired(h, "2025-02-10")


def test_renal_hold_not_after_course_lapsed():
    h = renal_history(0.9, 1.6, later_day="2025-07-05")   # 181 days after the only dose
    assert "RENAL_HOLD" not in rules_fired(h, "2025-07-05")
    h = renal_history(0.9, 1.6, later_day="2025-07-04")   # day 180: still on the course
    assert "RENAL_HOLD" in rules_fired(h, "2025-07-04")


def test_censored_creatinine_drives_only_when_the_bound_decides():
    assert "RENAL_HOLD" in rules_fired(renal_history(0.9, 1.5).scr("p1", "2025-02-11", 1.4, censor=">"), "2025-02-11")
    h = renal_history(0.9, 1.0)
    h.scr("p1", "2025-02-11", 3.0, censor="<")
    assert "RENAL_HOLD" not in rules_fired(h, "2025-02-11")


def test_preliminary_and_as_of_are_respected():
    h = renal_history(0.9, 1.0)
    h.scr("p1", "2025-02-11", 2.0, status="preliminary")
    assert "RENAL_HOLD" not in rules_fired(h, "2025-02-12")
    h = renal_history(0.9, 2.0, later_day="2025-02-12")
    assert "RENAL_HOLD" not in rules_fired(h, "2025-02-11")   # not collected yet on that night


@pytest.mark.parametrize(("resume_value", "resumes"), [(1.10, True), (1.11, False), (0.80, True)])
def test_renal_resume_within_10_percent(resume_value, resumes):
    h = renal_history(1.0, 1.6)
    h.scr("p1", "2025-02-20", resume_value)
    found = rules_fired(h, "2025-02-20")
    assert ("RENAL_RESUME" in found) is resumes
    assert ("RENAL_HOLD" in found) is not resumes
    if resumes:
        assert found["RENAL_RESUME"][0].episode == "course 2025-01-05; hold 2025-02-10"


def test_hold_lasts_until_resume_even_if_scr_dips_below_threshold():
    h = renal_history(1.0, 1.6)
    h.scr("p1", "2025-02-15", 1.3)   # below the hold threshold but above 1.1 x baseline
    found = rules_fired(h, "2025-02-15")
    assert "RENAL_HOLD" in found and found["RENAL_HOLD"][0].observed_on == date(2025, 2, 10)


def dose_band_history(scr_later: float, *, mg: str = "4.0", weight: float | None = 70, sex="M"):
    h = History().person("p1", birth="1955-01-01", sex=sex, weight=weight)
    h.scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "zoledronic_acid", mg)
    h.scr("p1", "2025-02-10", scr_later)
    return h


@pytest.mark.parametrize(("scr", "fires", "target"), [
    (1.13, False, None),        # CrCl (140-70)*70/(72*1.13) = 60.2 -> still > 60
    (1.134, True, "3.5 mg"),     # 60.0 -> 50-60 band (inclusive 60)
    (1.20, True, "3.5 mg"),      # 56.7
    (1.36, True, "3.5 mg"),     # 50.0 exactly: 50-60 band
    (1.37, True, "3.3 mg"),     # 49.7
    (1.49, True, "3.3 mg"),     # 45.7, and a rise of 0.49 is no hold
])
def test_dose_band(scr, fires, target):
    found = rules_fired(dose_band_history(scr), "2025-02-10")
    assert ("DOSE_BAND" in found) is fires
    if fires:
        assert found["DOSE_BAND"][0].evidence["target_dose"] == target


def test_dose_band_dose_tolerance_and_missing_weight():
    assert "DOSE_BAND" not in rules_fired(dose_band_history(1.20, mg="3.46"), "2025-02-10")  # within 0.05
    assert "DOSE_BAND" in rules_fired(dose_band_history(1.20, mg="3.44"), "2025-02-10")      # 0.06 away
    # no weight within 90 days: CrCl is not computed and the rule does not guess
    assert "DOSE_BAND" not in rules_fired(dose_band_history(1.20, weight=None), "2025-02-10")


def test_dose_band_at_first_dose_uses_baseline_crcl_and_female_factor():
    h = History().person("p1", birth="1955-01-01", sex="F", weight=70)
    h.scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "zoledronic_acid", "4.0")
    found = rules_fired(h, "2025-01-05")   # 68.1 x 0.85 = 57.8 -> 3.5 mg
    assert found["DOSE_BAND"][0].evidence["crcl"]["value_ml_min"] == 57.8
    assert "DOSE_BAND" not in rules_fired(h, "2025-01-04")   # no course yet


def test_demographics_delivered_after_the_night_hold_for_it():
    """SPEC 2.5: a Patient loaded today (birth date and sex stamped with today) still gives every
    earlier night its CrCl; cut off by the night, a backfill had no CrCl and DOSE_BAND went silent."""
    h = History().event("p1", "weight_kg", "2025-01-01", "70")
    h.event("p1", "birth_date", "2026-06-01", "1955-01-01").event("p1", "sex", "2026-06-01", "F")
    h.scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "zoledronic_acid", "4.0")
    found = rules_fired(h, "2025-01-05")   # 68.1 x 0.85 = 57.8 -> 3.5 mg
    assert found["DOSE_BAND"][0].evidence["crcl"]["value_ml_min"] == 57.8


@pytest.mark.parametrize("reverse", [False, True])
def test_a_later_demographic_delivery_corrects_every_night(reverse):
    """The latest delivery by occurred_at wins, even one after the night; at one instant the value
    breaks the tie. Row order never matters."""
    h = History().event("p1", "weight_kg", "2025-01-01", "70").event("p1", "sex", "2020-01-01", "M")
    h.event("p1", "birth_date", "2020-01-01", "1955-01-01")
    h.event("p1", "birth_date", "2026-01-01", "1940-06-01").event("p1", "birth_date", "2026-01-01", "1945-01-01")
    h.scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "zoledronic_acid", "4.0")
    labs, events = h.frames()
    if reverse:
        labs, events = labs[::-1], events[::-1]
    (band,) = [f for f in evaluate(labs, events, date(2025, 1, 5), SETTINGS) if f.rule == "DOSE_BAND"]
    assert band.evidence["crcl"]["age_years"] == 80 and band.evidence["crcl"]["value_ml_min"] == 58.3


@pytest.mark.parametrize(("weight", "target"), [(40, "3.0 mg"), (30, "not recommended")])
def test_dose_band_low_bands_at_first_dose(weight, target):
    h = History().person("p1", birth="1955-01-01", sex="M", weight=weight)
    h.scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "zoledronic_acid", "4.0")
    finding = rules_fired(h, "2025-01-05")["DOSE_BAND"][0]   # CrCl 38.9 and 29.2
    assert finding.evidence["target_dose"] == target


def test_dose_band_silent_while_held():
    h = dose_band_history(1.0)
    h.scr("p1", "2025-02-11", 1.5)   # rise 0.5: held, and CrCl changed band
    found = rules_fired(h, "2025-02-11")
    assert "RENAL_HOLD" in found and "DOSE_BAND" not in found


def alp_history(later: float, day_offset: int, regimen: str = "bortezomib"):
    start = pd.Timestamp("2025-01-10")
    h = History().event("p1", "myeloma_therapy_start", "2025-01-10", regimen)
    h.lab("p1", "alp", "2025-01-07", 100)
    h.lab("p1", "alp", (start + pd.Timedelta(days=day_offset)).date().isoformat(), later)
    return h


@pytest.mark.parametrize(("value", "offset", "fires"), [
    (125.0, 42, True), (124.9, 42, False), (125.0, 43, False), (150, 10, True),
])
def test_alp_rise_bortezomib(value, offset, fires):
    found = rules_fired(alp_history(value, offset), "2025-03-31")
    assert ("ALP_RISE_BORTEZOMIB" in found) is fires


def test_alp_rise_needs_bortezomib_and_a_baseline():
    assert "ALP_RISE_BORTEZOMIB" not in rules_fired(alp_history(150, 20, regimen="lenalidomide"), "2025-03-31")
    h = History().event("p1", "myeloma_therapy_start", "2025-01-10", "bortezomib")
    h.lab("p1", "alp", "2024-12-10", 100).lab("p1", "alp", "2025-02-01", 150)   # baseline 31 days before
    assert "ALP_RISE_BORTEZOMIB" not in rules_fired(h, "2025-03-31")


def review_history(first: str, months: int, stop: str | None = None):
    h = History()
    for day in pd.date_range(first, periods=months + 1, freq="28D"):
        h.dose("p1", day.date().isoformat(), "pamidronate", "90")
    if stop:
        h.event("p1", "bisphosphonate_stop", stop, "pamidronate")
    return h


@pytest.mark.parametrize(("as_of", "rule"), [
    ("2025-01-14", None), ("2025-01-15", "REVIEW_1Y"), ("2026-01-14", "REVIEW_1Y"), ("2026-01-15", "REVIEW_2Y"),
])
def test_reviews(as_of, rule):
    found = rules_fired(review_history("2024-01-15", 30), as_of)
    reviews = {r for r in found if r.startswith("REVIEW")}
    assert reviews == ({rule} if rule else set())


def test_review_month_end_clamp_and_stop():
    # 12 months after 29 February 2024 is 28 February 2025
    assert "REVIEW_1Y" in rules_fired(review_history("2024-02-29", 14), "2025-02-28")
    assert "REVIEW_1Y" not in rules_fired(review_history("2024-02-29", 14), "2025-02-27")
    assert "REVIEW_1Y" not in rules_fired(review_history("2024-01-15", 14, stop="2025-01-10"), "2025-01-20")


def test_restart_after_stop_rebaselines():
    h = History().person("p1", weight=110)
    h.scr("p1", "2025-01-03", 0.9).dose("p1", "2025-01-05", "pamidronate", "90")
    h.event("p1", "bisphosphonate_stop", "2025-02-01", "pamidronate")
    h.scr("p1", "2025-03-01", 1.3).dose("p1", "2025-03-02", "pamidronate", "90")
    h.scr("p1", "2025-03-20", 1.5)   # 0.6 over the old baseline, 0.2 over the new one
    assert "RENAL_HOLD" not in rules_fired(h, "2025-03-20")


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.floats(0.5, 4.0).map(lambda v: round(v, 2)), min_size=1, max_size=8),
       seed=st.integers(0, 1000))
def test_row_order_never_matters_and_hold_implies_threshold(values, seed):
    h = History().person("p1", weight=80).scr("p1", "2025-01-03", 1.0).dose("p1", "2025-01-05", "pamidronate", "90")
    for i, v in enumerate(values):
        h.scr("p1", (pd.Timestamp("2025-01-10") + pd.Timedelta(days=i)).date().isoformat(), v)
    labs, events = h.frames()
    as_of = date(2025, 2, 1)
    base = evaluate(labs, events, as_of, SETTINGS)
    shuffled = evaluate(labs.sample(frac=1, random_state=seed), events.sample(frac=1, random_state=seed),
                        as_of, SETTINGS)
    assert [(f.alert_id, f.observed_on) for f in base] == [(f.alert_id, f.observed_on) for f in shuffled]
    for f in base:
        if f.rule == "RENAL_HOLD":
            assert f.evidence["scr"]["rise_mg_dl"] >= 0.5


def test_empty_history_gives_no_findings():
    assert rules_fired(History(), "2025-01-01") == {}
