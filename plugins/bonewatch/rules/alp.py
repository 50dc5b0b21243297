"""ALP rules (SPEC 5): ALP_RISE_BORTEZOMIB for now."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding
from bonewatch.rules.common import finding, iso, num
from bonewatch.rules.derive import Facts, round_half_up

ALP_CAVEAT = ("ALP alone does not monitor bisphosphonate therapy: read it with imaging and the clinical "
              "picture. Other causes of a raised ALP: liver disease, vitamin D deficiency, Paget's disease, "
              "healing fracture.")


def therapy_starts(facts: Facts, regimen: str | None = None) -> pd.DataFrame:
    rows = facts.events[facts.events["event_type"] == "myeloma_therapy_start"]
    if regimen:
        rows = rows[rows["value"].str.lower().str.contains(regimen, regex=False)]
    return pd.DataFrame({"patient_id": rows["patient_id"].to_numpy(), "start": rows["day"].to_numpy(),
                         "regimen": rows["value"].to_numpy()}).drop_duplicates(["patient_id", "start"])


def alp_baselines(facts: Facts, starts: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """The ALP baseline (SPEC 4): last total ALP on or before therapy start, within the window."""
    alp = facts.labs[(facts.labs["analyte"] == "alp") & (facts.labs["censor"] == "")]
    alp = alp.sort_values(["collected_day", "collected_at"]).drop_duplicates(["patient_id", "collected_day"], keep="last")
    if starts.empty:
        return starts.assign(base_value=np.nan, base_day=pd.NaT, base_at=pd.NaT)
    return pd.merge_asof(
        starts.sort_values("start"),
        alp[["patient_id", "collected_day", "collected_at", "value"]].rename(
            columns={"collected_day": "base_day", "collected_at": "base_at", "value": "base_value"}),
        left_on="start", right_on="base_day", by="patient_id",
        tolerance=pd.Timedelta(days=settings.clinical.alp_baseline_window_days))


def check_alp_rise_bortezomib(facts: Facts, settings: Settings) -> list[Finding]:
    """A rise of >= rise_pct % over the ALP baseline by day `by_day` of a bortezomib regimen."""
    params = settings.rule("ALP_RISE_BORTEZOMIB").params
    bases = alp_baselines(facts, therapy_starts(facts, "bortezomib"), settings).dropna(subset=["base_value"])
    if bases.empty:
        return []
    alp = facts.labs[facts.labs["analyte"] == "alp"]
    rows = alp.merge(bases, on="patient_id")
    rows = rows[(rows["collected_at"] > rows["base_at"])
                & (rows["collected_day"] <= rows["start"] + pd.Timedelta(days=int(params["by_day"])))]
    pct = round_half_up((rows["value"] - rows["base_value"]) / rows["base_value"] * 100, 1)
    rows = rows.assign(pct=pct)
    rows = rows[rows["censor"].isin(["", ">"]) & (rows["pct"] >= params["rise_pct"] - 1e-9)]
    first = rows.sort_values("collected_at").groupby(["patient_id", "start"], sort=False).head(1)
    findings = []
    for row in first.itertuples(index=False):
        day_no = (row.collected_day - row.start).days
        findings.append(finding(settings, "ALP_RISE_BORTEZOMIB", row.patient_id, f"therapy {iso(row.start)}",
                                row.collected_day, {
            "summary": (f"Total ALP {row.value:.0f} U/L on {iso(row.collected_day)} (day {day_no} of "
                        f"{row.regimen}) is {row.pct:.1f}% above the ALP baseline {row.base_value:.0f} U/L "
                        f"({iso(row.base_day)}). In the APEX data a rise of >= 25% by week 6 went with "
                        f"response (PR or better) and longer time to progression."),
            "alp": {"value_u_l": num(row.value, 1), "date": iso(row.collected_day), "day": day_no,
                    "rise_pct": num(row.pct, 1), "kind": "total ALP"},
            "baseline": {"value_u_l": num(row.base_value, 1), "date": iso(row.base_day),
                         "rule": f"last ALP on or before therapy start, within "
                                 f"{settings.clinical.alp_baseline_window_days} days"},
            "therapy_start": iso(row.start), "regimen": row.regimen, "caveat": ALP_CAVEAT,
        }))
    return findings
