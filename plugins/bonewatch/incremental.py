"""Incremental evaluation: which patients a night must re-evaluate, and when next (pure).

A patient's findings as of a night depend only on that patient's history up to the night and on
the night itself. Between two nights they can change only when (a) data about the patient is
loaded, (b) a date counted from the patient's own data is reached (a course's 12- or 24-month
review, a course lapsing `course_gap_days` after its last dose, a monitoring window closing, an
ALP ageing out of its "last 30 days"), or (c) the rules or their configuration change. (a) is
marked by ingest in `patient_index`; (c) by `rules_digest`; (b) by `next_due`, computed after each
evaluation from the history already in memory and stored as the patient's `next_due_on`, so a
night finds its due patients through an index, not by scanning results.

The calendar (`clocks`) mirrors the date-driven rules of SPEC 5 and 10, reading their windows from
the configuration, and wakes a patient on the day a window closes and the day after (rules differ
on "from" and "after"). A rule it does not know has its `*days*` / `*months*` thresholds counted
from every clock. Waking a patient whose findings turn out unchanged costs a little time; missing
one would cost an alert, so `tests/integration/test_incremental.py` compares incremental nights
with full evaluations.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from importlib.resources import files
from typing import TYPE_CHECKING

from bonewatch.config import Settings

if TYPE_CHECKING:   # imported where a history is read: a rerun's digest and index query need neither
    import numpy as np
    import pandas as pd

# Rules whose dates the calendar below spells out; any other rule's thresholds count generically.
KNOWN_RULES = {
    "RENAL_HOLD", "RENAL_RESUME", "DOSE_BAND", "PRE_DOSE_SCR_MISSING", "ALP_ELEVATED_START",
    "ALP_RISE_BORTEZOMIB", "ALP_MONITOR_DUE", "ALP_NONBONE_CAUSE", "HYPOCALCEMIA", "REVIEW_1Y",
    "REVIEW_2Y", "MGUS_ON_BISPHOSPHONATE", "DENTAL_EXAM_MISSING", "ALBUMINURIA", "URINE_ALBUMIN_DUE",
}
ALP_ANALYTES = {"alp", "ggt", "bsap_activity", "bsap_mass"}
URINE_ANALYTES = {"urine_albumin_24h", "urine_albumin_spot", "urine_albumin_ratio"}

Clock = tuple[set[int], set[tuple[int, int]]]   # (day offsets, (months, extra days) offsets)


def rules_digest(settings: Settings) -> str:
    """A short digest of everything that decides findings besides the data: the rule modules'
    source and the rule, clinical and time-zone configuration. A change re-evaluates everyone."""
    digest = hashlib.sha256()
    package = files("bonewatch") / "rules"     # not files("bonewatch.rules"): that imports the rules
    for entry in sorted(package.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".py"):
            digest.update(entry.name.encode() + b"\0" + entry.read_bytes())
    config = {"rules": {k: v.model_dump() for k, v in settings.rules.items()},
              "clinical": settings.clinical.model_dump(), "timezone": settings.site.timezone}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _ints(value) -> list[int]:
    values = value if isinstance(value, list | tuple) else [value]
    return [int(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0]


def _param(settings: Settings, rule: str, name: str, default) -> list[int]:
    spec = settings.rules.get(rule)
    return _ints(spec.params.get(name, default) if spec is not None else default)


def _both(days) -> set[int]:
    return {d + extra for d in days for extra in (0, 1)}


def clocks(settings: Settings) -> dict[str, Clock]:
    """Per kind of anchor date, the offsets after which a rule may decide differently."""
    gap = settings.clinical.course_gap_days
    review = _param(settings, "REVIEW_1Y", "months", 12) + _param(settings, "REVIEW_2Y", "months", 24)
    urine = _param(settings, "URINE_ALBUMIN_DUE", "months", 6)
    monitor = _param(settings, "ALP_MONITOR_DUE", "months", [3, 6])
    window = _param(settings, "ALP_MONITOR_DUE", "window_days", 14)
    therapy_days = (_param(settings, "ALP_ELEVATED_START", "days", 30)
                    + _param(settings, "ALP_RISE_BORTEZOMIB", "by_day", 42))
    result: dict[str, Clock] = {
        # reviews and the urine-albumin course age count from the course start
        "course_start": (set(), {(m, d) for m in review + urine for d in (0, 1)}),
        # a course lapses `gap` days after its last dose (SPEC 10)
        "last_dose": (_both([gap]), set()),
        # ALP_ELEVATED_START (from day + 31), ALP_MONITOR_DUE (3 and 6 months, +/- 14 days),
        # the end of ALP_RISE_BORTEZOMIB's window
        "therapy_start": (_both(therapy_days), {(m, d) for m in monitor for d in _both([0, *window])}),
        # ALP_NONBONE_CAUSE looks at the latest ALP if collected in the last `recent_days`
        "latest_alp": (_both(_param(settings, "ALP_NONBONE_CAUSE", "recent_days", 30)), set()),
        # URINE_ALBUMIN_DUE: no urine albumin result in the last `months`
        "latest_urine": (set(), {(m, d) for m in urine for d in (0, 1, 2)}),
    }
    # A rule the calendar does not know: each of its day and month thresholds, from every clock.
    days, months = set(), set()
    for rule_id, spec in settings.rules.items():
        if rule_id in KNOWN_RULES:
            continue
        for name, value in spec.params.items():
            key = name.lower()
            if "month" in key:
                months.update(_ints(value))
            elif "day" in key:
                days.update(_ints(value))
    if days or months:
        for kind, (day_offsets, month_offsets) in result.items():
            result[kind] = (day_offsets | _both(days), month_offsets | {(m, d) for m in months for d in (0, 1)})
    return result


def add_months(days: np.ndarray, months: int) -> np.ndarray:
    """datetime64[D] + calendar months, clamped at month end (31 Aug + 6 months -> end of Feb)."""
    import numpy as np

    month = days.astype("datetime64[M]")
    day_of_month = (days - month.astype("datetime64[D]")).astype("int64")
    target = month + np.timedelta64(months, "M")
    length = ((target + np.timedelta64(1, "M")).astype("datetime64[D]") - target.astype("datetime64[D]")).astype("int64")
    return target.astype("datetime64[D]") + np.minimum(day_of_month, length - 1).astype("timedelta64[D]")


def _anchors(labs: pd.DataFrame, events: pd.DataFrame, night: np.datetime64, gap_days: int) -> dict[str, pd.DataFrame]:
    """The anchor dates of each clock, up to the night: (patient_id, day) frames."""
    import numpy as np
    import pandas as pd

    ev = events[events["day"] <= night]
    doses = ev[ev["event_type"] == "bisphosphonate_dose"].sort_values(["patient_id", "day"], kind="stable")
    gap = np.timedelta64(gap_days, "D")
    starts = []
    # every dose that may start a course, a superset: no earlier dose of the same agent (or of any
    # agent) within the gap, or the first dose after a stop
    for keys in (["patient_id"], ["patient_id", "value"]):
        previous = doses.groupby(keys, sort=False)["day"].shift()
        starts.append(doses[previous.isna() | ((doses["day"] - previous) > gap)])
    stops = ev[ev["event_type"] == "bisphosphonate_stop"]
    if not stops.empty and not doses.empty:
        after = doses.merge(stops[["patient_id", "day"]].rename(columns={"day": "stop"}), on="patient_id")
        starts.append(after[after["day"] >= after["stop"]].groupby(["patient_id", "stop"], sort=False).head(1))
    seen = labs[labs["day"] <= night]
    urine_labs = seen[seen["analyte"].isin(URINE_ANALYTES)]
    urine_events = ev[ev["event_type"] == "albuminuria_mg_24h"]

    def cols(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[["patient_id", "day"]]

    return {
        "course_start": cols(pd.concat(starts)) if starts else cols(doses),
        "last_dose": cols(doses.groupby(["patient_id", "value"], sort=False).tail(1)),
        "therapy_start": cols(ev[ev["event_type"] == "myeloma_therapy_start"]),
        "latest_alp": cols(seen[seen["analyte"].isin(ALP_ANALYTES)].groupby(["patient_id", "analyte"], sort=False)
                           .tail(1) if len(seen) else seen),
        "latest_urine": cols(pd.concat([urine_labs, urine_events]).sort_values("day").groupby("patient_id").tail(1)),
    }


def next_due(labs: pd.DataFrame, events: pd.DataFrame, as_of: date, settings: Settings) -> pd.Series:
    """Per patient (index), the first night after `as_of` on which the findings may change
    without new data being loaded (NaT: none). `labs` and `events` hold the patients' whole
    history, later data included (a backfill may hold data beyond the night evaluated): such data
    becomes visible on its own day, which is a due night too."""
    import numpy as np
    import pandas as pd

    night = np.datetime64(as_of, "D")
    lab = pd.DataFrame({"patient_id": labs["patient_id"].to_numpy(dtype=object),
                        "analyte": labs["analyte"].to_numpy(dtype=object),
                        "day": labs["collected_date"].to_numpy().astype("datetime64[D]")})
    ev = pd.DataFrame({"patient_id": events["patient_id"].to_numpy(dtype=object),
                       "event_type": events["event_type"].to_numpy(dtype=object),
                       "value": events["value"].to_numpy(dtype=object),
                       "day": events["occurred_date"].to_numpy().astype("datetime64[D]")})
    lab = lab.sort_values("day", kind="stable")
    ev = ev.sort_values("day", kind="stable")
    parts_ids = [lab.loc[lab["day"] > night, "patient_id"].to_numpy(dtype=object),
                 ev.loc[ev["day"] > night, "patient_id"].to_numpy(dtype=object)]
    parts_days = [lab.loc[lab["day"] > night, "day"].to_numpy().astype("datetime64[D]"),
                  ev.loc[ev["day"] > night, "day"].to_numpy().astype("datetime64[D]")]
    anchors = _anchors(lab, ev, night, settings.clinical.course_gap_days)
    for kind, (day_offsets, month_offsets) in clocks(settings).items():
        frame = anchors[kind].drop_duplicates()
        if frame.empty:
            continue
        ids = frame["patient_id"].to_numpy(dtype=object)
        days = frame["day"].to_numpy().astype("datetime64[D]")
        candidates = [days + np.timedelta64(d, "D") for d in sorted(day_offsets)]
        for months in sorted({m for m, _ in month_offsets}):
            base = add_months(days, months)
            candidates.extend(base + np.timedelta64(d, "D") for m, d in sorted(month_offsets) if m == months)
        for candidate in candidates:
            ahead = candidate > night
            parts_ids.append(ids[ahead])
            parts_days.append(candidate[ahead])
    ids = np.concatenate(parts_ids)
    days = np.concatenate(parts_days)
    if not len(ids):
        return pd.Series([], dtype="datetime64[ns]")
    return pd.Series(days.astype("datetime64[ns]"), index=ids).groupby(level=0).min()
