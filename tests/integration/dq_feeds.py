"""Synthetic nightly feeds for the data-quality tests: a few patients, one lab CSV and one events
CSV a night, with the anomalies a test asks for (a late or missing feed, a unit switch, a share of
bad rows). Arrival times are the files' modification times, set explicitly; the run's clock is
passed to `pipeline.nightly`. Also: a headless Chromium (Debian's package) with the network cut."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import pytest

# Nine-digit MRNs with leading zeros, like the hospital's: the grep test looks for each of them.
PATIENTS = ["004815162", "000342108", "007770001", "001234560", "009876543", "005550123", "002020202",
            "003141592"]
LAB_HEADER = "patient_id,result_id,loinc,value,unit,collected_at,status\n"
EVENT_HEADER = "patient_id,event_type,occurred_at,value,detail\n"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def at(night: date, hhmm: str, days: int = 1) -> datetime:
    """`hhmm` UTC (the default hospital zone) on the morning `days` after `night`."""
    return datetime.combine(night + timedelta(days=days), time.fromisoformat(hhmm), tzinfo=UTC)


@dataclass
class Night:
    """One night's deliveries. A None arrival means the feed sends nothing that night."""

    night: date
    labs_at: datetime | None = None
    events_at: datetime | None = None
    run_at: datetime | None = None
    alp_unit: str = "U/L"          # "ukat/L": the lab switched units
    events_bad: int = 0            # extra bad event rows (14 good ones a night)
    panels: bool = False           # every patient's labs come in full CBC + CMP panels (SPEC 2.5)
    local_creatinine: str = ""     # a local code for creatinine the hospital has not mapped yet

    def __post_init__(self):
        self.labs_at = self.labs_at if self.labs_at is not None else at(self.night, "00:20")
        self.events_at = self.events_at if self.events_at is not None else at(self.night, "00:40")
        self.run_at = self.run_at or at(self.night, "01:30")


#: a CBC and a comprehensive metabolic panel without its calcium, albumin, ALP and creatinine:
#: valid LOINC codes of analytes bonewatch does not monitor (counted, never quarantined)
PANEL_ROWS = [
    ("6690-2", "6.2", "10*3/uL"), ("789-8", "4.6", "10*6/uL"), ("718-7", "13.4", "g/dL"),
    ("4544-3", "40.1", "%"), ("787-2", "88", "fL"), ("785-6", "29.5", "pg"), ("786-4", "33.4", "g/dL"),
    ("788-0", "13.1", "%"), ("777-3", "251", "10*3/uL"), ("770-8", "58", "%"), ("736-9", "31", "%"),
    ("2345-7", "94", "mg/dL"), ("3094-0", "14", "mg/dL"), ("2951-2", "139", "mmol/L"),
    ("2823-3", "4.2", "mmol/L"), ("2075-0", "102", "mmol/L"), ("2028-9", "25", "mmol/L"),
    ("2885-2", "7.1", "g/dL"), ("1975-2", "0.6", "mg/dL"), ("1742-6", "21", "U/L"), ("1920-8", "24", "U/L"),
    ("33914-3", "78", "mL/min/{1.73_m2}"),
]

MISSING = datetime.min.replace(tzinfo=UTC)   # marker: no file that night


def history(folder: Path) -> list[Path]:
    """A backfill (no partition): demographics and a month of labs in the usual units."""
    folder.mkdir(parents=True, exist_ok=True)
    labs, events = [LAB_HEADER], [EVENT_HEADER]
    for i, pid in enumerate(PATIENTS):
        events.append(f"{pid},birth_date,2020-01-01,{1950 + i}-03-0{1 + i % 9},\n")
        events.append(f"{pid},sex,2020-01-01,{'F' if i % 2 else 'M'},\n")
        events.append(f"{pid},diagnosis,2025-01-10,MM,C90.00\n")
        for day in (1, 15):
            stamp = f"2025-05-{day:02d}T08:00:00+00:00"
            labs += [f"{pid},H{i}-{day}-c,2160-0,{0.9 + i * 0.03:.2f},mg/dL,{stamp},final\n",
                     f"{pid},H{i}-{day}-a,6768-6,{90 + i * 5},U/L,{stamp},final\n",
                     f"{pid},H{i}-{day}-k,17861-6,{9.2 + i * 0.05:.2f},mg/dL,{stamp},final\n"]
    (folder / "labs.csv").write_text("".join(labs), "utf-8")
    (folder / "events.csv").write_text("".join(events), "utf-8")
    return [folder / "labs.csv", folder / "events.csv"]


