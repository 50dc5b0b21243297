"""Synthetic cohort generator: an independent ground truth for the rule engine.

`generate()` writes a cohort of myeloma patients on bisphosphonates in the canonical input formats
(SPEC 2.1 lab CSV, SPEC 2.4 events CSV), split into a history delivery and one inbox folder per
night, and writes down which alerts the rules must raise and on which night
(`expected_alerts.jsonl`). Each patient carries exactly one scenario: clean background data, or a
clinical situation planted with explicit numbers at (or just short of) a threshold. Every rule of
SPEC section 5 is planted, with near misses that must stay quiet; the readings of SPEC 10 the
ground truth assumes are written down below ("Semantics the ground truth assumes").

This module deliberately does not import `bonewatch.rules`: a ground truth computed by the code
under test would prove nothing. The few clinical formulas it needs (Cockcroft-Gault, zoledronic
acid dose bands, calendar months, corrected calcium) are re-implemented here from SPEC sections 4,
5 and 10.
"""

from __future__ import annotations

import calendar
import csv
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

__all__ = [
    "EVENT_HEADER",
    "LAB_HEADER",
    "SCENARIOS",
    "add_months",
    "age_on",
    "crcl",
    "generate",
    "zoledronic_dose",
]

LAB_HEADER = ("patient_id", "result_id", "loinc", "value", "unit", "collected_at", "status")
EVENT_HEADER = ("patient_id", "event_type", "occurred_at", "value", "detail")

SCENARIOS = (
    "background",
    "renal_hold_at_threshold",
    "renal_hold_near_miss",
    "renal_hold_abnormal_baseline",
    "renal_hold_abnormal_near_miss",
    "renal_resume",
    "renal_resume_near_miss",
    "dose_band_change",
    "dose_band_near_miss",
    "dose_band_first_dose",
    "alp_rise_bortezomib",
    "alp_rise_near_miss",
    "alp_rise_not_bortezomib",
    "review_1y",
    "review_2y",
    "pre_dose_scr_missing",
    "pre_dose_scr_near_miss",
    "alp_elevated_start",
    "alp_elevated_start_uln",
    "alp_elevated_start_dose_day_30",
    "alp_elevated_start_on_course",
    "alp_monitor_due_3m",
    "alp_monitor_due_6m",
    "alp_monitor_window_edge",
    "alp_nonbone_cause",
    "alp_nonbone_cause_7_days",
    "alp_nonbone_ggt_55",
    "alp_nonbone_alp_130",
    "alp_nonbone_8_days",
    "hypocalcemia",
    "hypocalcemia_near_miss",
    "hypocalcemia_uncorrected",
    "hypocalcemia_albumin_2_days",
    "hypocalcemia_albumin_tie",
    "hypocalcemia_denosumab",
    "hypocalcemia_off_agent",
    "mgus_on_bisphosphonate",
    "smm_on_bisphosphonate",
    "mgus_with_osteoporosis",
    "mgus_progressed_to_mm",
    "mgus_on_denosumab",
    "dental_exam_missing",
    "dental_exam_near_miss",
    "dental_exam_missing_denosumab",
    "dental_exam_missing_new_course",
    "albuminuria",
    "albuminuria_near_miss",
    "urine_albumin_due",
    "urine_albumin_due_near_miss",
    "urine_albumin_due_new_course",
    "urine_albumin_spot_tests",
    "denosumab_course",
)
PLANTED = SCENARIOS[1:]
# Planted first in any cohort: together they raise every rule of SPEC 5, so even a small cohort
# (>= len(COVERING) patients) plants each rule at least once.
COVERING = (
    "renal_resume", "dose_band_change", "alp_rise_bortezomib", "review_2y",
    "pre_dose_scr_missing", "alp_elevated_start", "alp_monitor_due_3m", "alp_nonbone_cause",
    "hypocalcemia", "mgus_on_bisphosphonate", "dental_exam_missing", "albuminuria",
    "urine_albumin_due",
)
# After every planted scenario has appeared once, patients cycle over this many background slots
# per round of planted ones: about half the cohort is background in a large cohort.
BACKGROUND_PER_ROUND = 50
MIN_NIGHTS = 14  # renal_resume needs a hold and a resume a week apart, both inside the window

SCR, SCR_SI, ALP, CA, ALB, GGT, WEIGHT = (
    "2160-0", "14682-9", "6768-6", "17861-6", "1751-7", "2324-2", "29463-7",
)
URINE_ACR = "14959-1"   # albumin/creatinine ratio in urine (a spot test), mg/g
ZOL, PAM, DEN = "zoledronic_acid", "pamidronate", "denosumab"
DOSE_MG = {ZOL: 4.0, PAM: 90.0, DEN: 120.0}
DOSE_INTERVAL = 28
PAMIDRONATE_MG = DOSE_MG[PAM]
ALP_ULN, GGT_ULN, URINE_ALBUMIN_MAX = 130.0, 55, 500
BAD_ROW_SHARE = 0.01
BAD_KINDS = ("missing_value", "non_numeric", "impossible_date", "unconvertible_unit")

# --- Semantics the ground truth assumes ------------------------------------------------------------
# SPEC 5 and 10 leave some details open. `expected_alerts.jsonl` assumes the readings below; the
# planted data stay away from every case where two plausible readings would disagree, unless that
# case is the scenario's point (the unit tests check the calendar readings both ways).
# - raised_on is the first night the finding holds on the data delivered up to that night (a
#   night's inbox holds what was collected or happened that day), never before the first night.
#   Planted findings all begin between first night + 2 and last night - 2.
# - "On" an agent (SPEC 10): a course of that class is active or held on the night: a dose on or
#   before it, the latest at most 180 days before. No scenario sits on the 180-day edge.
# - PRE_DOSE_SCR_MISSING: per zoledronic acid or pamidronate dose (never denosumab); a usable SCr
#   collected on any calendar day from dose day - 7 to the dose day counts (planted SCr are drawn in
#   the morning, doses given at 14:00); raised on the dose day; one finding per dose.
# - ALP_ELEVATED_START: baseline ALP (SPEC 4) strictly above 130 U/L, compared in whole U/L (131
#   fires, 130 does not). A bisphosphonate course is active at therapy start when a bisphosphonate
#   dose fell on the start day or in the 180 days before it. A dose on start + 1 .. start + 30
#   prevents the finding; one on start + 31 or later does not. Raised on start + 31. Whether a
#   denosumab start would count is not planted.
# - ALP_MONITOR_DUE: due = therapy start + 3 and + 6 calendar months (clamped at month end, start
#   days 29-31 are planted); any total ALP collected from due - 14 to due + 14 inclusive satisfies
#   it; one finding per missed milestone, raised on due + 15.
# - ALP_NONBONE_CAUSE: on a night, the latest total ALP (by collection time) if collected on
#   night - 30 .. night, strictly above 130, and any GGT strictly above 55 collected within 7
#   calendar days of that ALP, before or after it, and delivered by the night. Raised on the later
#   of the two days. The planted data never put a normal GGT closer to the ALP than the high one,
#   so a "nearest GGT" reading agrees. The finding ends when a newer ALP is normal.
# - HYPOCALCEMIA: on any agent (denosumab included); the latest calcium by collection time,
#   corrected with the albumin nearest in time within 2 days before or after it (later one on a
#   tie) when that albumin is below 4.0 g/dL, rounded to 0.01, strictly below 8.5; with no albumin
#   within 2 days, or one at or above 4.0, the measured calcium is compared. Planted calcium and albumin share one clock time, so 48 hours and 2 calendar days
#   agree. Raised on the calcium's day, or on the day of a later albumin that completes it.
#   The finding ends when a newer calcium is normal.
# - MGUS_ON_BISPHOSPHONATE: an events `diagnosis` MGUS or SMM, no MM diagnosis and no osteoporosis
#   diagnosis recorded on or before the night, and a zoledronic acid or pamidronate dose on or
#   before it (denosumab does not count). Raised on the later of the diagnosis day and the first
#   such dose (planted: the first dose, inside the window, the diagnosis months before).
# - DENTAL_EXAM_MISSING: the first dose of a course of any agent (no same-class dose in the 180
#   days before it), with no `dental_exam` event from dose day - 6 calendar months to the dose day;
#   raised on the dose day. Planted first doses fall on day-of-month <= 28, so "exam + 6 months >=
#   dose day" gives the same answer (the exam exactly 6 months before counts).
# - ALBUMINURIA: an events `albuminuria_mg_24h` strictly above 500 mg/24 h collected while on
#   zoledronic acid or pamidronate; raised on the result's day; the hold ends with a later result
#   <= 500 (the generator gives no dose during the hold). Spot tests never drive it.
# - URINE_ALBUMIN_DUE: on zoledronic acid or pamidronate, the current course started at least 6
#   calendar months before the night (start + 6 months <= night), and no urine albumin result (an
#   events `albuminuria_mg_24h`, or a lab 14957-5 / 2862-1 / 14959-1) collected from night - 6
#   months to the night. Raised on the first such night; a new result ends it. Planted dates are
#   chosen so "result + 6 months >= night" agrees with "result >= night - 6 months".
# - Denosumab: only DENTAL_EXAM_MISSING and HYPOCALCEMIA concern it; `denosumab_course` gives
#   every other rule a reason to fire if it wrongly did (no pre-dose SCr, an SCr rise of 0.6 mg/dL,
#   a 24-h urine albumin of 900 mg, a course past 12 months, no urine albumin for months).


