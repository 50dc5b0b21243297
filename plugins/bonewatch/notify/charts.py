"""Trend charts for the digest: SCr and CrCl against the renal baseline, ALP against its baseline.

Pure: `build_trends` turns a patient's alert rows and lab history (DataFrames the shell loaded) into
`Trend` values, and `draw_trend` turns one `Trend` into PNG bytes with matplotlib's Agg backend.
No clock, no database; the same input always gives the same bytes. A chart is a few KB (a small
figure, saved as a 32-colour palette PNG) so a digest with many patients stays light.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import pandas as pd

RENAL_RULES = frozenset({"RENAL_HOLD", "RENAL_RESUME", "DOSE_BAND", "PRE_DOSE_SCR_MISSING"})
# every ALP rule is named ALP_*; see `family`

_MAX_TEXT_POINTS = 5


@dataclass(frozen=True)
class Series:
    """One analyte over time: (day, value) points, oldest first, and its baseline if known."""

    label: str
    unit: str
    points: tuple[tuple[date, float], ...]
    baseline: float | None = None
    baseline_on: date | None = None
    digits: int = 2


@dataclass(frozen=True)
class Trend:
    """What one chart shows: a title and one or two stacked series sharing the time axis."""

    patient_id: str
    kind: str                       # "renal" | "alp"
    title: str
    series: tuple[Series, ...]
    limits: tuple[tuple[str, float], ...] = field(default=())   # (label, value) on the first panel


def family(rule: str) -> str | None:
    """Which chart a rule's alert calls for: "renal", "alp" or None."""
    if rule in RENAL_RULES:
        return "renal"
    if rule.startswith("ALP_"):
        return "alp"
    return None


def _evidence(row: Mapping[str, Any]) -> dict:
    raw = row.get("evidence")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    return raw if isinstance(raw, dict) else {}


def _baseline(rows: Iterable[Mapping[str, Any]], keys: tuple[str, ...]) -> tuple[float | None, date | None]:
    """The first baseline value (under one of `keys`) the alerts' evidence states, and its date."""
    for row in rows:
        base = _evidence(row).get("baseline")
        if not isinstance(base, dict):
            continue
        for key in keys:
            value = base.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                on = base.get("date")
                try:
                    day = date.fromisoformat(on) if isinstance(on, str) else None
                except ValueError:
                    day = None
                return float(value), day
    return None, None


def _points(frame: pd.DataFrame, column: str) -> tuple[tuple[date, float], ...]:
    frame = frame.dropna(subset=[column]).sort_values("collected_at", kind="stable")
    return tuple((pd.Timestamp(d).date(), float(v)) for d, v in zip(frame["collected_day"], frame[column], strict=True))


def build_trends(alert_rows: Iterable[Mapping[str, Any]], scr: pd.DataFrame, alp: pd.DataFrame,
                 alp_uln: float | None = None) -> dict[str, list[Trend]]:
    """Trends per patient for the alerts of a digest.

    In: alert rows (the `alerts` table's columns), `scr` (creatinine rows with `patient_id`,
    `collected_at`, `collected_day`, `value`, `crcl`; exact values only) and `alp` (the same
    without `crcl`), both already restricted to the chart window. Out: {patient_id: [Trend]} with
    a renal trend for patients with a renal alert and an ALP trend for those with an ALP alert,
    each only when there is at least one point to draw.
    """
    by_patient: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in alert_rows:
        kind = family(str(row["rule"]))
        if kind:
            by_patient.setdefault(str(row["patient_id"]), {}).setdefault(kind, []).append(row)
    out: dict[str, list[Trend]] = {}
    for patient_id in sorted(by_patient):
        trends = []
        kinds = by_patient[patient_id]
        if "renal" in kinds:
            mine = scr[scr["patient_id"] == patient_id]
            base, base_on = _baseline(kinds["renal"], ("scr_mg_dl", "value_mg_dl", "value"))
            base_crcl = None
            if base_on is not None:
                at_base = mine[mine["collected_day"] == pd.Timestamp(base_on)]["crcl"].dropna()
                base_crcl = float(at_base.iloc[-1]) if len(at_base) else None
            series = [Series("SCr", "mg/dL", _points(mine, "value"), base, base_on, 2)]
            crcl = _points(mine, "crcl")
            if crcl:
                series.append(Series("CrCl", "mL/min", crcl, base_crcl, base_on if base_crcl else None, 1))
            if series[0].points:
                trends.append(Trend(patient_id, "renal", "Serum creatinine and CrCl (Cockcroft-Gault)",
                                    tuple(series)))
        if "alp" in kinds:
            mine = alp[alp["patient_id"] == patient_id]
            base, base_on = _baseline(kinds["alp"], ("value_u_l", "value"))
            points = _points(mine, "value")
            if points:
                limits = (("upper limit of normal", float(alp_uln)),) if alp_uln else ()
                trends.append(Trend(patient_id, "alp", "Total alkaline phosphatase",
                                    (Series("ALP", "U/L", points, base, base_on, 0),), limits))
        if trends:
            out[patient_id] = trends
    return out