def write_night(inbox: Path, spec: Night) -> Path:
    """Write one night's files under `<inbox>/<night>/` with their arrival times as mtimes."""
    folder = inbox / spec.night.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    n = spec.night.toordinal()
    stamp = f"{spec.night.isoformat()}T09:00:00+00:00"
    if spec.labs_at is not MISSING:
        rows = [LAB_HEADER]
        for i, pid in enumerate(PATIENTS):
            alp = 95 + i * 5 + n % 7
            alp_value = f"{alp / 60:.3f}" if spec.alp_unit == "ukat/L" else f"{alp}"
            rows += [f"{pid},N{n}-{i}-c,2160-0,{0.95 + i * 0.03:.2f},mg/dL,{stamp},final\n",
                     f"{pid},N{n}-{i}-a,6768-6,{alp_value},{spec.alp_unit},{stamp},final\n",
                     f"{pid},N{n}-{i}-k,17861-6,{9.3 + i * 0.05:.2f},mg/dL,{stamp},final\n",
                     f"{pid},N{n}-{i}-b,1751-7,4.1,g/dL,{stamp},final\n"]
            if spec.panels:
                rows += [f"{pid},N{n}-{i}-p{k},{code},{value},{unit},{stamp},final\n"
                         for k, (code, value, unit) in enumerate(PANEL_ROWS)]
            if spec.local_creatinine:
                rows.append(f"{pid},N{n}-{i}-l,{spec.local_creatinine},{84 + i},umol/L,{stamp},final\n")
        _write(folder / "labs.csv", "".join(rows), spec.labs_at)
    if spec.events_at is not MISSING:
        rows = [EVENT_HEADER]
        for i, pid in enumerate(PATIENTS):
            rows.append(f"{pid},weight_kg,{spec.night.isoformat()},{70 + i}.5,\n")
            if i < 6:
                rows.append(f"{pid},bone_disease,{spec.night.isoformat()},none,\n")
        for k in range(spec.events_bad):
            pid = PATIENTS[k % len(PATIENTS)]
            # Bad rows whose reasons would quote patient data: the dashboard must not show it.
            rows.append([f"{pid},birth_date,{spec.night.isoformat()},1950-02-30,\n",
                         f"{pid},weight_kg,not-a-date-{pid},71.0,\n",
                         f"{pid},weight_kg,{spec.night.isoformat()},{pid}kg,\n"][k % 3])
        _write(folder / "events.csv", "".join(rows), spec.events_at)
    return folder


def _write(path: Path, text: str, arrived: datetime) -> None:
    path.write_text(text, "utf-8")
    os.utime(path, (arrived.timestamp(), arrived.timestamp()))


def run_nights(settings, inbox: Path, specs: list[Night]) -> list[dict]:
    """Write and run each night in turn, as the nightly job would on the morning after."""
    from bonewatch import pipeline

    results = []
    for spec in specs:
        write_night(inbox, spec)
        results.append(pipeline.nightly(settings, spec.night, now=spec.run_at))
    return results