# --- clinical helpers (own implementations, see module docstring) ---------------------------------

def add_months(day: date, months: int) -> date:
    """`day` plus calendar months, clamped at month end (31 Aug + 6 months -> 28/29 Feb)."""
    index = day.month - 1 + months
    year, month = day.year + index // 12, index % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def age_on(birth: date, day: date) -> int:
    """Age in whole years on `day`."""
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def crcl(age: int, weight_kg: float, scr_mg_dl: float, sex: str) -> float:
    """Cockcroft-Gault creatinine clearance in mL/min, rounded to 0.1 (SPEC 4 and 10)."""
    value = (140 - age) * weight_kg / (72 * scr_mg_dl)
    if sex == "F":
        value *= 0.85
    return round(value, 1)


def zoledronic_dose(clearance: float) -> float | None:
    """Zoledronic acid dose (mg) for a CrCl (mL/min); None below 30 (not recommended)."""
    if clearance > 60:
        return 4.0
    if clearance >= 50:
        return 3.5
    if clearance >= 40:
        return 3.3
    if clearance >= 30:
        return 3.0
    return None


# --- one patient's plan ---------------------------------------------------------------------------

@dataclass
class _Plan:
    """What one patient's chart will hold; rendered to CSV rows by `_render`."""

    scenario: str
    sex: str
    birth: date
    weight: float
    therapy: str | None                  # None: no anti-myeloma therapy (MGUS, smouldering)
    therapy_start: date | None
    agent: str = ZOL
    weight_jitter: float = 0.0           # kg either side of `weight`; 0 for planted patients
    doses: list[tuple[date, float]] = field(default_factory=list)
    scr: dict[date, float] = field(default_factory=dict)     # draw day -> SCr mg/dL
    alp: dict[date, float] = field(default_factory=dict)     # draw day -> ALP U/L (GGT alongside)
    alp_planted: set[date] = field(default_factory=set)      # ALP written with one decimal
    # Planted values on a draw day (a day may hold only these). Any other draw day gets a routine
    # calcium and albumin, and a routine GGT beside its ALP. None: no such result that day.
    ca: dict[date, float] = field(default_factory=dict)      # mg/dL
    alb: dict[date, float | None] = field(default_factory=dict)   # g/dL
    ggt: dict[date, int | None] = field(default_factory=dict)     # U/L
    urine: dict[date, int] | None = None  # 24-h urine albumin mg; None: every 90 days from dosing
    spot: dict[date, int] = field(default_factory=dict)      # urine albumin/creatinine mg/g
    dental: list[date] | None = None      # None: one exam 10-40 days before the first dose
    diagnoses: list[tuple[date, str, str]] | None = None      # None: MM at the first visit
    clock: int | None = None             # minute of day of every draw (timing-critical cases)
    si_creatinine: bool = False
    si_alp: bool = False
    noisy: bool = False                  # background only: some "F" statuses
    weight_labs: bool = False            # background only: weights also sent as lab results
    expected: list[tuple[str, date]] = field(default_factory=list)

    @property
    def first_dose(self) -> date | None:
        return min(self.doses)[0] if self.doses else None


@dataclass(frozen=True)
class _Window:
    """The nights and the date ranges the scenarios are placed in."""

    first: date
    last: date
    course_lo: date   # earliest first dose that cannot reach 12 months by the last night
    x_lo: date        # earliest planted trigger on a course that started before it
    x_hi: date        # latest planted trigger

    @classmethod
    def of(cls, first: date, last: date) -> _Window:
        course_lo = max(first - timedelta(days=300), add_months(last, -12) + timedelta(days=7))
        # Two doses before the trigger, so the trigger never falls on the course's first cycle.
        x_lo = max(first + timedelta(days=2), course_lo + timedelta(days=60))
        return cls(first, last, course_lo, x_lo, last - timedelta(days=2))

    @property
    def new_lo(self) -> date:
        """Earliest first dose of a course planted inside the window (no review by the last night)."""
        return max(self.first + timedelta(days=2), self.course_lo)


def _day(rng: random.Random, lo: date, hi: date) -> date:
    return lo + timedelta(days=rng.randint(0, (hi - lo).days))


def _jitter(rng: random.Random, base: float, spread: float) -> float:
    return round(base + rng.uniform(-spread, spread), 2)


def _routine_alp(rng: random.Random, mean: float) -> float:
    # +-4 % around a per-patient mean keeps every pair of ALPs far from a 25 % rise.
    return float(round(mean * (1 + rng.uniform(-0.04, 0.04))))


def _birth(rng: random.Random, on: date, age: int) -> date:
    """A birth date giving exactly `age` on `on`; day <= 28 so no 29 Feb birthdays."""
    born = date(on.year - age - 1, rng.randint(1, 12), rng.randint(1, 28))
    return born if age_on(born, on) == age else born.replace(year=born.year + 1)


def _birth_for_constant_age(anchor: date, age: int) -> date:
    """Birthday on/just before `anchor`: the patient is `age` for the following year."""
    while anchor.day > 28:
        anchor -= timedelta(days=1)
    return anchor.replace(year=anchor.year - age)


def _schedule(first_dose: date, until: date) -> list[date]:
    days, day = [], first_dose
    while day <= until:
        days.append(day)
        day += timedelta(days=DOSE_INTERVAL)
    return days


def _course(rng: random.Random, plan: _Plan, days: list[date], mg: float, base: float,
            spread: float, alp_mean: float) -> None:
    """Give doses on `days`, each after a pre-dose draw (SCr, Ca/albumin, ALP/GGT) 1-3 days before.

    The first dose's draw is two days before it, so a scenario can pin the baseline there.
    """
    for i, day in enumerate(days):
        draw = day - timedelta(days=2 if i == 0 else rng.randint(1, 3))
        plan.scr[draw] = _jitter(rng, base, spread)
        plan.alp[draw] = _routine_alp(rng, alp_mean)
        plan.doses.append((day, mg))


def _pretherapy(rng: random.Random, plan: _Plan, base: float, spread: float, alp_mean: float,
                days_before: int | None = None) -> None:
    """The work-up panel shortly before therapy start: it gives the ALP baseline (SPEC 4)."""
    day = plan.therapy_start - timedelta(days=days_before or rng.randint(1, 5))
    plan.scr[day] = _jitter(rng, base, spread)
    plan.alp[day] = _routine_alp(rng, alp_mean)


