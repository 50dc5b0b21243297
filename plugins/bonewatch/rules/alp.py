"""ALP rules (SPEC 5): ALP_RISE_BORTEZOMIB for now."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding
from bonewatch.rules.common import conflict_evidence, finding, iso, num
from bonewatch.rules.derive import Facts, round_half_up

ALP_CAVEAT = ("ALP alone does not monitor bisphosphonate therapy: read it with imaging and the clinical "
              "picture. Other causes of a raised ALP: liver disease, vitamin D deficiency, Paget's disease, "
              "healing fracture.")


#: A drug administration (FHIR MedicationAdministration of bortezomib) starts a therapy only when
#: no start of the same regimen came in this many days before it: the later cycles continue it.
ADMINISTRATION_CONTINUES_DAYS = 180


def therapy_starts(facts: Facts, regimen: str | None = None) -> pd.DataFrame:
    """Therapy starts per patient: `myeloma_therapy_start` events, and the first administration of
    a regimen (SPEC 2.3: "the first MedicationAdministration of bortezomib starts" the therapy)."""
    rows = facts.events[facts.events["event_type"] == "myeloma_therapy_start"]
    administered = rows["detail"] == "administration"
    if administered.any():
        rows = rows.assign(_regimen=rows["value"].str.lower()).sort_values(["patient_id", "_regimen", "day"])
        previous = rows.groupby(["patient_id", "_regimen"])["day"].shift()
        gap = (rows["day"] - previous).dt.days
        continues = (rows["detail"] == "administration") & (gap <= ADMINISTRATION_CONTINUES_DAYS)
        rows = rows[~continues]
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
            **conflict_evidence(facts.conflict(row.patient_id, "alp", row.base_at),
                                facts.conflict(row.patient_id, "alp", row.collected_at)),
        }))
    return findings


def above(rows: pd.DataFrame, limit: float) -> pd.Series:
    """Strictly above `limit`; a censored value only when its bound decides it ('>130' does)."""
    exact = (rows["censor"] == "") & (rows["value"] > limit + 1e-9)
    bound = (rows["censor"] == ">") & (rows["value"] >= limit - 1e-9)
    return exact | bound


def elevated_baselines(facts: Facts, settings: Settings) -> pd.DataFrame:
    """Therapy starts (any regimen) whose ALP baseline is above the upper limit of normal."""
    bases = alp_baselines(facts, therapy_starts(facts), settings).dropna(subset=["base_value"])
    return bases[bases["base_value"] > settings.clinical.alp_uln + 1e-9].reset_index(drop=True)


def _flag_any(left: pd.DataFrame, right: pd.DataFrame, keep) -> pd.Series:
    """For each row of `left`, whether some row of `right` for the same patient satisfies `keep`
    (a function of the merged frame)."""
    pairs = left.reset_index().merge(right, on="patient_id", suffixes=("", "_r"))
    hit = pairs[keep(pairs)] if not pairs.empty else pairs
    return pd.Series(left.index.isin(hit["index"]), index=left.index)


def check_alp_elevated_start(facts: Facts, settings: Settings) -> list[Finding]:
    """ALP baseline above normal, no bisphosphonate course active at therapy start and no dose in
    the `days` after it; found from day start + days + 1 until a bisphosphonate is given."""
    days = int(settings.rule("ALP_ELEVATED_START").params["days"])
    as_of = pd.Timestamp(facts.as_of)
    bases = elevated_baselines(facts, settings)
    bases = bases[bases["start"] + pd.Timedelta(days=days + 1) <= as_of]
    if bases.empty:
        return []
    courses = facts.courses[facts.courses["cls"] == "bisphosphonate"][["patient_id", "start", "end"]]
    doses = facts.doses[facts.doses["cls"] == "bisphosphonate"][["patient_id", "day"]]
    on_at_start = _flag_any(bases, courses, lambda m: (m["start_r"] <= m["start"]) & (m["end"] >= m["start"]))
    # a dose on or after therapy start: given within the window, or since (the action is done)
    dosed = _flag_any(bases, doses, lambda m: m["day"] >= m["start"])
    bases = bases[~on_at_start & ~dosed]
    bsap = facts.labs[facts.labs["analyte"].isin(["bsap_activity", "bsap_mass"])].groupby("patient_id").tail(1)
    bsap = bsap.set_index("patient_id")
    findings = []
    for row in bases.itertuples(index=False):
        opens = row.start + pd.Timedelta(days=days + 1)
        note, bsap_conflict = "", None
        if row.patient_id in bsap.index:
            last = bsap.loc[row.patient_id]
            note = f" Latest bone-specific ALP: {last['value']:g} {last['unit']} on {iso(last['collected_day'])}."
            bsap_conflict = facts.conflict(row.patient_id, last["analyte"], last["collected_at"])
        findings.append(finding(settings, "ALP_ELEVATED_START", row.patient_id, f"therapy {iso(row.start)}", opens, {
            "summary": (f"ALP baseline {row.base_value:.0f} U/L ({iso(row.base_day)}) is above "
                        f"{settings.clinical.alp_uln:g} U/L at the start of {row.regimen} on {iso(row.start)}, "
                        f"and no bisphosphonate was given in the {days} days after it.{note}"),
            "baseline": {"value_u_l": num(row.base_value, 1), "date": iso(row.base_day), "kind": "total ALP",
                         "rule": f"last ALP on or before therapy start, within {settings.clinical.alp_baseline_window_days} days"},
            "uln_u_l": settings.clinical.alp_uln, "therapy_start": iso(row.start), "regimen": row.regimen,
            "caveat": ALP_CAVEAT,
            **conflict_evidence(facts.conflict(row.patient_id, "alp", row.base_at), bsap_conflict),
        }))
    return findings


def check_alp_monitor_due(facts: Facts, settings: Settings) -> list[Finding]:
    """For an above-normal ALP baseline: no ALP within +/- window_days of 3 and 6 months after therapy
    start; found once that window has closed, until an ALP arrives after it."""
    params = settings.rule("ALP_MONITOR_DUE").params
    window = pd.Timedelta(days=int(params["window_days"]))
    as_of = pd.Timestamp(facts.as_of)
    bases = elevated_baselines(facts, settings)
    if bases.empty:
        return []
    marks = pd.concat([bases.assign(months=int(m), due=bases["start"] + pd.DateOffset(months=int(m)))
                       for m in params["months"]], ignore_index=True)
    marks = marks[marks["due"] + window + pd.Timedelta(days=1) <= as_of]
    alp = facts.labs[facts.labs["analyte"] == "alp"][["patient_id", "collected_day"]]
    # an ALP in the window, or one after it (the order was done late): nothing is due
    measured = _flag_any(marks, alp, lambda m: m["collected_day"] >= m["due"] - window)
    findings = []
    for row in marks[~measured].itertuples(index=False):
        findings.append(finding(settings, "ALP_MONITOR_DUE", row.patient_id,
                                f"therapy {iso(row.start)}; month {row.months}", row.due + window + pd.Timedelta(days=1), {
            "summary": (f"ALP was {row.base_value:.0f} U/L (above normal) before therapy started on "
                        f"{iso(row.start)}; no ALP was measured within {window.days} days of the "
                        f"{row.months}-month mark ({iso(row.due)})."),
            "due": iso(row.due), "window": {"from": iso(row.due - window), "to": iso(row.due + window)},
            "baseline": {"value_u_l": num(row.base_value, 1), "date": iso(row.base_day)},
            "therapy_start": iso(row.start), "caveat": ALP_CAVEAT,
            **conflict_evidence(facts.conflict(row.patient_id, "alp", row.base_at)),
        }))
    return findings


def check_alp_nonbone(facts: Facts, settings: Settings) -> list[Finding]:
    """The latest ALP (collected in the last `recent_days`) above normal with a GGT above normal
    within `days` of it: the ALP may be hepatic."""
    params = settings.rule("ALP_NONBONE_CAUSE").params
    as_of = pd.Timestamp(facts.as_of)
    alp = facts.labs[facts.labs["analyte"] == "alp"].groupby("patient_id").tail(1)
    alp = alp[alp["collected_day"] >= as_of - pd.Timedelta(days=int(params["recent_days"]))]
    alp = alp[above(alp, settings.clinical.alp_uln)]
    ggt = facts.labs[facts.labs["analyte"] == "ggt"]
    ggt = ggt[above(ggt, settings.clinical.ggt_uln)]
    pairs = alp.merge(ggt[["patient_id", "value", "collected_day", "collected_at"]], on="patient_id",
                      suffixes=("", "_ggt"))
    pairs = pairs[(pairs["collected_day_ggt"] - pairs["collected_day"]).abs() <= pd.Timedelta(days=int(params["days"]))]
    # the latest high GGT by collection time (by day alone, two on one day came out in sort order)
    pairs = pairs.sort_values("collected_at_ggt", kind="stable").groupby("patient_id").tail(1)
    findings = []
    for row in pairs.itertuples(index=False):
        findings.append(finding(settings, "ALP_NONBONE_CAUSE", row.patient_id, f"ALP {iso(row.collected_day)}",
                                max(row.collected_day, row.collected_day_ggt), {
            "summary": (f"ALP {row.value:.0f} U/L on {iso(row.collected_day)} is above {settings.clinical.alp_uln:g} "
                        f"U/L and GGT {row.value_ggt:.0f} U/L on {iso(row.collected_day_ggt)} is above "
                        f"{settings.clinical.ggt_uln:g} U/L: the ALP may come from the liver."),
            "alp": {"value_u_l": num(row.value, 1), "date": iso(row.collected_day), "kind": "total ALP"},
            "ggt": {"value_u_l": num(row.value_ggt, 1), "date": iso(row.collected_day_ggt)},
            "caveat": ALP_CAVEAT,
            **conflict_evidence(facts.conflict(row.patient_id, "alp", row.collected_at),
                                facts.conflict(row.patient_id, "ggt", row.collected_at_ggt)),
        }))
    return findings


HEPATIC_NOTE = "ALP and GGT are both above normal now: this ALP may be hepatic, not bone."