def trend_lines(trend: Trend) -> list[str]:
    """The chart in words for the plain-text part, one line a series: the latest few values and
    the baseline."""
    lines = []
    for s in trend.series:
        shown = s.points[-_MAX_TEXT_POINTS:]
        values = ", ".join(f"{v:.{s.digits}f} ({d.isoformat()})" for d, v in shown)
        base = ("" if s.baseline is None else
                f"; baseline {s.baseline:.{s.digits}f}" + (f" ({s.baseline_on.isoformat()})" if s.baseline_on else ""))
        lines.append(f"{s.label} {s.unit}: {values}{base}")
    return lines


def trend_text(trend: Trend) -> str:
    """The chart in one line (the image's alt text)."""
    return " | ".join(trend_lines(trend))


def draw_trend(trend: Trend) -> bytes:
    """A small PNG of the trend: one panel per series, the baseline dashed, limits dotted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import dates as mdates
    from matplotlib.figure import Figure

    panels = len(trend.series)
    # Figure() directly, not pyplot: no global state, safe in threads (the web app, Airflow).
    fig = Figure(figsize=(4.6, 1.25 + 0.95 * panels), dpi=80)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    colours = ("#1f4e9c", "#7a3b8f")
    for index, (ax, s) in enumerate(zip(axes, trend.series, strict=True)):
        days = [pd.Timestamp(d) for d, _ in s.points]
        values = [v for _, v in s.points]
        ax.plot(days, values, marker="o", markersize=3, linewidth=1.2, color=colours[index % 2])
        if s.baseline is not None:
            ax.axhline(s.baseline, linestyle="--", linewidth=0.9, color="#444444")
            ax.annotate(f"baseline {s.baseline:.{s.digits}f}", xy=(0.01, s.baseline), xycoords=("axes fraction", "data"),
                        fontsize=6.5, color="#444444", va="bottom")
        if index == 0:
            for label, value in trend.limits:
                ax.axhline(value, linestyle=":", linewidth=0.9, color="#b00020")
                ax.annotate(label, xy=(0.99, value), xycoords=("axes fraction", "data"), fontsize=6.5,
                            color="#b00020", va="bottom", ha="right")
        ax.set_ylabel(f"{s.label}\n{s.unit}", fontsize=7)
        ax.tick_params(labelsize=6.5)
        ax.grid(True, linewidth=0.3, color="#cccccc")
        ax.margins(x=0.05, y=0.25)
    axes[-1].xaxis.set_major_formatter(mdates.DateFormatter("%d %b"))
    axes[-1].xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=6))
    axes[0].set_title(trend.title, fontsize=8)
    fig.tight_layout(pad=0.4)
    raw = io.BytesIO()
    fig.savefig(raw, format="png", metadata={"Software": None})
    return _palette_png(raw.getvalue())


def _palette_png(png: bytes) -> bytes:
    # A line chart has few colours: a 32-colour palette keeps it to a few KB.
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=32, dither=Image.Dither.NONE)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