def _scr_mg(plan: _Plan, value: float) -> float:
    """The SCr the engine will read back, after the SI round trip when the lab sends umol/L."""
    return round(value * 88.4, 1) / 88.4 if plan.si_creatinine else value


def _bands_hold(plan: _Plan, band: float) -> bool:
    """Every SCr of the plan gives a CrCl in `band`, for any weight the plan may write."""
    weights = {plan.weight - plan.weight_jitter, plan.weight + plan.weight_jitter}
    for day, value in plan.scr.items():
        age, scr = age_on(plan.birth, day), _scr_mg(plan, value)
        if any(zoledronic_dose(crcl(age, w, scr, plan.sex)) != band for w in weights):
            return False
    return True


def _body(rng: random.Random, win: _Window, scr_max: float) -> tuple[str, date, float]:
    """Sex, birth date and weight whose CrCl stays > 66 mL/min up to `scr_max` (4.0 mg band)."""
    for _ in range(200):
        sex = rng.choice("FM")
        age = rng.randint(50, 72)
        weight = round(rng.uniform(75, 125) if sex == "M" else rng.uniform(65, 110), 1)
        birth = _birth(rng, win.last, age)
        if crcl(age_on(birth, win.last) + 1, weight, scr_max, sex) > 66:
            return sex, birth, weight
    return "M", _birth(rng, win.last, 55), 110.0


def _start(rng: random.Random, first_dose: date) -> date:
    """Myeloma therapy starts a little before the bisphosphonate course."""
    return first_dose - timedelta(days=rng.randint(7, 20))


# --- scenarios ------------------------------------------------------------------------------------

def _background(rng: random.Random, win: _Window) -> _Plan:
    """Clean data: every rule stays quiet. Doses match the band of every CrCl of the patient."""
    hi = win.first - timedelta(days=40)
    if hi < win.course_lo:  # very long runs: the course starts inside the window instead
        hi = max(win.course_lo, win.last - timedelta(days=30))
    first_dose = _day(rng, win.course_lo, hi)
    agent = PAM if rng.random() < 0.15 else ZOL
    therapy = "lenalidomide" if rng.random() < 0.2 else "bortezomib"
    alp_mean = float(rng.randint(65, 105))
    for _ in range(200):
        sex = rng.choice("FM")
        age = rng.randint(50, 80)
        weight = round(rng.uniform(60, 110) if sex == "M" else rng.uniform(50, 90), 1)
        birth = _birth(rng, win.last, age)
        numerator = (140 - age) * weight * (0.85 if sex == "F" else 1.0) / 72
        if agent == ZOL and rng.random() < 0.1:
            band, spread, target = 3.5, 0.03, 55.0   # a reduced-dose patient, mid-band
        else:
            band, spread, target = 4.0, 0.1, rng.uniform(72, 130)
        base = round(numerator / target, 2)
        if not 0.55 <= base <= 1.6:
            continue
        plan = _Plan("background", sex, birth, weight, therapy, _start(rng, first_dose), agent,
                     weight_jitter=0.5, noisy=True,
                     si_creatinine=rng.random() < 0.1, si_alp=rng.random() < 0.1,
                     weight_labs=rng.random() < 0.1)
        _pretherapy(rng, plan, base, spread, alp_mean)
        mg = band if agent == ZOL else PAMIDRONATE_MG
        _course(rng, plan, _schedule(first_dose, win.last), mg, base, spread, alp_mean)
        if agent == PAM or _bands_hold(plan, band):
            return plan
    raise RuntimeError("could not draw a background patient")  # pragma: no cover


