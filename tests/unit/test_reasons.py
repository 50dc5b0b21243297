"""Quarantine reasons: feed text is quoted through one function, and the public form every channel
but the operator's command line shows (dashboard, dq metrics, data-team emails) withholds it."""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bonewatch.config import load_settings
from bonewatch.ingest import feeds
from bonewatch.ingest.hl7 import read_hl7
from bonewatch.ingest.parsing import public_reason, quote, quote_series
from bonewatch.ingest.sources import ReadContext

RECEIVED = datetime(2025, 3, 2)


@pytest.fixture(scope="module")
def settings():
    return load_settings(env={})


@pytest.mark.parametrize(("reason", "shown"), [
    ("unknown status «DOE JOHN»", "unknown status «…»"),
    ("unknown code «MRN 44556677»", "unknown code «…»"),
    ("unit «g/dL» cannot be converted for creatinine", "unit «…» cannot be converted for creatinine"),
    ("unparseable value «O'BRIEN»", "unparseable value «…»"),
    ("not an ORU^R01 message («DOE^JOHN»)", "not an ORU^R01 message («…»)"),
    ("impossible date «2025-02-30T08:00:00", "impossible date «…»"),      # cut short: to the end
    ("implausible creatinine value (outside 0.05-40 mg/dL)", "implausible creatinine value (outside 0.05-40 mg/dL)"),
    # stored before the marks: apostrophes, from the first to the last (a lone one: to the end)
    ("unknown code 'DOE JOHN'", "unknown code «…»"),
    ("unknown sex value 'O'BRIEN'", "unknown sex value «…»"),
    ("unknown event type 'DOE«JOHN'", "unknown event type «…»"),
    ("unknown status 'DOE JO", "unknown status «…»"),
])
def test_public_reason_withholds_every_quoted_part(reason, shown):
    assert public_reason(reason) == shown
    assert public_reason(shown) == shown                                  # idempotent


def test_a_value_cannot_close_its_quotation_early():
    reason = "unknown status " + quote("x» DOE JOHN «y")
    assert reason == "unknown status «x› DOE JOHN ‹y»"                   # the marks inside become ‹ ›
    assert public_reason(reason) == "unknown status «…»"
    assert quote_series(pd.Series(["a»b", "ZZ"])).tolist() == ["«a›b»", "«ZZ»"]


def _lab_reasons(value: str, settings) -> list[str]:
    """The reasons of lab rows that each carry `value` in one field (the others valid)."""
    good = {"patient_id": "000101", "result_id": "R", "loinc": "2160-0", "value": "1.0", "unit": "mg/dL",
            "collected_at": "2025-03-01T08:00:00", "status": "final"}
    rows = []
    for i, column in enumerate(("value", "unit", "collected_at", "status")):
        rows.append({**good, "result_id": f"R{i}", column: value})
    frame = pd.DataFrame(rows, columns=feeds.LAB_COLUMNS, index=pd.RangeIndex(2, 2 + len(rows)))
    return feeds.parse_labs(frame, settings, "d1", RECEIVED).rejected["reason"].tolist()


def _event_reasons(value: str, settings) -> list[str]:
    rows = [["000101", value, "2025-03-01", "F", ""],
            ["000101", "sex", "2025-03-01", value, ""],
            ["000101", "response", "2025-03-01", value, ""],
            ["000101", "birth_date", "2025-03-01", value, ""],
            ["000101", "weight_kg", "2025-03-01", value, ""],
            ["000101", "bisphosphonate_dose", "2025-03-01", "zoledronic_acid", value],
            ["000101", "sex", value, "F", ""]]
    frame = pd.DataFrame(rows, columns=feeds.EVENT_COLUMNS, index=pd.RangeIndex(2, 2 + len(rows)))
    return feeds.parse_events(frame, settings, "d1", RECEIVED).rejected["reason"].tolist()


