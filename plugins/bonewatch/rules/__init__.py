"""The functional core: pure rule functions over DataFrames, `as_of` passed in, no I/O, no clock.

`evaluate(labs, events, as_of, settings)` returns every finding as of that night.
"""

from __future__ import annotations

from datetime import date

import pandas as pd

from bonewatch.config import Settings
from bonewatch.model import Finding
from bonewatch.rules.alp import check_alp_rise_bortezomib
from bonewatch.rules.derive import prepare
from bonewatch.rules.renal import check_dose_band, check_renal
from bonewatch.rules.review import check_reviews

__all__ = ["evaluate"]


def evaluate(labs: pd.DataFrame, events: pd.DataFrame, as_of: date, settings: Settings) -> list[Finding]:
    """All findings as of `as_of`, sorted by (patient, rule, episode): deterministic, and the
    order of the input rows never matters."""
    facts = prepare(labs, events, as_of, settings)
    renal, held = check_renal(facts, settings)
    findings = [*renal, *check_dose_band(facts, held, settings), *check_alp_rise_bortezomib(facts, settings),
                *check_reviews(facts, settings)]
    return sorted(findings, key=lambda f: (f.patient_id, f.rule, f.episode))
