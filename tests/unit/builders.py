"""Tiny hand-built histories for rule tests: the same columns the store's reader returns."""

from __future__ import annotations

from datetime import date

import pandas as pd

LAB_COLUMNS = ["result_id", "patient_id", "analyte", "value", "censor", "unit", "collected_at",
               "collected_date", "status"]
EVENT_COLUMNS = ["event_key", "patient_id", "event_type", "occurred_at", "occurred_date", "value", "detail"]
UNITS = {"creatinine": "mg/dL", "alp": "U/L", "weight": "kg"}


class History:
    """Build labs and events for one or more patients with short calls."""

    def __init__(self) -> None:
        self.labs: list[dict] = []
        self.events: list[dict] = []

    def lab(self, patient: str, analyte: str, day: str, value: float, censor: str = "", status: str = "final"):
        self.labs.append({"result_id": f"r{len(self.labs)}", "patient_id": patient, "analyte": analyte,
                          "value": float(value), "censor": censor, "unit": UNITS.get(analyte, ""),
                          "collected_at": pd.Timestamp(day) + pd.Timedelta(hours=8),
                          "collected_date": date.fromisoformat(day), "status": status})
        return self

    def scr(self, patient: str, day: str, value: float, **kw):
        return self.lab(patient, "creatinine", day, value, **kw)

    def event(self, patient: str, event_type: str, day: str, value: str = "", detail: str = ""):
        self.events.append({"event_key": f"e{len(self.events)}", "patient_id": patient, "event_type": event_type,
                            "occurred_at": pd.Timestamp(day), "occurred_date": date.fromisoformat(day),
                            "value": value, "detail": detail})
        return self

    def person(self, patient: str, birth: str = "1955-01-01", sex: str = "M", weight: float | None = 70,
               weight_day: str = "2025-01-01"):
        self.event(patient, "birth_date", "2000-01-01", birth).event(patient, "sex", "2000-01-01", sex)
        if weight is not None:
            self.event(patient, "weight_kg", weight_day, str(weight))
        return self

    def dose(self, patient: str, day: str, agent: str = "zoledronic_acid", mg: str = "4.0"):
        return self.event(patient, "bisphosphonate_dose", day, agent, mg)

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        labs = pd.DataFrame(self.labs, columns=LAB_COLUMNS)
        events = pd.DataFrame(self.events, columns=EVENT_COLUMNS)
        for frame, cols in ((labs, ["result_id", "patient_id", "analyte", "censor", "unit", "status"]),
                            (events, ["event_key", "patient_id", "event_type", "value", "detail"])):
            for c in cols:
                frame[c] = frame[c].astype("str")
        labs["value"] = labs["value"].astype("float64")
        labs["collected_at"] = labs["collected_at"].astype("datetime64[ns]")
        events["occurred_at"] = events["occurred_at"].astype("datetime64[ns]")
        return labs, events