def patient_ids_in(folder: Path, ids: list[str]) -> dict[str, list[str]]:
    """Every file under `folder` that contains one of `ids` (bytes, any encoding)."""
    found: dict[str, list[str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits = [pid for pid in ids if pid.encode() in data]
        if hits:
            found[str(path.relative_to(folder))] = hits
    return found


# ---- the browser -------------------------------------------------------------------------------

def launch_chromium(playwright):
    """Debian's chromium, headless, networking features off. Fails (never skips) without it."""
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`bash scripts/ensure-chromium`, "
                    "which `make test` runs first)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


class OfflinePage:
    """A browser page that may load file:// URLs only; every other request is aborted and
    remembered, and console errors, page errors and failed requests (a file:// one included:
    a missing file) are collected."""

    def __init__(self, browser, width: int = 1440, height: int = 1000):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("requestfailed", lambda req: self.failed.append(f"{req.url}: {req.failure}"))

    def _route(self, route):
        url = route.request.url
        if url.startswith("file://") or url.startswith("data:"):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def open(self, path: Path):
        self.page.goto(path.resolve().as_uri(), wait_until="load")
        return self.page

    def close(self):
        self.context.close()


# ---- nothing remote ----------------------------------------------------------------------------

#: an http(s)/ws/ftp URL or a protocol-relative //host: anything a page could fetch from elsewhere
#: (this machine's own names excepted)
REMOTE = re.compile(r"(?i)(?:\b(?:https?|wss?|ftp):)?//(?!(?:localhost|127\.0\.0\.1)\b)"
                    r"[a-z0-9-]+(?:\.[a-z0-9-]+)+[^\s\"'`()<>\\]*")
#: files a browser loads; licence texts and READMEs beside the vendored files are read by people
SCANNED = {".html", ".htm", ".css", ".js", ".mjs", ".svg", ".json"}
#: a licence banner: the comment a minified file starts with, and /*! ... */ comments anywhere
_BANNER = re.compile(r"\A\s*/\*.*?\*/|/\*!.*?\*/", re.S)
#: an HTML or XML comment (an SVG's "Generator: Sketch - https://sketch.com")
_MARKUP_COMMENT = re.compile(r"<!--.*?-->", re.S)

# Remote-looking strings that nothing fetches, each with the reason. Keyed by URL prefix; a
# prefix under a file name holds in that file only.
INERT_EVERYWHERE = {
    "http://www.w3.org/": "XML, SVG and XLink namespace names (xmlns, createElementNS): names, never fetched",
}
INERT_IN = {
    "plotly.min.js": {
        # map traces (scattermap, choroplethmap, ...): the dashboard draws heatmaps, bars and boxes only
        "https://basemaps.cartocdn.com/": "map styles of map traces",
        "https://tiles.basemaps.cartocdn.com/": "map fonts of map traces",
        "https://tile.openstreetmap.org/": "map tiles of map traces",
        "https://www.openstreetmap.org/copyright": "attribution link drawn on a map",
        "https://wiki.openstreetmap.org/": "link in the 'needs WebGL' message of map traces",
        "https://server.arcgisonline.com/": "map tiles of map traces",
        "https://geoserveis.icgc.cat/": "map styles of map traces",
        "https://tilemaps.icgc.cat/": "map tiles of map traces",
        "https://fonts.openmaptiles.org/": "map fonts of map traces",
        "https://cdn.jsdelivr.net/npm/@mapbox/maki": "map marker icons of map traces",
        "https://maplibre.org/": "attribution link drawn on a map",
        "http://www.esri.com": "attribution text of a map layer",
        # geo traces (scattergeo, choropleth): none on the dashboard
        "https://cdn.plot.ly/un/": "topojson of geo traces",
        # other dormant features and message text
        "https://cloud.plotly.com/newchart": "'Edit in Chart Studio' (config showEditInChartStudio, off)",
        "https://plotly.com/": "text of help messages and the logo link (config displaylogo, off)",
        "https://get.webgl.org": "link in the 'needs WebGL' message (no WebGL trace is drawn)",
        "http://get.webgl.org": "the same link, in another message",
        "https://github.com/": "links in error messages and licence comments of bundled modules",
    },
    "bootstrap.min.js": {"https://popper.js.org": "text of the 'tooltips need Popper' error message"},
    "vega-lite.min.js": {
        "https://vega.github.io/schema/vega/": "the $schema name written into compiled specs, never fetched",
        "https://github.com/vega/vega-lite/issues/": "text of a warning message",
    },
    "vega-embed.min.js": {
        "https://vega.github.io/editor/": "'Open in Vega Editor' action; GX embeds charts with actions: false",
        "https://github.com/Starcounter-Jack/JSON-Patch": "text of an error message",
    },
}


def remote_references(folder: Path) -> dict[str, list[str]]:
    """Every file under `folder` that a browser loads, with the remote references it holds beyond
    the inert ones above (licence banners and markup comments skipped: nothing loads them)."""
    found: dict[str, list[str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SCANNED):
        text = path.read_text("utf-8", errors="replace")
        if path.suffix.lower() in {".css", ".js", ".mjs"}:
            text = _BANNER.sub("", text)
        elif path.suffix.lower() in {".html", ".htm", ".svg"}:
            text = _MARKUP_COMMENT.sub("", text)
        inert = tuple(INERT_EVERYWHERE) + tuple(INERT_IN.get(path.name, {}))
        hits = sorted({m.group(0) for m in REMOTE.finditer(text)
                       if not m.group(0).lower().startswith(inert)})
        if hits:
            found[str(path.relative_to(folder))] = hits
    return found
