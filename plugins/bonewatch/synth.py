"""Synthetic cohort generator: an independent ground truth for the rule engine.

`generate()` writes a cohort of myeloma patients on bisphosphonates in the canonical input formats
(SPEC 2.1 lab CSV, SPEC 2.4 events CSV), split into a history delivery and one inbox folder per
night, and writes down which alerts the rules must raise and on which night
(`expected_alerts.jsonl`). Each patient carries exactly one scenario: clean background data, or a
clinical situation planted with explicit numbers at (or just short of) a threshold.

This module deliberately does not import `bonewatch.rules`: a ground truth computed by the code
under test would prove nothing. The few clinical formulas it needs (Cockcroft-Gault, zoledronic
acid dose bands, calendar months) are re-implemented here from SPEC sections 4, 5 and 10.
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
)
PLANTED = SCENARIOS[1:]
# After every planted scenario has appeared once, patients cycle over this many background slots
# per round of planted ones: about 60 % background in a large cohort, about 45 % at 60 patients.
BACKGROUND_PER_ROUND = 21
MIN_NIGHTS = 14  # renal_resume needs a hold and a resume a week apart, both inside the window

SCR, SCR_SI, ALP, CA, ALB, GGT, WEIGHT = (
    "2160-0", "14682-9", "6768-6", "17861-6", "1751-7", "2324-2", "29463-7",
)
ZOL, PAM = "zoledronic_acid", "pamidronate"
DOSE_INTERVAL = 28
PAMIDRONATE_MG = 90.0
BAD_ROW_SHARE = 0.01
BAD_KINDS = ("unknown_code", "non_numeric", "impossible_date", "unconvertible_unit")


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
    therapy: str
    therapy_start: date
    agent: str = ZOL
    weight_jitter: float = 0.0           # kg either side of `weight`; 0 for planted patients
    doses: list[tuple[date, float]] = field(default_factory=list)
    scr: dict[date, float] = field(default_factory=dict)     # draw day -> SCr mg/dL
    alp: dict[date, float] = field(default_factory=dict)     # draw day -> ALP U/L (GGT alongside)
    alp_planted: set[date] = field(default_factory=set)      # ALP written with one decimal
    si_creatinine: bool = False
    si_alp: bool = False
    noisy: bool = False                  # background only: some "F" statuses
    weight_labs: bool = False            # background only: weights also sent as lab results
    expected: list[tuple[str, date]] = field(default_factory=list)

    @property
    def first_dose(self) -> date:
        return self.doses[0][0]


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


_BUILDERS = {
    "background": lambda rng, win, _: _background(rng, win),
    **{name: _renal for name in PLANTED if name.startswith("renal_")},
    **{name: _dose_band for name in PLANTED if name.startswith("dose_band_")},
    **{name: _alp for name in PLANTED if name.startswith("alp_")},
    "review_1y": _review,
    "review_2y": _review,
}


def _assign(rng: random.Random, patients: int) -> list[str]:
    """One scenario a patient: every planted one first (shuffled), then a background-heavy cycle."""
    first = list(PLANTED)
    rng.shuffle(first)
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
    earliest = min([plan.therapy_start, first_dose, *plan.scr, *plan.alp])
    diagnosed = earliest - timedelta(days=rng.randint(20, 200))
    event(diagnosed, "diagnosis", "MM", "C90.00")
    event(diagnosed, "birth_date", plan.birth.isoformat())
    event(diagnosed, "sex", plan.sex)
    event(diagnosed, "bone_disease", "active")
    weights = {diagnosed}
    event(plan.therapy_start, "myeloma_therapy_start", plan.therapy)
    dental = first_dose - timedelta(days=rng.randint(10, 40))
    event(dental, "dental_exam", "completed")
    weights.add(dental)
    for day, mg in plan.doses:
        detail = f"{mg:.0f}" if plan.agent == PAM else f"{mg:.1f}"
        event(day, "bisphosphonate_dose", plan.agent, detail, f"{day.isoformat()}T14:00:00+00:00")
        weights.add(day)
    day = first_dose - timedelta(days=5)
    while day <= win.last:
        event(day, "albuminuria_mg_24h", str(rng.randint(50, 200)))
        day += timedelta(days=90)
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

    for day in sorted(set(plan.scr) | set(plan.alp)):
        stamp = _stamp(rng, day, rng.randrange(7 * 60, 12 * 60, 5))  # one specimen, one time
        if day in plan.scr:
            mg_dl = plan.scr[day]
            if plan.si_creatinine:
                lab(day, stamp, SCR_SI, f"{mg_dl * 88.4:.1f}", "umol/L")
            else:
                lab(day, stamp, SCR, f"{mg_dl:.2f}", "mg/dL")
        lab(day, stamp, CA, f"{rng.uniform(9.0, 9.8):.1f}", "mg/dL")
        lab(day, stamp, ALB, f"{rng.uniform(3.6, 4.4):.1f}", "g/dL")
        if day in plan.alp:
            u_l = plan.alp[day]
            if plan.si_alp:
                lab(day, stamp, ALP, f"{u_l / 60:.3f}", "ukat/L")
            elif day in plan.alp_planted:
                lab(day, stamp, ALP, f"{u_l:.1f}", "U/L")
            else:
                lab(day, stamp, ALP, f"{u_l:.0f}", "U/L")
            lab(day, stamp, GGT, str(rng.randint(15, 45)), "U/L")


def _bad_row(kind: str, pid: str, rid: str, night: date) -> tuple:
    """A row the ingest must quarantine; even a lenient reader could not turn it into a finding."""
    stamp = f"{night.isoformat()}T09:00:00+00:00"
    if kind == "unknown_code":
        return (pid, rid, "99999-9", "12.3", "mg/dL", stamp, "final")
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


def _clear(out: Path) -> None:
    """Remove what an earlier run wrote here (only the generator's own file names)."""
    for name in ("history/labs.csv", "history/events.csv", "expected_alerts.jsonl",
                 "manifest.json"):
        (out / name).unlink(missing_ok=True)
    inbox = out / "inbox"
    if inbox.is_dir():
        for night in inbox.iterdir():
            if night.is_dir():
                for name in ("labs.csv", "events.csv"):
                    (night / name).unlink(missing_ok=True)
                if not any(night.iterdir()):
                    night.rmdir()


def generate(out: Path, patients: int = 60, seed: int = 7, last_night: date = date(2025, 6, 30),
             nights: int = 30) -> dict:
    """Write a synthetic cohort under `out`; return the manifest.

    In: the output folder, the number of patients, the random seed, the last night and how many
    nights end there (>= 14). Out, under `out`: `history/{labs,events}.csv` (everything before the
    first night), `inbox/YYYY-MM-DD/{labs,events}.csv` (what was collected or happened that day;
    only days with rows), `expected_alerts.jsonl` (one {patient_id, rule, raised_on, scenario} a
    line, sorted) and `manifest.json`. The same arguments always give byte-identical files.
    """
    if patients < 1:
        raise ValueError("patients must be at least 1")
    if nights < MIN_NIGHTS:
        raise ValueError(f"nights must be at least {MIN_NIGHTS}")
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
    bad_rows = max(1, round(total * BAD_ROW_SHARE)) if total else 0
    hosts = [p for p, s in zip(mrns, scenarios, strict=True) if s == "background"] or mrns
    lab_nights = sorted(nightly_labs)
    for i in range(bad_rows):
        night = rng.choice(lab_nights)
        nightly_labs[night].append(_bad_row(BAD_KINDS[i % len(BAD_KINDS)], rng.choice(hosts),
                                            ids(), night))

    _clear(out)
    by_lab = lambda row: (row[5], row[0], row[1])  # noqa: E731  collected_at, patient, result
    by_event = lambda row: (row[2], row[0], row[1], row[3])  # noqa: E731
    _write_csv(out / "history" / "labs.csv", LAB_HEADER, sorted(history_labs, key=by_lab))
    _write_csv(out / "history" / "events.csv", EVENT_HEADER, sorted(history_events, key=by_event))
    for day, rows in nightly_labs.items():
        _write_csv(out / "inbox" / day.isoformat() / "labs.csv", LAB_HEADER,
                   sorted(rows, key=by_lab))
    for day, rows in nightly_events.items():
        _write_csv(out / "inbox" / day.isoformat() / "events.csv", EVENT_HEADER,
                   sorted(rows, key=by_event))

    expected.sort(key=lambda a: (a["raised_on"], a["patient_id"], a["rule"]))
    with (out / "expected_alerts.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(json.dumps(alert) + "\n" for alert in expected)
    manifest = {
        "seed": seed,
        "patients": patients,
        "first_night": first_night.isoformat(),
        "last_night": last_night.isoformat(),
        "nights": nights,
        "scenarios": {name: scenarios.count(name) for name in SCENARIOS},
        "bad_rows": bad_rows,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
