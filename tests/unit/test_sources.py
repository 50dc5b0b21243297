"""Format detection (from the name, else the content) and the configured unit aliases."""

from __future__ import annotations

import json
from datetime import datetime

import pandas as pd
import pytest

from bonewatch.config import load_settings, with_overrides
from bonewatch.errors import SourceUnreadable
from bonewatch.ingest import feeds, sources

LAB_HEADER = ",".join(feeds.LAB_COLUMNS) + "\n"
OBSERVATION = json.dumps({"resourceType": "Observation", "id": "o1"})


@pytest.mark.parametrize(("name", "content", "fmt"), [
    ("labs.csv", LAB_HEADER, "labs_csv"),
    ("night.events.csv", "patient_id,event_type,occurred_at,value,detail\n", "events_csv"),
    ("clinical.csv", "patient_id,event_type,occurred_at,value,detail\n", "events_csv"),   # header decides
    ("lis.hl7", "MSH|^~\\&|LIS\r", "hl7"),
    ("bundle.json", '{"resourceType": "Bundle"}', "fhir_bundle"),
    ("Observation.ndjson", OBSERVATION + "\n", "fhir_ndjson"),
    # no known suffix: the content decides
    ("export.dat", "\x0bMSH|^~\\&|LIS\r", "hl7"),
    ("export.dat", OBSERVATION + "\n" + OBSERVATION + "\n", "fhir_ndjson"),
    ("export.dat", '{\n "resourceType": "Bundle",\n "entry": []\n}\n', "fhir_bundle"),
    ("export.txt", LAB_HEADER, "labs_csv"),
])
def test_format_from_name_then_content(tmp_path, name, content, fmt):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert sources.detect_format(path) == fmt
    assert sources.FEED_OF_FORMAT[fmt] in {"labs", "events", "hl7", "fhir"}


@pytest.mark.parametrize("name", ["report.pdf", "notes.txt", "expected_alerts.jsonl"])
def test_unknown_format_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"%PDF-1.4 something else\n")
    with pytest.raises(SourceUnreadable, match=f"{name}: unsupported format"):
        sources.detect_format(path)


def test_unit_aliases_from_the_configuration_convert(tmp_path):
    settings = with_overrides(load_settings(env={}), ingest__unit_aliases={"mcmol/L": "umol/L", "mg/Dl ": "mg/dL"})
    frame = pd.DataFrame([["000101", "R1", "2160-0", "88.4", "mcmol/L", "2025-03-01T08:00:00+00:00", "final"],
                          ["000101", "R2", "2160-0", "1.0", "mcmol/L", "2025-03-01T08:00:00+00:00", "final"],
                          ["000101", "R3", "2160-0", "1.0", "parsecs", "2025-03-01T08:00:00+00:00", "final"]],
                         columns=feeds.LAB_COLUMNS, index=pd.Index([2, 3, 4], name="line"))
    parsed = feeds.parse_labs(frame, settings, "d1", datetime(2025, 3, 2))
    assert parsed.rows["value"].round(4).tolist() == [1.0, round(1 / 88.4, 4)]
    assert parsed.rows["orig_unit"].tolist() == ["mcmol/L", "mcmol/L"]     # as sent, kept beside
    assert parsed.rejected["reason"].tolist() == ["unit «parsecs» cannot be converted for creatinine"]


@pytest.mark.parametrize(("name", "feed"), [
    ("lis.hl7", "hl7"), ("x.ORU", "hl7"), ("a.hl7v2", "hl7"), ("clinical.events.csv", "events"),
    ("labs.csv", "labs"), ("bundle.json", "fhir"), ("Observation.ndjson", "fhir"), ("notes.txt", None),
    ("noext", None),
])
def test_feed_of_name_for_files_that_cannot_be_opened(name, feed):
    assert sources.feed_of_name(name) == feed
