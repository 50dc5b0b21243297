"""Properties of the rule engine over random histories (hypothesis):
- evaluating as of d on the full history equals evaluating as of d on the history truncated at d;
- the same data in SI units (umol/L, ukat/L, mmol/L, g/L) gives the same alerts as in conventional units;
- row order never changes the result, nor do the result ids (two results of one analyte at one
  instant with different values: the cautious one is used, whatever their ids).

Birth date and sex are timeless (SPEC 2.5): the histories here date them before every night, so
truncating the history at a night keeps them."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bonewatch.ingest import feeds
from bonewatch.rules import evaluate
from tests.unit.test_rules import SETTINGS

START = date(2025, 1, 1)
CONVENTIONAL = {"creatinine": ("2160-0", "mg/dL", 1.0), "alp": ("6768-6", "U/L", 1.0),
                "calcium": ("17861-6", "mg/dL", 1.0), "albumin": ("1751-7", "g/dL", 1.0),
                "ggt": ("2324-2", "U/L", 1.0)}
SI = {"creatinine": ("14682-9", "umol/L", 88.4), "alp": ("6768-6", "ukat/L", 1 / 60),
      "calcium": ("2000-8", "mmol/L", 1 / 4.008), "albumin": ("1751-7", "g/L", 10.0),
      "ggt": ("2324-2", "µkat/L", 1 / 60)}
RANGES = {"creatinine": (0.6, 3.0), "alp": (60, 260), "calcium": (7.5, 10.5), "albumin": (2.5, 4.8),
          "ggt": (10, 120)}

day = st.integers(0, 150)
lab = st.tuples(st.sampled_from(sorted(RANGES)), day, st.floats(0, 1))
event = st.one_of(
    st.tuples(st.just("bisphosphonate_dose"), day, st.sampled_from(["zoledronic_acid|4.0", "zoledronic_acid|3.5",
                                                                    "pamidronate|90", "denosumab|120"])),
    st.tuples(st.just("myeloma_therapy_start"), day, st.sampled_from(["bortezomib", "lenalidomide"])),
    st.tuples(st.just("bisphosphonate_stop"), day, st.just("zoledronic_acid|")),
    st.tuples(st.just("albuminuria_mg_24h"), day, st.sampled_from(["300|", "500|", "700|"])),
    st.tuples(st.just("dental_exam"), day, st.just("|")),
    st.tuples(st.just("weight_kg"), day, st.sampled_from(["55|", "80|"])),
)
history = st.tuples(st.lists(lab, min_size=1, max_size=14), st.lists(event, min_size=1, max_size=8))


def raw_frames(labs, events, units) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The history as raw CSV strings (what ingest receives), in the given units."""
    lab_rows = []
    for i, (analyte, offset, u) in enumerate(labs):
        low, high = RANGES[analyte]
        value = round(low + u * (high - low), 2)
        code, unit, factor = units[analyte]
        lab_rows.append({"patient_id": "0001", "result_id": f"r{i}", "loinc": code, "value": repr(value * factor),
                         "unit": unit, "collected_at": f"{START + timedelta(days=offset)}T08:00:00",
                         "status": "final"})
    event_rows = [{"patient_id": "0001", "event_type": "birth_date", "occurred_at": "2000-01-01",
                   "value": "1955-03-01", "detail": ""},
                  {"patient_id": "0001", "event_type": "sex", "occurred_at": "2000-01-01", "value": "F", "detail": ""}]
    for kind, offset, payload in events:
        value, _, detail = payload.partition("|")
        event_rows.append({"patient_id": "0001", "event_type": kind, "occurred_at": str(START + timedelta(days=offset)),
                           "value": value, "detail": detail})
    as_frame = lambda rows, start: pd.DataFrame(rows, index=range(start, start + len(rows)))  # noqa: E731
    return as_frame(lab_rows, 2), as_frame(event_rows, 2)


def parsed(labs, events, units):
    raw_labs, raw_events = raw_frames(labs, events, units)
    received = pd.Timestamp("2026-01-01")
    lab_rows = feeds.parse_labs(raw_labs.astype("str"), SETTINGS, "d", received).rows
    event_rows = feeds.parse_events(raw_events.astype("str"), SETTINGS, "d", received).rows
    return lab_rows.reset_index(drop=True), event_rows.reset_index(drop=True)


def keys(findings):
    return sorted((f.rule, f.episode, f.observed_on, f.evidence.get("summary", "")[:0]) for f in findings)


PROPERTY = hsettings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(history, st.integers(0, 160))
def test_truncated_history_gives_the_same_alerts(h, offset):
    labs, events = parsed(*h, CONVENTIONAL)
    as_of = START + timedelta(days=offset)
    cut_labs = labs[pd.to_datetime(labs["collected_date"]) <= pd.Timestamp(as_of)]
    cut_events = events[pd.to_datetime(events["occurred_date"]) <= pd.Timestamp(as_of)]
    assert keys(evaluate(labs, events, as_of, SETTINGS)) == keys(evaluate(cut_labs, cut_events, as_of, SETTINGS))


@PROPERTY
@given(history, st.integers(0, 160))
def test_si_units_give_the_same_alerts(h, offset):
    as_of = START + timedelta(days=offset)
    conventional = evaluate(*parsed(*h, CONVENTIONAL), as_of, SETTINGS)
    si = evaluate(*parsed(*h, SI), as_of, SETTINGS)
    assert [(f.rule, f.episode, f.observed_on) for f in conventional] == [(f.rule, f.episode, f.observed_on) for f in si]


@PROPERTY
@given(history, st.integers(0, 160), st.integers(0, 10_000))
# found by CI: two weights at the same instant, the CrCl took whichever row came last
@example(h=([("albumin", 0, 0.0)] * 4 + [("creatinine", 25, 0.6)],
            [("bisphosphonate_dose", 2, "zoledronic_acid|4.0"), ("weight_kg", 11, "80|"),
             ("bisphosphonate_dose", 0, "zoledronic_acid|4.0"), ("weight_kg", 11, "55|")]), offset=121, seed=0)
def test_row_order_never_changes_the_alerts(h, offset, seed):
    labs, events = parsed(*h, CONVENTIONAL)
    as_of = START + timedelta(days=offset)
    shuffled = evaluate(labs.sample(frac=1, random_state=seed), events.sample(frac=1, random_state=seed), as_of,
                        SETTINGS)
    assert [(f.alert_id, f.observed_on, f.evidence) for f in evaluate(labs, events, as_of, SETTINGS)] == \
        [(f.alert_id, f.observed_on, f.evidence) for f in shuffled]


@PROPERTY
@given(history, st.integers(0, 160), st.integers(0, 10_000))
# two ALPs at one instant (160 and 100 U/L) beside a GGT of 120: the latest ALP was the one whose
# result id sorted last, and ALP_NONBONE_CAUSE came and went with the ids
@example(h=([("alp", 0, 0.5), ("alp", 0, 0.2), ("ggt", 0, 1.0)], [("dental_exam", 0, "|")]), offset=0, seed=3)
def test_result_ids_never_change_the_alerts(h, offset, seed):
    labs, events = parsed(*h, CONVENTIONAL)
    as_of = START + timedelta(days=offset)
    relabelled = labs.assign(result_id=np.random.default_rng(seed).permutation(labs["result_id"].to_numpy()))
    assert [(f.alert_id, f.observed_on, f.evidence) for f in evaluate(labs, events, as_of, SETTINGS)] == \
        [(f.alert_id, f.observed_on, f.evidence) for f in evaluate(relabelled, events, as_of, SETTINGS)]
