"""HYPOCALCEMIA (SPEC 4, 5, 10): latest calcium, corrected for a low albumin within 2 days."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding
from bonewatch.rules.common import conflict_evidence, finding, iso, num
from bonewatch.rules.derive import Facts, current_courses, round_half_up

ALBUMIN_NORMAL = 4.0   # g/dL: the correction applies only below it (SPEC 4)


def corrected_calcium(facts: Facts, albumin_days: int) -> pd.DataFrame:
    """Every calcium with the albumin nearest in time within `albumin_days` calendar days (the later
    one on a tie) and the value compared: Ca + 0.8 x (4.0 - albumin) when that albumin is below
    ALBUMIN_NORMAL g/dL (column `corrected_flag`), else the measured calcium (no albumin, or one
    at or above 4.0)."""
    ca = facts.labs[facts.labs["analyte"] == "calcium"][
        ["patient_id", "collected_at", "collected_day", "value", "censor"]].reset_index(drop=True)
    alb = facts.labs[(facts.labs["analyte"] == "albumin") & (facts.labs["censor"] == "")][
        ["patient_id", "collected_at", "collected_day", "value"]].rename(
        columns={"collected_at": "alb_at", "collected_day": "alb_day", "value": "albumin"})
    if ca.empty:
        return ca.assign(albumin=np.nan, alb_day=pd.NaT, corrected=np.nan, corrected_flag=False)
    ca["_i"] = np.arange(len(ca))
    tolerance = pd.Timedelta(days=albumin_days + 1)
    picks = []
    for direction in ("backward", "forward"):
        if alb.empty:
            break
        m = pd.merge_asof(ca.sort_values("collected_at"), alb.sort_values("alb_at"), left_on="collected_at",
                          right_on="alb_at", by="patient_id", direction=direction, tolerance=tolerance)
        m = m[(m["alb_day"] - m["collected_day"]).abs() <= pd.Timedelta(days=albumin_days)]
        picks.append(m[["_i", "alb_at", "alb_day", "albumin"]].assign(gap=(m["alb_at"] - m["collected_at"]).abs()))
    if picks:
        both = pd.concat(picks).sort_values(["_i", "gap", "alb_at"], ascending=[True, True, False])
        ca = ca.merge(both.drop_duplicates("_i").drop(columns="gap"), on="_i", how="left")
    else:
        ca = ca.assign(alb_at=pd.NaT, alb_day=pd.NaT, albumin=np.nan)
    # SPEC 4: the formula corrects for a low albumin; "correcting" a normal calcium down for a high
    # albumin raised false alarms (9.5 mg/dL with albumin 5.4 g/dL became 8.38). Compared at the
    # albumin's reporting precision (0.1 g/dL, SPEC 10): 40 g/L is 4.0, not 3.9999.
    ca["corrected_flag"] = round_half_up(ca["albumin"], 1) < ALBUMIN_NORMAL - 1e-9
    raw = ca["value"] + 0.8 * (ALBUMIN_NORMAL - ca["albumin"])
    ca["corrected"] = round_half_up(raw.where(ca["corrected_flag"], ca["value"]), 2)
    return ca.sort_values(["patient_id", "collected_at"]).drop(columns="_i").reset_index(drop=True)


def check_hypocalcemia(facts: Facts, settings: Settings) -> list[Finding]:
    """On any bone-modifying agent, the latest (corrected) calcium is below the threshold. The
    episode starts at the first low calcium of the current run of low values."""
    params = settings.rule("HYPOCALCEMIA").params
    on_agent = set(current_courses(facts)["patient_id"])
    ca = corrected_calcium(facts, int(params["albumin_days"]))
    ca = ca[ca["patient_id"].isin(on_agent)]
    if ca.empty:
        return []
    threshold = float(params["threshold"])
    # a censored calcium counts as low only when its bound decides it ('<8.0' does, '>8.0' never)
    ca["low"] = (ca["censor"] != ">") & (ca["corrected"] < threshold - 1e-9)
    run = (~ca["low"]).astype(int).groupby(ca["patient_id"]).cumsum()
    ca["run_start"] = ca["collected_day"].where(ca["low"]).groupby([ca["patient_id"], run]).transform("min")
    latest = ca.groupby("patient_id").tail(1)
    findings = []
    for row in latest[latest["low"]].itertuples(index=False):
        albumin = not pd.isna(row.albumin)
        corrected = bool(row.corrected_flag)
        calcium = f"calcium {row.value:.2f} mg/dL on {iso(row.collected_day)}"
        if corrected:
            what = (f"corrected calcium {row.corrected:.2f} mg/dL ({calcium}, albumin {row.albumin:.1f} g/dL "
                    f"on {iso(row.alb_day)})")
            arithmetic = f"{row.value:.2f} + 0.8 x (4.0 - {row.albumin:.1f}) = {row.corrected:.2f} mg/dL"
        elif albumin:
            what = (f"{calcium} (albumin {row.albumin:.1f} g/dL on {iso(row.alb_day)} is not below "
                    f"{ALBUMIN_NORMAL:.1f} g/dL: the measured calcium is used)")
            arithmetic = f"albumin {row.albumin:.1f} g/dL is not below {ALBUMIN_NORMAL:.1f}: the measured calcium is used"
        else:
            what = f"{calcium} (uncorrected: no albumin within {int(params['albumin_days'])} days)"
            arithmetic = "uncorrected"
        findings.append(finding(settings, "HYPOCALCEMIA", row.patient_id, f"low calcium from {iso(row.run_start)}",
                                row.collected_day, {
            "summary": f"The latest {what} is below {threshold:.2f} mg/dL.",
            "calcium": {"value_mg_dl": num(row.value), "date": iso(row.collected_day), "censor": row.censor or None},
            "albumin": {"value_g_dl": num(row.albumin, 1), "date": iso(row.alb_day)} if albumin else None,
            "corrected_mg_dl": num(row.corrected), "corrected": corrected, "arithmetic": arithmetic,
            "missing": None if albumin else f"albumin within {int(params['albumin_days'])} days of the calcium",
            **conflict_evidence(facts.conflict(row.patient_id, "calcium", row.collected_at),
                                facts.conflict(row.patient_id, "albumin", row.alb_at) if albumin else None),
        }))
    return findings
