"""Renal rules: RENAL_HOLD, RENAL_RESUME and zoledronic acid DOSE_BAND (SPEC 5 and 10).

The hold/resume state machine runs per bisphosphonate course over its creatinines in collection
order, vectorised: a crossing marks "held", a value back within 10 % of baseline marks "active",
and the state in between is carried forward.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding
from bonewatch.rules.common import conflict_evidence, finding, iso, num
from bonewatch.rules.derive import Facts, cockcroft_gault, round_half_up

BANDS = [  # (label, dose mg) in the label's order; see band_of_crcl for the half-open limits
    ("CrCl > 60", 4.0), ("CrCl 50-60", 3.5), ("CrCl 40-<50", 3.3), ("CrCl 30-<40", 3.0), ("CrCl < 30", None),
]


def band_of_crcl(crcl: pd.Series) -> pd.Series:
    """Dose band index (0..4) of each CrCl, half-open as SPEC 10 says; NaN stays NaN."""
    c = pd.Series(crcl, dtype="float64")
    band = np.select([c > 60, c >= 50, c >= 40, c >= 30, c < 30], [0, 1, 2, 3, 4], default=-1).astype("float64")
    band[c.isna().to_numpy()] = np.nan
    return pd.Series(band, index=c.index)


def band_of_dose(dose_mg: pd.Series, tolerance: float) -> pd.Series:
    """Band index of a dose (within `tolerance` mg of a band's dose); -1 when it fits none."""
    d = pd.Series(dose_mg, dtype="float64")
    out = pd.Series(-1.0, index=d.index)
    for index, (_, mg) in enumerate(BANDS):
        if mg is not None:
            out[(d - mg).abs() <= tolerance + 1e-9] = index
    out[d.isna()] = np.nan
    return out


def renal_baselines(facts: Facts, settings: Settings) -> pd.DataFrame:
    """One row per bisphosphonate course: the renal baseline (SPEC 4), or why there is none.

    Two exact creatinines at the baseline's instant that differ: the lower is the baseline (and
    its CrCl), `base_note` says so. Everywhere else the higher is used, but for a baseline the
    lower is the cautious reading: a rise is measured from it (a larger rise, a lower threshold)
    and a resume needs a lower value."""
    courses = facts.courses[facts.courses["cls"] == "bisphosphonate"].copy()
    if courses.empty:
        return courses.assign(base_value=np.nan, base_at=pd.NaT, base_day=pd.NaT, base_crcl=np.nan,
                              base_censor="", base_result_id=None, base_note=None)
    window = pd.Timedelta(days=settings.clinical.renal_baseline_window_days)
    scr = facts.scr[facts.scr["censor"] == ""].sort_values("collected_day")
    # the last creatinine whose calendar day is on or before the first dose, within the window
    scr = scr.sort_values(["collected_day", "collected_at"]).drop_duplicates(["patient_id", "collected_day"], keep="last")
    courses["_i"] = np.arange(len(courses))
    merged = pd.merge_asof(
        courses.sort_values("start"),
        scr[["patient_id", "collected_day", "collected_at", "value", "crcl", "result_id", "age", "sex",
             "weight_kg", "crcl_missing"]].rename(columns={
                 "collected_day": "base_day", "collected_at": "base_at", "value": "base_value",
                 "crcl": "base_crcl", "result_id": "base_result_id", "age": "base_age", "sex": "base_sex",
                 "weight_kg": "base_weight", "crcl_missing": "base_crcl_missing"}),
        left_on="start", right_on="base_day", by="patient_id", tolerance=window)
    clashes = facts.conflicts[(facts.conflicts["analyte"] == "creatinine") & facts.conflicts["lowest"].notna()]
    merged = merged.merge(clashes[["patient_id", "at", "lowest", "lowest_note"]].rename(
        columns={"at": "base_at", "lowest_note": "base_note"}), on=["patient_id", "base_at"], how="left")
    lower = merged["lowest"].notna() & (merged["lowest"] < merged["base_value"])
    if lower.any():
        merged.loc[lower, "base_crcl"] = cockcroft_gault(
            merged.loc[lower, "base_age"], merged.loc[lower, "base_weight"], merged.loc[lower, "lowest"],
            merged.loc[lower, "base_sex"])
        merged.loc[lower, "base_value"] = merged.loc[lower, "lowest"]
    return merged.sort_values("_i").drop(columns=["_i", "lowest"]).reset_index(drop=True)


def renal_states(facts: Facts, baselines: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Each creatinine after its course's baseline, with the hold state after it."""
    hold = settings.rule("RENAL_HOLD").params
    resume = settings.rule("RENAL_RESUME").params
    with_base = baselines.dropna(subset=["base_value"])
    if with_base.empty or facts.scr.empty:
        return pd.DataFrame(columns=["patient_id", "course_no", "collected_at", "held", "cross", "resume",
                                     "episode_day", "value", "rise"])
    rows = facts.scr.merge(with_base[["patient_id", "course_no", "start", "end", "base_value", "base_at"]],
                           on="patient_id")
    rows = rows[(rows["collected_at"] > rows["base_at"]) & (rows["collected_day"] <= rows["end"])]
    rows = rows.sort_values(["patient_id", "course_no", "collected_at"], kind="stable").reset_index(drop=True)
    base = rows["base_value"]
    threshold = np.where(round_half_up(base, 2) >= hold["abnormal_baseline"], hold["rise_abnormal"], hold["rise_normal"])
    rise = round_half_up(rows["value"] - base, 2)
    exact, above, below = rows["censor"] == "", rows["censor"] == ">", rows["censor"] == "<"
    # a censored value drives a rule only when its bound decides it (SPEC 10)
    rows["rise"] = rise
    rows["cross"] = (exact | above) & (rise >= threshold - 1e-9)
    limit = round_half_up(resume["resume_factor"] * base, 2)
    rows["resume"] = ~rows["cross"] & (exact | below) & (round_half_up(rows["value"], 2) <= limit + 1e-9)
    rows["threshold"] = threshold
    rows["resume_limit"] = limit
    mark = pd.Series(np.where(rows["cross"], 1.0, np.where(rows["resume"], 0.0, np.nan)), index=rows.index)
    key = [rows["patient_id"], rows["course_no"]]
    rows["held"] = mark.groupby(key).ffill().fillna(0.0).astype(bool)
    was_held = rows["held"].groupby(key).shift(fill_value=False).astype(bool)
    rows["hold_starts"] = rows["held"] & ~was_held
    rows["resumes"] = ~rows["held"] & was_held
    start_day = rows["collected_day"].where(rows["hold_starts"])
    rows["episode_day"] = start_day.groupby(key).ffill()
    return rows


def check_renal(facts: Facts, settings: Settings) -> tuple[list[Finding], pd.DataFrame, pd.DataFrame]:
    """RENAL_HOLD and RENAL_RESUME findings for current bisphosphonate courses. Also returns the
    renal hold state per current course (for DOSE_BAND) and the baselines (for the course index)."""
    baselines = renal_baselines(facts, settings)
    states = renal_states(facts, baselines, settings)
    empty = pd.DataFrame(columns=["patient_id", "course_no", "held"])
    current = baselines[~baselines["discontinued"].astype(bool)] if not baselines.empty else baselines
    if current.empty or states.empty:
        return [], empty, baselines
    key = ["patient_id", "course_no"]
    last = states.groupby(key, sort=False).tail(1)
    last = last.merge(current[[*key, "base_day", "base_crcl", "base_result_id", "base_note"]], on=key)
    crossings = (states[states["hold_starts"]][[*key, "collected_day", "collected_at", "value", "rise", "threshold"]]
                 .rename(columns={"collected_day": "episode_day", "collected_at": "cross_time", "value": "cross_value",
                                  "rise": "cross_rise", "threshold": "cross_threshold"})
                 .drop_duplicates([*key, "episode_day"]))
    resumes = (states[states["resumes"]][[*key, "collected_day", "collected_at", "value", "resume_limit", "crcl",
                                          "crcl_missing", "weight_note"]]
               .groupby(key, sort=False).tail(1)
               .rename(columns={"collected_day": "resume_day", "collected_at": "resume_time", "value": "resume_value",
                                "crcl": "resume_crcl", "crcl_missing": "resume_crcl_missing", "resume_limit": "resume_at",
                                "weight_note": "resume_weight_note"}))
    last = last.dropna(subset=["episode_day"]).merge(crossings, on=[*key, "episode_day"], how="left")
    last = last.merge(resumes, on=key, how="left")
    hold_rule = settings.rule("RENAL_HOLD").params
    findings: list[Finding] = []
    for row in last.itertuples(index=False):
        episode = f"course {iso(row.start)}; hold {iso(row.episode_day)}"
        baseline = {"scr_mg_dl": num(row.base_value), "date": iso(row.base_day),
                    "rule": f"last creatinine on or before the course's first dose ({iso(row.start)}), "
                            f"within {settings.clinical.renal_baseline_window_days} days before it"}
        if row.held:
            above = row.cross_threshold > hold_rule["rise_normal"]
            findings.append(finding(settings, "RENAL_HOLD", row.patient_id, episode, row.episode_day, {
                "summary": (f"Serum creatinine {row.cross_value:.2f} mg/dL on {iso(row.episode_day)} is "
                            f"{row.cross_rise:.2f} mg/dL above the renal baseline {row.base_value:.2f} mg/dL "
                            f"({iso(row.base_day)}); the hold threshold is a rise of {row.cross_threshold:.2f} mg/dL "
                            f"for a baseline {'at or above' if above else 'below'} "
                            f"{hold_rule['abnormal_baseline']:.1f} mg/dL."),
                "scr": {"value_mg_dl": num(row.cross_value), "date": iso(row.episode_day),
                        "rise_mg_dl": num(row.cross_rise), "threshold_mg_dl": num(row.cross_threshold)},
                "arithmetic": (f"{row.cross_value:.2f} - {row.base_value:.2f} = {row.cross_rise:.2f} mg/dL "
                               f">= {row.cross_threshold:.2f}"),
                "latest_scr": {"value_mg_dl": num(row.value), "date": iso(row.collected_day)},
                "baseline": baseline, "course_start": iso(row.start),
                **conflict_evidence(row.base_note, facts.conflict(row.patient_id, "creatinine", row.cross_time),
                                    facts.conflict(row.patient_id, "creatinine", row.collected_at)),
            }))
        elif not pd.isna(row.resume_day) and row.resume_day >= row.episode_day:
            crcl = ("CrCl not computed: no " + row.resume_crcl_missing if pd.isna(row.resume_crcl)
                    else f"CrCl {row.resume_crcl:.1f} mL/min")
            findings.append(finding(settings, "RENAL_RESUME", row.patient_id, episode, row.resume_day, {
                "summary": (f"Serum creatinine {row.resume_value:.2f} mg/dL on {iso(row.resume_day)} is back "
                            f"within 10% of the renal baseline {row.base_value:.2f} mg/dL (limit "
                            f"{row.resume_at:.2f} mg/dL); the hold began {iso(row.episode_day)}. {crcl}."),
                "scr": {"value_mg_dl": num(row.resume_value), "date": iso(row.resume_day),
                        "limit_mg_dl": num(row.resume_at)},
                "arithmetic": f"{row.resume_value:.2f} <= 1.10 x {row.base_value:.2f} = {row.resume_at:.2f} mg/dL",
                "hold_began": iso(row.episode_day), "baseline": baseline, "course_start": iso(row.start),
                "crcl_ml_min": num(row.resume_crcl, 1),
                "missing": None if not pd.isna(row.resume_crcl) else f"CrCl: no {row.resume_crcl_missing}",
                **conflict_evidence(row.base_note, facts.conflict(row.patient_id, "creatinine", row.resume_time),
                                    None if pd.isna(row.resume_crcl) else row.resume_weight_note),
            }))
    all_last = states.groupby(key, sort=False).tail(1)[[*key, "held"]]
    return findings, all_last, baselines


def check_dose_band(facts: Facts, held: pd.DataFrame, settings: Settings) -> list[Finding]:
    """DOSE_BAND: on an active (not held) zoledronic acid course, the band of the latest CrCl
    differs from the band of the last dose given (SPEC 10)."""
    params = settings.rule("DOSE_BAND").params
    courses = facts.courses[(facts.courses["cls"] == "bisphosphonate") & ~facts.courses["discontinued"].astype(bool)]
    if courses.empty or facts.scr.empty:
        return []
    last_dose = facts.doses.merge(courses[["patient_id", "cls", "course_no", "start"]],
                                  on=["patient_id", "cls", "course_no"]).groupby("patient_id").tail(1)
    last_dose = last_dose[last_dose["agent"] == "zoledronic_acid"]
    latest = facts.scr.groupby("patient_id").tail(1)
    rows = last_dose.merge(latest, on="patient_id", suffixes=("", "_scr"))
    rows = rows.merge(held, on=["patient_id", "course_no"], how="left")
    rows = rows[~rows["held"].fillna(False).astype(bool) & rows["crcl"].notna() & rows["dose_mg"].notna()]
    rows = rows.assign(crcl_band=band_of_crcl(rows["crcl"]).to_numpy(),
                       dose_band=band_of_dose(rows["dose_mg"], params["dose_tolerance_mg"]).to_numpy())
    rows = rows[rows["crcl_band"] != rows["dose_band"]]
    findings = []
    for row in rows.itertuples(index=False):
        label, mg = BANDS[int(row.crcl_band)]
        target = f"{mg:.1f} mg" if mg is not None else "not recommended"
        action = (f"Give zoledronic acid {mg:.1f} mg (band {label}) instead of {row.dose_mg:.1f} mg."
                  if mg is not None else
                  "CrCl below 30 mL/min: do not give zoledronic acid; consider denosumab.")
        sex_word = {"F": "female, x 0.85", "M": "male"}.get(row.sex, row.sex)
        findings.append(finding(settings, "DOSE_BAND", row.patient_id,
                                f"course {iso(row.start)}; band {label}", max(row.day, row.collected_day), {
            "summary": (f"CrCl {row.crcl:.1f} mL/min on {iso(row.collected_day)} is in band {label} "
                        f"({target}); the last dose on {iso(row.day)} was {row.dose_mg:.1f} mg."),
            "crcl": {"value_ml_min": num(row.crcl, 1), "date": iso(row.collected_day),
                     "scr_mg_dl": num(row.value), "age_years": int(row.age), "weight_kg": num(row.weight_kg, 1),
                     "weight_date": iso(row.weight_day), "sex": row.sex,
                     "formula": f"(140 - {int(row.age)}) x {row.weight_kg:.1f} / (72 x {row.value:.2f}) ({sex_word})"},
            "last_dose": {"date": iso(row.day), "dose_mg": num(row.dose_mg), "agent": "zoledronic acid"},
            "target_dose": target, "course_start": iso(row.start),
            **conflict_evidence(facts.conflict(row.patient_id, "creatinine", row.collected_at), row.weight_note),
        }, action=action))
    return findings


def albuminuria_states(facts: Facts, settings: Settings) -> pd.DataFrame:
    """24-h urine albumin of each current bisphosphonate course, with the ALBUMINURIA hold state:
    held from a value above the limit until a later value at or below it."""
    from bonewatch.rules.derive import current_courses, urine_albumin

    limit = float(settings.rule("ALBUMINURIA").params["threshold_mg_24h"])
    courses = current_courses(facts, "bisphosphonate")[["patient_id", "course_no", "start", "end"]]
    rows = urine_albumin(facts, only_24h=True).merge(courses, on="patient_id")
    rows = rows[(rows["day"] >= rows["start"]) & (rows["day"] <= rows["end"])]
    rows = rows.sort_values(["patient_id", "course_no", "at"], kind="stable").reset_index(drop=True)
    if rows.empty:
        return rows.assign(held=pd.Series(dtype=bool), episode_day=pd.Series(dtype="datetime64[ns]"))
    over = (rows["censor"] != "<") & (rows["value"] > limit + 1e-9)
    under = (rows["censor"] != ">") & (rows["value"] <= limit + 1e-9)
    mark = pd.Series(np.where(over, 1.0, np.where(under, 0.0, np.nan)), index=rows.index)
    key = [rows["patient_id"], rows["course_no"]]
    rows["held"] = mark.groupby(key).ffill().fillna(0.0).astype(bool)
    starts = rows["held"] & ~rows["held"].groupby(key).shift(fill_value=False).astype(bool)
    rows["episode_day"] = rows["day"].where(starts).groupby(key).ffill()
    # the result that started the episode (the first of its day may be another, under the limit)
    for column in ("value", "day", "at"):
        rows[f"first_{column}"] = rows[column].where(starts).groupby(key).ffill()
    return rows


def check_albuminuria(facts: Facts, settings: Settings) -> tuple[list[Finding], pd.DataFrame]:
    """ALBUMINURIA findings, and the held state per current course (for DOSE_BAND)."""
    limit = float(settings.rule("ALBUMINURIA").params["threshold_mg_24h"])
    rows = albuminuria_states(facts, settings)
    if rows.empty:
        return [], pd.DataFrame(columns=["patient_id", "course_no", "held"])
    last = rows.groupby(["patient_id", "course_no"], sort=False).tail(1)
    findings = []
    for row in last[last["held"]].itertuples(index=False):
        findings.append(finding(settings, "ALBUMINURIA", row.patient_id,
                                f"course {iso(row.start)}; from {iso(row.episode_day)}", row.episode_day, {
            "summary": (f"Urine albumin {row.first_value:.0f} mg/24 h on {iso(row.first_day)} is above {limit:.0f} "
                        "mg/24 h" + (f"; the latest, {row.value:.0f} mg/24 h on {iso(row.day)}, is still above."
                                     if row.at != row.first_at else ".")),
            "first_over": {"value_mg_24h": num(row.first_value, 0), "date": iso(row.first_day)},
            "latest": {"value_mg_24h": num(row.value, 0), "date": iso(row.day)},
            "limit_mg_24h": limit, "course_start": iso(row.start),
            **conflict_evidence(facts.conflict(row.patient_id, "urine_albumin_24h", row.first_at),
                                facts.conflict(row.patient_id, "urine_albumin_24h", row.at)),
        }))
    return findings, last[["patient_id", "course_no", "held"]]
