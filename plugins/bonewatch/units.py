"""Analytes, their LOINC codes, canonical units and the exact conversions of SPEC section 3.

A small explicit table rather than a general units library: the conversions are few, clinically
fixed, and must be exact; each one is tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Analyte:
    name: str
    canonical_unit: str
    factors: dict[str, float]  # normalised unit spelling -> multiply to get the canonical unit


_U_L = {"u/l": 1.0, "iu/l": 1.0, "ukat/l": 60.0}

ANALYTES: dict[str, Analyte] = {
    a.name: a
    for a in (
        Analyte("alp", "U/L", _U_L),
        Analyte("bsap_activity", "U/L", _U_L),
        Analyte("bsap_mass", "ug/L", {"ug/l": 1.0, "ng/ml": 1.0}),
        Analyte("creatinine", "mg/dL", {"mg/dl": 1.0, "umol/l": 1 / 88.4}),
        Analyte("calcium", "mg/dL", {"mg/dl": 1.0, "mmol/l": 4.008}),
        Analyte("albumin", "g/dL", {"g/dl": 1.0, "g/l": 0.1}),
        Analyte("ggt", "U/L", _U_L),
        Analyte("weight", "kg", {"kg": 1.0, "lb": 0.45359237, "lbs": 0.45359237, "[lb_av]": 0.45359237}),
        Analyte("urine_albumin_24h", "mg/24h", {"mg/24h": 1.0, "mg/(24.h)": 1.0, "g/24h": 1000.0,
                                                "g/(24.h)": 1000.0, "mg/d": 1.0, "g/d": 1000.0}),
        Analyte("urine_albumin_spot", "mg/L", {"mg/l": 1.0, "mg/g": 1.0, "mg/mmol": 1.0, "ug/mg": 1.0}),
    )
}

LOINC: dict[str, str] = {
    "6768-6": "alp",
    "1777-3": "bsap_activity",
    "17838-4": "bsap_mass",
    "2160-0": "creatinine",
    "14682-9": "creatinine",
    "17861-6": "calcium",
    "2000-8": "calcium",
    "1751-7": "albumin",
    "2324-2": "ggt",
    "29463-7": "weight",
    "14956-7": "urine_albumin_24h",
    "14957-5": "urine_albumin_spot",
    "2862-1": "urine_albumin_spot",
    "14959-1": "urine_albumin_spot",
}

_SPACES = re.compile(r"\s+")


def normalise_unit(unit: str) -> str:
    """Fold the spellings labs send (µmol/L, umol/l, U/L, mg/dl, [IU]/L, µkat/L) to one key."""
    u = _SPACES.sub("", unit).lower()
    u = u.replace("µ", "u").replace("μ", "u").replace("[iu]", "iu").replace("{", "").replace("}", "")
    return u


def unit_key_table() -> dict[tuple[str, str], float]:
    """(analyte, normalised unit) -> factor to the canonical unit."""
    return {(name, unit): factor for name, a in ANALYTES.items() for unit, factor in a.factors.items()}