def _existing_course(rng: random.Random, win: _Window, trigger: date, max_cycles: int = 8) -> date:
    """First dose of a course running before `trigger`, the pre-dose draw of a dose 2 days later."""
    dose = trigger + timedelta(days=2)
    cycles = min(max_cycles, (dose - win.course_lo).days // DOSE_INTERVAL)
    return dose - timedelta(days=DOSE_INTERVAL * rng.randint(2, max(2, cycles)))


def _renal(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """The renal hold / resume scenarios: planted SCr values against a pinned baseline."""
    # baseline, trigger SCr, agent, hold expected, resume SCr (None: no resume phase)
    base, peak, agent, holds, resume = {
        "renal_hold_at_threshold": (0.90, 1.40, ZOL, True, None),
        "renal_hold_near_miss": (0.90, 1.39, ZOL, False, None),
        "renal_hold_abnormal_baseline": (1.40, 2.40, PAM, True, None),
        "renal_hold_abnormal_near_miss": (1.50, 2.49, PAM, False, None),
        "renal_resume": (1.00, 1.60, PAM, True, 1.10),
        "renal_resume_near_miss": (1.00, 1.60, ZOL, True, 1.11),
    }[scenario]
    x_hi = win.x_hi - timedelta(days=7) if resume else win.x_hi
    trigger = _day(rng, win.x_lo, x_hi)
    first_dose = _existing_course(rng, win, trigger)
    held_dose = trigger + timedelta(days=2)
    # Zoledronic patients keep CrCl > 60 even at the highest SCr planted, so DOSE_BAND stays quiet
    # however the engine orders hold and band checks.
    sex, birth, weight = _body(rng, win, 1.80 if agent == ZOL else 1.0)
    if scenario == "renal_hold_near_miss":
        # The brief's reference patient: CrCl > 60 both at 0.90 and at 1.39, so no band change.
        sex, weight = "M", 110.0
        birth = _birth_for_constant_age(first_dose - timedelta(days=60), 55)
    plan = _Plan(scenario, sex, birth, weight, "bortezomib", _start(rng, first_dose), agent)
    alp_mean = float(rng.randint(65, 105))
    mg = 4.0 if agent == ZOL else PAMIDRONATE_MG
    _pretherapy(rng, plan, base, 0.05, alp_mean)
    before = [d for d in _schedule(first_dose, win.last) if d < held_dose]
    _course(rng, plan, before, mg, base, 0.05, alp_mean)
    plan.scr[first_dose - timedelta(days=2)] = base
    plan.scr[trigger] = peak
    if holds:
        plan.expected.append(("RENAL_HOLD", trigger))
    if not holds:
        # Not held: the dose goes ahead and the course continues on routine values.
        after = _schedule(held_dose, win.last)
        _course(rng, plan, after, mg, base, 0.05, alp_mean)
        plan.scr[trigger] = peak  # the first draw of `after` is the trigger draw itself
        return plan
    recheck_from = trigger + timedelta(days=7)
    if resume is not None:
        latest = min(trigger + timedelta(days=21), win.x_hi)
        resumed = _day(rng, trigger + timedelta(days=7), latest)
        gap = (resumed - trigger).days
        if gap >= 10:  # a recheck while held, still high
            plan.scr[trigger + timedelta(days=gap // 2)] = _jitter(rng, 1.42, 0.07)
        if resume <= 1.10 * base:
            plan.expected.append(("RENAL_RESUME", resumed))
            _course(rng, plan, _schedule(resumed + timedelta(days=2), win.last), mg, base, 0.05,
                    alp_mean)
            plan.scr[resumed] = resume
            return plan
        plan.scr[resumed] = resume
        recheck_from = resumed + timedelta(days=14)
        level, spread = 1.18, 0.06   # stays above 1.10 x baseline: no resume
    else:
        level, spread = peak + 0.08, 0.07  # stays at or above the trigger: the hold goes on
        level = round(max(level, peak + spread), 2)
    day = recheck_from
    while day <= win.last:
        plan.scr[day] = _jitter(rng, level, spread)
        day += timedelta(days=14)
    return plan


def _dose_band(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """DOSE_BAND at and just short of a band edge, and at a new course's first dose."""
    # The planted CrCl must not drift with a birthday: the patient keeps one age for a year from
    # before the course, so the trigger must lie within ~230 days of the last night.
    lo = max(win.x_lo, win.last - timedelta(days=230))
    trigger = _day(rng, lo, win.x_hi)
    alp_mean = float(rng.randint(65, 105))
    if scenario == "dose_band_first_dose":
        # Male 65 y, 60 kg, SCr 1.39 -> CrCl 45.0 (band 3.3), given 4.0 mg at the first dose.
        first_dose = trigger
        birth = _birth_for_constant_age(first_dose - timedelta(days=60), 65)
        plan = _Plan(scenario, "M", birth, 60.0, "bortezomib", _start(rng, first_dose))
        _pretherapy(rng, plan, 1.39, 0.03, alp_mean)
        days = _schedule(first_dose, win.last)
        _course(rng, plan, days[:1], 4.0, 1.39, 0.03, alp_mean)
        _course(rng, plan, days[1:], 3.3, 1.39, 0.03, alp_mean)  # the nurse adjusts the dose
        plan.scr[first_dose - timedelta(days=2)] = 1.39
        plan.expected.append(("DOSE_BAND", first_dose))
        return plan
    # Male 70 y, 70 kg: SCr 1.00 -> CrCl 68.1 (4.0 mg); 1.20 -> 56.7 (3.5 mg); 1.13 -> 60.2 (4.0).
    first_dose = _existing_course(rng, win, trigger, max_cycles=3)
    birth = _birth_for_constant_age(first_dose - timedelta(days=40), 70)
    plan = _Plan(scenario, "M", birth, 70.0, "bortezomib", _start(rng, first_dose))
    _pretherapy(rng, plan, 1.00, 0.03, alp_mean)
    days = _schedule(first_dose, win.last)
    dose = trigger + timedelta(days=2)
    _course(rng, plan, [d for d in days if d < dose], 4.0, 1.00, 0.03, alp_mean)
    if scenario == "dose_band_change":
        _course(rng, plan, [d for d in days if d >= dose], 3.5, 1.20, 0.02, alp_mean)
        plan.scr[trigger] = 1.20
        plan.expected.append(("DOSE_BAND", trigger))
    else:
        _course(rng, plan, [d for d in days if d >= dose], 4.0, 1.00, 0.03, alp_mean)
        plan.scr[trigger] = 1.13
    plan.scr[first_dose - timedelta(days=2)] = 1.00
    return plan


def _alp(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """ALP rise after bortezomib start: exactly 25.0 % on day 42, 24.9 %, and not on bortezomib."""
    bortezomib = scenario != "alp_rise_not_bortezomib"
    horizon = 42 if bortezomib else 30
    trigger = _day(rng, win.x_lo, win.x_hi - timedelta(days=1))
    start = trigger - timedelta(days=horizon)
    first_dose = start + timedelta(days=rng.randint(7, 14))
    sex, birth, weight = _body(rng, win, 1.0)
    regimen = "bortezomib" if bortezomib else "lenalidomide"
    plan = _Plan(scenario, sex, birth, weight, regimen, start)
    base = round(rng.uniform(0.7, 0.95), 2)
    after_mean = {"alp_rise_bortezomib": 120.0, "alp_rise_near_miss": 122.0}.get(scenario, 134.0)
    _pretherapy(rng, plan, base, 0.05, 100.0, days_before=3)
    _course(rng, plan, _schedule(first_dose, win.last), 4.0, base, 0.05, after_mean)
    # Only the planted ALPs around the therapy start: baseline, two visits, the day-42 result.
    closed = start - timedelta(days=30), trigger + timedelta(days=1)
    for day in [d for d in plan.alp if closed[0] <= d <= closed[1]]:
        del plan.alp[day]
    planted = {start - timedelta(days=3): 100.0,
               start + timedelta(days=14): round(rng.uniform(98, 112), 1)}
    if bortezomib:
        planted[start + timedelta(days=28)] = round(rng.uniform(98, 112), 1)
    planted[trigger] = {"alp_rise_bortezomib": 125.0,
                        "alp_rise_near_miss": 124.9}.get(scenario, 140.0)
    if scenario == "alp_rise_near_miss":
        planted[trigger + timedelta(days=1)] = 140.0   # day 43: outside the window of the rule
    plan.alp.update(planted)
    plan.alp_planted.update(planted)
    if scenario == "alp_rise_bortezomib":
        plan.expected.append(("ALP_RISE_BORTEZOMIB", trigger))
    return plan


def _review(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """A course that reaches 12 (or 24) months inside the window."""
    months = 12 if scenario == "review_1y" else 24
    candidates = [win.first + timedelta(days=i) for i in range(2, (win.x_hi - win.first).days + 1)]
    # A day-of-month <= 28 makes "12 months later" unambiguous whichever way it is computed.
    reached = rng.choice([d for d in candidates if d.day <= 28])
    first_dose = add_months(reached, -months)
    sex, birth, weight = _body(rng, win, 1.0)
    agent = ZOL if scenario == "review_1y" or rng.random() < 0.5 else PAM
    plan = _Plan(scenario, sex, birth, weight, "bortezomib", _start(rng, first_dose), agent)
    base, alp_mean = round(rng.uniform(0.7, 0.95), 2), float(rng.randint(65, 105))
    _pretherapy(rng, plan, base, 0.05, alp_mean)
    mg = 4.0 if agent == ZOL else PAMIDRONATE_MG
    _course(rng, plan, _schedule(first_dose, win.last), mg, base, 0.05, alp_mean)
    one, two = add_months(first_dose, 12), add_months(first_dose, 24)
    # REVIEW_1Y holds from 12 months until 24 months, REVIEW_2Y from 24 months on.
    if one <= win.last and two > win.first:
        plan.expected.append(("REVIEW_1Y", max(one, win.first)))
    if two <= win.last:
        plan.expected.append(("REVIEW_2Y", max(two, win.first)))
    return plan


# --- scenarios of the later rules (SPEC 5 from PRE_DOSE_SCR_MISSING on) -----------------------------

def _pick(rng: random.Random, lo: date, hi: date, ok) -> date:
    """A random day in [lo, hi] for which `ok(day)` holds."""
    days = [lo + timedelta(days=i) for i in range((hi - lo).days + 1)]
    days = [d for d in days if ok(d)]
    if not days:  # pragma: no cover - the window arithmetic guarantees candidates for >= 14 nights
        raise RuntimeError(f"no day between {lo} and {hi} fits")
    return rng.choice(days)


def _in_window(win: _Window, day: date) -> bool:
    return win.first + timedelta(days=2) <= day <= win.x_hi


def _patient(rng: random.Random, win: _Window, scenario: str, first_dose: date, agent: str, *,
             start: date | None = None, alp_mean: float | None = None,
             until: date | None = None) -> _Plan:
    """A myeloma patient with a work-up panel and a routine course from `first_dose` to `until`
    (default the last night; no dose at all if it begins later). CrCl stays > 60 (4.0 mg band)."""
    sex, birth, weight = _body(rng, win, 1.0)
    regimen = rng.choice(("bortezomib", "bortezomib", "lenalidomide"))
    plan = _Plan(scenario, sex, birth, weight, regimen, start or _start(rng, first_dose), agent)
    base = round(rng.uniform(0.7, 0.95), 2)
    alp_mean = alp_mean or float(rng.randint(65, 105))
    _pretherapy(rng, plan, base, 0.05, alp_mean)
    _course(rng, plan, _schedule(first_dose, until or win.last), DOSE_MG[agent], base, 0.05,
            alp_mean)
    return plan


def _running(rng: random.Random, win: _Window, scenario: str, trigger: date, agent: str,
             **kwargs) -> _Plan:
    """A patient whose course began at least two cycles before `trigger`; a dose on trigger + 2."""
    return _patient(rng, win, scenario, _existing_course(rng, win, trigger), agent, **kwargs)


def _draw_before(plan: _Plan, dose: date) -> date:
    """The pre-dose draw of `dose` (1-3 days before it)."""
    return next(d for d in sorted(plan.scr) if dose - timedelta(days=3) <= d < dose)


def _move_draw(plan: _Plan, old: date, new: date) -> None:
    for values in (plan.scr, plan.alp):
        if old in values:
            values[new] = values.pop(old)


def _drop_alp(plan: _Plan, lo: date, hi: date) -> None:
    """No ALP (so no routine GGT beside it) collected in [lo, hi]; the SCr of those draws stays."""
    for day in [d for d in plan.alp if lo <= d <= hi]:
        del plan.alp[day]
        plan.alp_planted.discard(day)


def _baseline_alp(rng: random.Random, plan: _Plan, value: float) -> None:
    """Pin the ALP baseline (SPEC 4): the only ALP in the 30 days up to therapy start."""
    start = plan.therapy_start
    _drop_alp(plan, start - timedelta(days=30), start)
    day = start - timedelta(days=rng.randint(1, 5))
    plan.alp[day] = value
    plan.alp_planted.add(day)


def _monitor_alps(rng: random.Random, plan: _Plan, mean: float, skip: int | None = None) -> None:
    """An ALP within 10 days of the 3- and 6-month dates (not `skip`): ALP_MONITOR_DUE stays quiet."""
    for months in (3, 6):
        if months != skip:
            day = add_months(plan.therapy_start, months) + timedelta(days=rng.randint(-10, 10))
            plan.alp.setdefault(day, _routine_alp(rng, mean))


def _urine_series(rng: random.Random, start: date, until: date) -> dict[date, int]:
    """A 24-h urine albumin every 90 days, normal values."""
    series, day = {}, start
    while day <= until:
        series[day] = rng.randint(50, 200)
        day += timedelta(days=90)
    return series


def _pre_dose(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """A bisphosphonate dose whose only recent SCr was drawn 8 days before it (7: near miss)."""
    dose = _day(rng, win.x_lo, win.x_hi)
    plan = _running(rng, win, scenario, dose - timedelta(days=2), rng.choice((ZOL, PAM)))
    gap = 8 if scenario == "pre_dose_scr_missing" else 7
    _move_draw(plan, _draw_before(plan, dose), dose - timedelta(days=gap))
    if gap == 8:
        plan.expected.append(("PRE_DOSE_SCR_MISSING", dose))
    return plan


def _alp_start(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """An ALP baseline of 131 U/L (130: near miss) and when the bisphosphonate starts."""
    agent = rng.choice((ZOL, PAM))
    baseline = 130.0 if scenario == "alp_elevated_start_uln" else 131.0
    if scenario == "alp_elevated_start_on_course":
        # Therapy (a new line) starts on a course that is already running.
        # Two cycles before therapy start (as `_existing_course` needs).
        raised = _day(rng, max(win.first + timedelta(days=2),
                               win.course_lo + timedelta(days=2 * DOSE_INTERVAL + 31)), win.x_hi)
        start = raised - timedelta(days=31)
        plan = _running(rng, win, scenario, start, agent, alp_mean=baseline)
        plan.therapy_start = start
    else:
        raised = _day(rng, win.new_lo + timedelta(days=1), win.x_hi)
        start = raised - timedelta(days=31)
        first_dose = start + timedelta(days=30 if scenario == "alp_elevated_start_dose_day_30"
                                        else 31 + rng.randint(10, 40))
        plan = _patient(rng, win, scenario, first_dose, agent, start=start, alp_mean=baseline)
    _baseline_alp(rng, plan, baseline)
    if scenario == "alp_elevated_start_uln":
        # Not above normal: no ALP around 3 and 6 months either, and ALP_MONITOR_DUE stays quiet.
        for months in (3, 6):
            due = add_months(start, months)
            _drop_alp(plan, due - timedelta(days=14), due + timedelta(days=14))
    else:
        _monitor_alps(rng, plan, baseline)
    if scenario == "alp_elevated_start":
        plan.expected.append(("ALP_ELEVATED_START", raised))
    return plan


def _alp_monitor(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """An elevated ALP baseline and no ALP within 14 days of the 3- or 6-month date (or one ALP
    exactly 14 days before or after it: the near miss)."""
    months = {"alp_monitor_due_3m": 3, "alp_monitor_due_6m": 6}.get(scenario) or rng.choice((3, 6))
    start = _pick(rng, add_months(win.first, -months) - timedelta(days=20),
                  add_months(win.last, -months),
                  lambda d: d >= win.course_lo
                  and _in_window(win, add_months(d, months) + timedelta(days=15)))
    baseline = float(rng.randint(135, 220))
    plan = _patient(rng, win, scenario, start + timedelta(days=rng.randint(7, 20)),
                    rng.choice((ZOL, PAM)), start=start, alp_mean=baseline)
    _baseline_alp(rng, plan, baseline)
    due = add_months(start, months)
    _drop_alp(plan, due - timedelta(days=14), due + timedelta(days=14))
    if scenario == "alp_monitor_window_edge":
        plan.alp[due + timedelta(days=rng.choice((-14, 14)))] = _routine_alp(rng, baseline)
    else:
        plan.expected.append(("ALP_MONITOR_DUE", due + timedelta(days=15)))
    _monitor_alps(rng, plan, baseline, skip=months)
    return plan


def _alp_nonbone(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """An ALP above 130 U/L with a GGT above 55 U/L within 7 days, and near misses."""
    day = _day(rng, win.x_lo, win.x_hi)
    plan = _running(rng, win, scenario, day, rng.choice((ZOL, PAM)))
    high_alp, high_ggt = float(rng.randint(140, 220)), rng.randint(60, 150)
    same_draw = {"alp_nonbone_cause": (131.0, 56), "alp_nonbone_ggt_55": (high_alp, 55),
                 "alp_nonbone_alp_130": (130.0, high_ggt)}
    alp, ggt, alp_day, ggt_day = high_alp, high_ggt, day, day
    if scenario in same_draw:
        alp, ggt = same_draw[scenario]
    elif scenario == "alp_nonbone_cause_7_days":
        alp_day, ggt_day = rng.choice(((day - timedelta(days=7), day),
                                       (day, day - timedelta(days=7))))
    else:  # alp_nonbone_8_days
        after = rng.random() < 0.5 and day + timedelta(days=8) <= win.last
        ggt_day = day + timedelta(days=8 if after else -8)
    # Nothing else within 8 days of the ALP: no other ALP to become the latest, no other GGT.
    _drop_alp(plan, alp_day - timedelta(days=8), alp_day + timedelta(days=8))
    plan.alp[alp_day] = alp
    plan.alp_planted.add(alp_day)
    plan.ggt[alp_day] = None
    plan.ggt[ggt_day] = ggt
    if scenario in ("alp_nonbone_cause", "alp_nonbone_cause_7_days"):
        plan.expected.append(("ALP_NONBONE_CAUSE", max(alp_day, ggt_day)))
    return plan


def _calcium(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """A low corrected calcium on a bone-modifying agent, at 8.49 and 8.50, and the albumin edges."""
    if scenario == "hypocalcemia_off_agent":
        # 8.49 corrected, but before the first dose: no agent yet; the pre-dose draw is normal.
        day = _day(rng, win.new_lo, win.x_hi)
        plan = _patient(rng, win, scenario, day + timedelta(days=rng.randint(5, 25)),
                        rng.choice((ZOL, PAM)))
        plan.clock = 9 * 60
        plan.ca[day], plan.alb[day] = 8.01, 3.4
        return plan
    day = _day(rng, win.x_lo, win.x_hi - timedelta(days=1))
    agent = DEN if scenario == "hypocalcemia_denosumab" else rng.choice((ZOL, PAM))
    plan = _running(rng, win, scenario, day, agent)        # a dose on day + 2
    plan.clock = 9 * 60   # every result at 09:00: 48 hours and 2 calendar days agree
    _move_draw(plan, _draw_before(plan, day + timedelta(days=2)), day)
    back = lambda n: day + timedelta(days=n)  # noqa: E731
    if scenario in ("hypocalcemia", "hypocalcemia_denosumab"):
        plan.ca[day], plan.alb[day] = 8.01, 3.4           # 8.01 + 0.8 x 0.6 = 8.49
        plan.expected.append(("HYPOCALCEMIA", day))
    elif scenario == "hypocalcemia_near_miss":
        plan.ca[day], plan.alb[day] = 8.02, 3.4           # 8.50
    elif scenario == "hypocalcemia_uncorrected":
        plan.ca[day], plan.alb[day] = 8.49, None          # nearest albumin 3 days before: raw
        plan.alb[back(-3)] = 3.0                          # (it would correct to 9.29)
        plan.expected.append(("HYPOCALCEMIA", day))
    elif scenario == "hypocalcemia_albumin_2_days":
        plan.ca[day], plan.alb[day] = 8.2, None           # albumin exactly 2 days before: 8.60
        plan.alb[back(-2)] = 3.5
    else:  # hypocalcemia_albumin_tie: 1 day before (-> 8.90) and 1 day after (-> 8.42): the later
        plan.ca[day], plan.alb[day] = 8.1, None
        plan.alb[back(-1)], plan.alb[back(1)] = 3.0, 3.6
        plan.expected.append(("HYPOCALCEMIA", back(1)))
    return plan


def _mgus(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """A bisphosphonate started in MGUS or smouldering myeloma, and the diagnoses that excuse it."""
    first_dose = _day(rng, win.new_lo, win.x_hi)
    agent = DEN if scenario == "mgus_on_denosumab" else rng.choice((ZOL, PAM))
    kind = "SMM" if scenario == "smm_on_bisphosphonate" else "MGUS"
    found = first_dose - timedelta(days=rng.randint(120, 700))
    diagnoses = [(found, kind, "D47.2" if kind == "MGUS" else "")]
    if scenario == "mgus_progressed_to_mm":
        # Progressed to myeloma before the course: therapy starts after the MM diagnosis.
        diagnoses.append((_day(rng, found + timedelta(days=30), first_dose - timedelta(days=40)),
                          "MM", "C90.00"))
        plan = _patient(rng, win, scenario, first_dose, agent)
    else:
        sex, birth, weight = _body(rng, win, 1.0)
        plan = _Plan(scenario, sex, birth, weight, None, None, agent)
        base = round(rng.uniform(0.7, 0.95), 2)
        _course(rng, plan, _schedule(first_dose, win.last), DOSE_MG[agent], base, 0.05,
                float(rng.randint(65, 105)))
    if scenario == "mgus_with_osteoporosis":
        diagnoses.append((first_dose - timedelta(days=rng.randint(20, 600)), "osteoporosis",
                          "M81.0"))
    plan.diagnoses = sorted(diagnoses)
    if scenario in ("mgus_on_bisphosphonate", "smm_on_bisphosphonate"):
        plan.expected.append(("MGUS_ON_BISPHOSPHONATE", first_dose))
    return plan


def _dental(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """A course's first dose with the last dental exam 6 months and a day before it (or exactly 6
    months: near miss), none at all (denosumab), or only before an earlier course."""
    first_dose = _pick(rng, win.new_lo, win.x_hi, lambda d: d.day <= 28)
    agent = DEN if scenario == "dental_exam_missing_denosumab" else rng.choice((ZOL, PAM))
    if scenario == "dental_exam_missing_new_course":
        # A short first course, then more than 180 days without a dose: a new course.
        cycles = rng.randint(3, 6)
        last_dose = first_dose - timedelta(days=rng.randint(190, 260))
        earlier = last_dose - timedelta(days=DOSE_INTERVAL * (cycles - 1))
        plan = _patient(rng, win, scenario, earlier, agent, until=last_dose)
        _course(rng, plan, _schedule(first_dose, win.last), DOSE_MG[agent],
                round(rng.uniform(0.7, 0.95), 2), 0.05, float(rng.randint(65, 105)))
        plan.dental = [earlier - timedelta(days=rng.randint(10, 40))]
    else:
        plan = _patient(rng, win, scenario, first_dose, agent)
        six_months = add_months(first_dose, -6)
        plan.dental = {"dental_exam_missing": [six_months - timedelta(days=1)],
                       "dental_exam_near_miss": [six_months]}.get(scenario, [])
    if scenario != "dental_exam_near_miss":
        plan.expected.append(("DENTAL_EXAM_MISSING", first_dose))
    return plan


def _albuminuria(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """A 24-h urine albumin of 501 mg (500: near miss) on a running bisphosphonate course."""
    day = _day(rng, win.x_lo, win.x_hi)
    plan = _running(rng, win, scenario, day, rng.choice((ZOL, PAM)))
    plan.urine = _urine_series(rng, plan.first_dose - timedelta(days=5), win.last)
    if scenario == "albuminuria_near_miss":
        plan.urine[day] = URINE_ALBUMIN_MAX
        return plan
    plan.urine[day] = URINE_ALBUMIN_MAX + 1
    # The nurse holds the bisphosphonate and rechecks 3-4 weeks later: normal, dosing resumes.
    recheck = day + timedelta(days=rng.randint(21, 28))
    plan.urine[recheck] = rng.randint(150, 400)
    plan.doses = [(d, mg) for d, mg in plan.doses if not day < d <= recheck]
    plan.expected.append(("ALBUMINURIA", day))
    return plan


def _urine(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """No urine albumin for 6 months and a day on a course at least 6 months old, and near misses."""
    agent = rng.choice((ZOL, PAM))
    if scenario == "urine_albumin_due_new_course":
        # Never checked: due the day the course is 6 months old; checked a few days later.
        first_dose = _pick(rng, add_months(win.first, -6) - timedelta(days=5),
                           add_months(win.last, -6),
                           lambda d: d >= win.course_lo and d.day <= 28
                           and _in_window(win, add_months(d, 6)))
        plan = _patient(rng, win, scenario, first_dose, agent)
        raised = add_months(first_dose, 6)
        plan.urine = _urine_series(rng, raised + timedelta(days=rng.randint(1, 10)), win.last)
        plan.expected.append(("URINE_ALBUMIN_DUE", raised))
        return plan
    # `last_result` is the last urine albumin for 6 months; the night after 6 months have passed
    # (`due`) is inside the window. Both ways of counting months back must agree on `due`.
    shift = 0 if scenario == "urine_albumin_due_near_miss" else 1

    def fits(day: date) -> bool:
        due = add_months(day, 6) + timedelta(days=shift)
        return (day >= win.course_lo + timedelta(days=10) and day.day <= 28
                and _in_window(win, due) and add_months(due - timedelta(days=shift), -6) == day
                and (shift == 0 or add_months(due, -6) > day))

    last_result = _pick(rng, add_months(win.first, -6) - timedelta(days=5),
                        add_months(win.last, -6), fits)
    due = add_months(last_result, 6) + timedelta(days=shift)
    first_dose = _day(rng, win.course_lo, last_result - timedelta(days=10))
    plan = _patient(rng, win, scenario, first_dose, agent)
    plan.urine, day = {}, last_result
    while day >= first_dose - timedelta(days=90):
        plan.urine[day] = rng.randint(50, 200)
        day -= timedelta(days=90)
    if scenario == "urine_albumin_due_near_miss":
        # The result 6 months back still counts on `due`; the next one comes the day after.
        plan.urine.update(_urine_series(rng, due + timedelta(days=1), win.last))
    elif scenario == "urine_albumin_spot_tests":
        # The ward switched to spot albumin/creatinine ratios every 90 days: they count.
        day = last_result + timedelta(days=90)
        while day <= win.last:
            plan.spot[day] = rng.randint(5, 25)
            day += timedelta(days=90)
    else:
        plan.urine.update(_urine_series(rng, due + timedelta(days=rng.randint(1, 10)), win.last))
        plan.expected.append(("URINE_ALBUMIN_DUE", due))
    return plan


def _denosumab(rng: random.Random, win: _Window, scenario: str) -> _Plan:
    """Denosumab for more than a year: only DENTAL_EXAM_MISSING and HYPOCALCEMIA concern it, and
    both stay quiet; every bisphosphonate-only rule has a reason to fire if it wrongly looked."""
    first_dose = win.last - timedelta(days=rng.randint(400, 600))
    sex, birth, weight = _body(rng, win, 1.0)
    plan = _Plan(scenario, sex, birth, weight, "bortezomib", _start(rng, first_dose), DEN)
    base, alp_mean = round(rng.uniform(0.7, 0.95), 2), float(rng.randint(65, 105))
    _pretherapy(rng, plan, base, 0.05, alp_mean)
    for i, day in enumerate(_schedule(first_dose, win.last)):
        plan.doses.append((day, DOSE_MG[DEN]))
        if i % 2 == 0:  # a blood test every other dose, 10 days before it: no SCr in 7 days
            draw = day - timedelta(days=10)
            plan.scr[draw] = _jitter(rng, base, 0.05)
            plan.alp[draw] = _routine_alp(rng, alp_mean)
    plan.scr[_day(rng, win.first + timedelta(days=2), win.x_hi)] = round(base + 0.6, 2)
    plan.urine = {_day(rng, win.first + timedelta(days=2), win.x_hi): 900}
    return plan


_BUILDERS = {
    "background": lambda rng, win, _: _background(rng, win),
    **{name: _renal for name in PLANTED if name.startswith("renal_")},
    **{name: _dose_band for name in PLANTED if name.startswith("dose_band_")},
    **{name: _alp for name in PLANTED if name.startswith("alp_rise_")},
    "review_1y": _review,
    "review_2y": _review,
    **{name: _pre_dose for name in PLANTED if name.startswith("pre_dose_")},
    **{name: _alp_start for name in PLANTED if name.startswith("alp_elevated_")},
    **{name: _alp_monitor for name in PLANTED if name.startswith("alp_monitor_")},
    **{name: _alp_nonbone for name in PLANTED if name.startswith("alp_nonbone_")},
    **{name: _calcium for name in PLANTED if name.startswith("hypocalcemia")},
    **{name: _mgus for name in PLANTED if name.startswith(("mgus_", "smm_"))},
    **{name: _dental for name in PLANTED if name.startswith("dental_")},
    **{name: _albuminuria for name in PLANTED if name.startswith("albuminuria")},
    **{name: _urine for name in PLANTED if name.startswith("urine_")},
    "denosumab_course": _denosumab,
}


def _assign(rng: random.Random, patients: int) -> list[str]:
    """One scenario a patient: the covering set, then every other planted one (each part
    shuffled), then a background-heavy cycle."""
    covering, rest = list(COVERING), [s for s in PLANTED if s not in COVERING]
    rng.shuffle(covering)
    rng.shuffle(rest)
    first = covering + rest
    cycle = list(PLANTED) + ["background"] * BACKGROUND_PER_ROUND
    rng.shuffle(cycle)
    return [first[i] if i < len(first) else cycle[(i - len(first)) % len(cycle)]
            for i in range(patients)]


# --- rendering ------------------------------------------------------------------------------------

class _Ids:
    """Sequential, unique lab result ids."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"L{self.n:09d}"


def _stamp(rng: random.Random, day: date, minute: int) -> str:
    # Most feeds send an offset; some send local hospital time (default zone UTC), same instant.
    clock = f"{day.isoformat()}T{minute // 60:02d}:{minute % 60:02d}:00"
    return clock if rng.random() < 0.1 else clock + "+00:00"


def _render(rng: random.Random, pid: str, plan: _Plan, win: _Window, ids: _Ids,
            labs: list, events: list) -> None:
    """Append the plan's lab rows and event rows, each as (calendar day, row tuple)."""
    def status() -> str:
        return "F" if plan.noisy and rng.random() < 0.02 else "final"

    def lab(day: date, stamp: str, code: str, value: str, unit: str) -> None:
        labs.append((day, (pid, ids(), code, value, unit, stamp, status())))

    def event(day: date, kind: str, value: str = "", detail: str = "",
              at: str | None = None) -> None:
        events.append((day, (pid, kind, at or day.isoformat(), value, detail)))

    def weigh(day: date) -> None:
        kg = round(plan.weight + rng.uniform(-plan.weight_jitter, plan.weight_jitter), 1)
        event(day, "weight_kg", f"{kg:.1f}")
        if plan.weight_labs:  # a few feeds also send the weight as a lab result (same value)
            lab(day, _stamp(rng, day, 12 * 60), WEIGHT, f"{kg:.1f}", "kg")

    first_dose = plan.first_dose
    draws = set(plan.scr) | set(plan.alp) | set(plan.ca) | set(plan.alb) | set(plan.ggt)
    marks = [*draws, *plan.spot, *(plan.urine or ()), *(plan.dental or ()),
             *(day for day, _, _ in plan.diagnoses or ())]
    marks += [day for day in (plan.therapy_start, first_dose) if day is not None]
    earliest = min(marks)
    diagnosed = earliest - timedelta(days=rng.randint(20, 200))
    for day, value, code in plan.diagnoses or [(diagnosed, "MM", "C90.00")]:
        event(day, "diagnosis", value, code)
    event(diagnosed, "birth_date", plan.birth.isoformat())
    event(diagnosed, "sex", plan.sex)
    event(diagnosed, "bone_disease", "active" if plan.therapy else "none")
    weights = {diagnosed}
    if plan.therapy_start is not None:
        event(plan.therapy_start, "myeloma_therapy_start", plan.therapy)
    dental = plan.dental
    if dental is None:
        dental = [first_dose - timedelta(days=rng.randint(10, 40))] if first_dose else []
    for day in dental:
        event(day, "dental_exam", "completed")
        weights.add(day)
    for day, mg in sorted(plan.doses):
        detail = f"{mg:.1f}" if plan.agent == ZOL else f"{mg:.0f}"
        event(day, "bisphosphonate_dose", plan.agent, detail, f"{day.isoformat()}T14:00:00+00:00")
        weights.add(day)
    urine = plan.urine
    if urine is None:
        urine = _urine_series(rng, first_dose - timedelta(days=5), win.last) if first_dose else {}
    for day, mg in sorted(urine.items()):
        event(day, "albuminuria_mg_24h", str(mg))
    if plan.therapy_start is not None:
        day = plan.therapy_start + timedelta(days=90)
        while day <= win.last:
            event(day, "response", rng.choice(("VGPR", "PR", "CR")))
            event(day, "bone_disease", rng.choice(("active", "none")))
            day += timedelta(days=120)
    # A weight within 90 days before every creatinine, so CrCl can always be computed.
    known = sorted(weights)
    for draw in sorted(plan.scr):
        if not any(draw - timedelta(days=90) <= w < draw for w in known):
            known.append(draw - timedelta(days=1))
            known.sort()
    for day in known:
        weigh(day)

    for day in sorted(draws):
        minute = plan.clock if plan.clock is not None else rng.randrange(7 * 60, 12 * 60, 5)
        stamp = _stamp(rng, day, minute)  # one specimen, one time
        routine = day in plan.scr or day in plan.alp
        if day in plan.scr:
            mg_dl = plan.scr[day]
            if plan.si_creatinine:
                lab(day, stamp, SCR_SI, f"{mg_dl * 88.4:.1f}", "umol/L")
            else:
                lab(day, stamp, SCR, f"{mg_dl:.2f}", "mg/dL")
        if day in plan.ca:
            lab(day, stamp, CA, f"{plan.ca[day]:.2f}", "mg/dL")
        elif routine:
            lab(day, stamp, CA, f"{rng.uniform(9.0, 9.8):.1f}", "mg/dL")
        if day in plan.alb:
            if plan.alb[day] is not None:
                lab(day, stamp, ALB, f"{plan.alb[day]:.1f}", "g/dL")
        elif routine:
            lab(day, stamp, ALB, f"{rng.uniform(3.6, 4.4):.1f}", "g/dL")
        if day in plan.alp:
            u_l = plan.alp[day]
            if plan.si_alp:
                lab(day, stamp, ALP, f"{u_l / 60:.3f}", "ukat/L")
            elif day in plan.alp_planted:
                lab(day, stamp, ALP, f"{u_l:.1f}", "U/L")
            else:
                lab(day, stamp, ALP, f"{u_l:.0f}", "U/L")
        if day in plan.ggt:
            if plan.ggt[day] is not None:
                lab(day, stamp, GGT, str(plan.ggt[day]), "U/L")
        elif day in plan.alp:
            lab(day, stamp, GGT, str(rng.randint(15, 45)), "U/L")
    for day, ratio in sorted(plan.spot.items()):
        lab(day, _stamp(rng, day, 10 * 60), URINE_ACR, str(ratio), "mg/g")


def _bad_row(kind: str, pid: str, rid: str, night: date) -> tuple:
    """A row the ingest must quarantine; even a lenient reader could not turn it into a finding."""
    stamp = f"{night.isoformat()}T09:00:00+00:00"
    if kind == "missing_value":
        return (pid, rid, SCR, "", "mg/dL", stamp, "final")
    if kind == "non_numeric":
        return (pid, rid, CA, "abc", "mg/dL", stamp, "final")
    if kind == "impossible_date":
        return (pid, rid, ALP, "85", "U/L", f"{night.year}-02-30T08:00:00", "final")
    # 1.0 g/dL would be 1000 mg/dL even if converted: implausible either way.
    return (pid, rid, SCR, "1.0", "g/dL", stamp, "final")


def _write_csv(path: Path, header: tuple, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


#: the generator's own file names in a delivery folder, per format (NDJSON: one file a resource type)
_OWN_FILES = ("labs.csv", "events.csv", "labs.hl7", "bundle.json")
FORMATS = ("csv", "hl7", "fhir", "ndjson")


def _clear(out: Path) -> None:
    """Remove what an earlier run wrote here (only the generator's own file names)."""
    for name in ("expected_alerts.jsonl", "manifest.json"):
        (out / name).unlink(missing_ok=True)
    folders = [out / "history"]
    inbox = out / "inbox"
    if inbox.is_dir():
        folders += [night for night in inbox.iterdir() if night.is_dir()]
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in [*(folder / name for name in _OWN_FILES), *folder.glob("*.ndjson")]:
            path.unlink(missing_ok=True)
        if folder.parent == inbox and not any(folder.iterdir()):
            folder.rmdir()


def _write_delivery(folder: Path, labs: list[tuple], events: list[tuple], fmt: str) -> None:
    """One delivery folder's files in the chosen format: CSV (labs.csv, events.csv), HL7 v2
    (labs.hl7; clinical events stay CSV, ORU carries results only), a FHIR Bundle (bundle.json,
    labs and events together) or FHIR bulk NDJSON (one file a resource type).

    A CSV feed with no rows (None) still sends its header-only file, as real feeds do: a night
    without that file is the feed missing, and the data-quality check says so in red. (HL7 has no
    header-only file: an ORU feed with nothing to send sends nothing.)"""
    if fmt == "csv":
        _write_csv(folder / "labs.csv", LAB_HEADER, labs or [])
        _write_csv(folder / "events.csv", EVENT_HEADER, events or [])
    elif fmt == "hl7":
        from bonewatch.ingest import hl7

        if labs:
            folder.mkdir(parents=True, exist_ok=True)
            hl7.write_hl7(folder / "labs.hl7", labs)
        _write_csv(folder / "events.csv", EVENT_HEADER, events or [])
    elif fmt in ("fhir", "ndjson"):
        from bonewatch.ingest import fhir

        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "fhir":
            fhir.write_bundle(folder / "bundle.json", labs or [], events or [])
        else:
            fhir.write_ndjson(folder, labs or [], events or [])
    else:
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")


def generate(out: Path, patients: int = 60, seed: int = 7, last_night: date = date(2025, 6, 30),
             nights: int = 30, fmt: str = "csv") -> dict:
    """Write a synthetic cohort under `out`; return the manifest.

    In: the output folder, the number of patients, the random seed, the last night and how many
    nights end there (>= 14), and the format of the feeds (`FORMATS`: csv, hl7, fhir, ndjson; the
    same cohort in each). Out, under `out`: `history/` (everything before the first night),
    `inbox/YYYY-MM-DD/` (what was collected or happened that day; only days with rows), each with
    `labs.csv` + `events.csv` (csv; header only for a feed without rows that day), `labs.hl7` + `events.csv` (hl7), `bundle.json` (fhir) or one
    `<ResourceType>.ndjson` a resource type (ndjson); `expected_alerts.jsonl` (one {patient_id, rule, raised_on, scenario} a
    line, sorted) and `manifest.json` (counts, and `patient_scenarios`: patient_id -> scenario).
    The same arguments always give byte-identical files.
    """
    if patients < 1:
        raise ValueError("patients must be at least 1")
    if nights < MIN_NIGHTS:
        raise ValueError(f"nights must be at least {MIN_NIGHTS}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    out = Path(out)
    first_night = last_night - timedelta(days=nights - 1)
    win = _Window.of(first_night, last_night)
    rng = random.Random(seed)
    scenarios = _assign(rng, patients)
    mrns = [f"{n:09d}" for n in rng.sample(range(100_000, 10_000_000), patients)]

    ids = _Ids()
    labs: list[tuple[date, tuple]] = []
    events: list[tuple[date, tuple]] = []
    expected: list[dict] = []
    for pid, scenario in zip(mrns, scenarios, strict=True):
        plan = _BUILDERS[scenario](rng, win, scenario)
        _render(rng, pid, plan, win, ids, labs, events)
        expected += [{"patient_id": pid, "rule": rule, "raised_on": day.isoformat(),
                      "scenario": scenario} for rule, day in plan.expected]

    history_labs = [row for day, row in labs if day < first_night]
    history_events = [row for day, row in events if day < first_night]
    nightly_labs: dict[date, list[tuple]] = defaultdict(list)
    nightly_events: dict[date, list[tuple]] = defaultdict(list)
    for day, row in labs:
        if first_night <= day <= last_night:
            nightly_labs[day].append(row)
    for day, row in events:
        if first_night <= day <= last_night:
            nightly_events[day].append(row)

    # ~1 % extra rows the ingest must quarantine, nightly files only, on background patients so
    # that no planted scenario depends on how they are handled.
    total = sum(len(rows) for rows in nightly_labs.values())
    bad_rows = max(len(BAD_KINDS), round(total * BAD_ROW_SHARE)) if total else 0
    hosts = [p for p, s in zip(mrns, scenarios, strict=True) if s == "background"] or mrns
    lab_nights = sorted(nightly_labs)
    for i in range(bad_rows):
        night = rng.choice(lab_nights)
        nightly_labs[night].append(_bad_row(BAD_KINDS[i % len(BAD_KINDS)], rng.choice(hosts),
                                            ids(), night))

    _clear(out)
    by_lab = lambda row: (row[5], row[0], row[1])  # noqa: E731  collected_at, patient, result
    by_event = lambda row: (row[2], row[0], row[1], row[3])  # noqa: E731
    _write_delivery(out / "history", sorted(history_labs, key=by_lab), sorted(history_events, key=by_event), fmt)
    for day in sorted(set(nightly_labs) | set(nightly_events)):
        labs_rows = sorted(nightly_labs[day], key=by_lab) if day in nightly_labs else None
        event_rows = sorted(nightly_events[day], key=by_event) if day in nightly_events else None
        _write_delivery(out / "inbox" / day.isoformat(), labs_rows, event_rows, fmt)

    expected.sort(key=lambda a: (a["raised_on"], a["patient_id"], a["rule"]))
    with (out / "expected_alerts.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(json.dumps(alert) + "\n" for alert in expected)
    manifest = {
        "seed": seed,
        "format": fmt,
        "patients": patients,
        "first_night": first_night.isoformat(),
        "last_night": last_night.isoformat(),
        "nights": nights,
        "scenarios": {name: scenarios.count(name) for name in SCENARIOS},
        "bad_rows": bad_rows,
        "patient_scenarios": dict(sorted(zip(mrns, scenarios, strict=True))),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