def _hl7_reasons(value: str, settings, folder: Path) -> list[str]:
    """The reasons of HL7 messages carrying `value` as their type (MSH-9) or version (MSH-12)."""
    text = value.replace("|", "/").replace("^", "/").replace("\\", "/").replace("~", "/").replace("&", "/")
    text = " ".join(text.split()) or "x"
    obx = "OBX|1|NM|2160-0^^LN||1.0|mg/dL|||||F|||20250301080000"
    messages = [f"MSH|^~\\&|LIS|H|BW|H|20250301||{text}|1|P|2.5.1\rPID|1||000101^^^H^MR\r{obx}",
                f"MSH|^~\\&|LIS|H|BW|H|20250301||ORU^R01|2|P|{text}\rPID|1||000101^^^H^MR\r{obx}"]
    path = folder / "planted.hl7"
    path.write_text("\r".join(messages) + "\r", encoding="utf-8")
    items = list(read_hl7(path, ReadContext(settings, 1000, received_at=RECEIVED)))
    return [bad[2] for _, chunk in items for bad in chunk.bad_rows]


PLANTED = st.text(min_size=0, max_size=30).map(lambda t: "ZZPHI" + t)


@hsettings(max_examples=60, deadline=None)
@given(PLANTED)
def test_no_planted_text_survives_a_public_reason(value):
    """Whatever a feed sends in any field, the public form of the reason does not show it: every
    reason that quotes feed text quotes it through `quote`."""
    settings = load_settings(env={})
    with tempfile.TemporaryDirectory() as folder:
        hl7_reasons = _hl7_reasons(value, settings, Path(folder))
    assert len(hl7_reasons) >= 2, "an HL7 message with a planted type or version is a bad row"
    reasons = _lab_reasons(value, settings) + _event_reasons(value, settings) + hl7_reasons
    for reason in reasons:
        assert "ZZPHI" not in public_reason(reason), reason
        assert "\n" not in public_reason(reason)


def test_planted_values_are_quoted_for_the_operator(settings):
    """The command line (`bonewatch quarantine`) still reads what was sent, except a birth date."""
    reasons = _lab_reasons("ZZPHINAME", settings) + _event_reasons("ZZPHINAME", settings)
    assert "unparseable value «ZZPHINAME»" in reasons and "unknown event type «zzphiname»" in reasons
    assert all("ZZPHINAME" in r or "zzphiname" in r for r in reasons if "birth date" not in r and "«" in r)


def test_an_impossible_birth_date_is_not_quoted_in_the_events_feed(settings):
    """PHI: like HL7 PID-7, the events CSV's birth date is named, not quoted, even to the operator."""
    reasons = _event_reasons("1950-02-30", settings)
    births = [r for r in reasons if "birth date" in r]
    assert births == ["impossible birth date (not a calendar date from 1900 on)"]
    assert not any("1950" in r for r in reasons if "birth" in r)


def test_hl7_message_type_and_version_are_quoted_for_the_operator(settings, tmp_path):
    reasons = _hl7_reasons("DOE JOHN", settings, tmp_path)
    assert "not an ORU^R01 message («DOE JOHN»)" in reasons and "unsupported HL7 version «DOE JOHN»" in reasons
    assert {public_reason(r) for r in reasons} == {"not an ORU^R01 message («…»)", "unsupported HL7 version «…»"}


def test_dashboard_codes_mask_local_codes_a_name_or_an_mrn_could_hide_in(tmp_path):
    """The codes page shows LOINC codes and the configured ones in full; every other local code is
    masked, so a name or an MRN sent in a code field never reaches the dashboard."""
    from bonewatch.ingest.codes import public_codes

    config = tmp_path / "bonewatch.toml"
    config.write_text('[ingest]\nignore_codes = ["GLU-POC"]\n[ingest.code_map]\nCRE-LOCAL = "2160-0"\n', "utf-8")
    frame = pd.DataFrame({"code": ["718-7", "CRE-LOCAL", "GLU-POC", "ZZPHINAME", "99887766", "MRN:99887766",
                                   "Medication:1234567", "Condition:C90.0", "1234-5"]})
    shown = public_codes(frame, load_settings(config))["code"].tolist()
    assert shown == ["718-7", "CRE-LOCAL", "GLU-POC", "•••••••••", "••••••••", "•••:••••••••",
                     "Medication:•••••••", "Condition:•••.•", "••••-•"]      # 1234-5: a wrong check digit
