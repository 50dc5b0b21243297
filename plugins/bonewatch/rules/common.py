"""Helpers shared by the rule modules: building findings and writing evidence in plain words."""

from __future__ import annotations

from datetime import date

import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding, Severity

DISCLAIMER = "This alert supports, and does not replace, clinical judgement."


def day(value) -> date:
    return pd.Timestamp(value).date()


def iso(value) -> str | None:
    return None if value is None or pd.isna(value) else pd.Timestamp(value).date().isoformat()


def num(value, digits: int = 2) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), digits)


def finding(settings: Settings, rule: str, patient_id: str, episode: str, observed_on, evidence: dict,
            action: str | None = None) -> Finding:
    spec = settings.rule(rule)
    return Finding(
        patient_id=str(patient_id), rule=rule, rule_version=settings.rule_version(rule),
        severity=Severity(spec.severity), episode=episode, observed_on=day(observed_on),
        action=action or spec.action, citation=spec.citation, evidence=evidence,
    )


def conflict_evidence(*notes) -> dict:
    """`{"conflict": ...}` naming the same-instant conflicting results a finding used (each note
    says which values and which one was used; several are joined with '; '), or {} when none."""
    said = list(dict.fromkeys(n for n in notes if isinstance(n, str) and n))
    return {"conflict": "; ".join(said)} if said else {}
