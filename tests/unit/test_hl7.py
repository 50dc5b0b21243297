"""HL7 v2 ORU^R01 reader and writer (SPEC 2.2): mapping, line numbers, quarantine, whole-file failures."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from bonewatch.config import load_settings
from bonewatch.errors import SourceUnreadable
from bonewatch.ingest import feeds, sources
from bonewatch.ingest.hl7 import hl7_result_ids, hl7_timestamp, read_hl7, write_hl7
from bonewatch.ingest.sources import ReadContext

RECEIVED = datetime(2025, 6, 1, 12, 0)
ROWS = [
    ("000123", "R100", "2160-0", "1.2", "mg/dL", "2025-01-15T08:30:00", "final"),
    ("000123", "R101", "6768-6", "<5", "U/L", "2025-01-15T08:30:00", "F"),
    ("000123", "R102", "17861-6", "9.1", "mg/dL", "2025-01-15T08:30:00", "corrected"),
    ("000456", "R200", "2160-0", "88.4", "umol/L", "2025-02-01T07:00:00+01:00", "preliminary"),
    ("000456", "R201", "6768-6", ">=1000", "ukat/L", "2025-02-01T07:00:00+01:00", "cancelled"),
    ("000123", "R300", "LOCALCREA", "0.9", "mg/dL", "2025-03-01", "final"),
    ("000789", "R400", "1751-7", "35", "g/L", "2025-03-02T10:15", "final"),
]

MSH = "MSH|^~\\&|LAB|HOSP|BW|HOSP|20250115090000||ORU^R01|{cid}|P|{version}"


@pytest.fixture
def settings(tmp_path):
    config = tmp_path / "bonewatch.toml"
    config.write_text('[ingest.code_map]\nLOCALCREA = "2160-0"\n', "utf-8")
    return load_settings(config)


def ctx(settings, chunk_rows: int = 1000) -> ReadContext:
    return ReadContext(settings, chunk_rows, received_at=RECEIVED)


def read(path: Path, settings, chunk_rows: int = 1000) -> tuple[pd.DataFrame, list, list]:
    """All lab rows (one frame), all bad rows, and the lab chunks' sizes."""
    labs, _, bad, sizes = read_all(path, settings, chunk_rows)
    return labs, bad, sizes


def read_all(path: Path, settings, chunk_rows: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame, list, list]:
    """All lab rows, all event rows (each one frame), all bad rows, and the lab chunks' sizes."""
    items = list(read_hl7(path, ctx(settings, chunk_rows)))
    assert {kind for kind, _ in items} <= {"labs", "events"}
    frames = {"labs": [], "events": []}
    for kind, chunk in items:
        columns = feeds.LAB_COLUMNS if kind == "labs" else feeds.EVENT_COLUMNS
        assert list(chunk.frame.columns) == columns and chunk.frame.index.name == "line"
        assert chunk.frame.index.is_unique, "one frame holds one row a line"
        frames[kind].append(chunk.frame)
    labs, events = (pd.concat(frames[k]) if frames[k] else pd.DataFrame(columns=c)
                    for k, c in (("labs", feeds.LAB_COLUMNS), ("events", feeds.EVENT_COLUMNS)))
    return labs, events, [bad for _, chunk in items for bad in chunk.bad_rows], [len(f) for f in frames["labs"]]


def message(cid: str, *segments: str, version: str = "2.5.1") -> list[str]:
    return [MSH.format(cid=cid, version=version), *segments]


def write(path: Path, messages: list[list[str]], end: str = "\r", after: str = "") -> Path:
    path.write_bytes("".join(end.join(m) + end + after for m in messages).encode("utf-8"))
    return path


def good(cid: str, mrn: str = "000123", order: str = "ORD1", version: str = "2.5.1") -> list[str]:
    return message(cid, f"PID|1||{mrn}^^^HOSP^MR", f"OBR|1||{order}|CHEM^^L|||20250115083000",
                   "OBX|1|NM|2160-0^^LN||1.2|mg/dL|||||F|||20250115083000",
                   "NTE|1||drawn from the left arm",
                   "OBX|2|NM|6768-6^^LN||110|U/L|||||F", version=version)


# ---------------------------------------------------------------------------------------- round trip


def test_round_trip_gives_the_same_canonical_rows_as_csv(tmp_path, settings):
    path = tmp_path / "labs.hl7"
    write_hl7(path, ROWS)
    frame, bad, _ = read(path, settings)
    assert bad == []
    assert list(frame["result_id"]) == hl7_result_ids(ROWS)
    assert list(frame["patient_id"]) == [r[0] for r in ROWS]          # leading zeros kept
    from_hl7 = feeds.parse_labs(frame, settings, "d1", RECEIVED)
    csv = pd.DataFrame(ROWS, columns=feeds.LAB_COLUMNS, index=pd.Index(range(2, 2 + len(ROWS)), name="line"))
    from_csv = feeds.parse_labs(csv, settings, "d2", RECEIVED)
    assert from_hl7.rejected.empty and from_csv.rejected.empty
    columns = ["patient_id", "analyte", "value", "censor", "unit", "orig_value", "orig_unit", "collected_at",
               "collected_date", "status"]
    pd.testing.assert_frame_equal(from_hl7.rows[columns].reset_index(drop=True),
                                  from_csv.rows[columns].reset_index(drop=True))
    assert list(from_hl7.rows["censor"]) == ["", "<", "", "", ">", "", ""]


def test_write_is_deterministic_and_shaped_as_specified(tmp_path):
    a, b = tmp_path / "a.hl7", tmp_path / "b.hl7"
    write_hl7(a, ROWS)
    write_hl7(b, list(ROWS))
    assert a.read_bytes() == b.read_bytes()
    text = a.read_bytes().decode("utf-8")
    messages = text.split("\r\n")[:-1]
    assert len(messages) == 4                        # grouped by (patient, collected_at), first appearance
    first = messages[0].split("\r")
    assert first[0].startswith("MSH|^~\\&|") and "|ORU^R01" in first[0] and first[0].endswith("|2.5.1")
    assert first[1] == "PID|1||000123^^^HOSP^MR"
    assert first[2].split("|")[3] == "R100" and first[2].split("|")[7] == "20250115083000"
    assert [s.split("|")[1] for s in first[3:]] == ["1", "2", "3"]
    assert first[4].split("|")[2] == "SN" and first[4].split("|")[5] == "<^5"
    assert [s.split("|")[11] for s in first[3:]] == ["F", "F", "C"]
    assert messages[1].split("\r")[-1].split("|")[14] == "20250201070000+0100"


def test_result_ids_follow_the_message_grouping():
    # a message per (patient, time): OBR-3 = its first result_id, OBR-4 = its first code; the second
    # row of one code in a message is the second occurrence of that test
    rows = [("P1", "A", "2160-0", "1", "mg/dL", "2025-01-01", "final"),
            ("P2", "B", "2160-0", "1", "mg/dL", "2025-01-01", "final"),
            ("P1", "C", "2160-0", "1", "mg/dL", "2025-01-01", "final"),
            ("P1", "D", "6768-6", "1", "U/L", "2025-01-01", "final")]
    assert hl7_result_ids(rows) == ["A|2160-0|2160-0", "B|2160-0|2160-0", "A|2160-0|2160-0||2", "A|2160-0|6768-6"]


def test_separators_in_values_are_escaped_and_read_back(tmp_path, settings):
    path = tmp_path / "esc.hl7"
    write_hl7(path, [("P|1", "R^1", "2160-0", "see note", "mg&dL", "2025-01-01", "final")])
    frame, bad, _ = read(path, settings)
    assert bad == []
    assert frame.iloc[0].tolist()[:5] == ["P|1", "R\\S\\1|2160-0|2160-0", "2160-0", "see note", "mg&dL"]
    assert list(frame["result_id"]) == hl7_result_ids([("P|1", "R^1", "2160-0", "", "", "2025-01-01", "")])


def test_sources_dispatch_hl7(tmp_path, settings):
    path = write(tmp_path / "feed.hl7", [good("1")])
    assert sources.detect_format(path) == "hl7"
    assert [kind for kind, _ in sources.read(path, "hl7", ctx(settings))] == ["labs"]


# ---------------------------------------------------------------------------------------- framing and lines


@pytest.mark.parametrize("variant", ["cr", "lf", "crlf", "mllp", "mllp-lf", "bom", "editor"])
def test_line_end_variants_give_identical_frames(tmp_path, settings, variant):
    messages = [good("1"), good("2", mrn="000456", order="ORD2")]
    reference, _, _ = read(write(tmp_path / "ref.hl7", messages, "\r"), settings)
    path = tmp_path / f"{variant}.hl7"
    if variant == "cr":
        write(path, messages, "\r")
    elif variant == "lf":
        write(path, messages, "\n")
    elif variant == "crlf":
        write(path, messages, "\r\n")
    elif variant == "mllp":
        path.write_bytes(b"".join(b"\x0b" + "\r".join(m).encode() + b"\r\x1c\r" for m in messages))
    elif variant == "mllp-lf":
        path.write_bytes(b"".join(b"\x0b" + "\n".join(m).encode() + b"\x1c\n" for m in messages))
    elif variant == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + "".join("\r".join(m) + "\r" for m in messages).encode())
    else:                                            # write_hl7's layout: `\r` segments, `\r\n` after a message
        path.write_bytes("".join("\r".join(m) + "\r\n" for m in messages).encode())
    frame, bad, _ = read(path, settings)
    assert bad == []
    pd.testing.assert_frame_equal(frame, reference)
    assert list(frame.index) == [4, 6, 10, 12]       # the OBX segments' lines (NTE on 5 and 11)
    assert list(frame["patient_id"]) == ["000123", "000123", "000456", "000456"]


def test_blank_lines_count_and_the_last_segment_may_lack_its_end(tmp_path, settings):
    path = tmp_path / "blank.hl7"
    path.write_bytes(b"\n".join(m.encode() for m in good("1")) + b"\n\n\n" + b"\n".join(m.encode() for m in good("2")))
    frame, bad, _ = read(path, settings)
    assert bad == [] and list(frame.index) == [4, 6, 12, 14]


# ---------------------------------------------------------------------------------------- mapping


def test_versions_2_3_to_2_5_1_accepted_and_2_1_quarantined(tmp_path, settings):
    path = write(tmp_path / "v.hl7", [good("1", version="2.3"), good("2", version="2.1"), good("3", version="2.5.1"),
                                      good("4", version="2.4")])
    frame, bad, _ = read(path, settings)
    assert list(frame.index) == [4, 6, 16, 18, 22, 24]
    assert bad == [(10, "OBX|1|NM|2160-0^^LN||1.2|mg/dL|||||F|||20250115083000", "unsupported HL7 version «2.1»"),
                   (12, "OBX|2|NM|6768-6^^LN||110|U/L|||||F", "unsupported HL7 version «2.1»")]


def test_structured_numeric_values(tmp_path, settings):
    path = write(tmp_path / "sn.hl7", [message(
        "1", "PID|1||000123^^^HOSP^MR", "OBR|1||ORD1|CHEM|||20250115083000",
        "OBX|1|SN|2160-0^^LN||<^5|mg/dL|||||F", "OBX|2|SN|2160-0^^LN||^5|mg/dL|||||F",
        "OBX|3|SN|6768-6^^LN||>=^1000|U/L|||||F", "OBX|4|SN|6768-6^^LN||=^7|U/L|||||F",
        "OBX|5|SN|6768-6^^LN||^1^-^5|U/L|||||F", "OBX|6|NM|6768-6^^LN||42^ignored|U/L|||||F",
        "OBX|7|ST|6768-6^^LN||12|U/L|||||F")])
    frame, bad, _ = read(path, settings)
    assert bad == []
    assert list(frame["value"]) == ["<5", "5", ">=1000", "7", "1-5", "42", "12"]
    parsed = feeds.parse_labs(frame, settings, "d", RECEIVED)
    assert list(parsed.rows["censor"]) == ["<", "", ">", "", "", ""]
    assert list(parsed.rejected["reason"]) == ["unparseable value «1-5»"]


def test_obx14_is_preferred_over_obr7_and_timestamps_convert(tmp_path, settings):
    path = write(tmp_path / "ts.hl7", [message(
        "1", "PID|1||000123^^^HOSP^MR", "OBR|1||ORD1|CHEM|||202501150830-0500",
        "OBX|1|NM|2160-0^^LN||1.0|mg/dL|||||F|||20250116091500.1234+0100",
        "OBX|2|NM|2160-0^^LN||1.0|mg/dL|||||F", "OBX|3|NM|2160-0^^LN||1.0|mg/dL|||||F|||20250117",
        "OBX|4|NM|2160-0^^LN||1.0|mg/dL|||||F|||20250230")])
    frame, _, _ = read(path, settings)
    assert list(frame["collected_at"]) == ["2025-01-16T09:15:00+01:00", "2025-01-15T08:30:00-05:00", "2025-01-17",
                                           "20250230"]
    parsed = feeds.parse_labs(frame, settings, "d", RECEIVED)
    assert list(parsed.rows["collected_at"].astype(str)) == ["2025-01-16 08:15:00", "2025-01-15 13:30:00",
                                                             "2025-01-17 00:00:00"]
    assert list(parsed.rejected["reason"]) == ["impossible date «20250230»"]


@pytest.mark.parametrize(("sent", "iso"), [
    ("20250115", "2025-01-15"),
    ("2025011508", "2025-01-15T08:00:00"),
    ("202501150830", "2025-01-15T08:30:00"),
    ("20250115083012", "2025-01-15T08:30:12"),
    ("20250115083012.5", "2025-01-15T08:30:12"),
    ("20250115083012+0000", "2025-01-15T08:30:12+00:00"),
    ("20250115083012-0330", "2025-01-15T08:30:12-03:30"),
    (" 20250115 ", "2025-01-15"),
    ("", ""),
    ("2025011", "2025011"),
    ("20251301", "20251301"),
    ("20250115250000", "20250115250000"),
    ("20250115083012+9900", "20250115083012+9900"),
    ("2025-01-15", "2025-01-15"),
    ("yesterday", "yesterday"),
])
def test_hl7_timestamps(sent, iso):
    assert hl7_timestamp(sent) == iso


def test_pid3_repetitions_pick_the_mr(tmp_path, settings):
    path = write(tmp_path / "pid.hl7", [
        message("1", "PID|1||999^^^HOSP^PI~000777^^^HOSP^MR", "OBR|1||O1|C|||20250115",
                "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"),
        message("2", "PID|1||00555^^^HOSP^PI~888^^^X^SS", "OBR|1||O2|C|||20250115",
                "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"),
        message("3", "PID|1||00321", "OBR|1||O3|C|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"),
    ])
    frame, bad, _ = read(path, settings)
    assert bad == [] and list(frame["patient_id"]) == ["000777", "00555", "00321"]


def test_statuses(tmp_path, settings):
    statuses = ["F", "C", "P", "X", "W", "D", "I", "R", "S", "f", "Q"]
    obx = [f"OBX|{i}|NM|2160-0^^LN||1|mg/dL|||||{s}" for i, s in enumerate(statuses, start=1)]
    path = write(tmp_path / "st.hl7", [message("1", "PID|1||1", "OBR|1||O|C|||20250115", *obx)])
    frame, _, _ = read(path, settings)
    assert list(frame["status"]) == ["F", "C", "P", "X", "cancelled", "cancelled", "preliminary", "preliminary",
                                     "preliminary", "f", "Q"]
    parsed = feeds.parse_labs(frame, settings, "d", RECEIVED)
    assert list(parsed.rejected["reason"]) == ["unknown status «Q»"]


def test_several_orders_and_patients_in_one_message(tmp_path, settings):
    path = write(tmp_path / "groups.hl7", [message(
        "1", "PID|1||P1", "ORC|RE", "OBR|1||A|C|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F",
        "OBR|2||B|C|||20250116", "OBX|1|NM|2160-0^^LN||2|mg/dL|||||F", "ZXX|local|segment",
        "PID|2||P2", "OBX|1|NM|2160-0^^LN||3|mg/dL|||||F", "OBR|1||C|C|||20250117",
        "OBX|1|NM|2160-0^^LN||4|mg/dL|||||F")])
    frame, bad, _ = read(path, settings)
    assert list(frame["result_id"]) == ["A|C|2160-0", "B|C|2160-0", "C|C|2160-0"]
    assert list(frame["patient_id"]) == ["P1", "P1", "P2"]
    assert list(frame["collected_at"]) == ["2025-01-15", "2025-01-16", "2025-01-17"]
    assert [(line, reason) for line, _, reason in bad] == [(10, "OBX without an OBR before it")]


# ---------------------------------------------------------------------------------------- bad rows


def test_bad_messages_and_segments_are_quarantined_and_good_ones_kept(tmp_path, settings):
    messages = [
        good("1"),                                                                       # lines 1-6
        message("2", "OBR|1||O2|C|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"),   # 7-9: no PID
        message("3", "PID|1||^^^HOSP^MR", "OBR|1||O3|C|||20250115",                       # 10-13: empty PID-3
                "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"),
        message("4", "PID|1||SECRET42^^^HOSP^MR", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F",  # 14-20
                "OBR|1|||C|||20250115", "OBX|2|NM|2160-0^^LN||1|mg/dL|||||F",
                "OBR|2||O4|C|||20250115", "OBX||NM|2160-0^^LN||1|mg/dL|||||F"),
        ["MSH|^~\\&|ADT|HOSP|BW|HOSP|20250115||ADT^A01|5|P|2.5.1", "PID|1||SECRET42",    # 21-23
         "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"],
        ["MSH|^^^^|LAB|HOSP", "PID|1||SECRET42", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"],  # 24-26
        good("7", mrn="000456", order="ORD7"),                                            # 27-32
    ]
    path = write(tmp_path / "bad.hl7", messages)
    with path.open("ab") as handle:                                                      # 33-36: cut off
        handle.write(b"MSH|^~\\&|LAB|HOSP|BW|HOSP|20250115||ORU^R01|8|P|2.5\rPID|1||000999\r"
                     b"OBR|1||O8|C|||20250115\rOBX|1|NM|2160-0^^LN||1.")
    frame, bad, _ = read(path, settings)
    # An OBR without any order number (line 17) and an OBX without a set id (line 20) no longer
    # stop the reader: the set id is not part of a result's identity, and a row without an id is
    # emitted with an empty one, for `parse_labs` to quarantine if its code is monitored.
    assert list(frame.index) == [4, 6, 18, 20, 30, 32, 36]
    assert list(frame["result_id"]) == ["ORD1|CHEM|2160-0", "ORD1|CHEM|6768-6", "", "O4|C|2160-0",
                                        "ORD7|CHEM|2160-0", "ORD7|CHEM|6768-6", "O8|C|2160-0"]
    reasons = [(line, reason) for line, _, reason in bad]
    assert reasons[:4] == [
        (9, "message at line 7 has no PID segment"),
        (13, "PID-3 (patient id) is empty"),
        (16, "OBX without an OBR before it"),
        (21, "not an ORU^R01 message («ADT^A01»)"),
    ]
    assert reasons[4][0] == 24 and reasons[4][1].startswith("the HL7 message cannot be parsed (")
    assert len(reasons) == 5
    assert bad[0][1] == "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"
    assert bad[3][1].startswith("MSH|^~\\&|ADT")
    assert all("SECRET42" not in reason and "\n" not in reason and len(reason) <= 200 for _, _, reason in bad)
    parsed = feeds.parse_labs(frame, settings, "d", RECEIVED)
    assert list(parsed.rejected["line"]) == [18, 36]
    assert list(parsed.rejected["reason"]) == ["missing result_id",
                                               "unit «» cannot be converted for creatinine"]  # the cut-off OBX
    assert len(parsed.rows) == 5


def test_obx_before_any_msh_is_quarantined(tmp_path, settings):
    path = tmp_path / "orphan.hl7"
    path.write_bytes(b"OBX|1|NM|2160-0^^LN||1|mg/dL|||||F\rFHS|^~\\&\r" + "\r".join(good("1")).encode() + b"\rFTS|1\r")
    frame, bad, _ = read(path, settings)
    assert list(frame.index) == [6, 8]
    assert bad == [(1, "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F", "OBX outside a message (no MSH segment before it)")]


def test_missing_version_is_quarantined(tmp_path, settings):
    path = write(tmp_path / "nover.hl7", [["MSH|^~\\&|LAB|HOSP|BW|HOSP|20250115||ORU^R01|1|P", *good("x")[1:]]])
    frame, bad, _ = read(path, settings)
    assert frame.empty and {reason for _, _, reason in bad} == {"missing HL7 version (MSH-12)"}


# ---------------------------------------------------------------------------------------- whole-file failures


def _unreadable(path: Path, settings) -> SourceUnreadable:
    with pytest.raises(SourceUnreadable) as info:
        list(read_hl7(path, ctx(settings)))
    assert path.name in str(info.value)
    return info.value


def test_empty_files_are_unreadable(tmp_path, settings):
    empty = tmp_path / "empty.hl7"
    empty.write_bytes(b"")
    error = _unreadable(empty, settings)
    assert (error.line, error.reason) == (None, "the file is empty")
    blank = tmp_path / "blank.hl7"
    blank.write_bytes(b"\xef\xbb\xbf\r\n \r\n\x0b\x1c\r")
    error = _unreadable(blank, settings)
    assert (error.line, error.reason) == (1, "the file is empty")


def test_a_file_without_msh_is_not_hl7(tmp_path, settings):
    path = tmp_path / "labs.hl7"
    path.write_text("patient_id,result_id\nP1,R1\nPID|1||1\rOBX|MSH|1", "utf-8")
    error = _unreadable(path, settings)
    assert (error.line, error.reason) == (1, "no MSH segment: not an HL7 v2 file")
    binary = tmp_path / "binary.hl7"
    binary.write_bytes(bytes(range(256)) * 4)
    assert _unreadable(binary, settings).line == 1


def test_bytes_that_are_not_utf8_name_their_line(tmp_path, settings):
    path = tmp_path / "latin.hl7"
    text = "\r".join(good("1")) + "\r" + "\r".join(message("2", "PID|1||1", "OBR|1||O|C|||20250115",
                                                                "OBX|1|NM|2160-0^^LN||1|\xb5mol/L|||||F")) + "\r"
    path.write_bytes(text.encode("latin-1"))
    error = _unreadable(path, settings)
    assert (error.line, error.reason) == (10, "not UTF-8 text")


def _latin1_message(cid: str, charset: str) -> list[str]:
    msh = MSH.format(cid=cid, version="2.5.1") + ("|" * 6 + charset if charset else "")
    return [msh, "PID|1||000123^^^HOSP^MR", "OBR|1||O" + cid + "|C|||20250115",
            "OBX|1|NM|2160-0^^LN||88.4|\xb5mol/L|||||F", "NTE|1||Bemerkung: Hämolyse"]


@pytest.mark.parametrize("declared_in", ["first", "second"])
def test_latin1_declared_in_msh18_decodes(tmp_path, settings, declared_in):
    first, second = ("8859/1", "") if declared_in == "first" else ("", "8859/1")
    messages = [_latin1_message("1", first), _latin1_message("2", second)]
    assert (messages[0] if first else messages[1])[0].split("|")[17] == "8859/1"
    path = tmp_path / "latin1.hl7"
    path.write_bytes("".join("\r".join(m) + "\r" for m in messages).encode("latin-1"))
    frame, bad, _ = read(path, settings)
    assert bad == [] and list(frame["unit"]) == ["µmol/L", "µmol/L"]
    parsed = feeds.parse_labs(frame, settings, "d", RECEIVED)
    assert parsed.rejected.empty and list(parsed.rows["value"].round(6)) == [1.0, 1.0]


# ---------------------------------------------------------------------------------------- chunking


def test_small_chunks_give_the_same_rows_as_one_chunk(tmp_path, settings):
    rows = [(f"{p:06d}", f"R{p}-{i}", "2160-0", f"{p}.{i}", "mg/dL", f"2025-01-{p % 28 + 1:02d}T08:00:00", "final")
            for p in range(7) for i in range(p % 3 + 1)]
    path = tmp_path / "many.hl7"
    write_hl7(path, rows)
    with path.open("ab") as handle:           # a bad row lands in some chunk too
        handle.write(b"MSH|^~\\&|L|H|B|H|20250101||ADT^A08|x|P|2.5.1\r\n")
    big, big_bad, big_sizes = read(path, settings, 1000)
    small, small_bad, small_sizes = read(path, settings, 2)
    pd.testing.assert_frame_equal(small, big)
    assert list(big["result_id"]) == hl7_result_ids(rows) and big["result_id"].is_unique  # 2160-0 up to 3 times
    assert small_bad == big_bad and len(big_bad) == 1
    assert big_sizes == [len(rows)] and all(size <= 2 for size in small_sizes) and sum(small_sizes) == len(rows)
    assert len(small_sizes) == -(-len(rows) // 2)


# ---------------------------------------------------------------------------------------- real-feed shapes

SHAPES = Path(__file__).resolve().parents[1] / "data" / "shapes" / "hl7"


def one_obx(obx3: str, obr: str = "OBR|1||ACC1|CHEM|||20250115083000") -> list[str]:
    return message("1", "PID|1||000123^^^HOSP^MR", obr, f"OBX|1|NM|{obx3}||1.2|mg/dL|||||F")


@pytest.mark.parametrize(("obx3", "code"), [
    ("001370^Creatinine^L^2160-0^Creatinine^LN", "2160-0"),            # LabCorp: local code, LOINC alternate
    ("2160-0^Creatinine^LN^001370^Creatinine^L", "2160-0"),            # LOINC first
    ("001370^Creatinine^99LAB^2160-0^Creatinine^ln", "2160-0"),        # the coding system in any case
    ("001370^Creatinine^L^2160-0^Creatinine^LOINC", "2160-0"),         # LOINC spelled out
    ("^Creatinine^L^2160-0^^LN", "2160-0"),                            # no primary identifier
    ("001370^Creatinine^L^^^^^^Creatinine, serum^2160-0^Creatinine^LN", "2160-0"),  # CWE second alternate (10-12)
    ("718-7^Hemoglobin^LN^HGB^Hemoglobin^L", "718-7"),                 # LOINC not monitored: still the LOINC
    ("CR^Creatinine^L^LOCALCREA^Creatinine^99LOC", "LOCALCREA"),        # the coding in the hospital's code map
    ("LOCALCREA^Creatinine^99LOC^CR^Creatinine^L", "LOCALCREA"),
    ("HGB^Hemoglobin^L^HB^Hb^99LOC", "HGB"),                           # nothing LOINC, nothing mapped: the first
    ("^^^HB^Hb^99LOC", "HB"),                                          # ... the first that is sent
    ("2160-0", "2160-0"),                                              # a bare code
    ("", ""),
])
def test_obx3_code_is_the_loinc_coding_wherever_it_is_else_the_mapped_one(tmp_path, settings, obx3, code):
    frame, bad, _ = read(write(tmp_path / "c.hl7", [one_obx(obx3)]), settings)
    assert bad == [] and list(frame["loinc"]) == [code]


def test_labcorp_shape_gets_creatinine_in(settings):
    frame, bad, _ = read(SHAPES / "labcorp_local_then_loinc.hl7", settings)
    assert bad == [] and list(frame["loinc"]) == ["2160-0", "17861-6", "1751-7", "6768-6"]
    parsed = feeds.parse_labs(frame, settings, "d", RECEIVED)
    assert parsed.rejected.empty
    assert list(parsed.rows["analyte"]) == ["creatinine", "calcium", "albumin", "alp"]
    assert list(parsed.rows["value"]) == [1.2, 9.1, 4.1, 110.0]


def test_two_panels_under_one_accession_keep_every_result(settings):
    # a renal and a hepatic panel on accession ACC7788, each restarting OBX-1 at 1, albumin in both
    frame, bad, _ = read(SHAPES / "two_panels_one_accession.hl7", settings)
    assert bad == []
    assert list(frame["result_id"]) == [
        "ACC7788^HOSP_LAB|24362-6|2160-0", "ACC7788^HOSP_LAB|24362-6|17861-6", "ACC7788^HOSP_LAB|24362-6|1751-7",
        "ACC7788^HOSP_LAB|24325-3|6768-6", "ACC7788^HOSP_LAB|24325-3|1751-7", "ACC7788^HOSP_LAB|24325-3|2324-2"]
    assert frame["result_id"].is_unique


def test_a_correction_in_a_later_message_has_the_identity_of_its_original(settings):
    # the original is the third OBX of its panel; the correction comes alone, as OBX-1
    original, _, _ = read(SHAPES / "correction" / "1_original.hl7", settings)
    corrected, bad, _ = read(SHAPES / "correction" / "2_corrected.hl7", settings)
    assert bad == []
    assert list(corrected["result_id"]) == ["ACC9001^LAB|BMP|2160-0"]
    assert original.set_index("result_id").loc["ACC9001^LAB|BMP|2160-0", "value"] == "1.50"
    assert list(corrected["status"]) == ["C"] and list(corrected["value"]) == ["1.00"]


@pytest.mark.parametrize(("segments", "ids"), [
    # OBX-4 sub-ids tell two results of one test apart
    (["OBR|1||A1|MICRO|||20250115", "OBX|1|NM|2160-0^^LN|1|1|mg/dL|||||F",
      "OBX|2|NM|2160-0^^LN|2|2|mg/dL|||||F"], ["A1|MICRO|2160-0|1", "A1|MICRO|2160-0|2"]),
    # the same test twice in one OBR without a sub-id: the second is the second occurrence
    (["OBR|1||A1|CHEM|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F", "OBX|2|NM|2160-0^^LN||2|mg/dL|||||F",
      "OBX|3|NM|2160-0^^LN||3|mg/dL|||||F"], ["A1|CHEM|2160-0", "A1|CHEM|2160-0||2", "A1|CHEM|2160-0||3"]),
    # the set id is not part of the identity
    (["OBR|1||A1|CHEM|||20250115", "OBX|7|NM|2160-0^^LN||1|mg/dL|||||F", "OBX||NM|6768-6^^LN||2|U/L|||||F"],
     ["A1|CHEM|2160-0", "A1|CHEM|6768-6"]),
    # without OBR-3: the ORC's filler number, then the placer number (OBR-2, else ORC-2)
    (["ORC|RE|P9^EHR|F9^LAB", "OBR|1|P9^EHR||CHEM|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"],
     ["F9^LAB|CHEM|2160-0"]),
    (["ORC|RE|P9^EHR", "OBR|1|||CHEM|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F",
      "OBR|2|P8||CHEM|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"],
     ["placer:P9^EHR|CHEM|2160-0", "placer:P8|CHEM|2160-0"]),
    # an ORC belongs to the OBR right after it only
    (["ORC|RE||F9", "OBR|1||A1|CHEM|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F",
      "OBR|2|||CHEM|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"], ["A1|CHEM|2160-0", ""]),
    # the service's identifier (4.1, else the alternate 4.4); separators inside a part are escaped
    (["OBR|1||A\\F\\1|^Panel^L^CMP^CMP^99L|||20250115", "OBX|1|NM|X\\S\\Y^^L||1|mg/dL|||||F"],
     ["A\\F\\1|CMP|X\\S\\Y"]),
])
def test_result_identity(tmp_path, settings, segments, ids):
    frame, bad, _ = read(write(tmp_path / "id.hl7", [message("1", "PID|1||000123^^^HOSP^MR", *segments)]), settings)
    assert bad == [] and list(frame["result_id"]) == ids


def test_a_long_identity_is_hashed_deterministically(tmp_path, settings):
    def ids(order: str) -> list[str]:
        path = write(tmp_path / "long.hl7", [one_obx("2160-0^^LN", f"OBR|1||{order}|CHEM|||20250115")])
        return list(read(path, settings)[0]["result_id"])

    first, again, other = ids("A" * 150 + "1"), ids("A" * 150 + "1"), ids("A" * 150 + "2")
    assert first == again and first != other
    assert all(len(i) <= 120 and i.startswith("A" * 60) for i in first + other)


@pytest.mark.parametrize(("pid7", "pid8", "facts", "bad"), [
    ("19550402", "F", [("birth_date", "1955-04-02"), ("sex", "F")], False),
    ("195504021230", "M", [("birth_date", "1955-04-02"), ("sex", "M")], False),
    ("19550402000000-0500", "m", [("birth_date", "1955-04-02"), ("sex", "M")], False),
    ("19550402", "", [("birth_date", "1955-04-02")], False),
    ("", "F", [("sex", "F")], False),
    ("19550402", "U", [("birth_date", "1955-04-02")], False),  # unknown, other, ambiguous, not applicable:
    ("", "U", [], False),                                      # no sex
    ("", "O", [], False),
    ("", "A", [], False),
    ("", "N", [], False),
    ("", "", [], False),
    ("19550230", "F", [("sex", "F")], True),    # no such day: a bad row, the sex still kept
    ("1955", "", [], True),                     # a year alone gives no age in whole years
    ("04/02/1955", "U", [], True),
    ("18991231", "", [], True),
])
def test_pid7_and_pid8_become_birth_date_and_sex(tmp_path, settings, pid7, pid8, facts, bad):
    pid = f"PID|1||000123^^^HOSP^MR||TEST^ONE||{pid7}|{pid8}"
    path = write(tmp_path / "pid.hl7", [message("1", pid, "OBR|1||A1|CHEM|||20250115083000",
                                                "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F")])
    labs, events, bad_rows, _ = read_all(path, settings)
    assert len(labs) == 1
    assert [(row.event_type, row.value) for row in events.itertuples()] == facts
    assert set(events["patient_id"]) <= {"000123"} and set(events["occurred_at"]) <= {"2025-01-15T09:00:00"}
    assert set(events.index) <= {2}                                      # the PID's line
    if bad:
        assert [(line, text) for line, text, _ in bad_rows] == [(2, pid)]
        reason = bad_rows[0][2]
        assert "birth date" in reason and pid7 not in reason and "000123" not in reason
    else:
        assert bad_rows == []
    parsed = feeds.parse_events(events.reset_index(drop=True), settings, "d", RECEIVED)
    assert parsed.rejected.empty and len(parsed.rows) == len(facts)


def test_demographics_of_a_file_once_per_patient_and_fact(settings):
    labs, events, bad, _ = read_all(SHAPES / "pid_demographics.hl7", settings)
    assert len(labs) == 3
    # 000123 sent twice: one row a fact, the last one; 000456 in a message without OBX, sex U;
    # 000789 born on 30 February: a bad row, the sex kept
    assert sorted(events.itertuples(name=None)) == [
        (6, "000123", "birth_date", "2025-01-16T09:00:00", "1955-04-02", ""),
        (6, "000123", "sex", "2025-01-16T09:00:00", "F", ""),
        (10, "000456", "birth_date", "2025-01-16T10:00:00", "1948-07-11", ""),
        (12, "000789", "sex", "2025-01-16T11:00:00", "M", ""),
    ]
    assert [(line, reason) for line, _, reason in bad] == [
        (12, "PID-7 (birth date) is not a full calendar date from 1900 on")]


def test_demographics_dedupe_keeps_the_last_value_sent(tmp_path, settings):
    sexes = ["F"] * 300 + ["M", "F"]
    messages = [[f"MSH|^~\\&|LAB|HOSP|BW|HOSP|202501{1 + n // 24:02d}{n % 24:02d}0000||ORU^R01|{n}|P|2.5.1",
                 f"PID|1||000123^^^HOSP^MR||||19550402|{sex}"] for n, sex in enumerate(sexes)]
    _, events, bad, _ = read_all(write(tmp_path / "many.hl7", messages), settings)
    assert bad == []
    facts = sorted(zip(events["event_type"], events["value"], events["occurred_at"], strict=True))
    # one birth date, and of the sexes the last F (after the M) and that M: the latest one is F
    assert facts == [("birth_date", "1955-04-02", "2025-01-13T13:00:00"), ("sex", "F", "2025-01-13T13:00:00"),
                     ("sex", "M", "2025-01-13T12:00:00")]


def test_demographics_occurred_at_falls_back_to_obr7_then_the_day_received(tmp_path, settings):
    pid = "PID|1||000123^^^HOSP^MR||||19550402|F"
    path = write(tmp_path / "at.hl7", [
        ["MSH|^~\\&|LAB|HOSP|BW|HOSP|||ORU^R01|1|P|2.5.1", pid, "OBR|1||A1|CHEM|||20250110",
         "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"],
        ["MSH|^~\\&|LAB|HOSP|BW|HOSP|20250230||ORU^R01|2|P|2.5.1", pid.replace("000123", "000456")],
    ])
    _, events, bad, _ = read_all(path, settings)
    assert bad == []
    assert sorted(set(zip(events["patient_id"], events["occurred_at"], strict=True))) == [
        ("000123", "2025-01-10"), ("000456", RECEIVED.date().isoformat())]


def test_demographics_that_cannot_be_used_are_bad_rows(tmp_path, settings):
    path = write(tmp_path / "nopid.hl7", [
        message("1", "PID|1||^^^HOSP^MR||||19550402|F"),                       # no patient id
        message("2", "PID|1||000123^^^HOSP^MR||||19550402|F", version="2.1"),  # a message not read
        message("3", "PID|1||000456^^^HOSP^MR||||19550402|U"),
    ])
    _, events, bad, _ = read_all(path, settings)
    assert list(events.itertuples(name=None)) == [(6, "000456", "birth_date", "2025-01-15T09:00:00", "1955-04-02", "")]
    assert [(line, reason) for line, _, reason in bad] == [(2, "PID-3 (patient id) is empty"),
                                                           (4, "unsupported HL7 version «2.1»")]


def test_demographic_events_chunked_one_row_a_line_a_frame(tmp_path, settings):
    messages = [message(str(n), f"PID|1||P{n}^^^HOSP^MR||||19550402|F") for n in range(5)]
    items = list(read_hl7(write(tmp_path / "d.hl7", messages), ctx(settings, chunk_rows=4)))
    assert all(kind == "events" for kind, _ in items)
    frames = [chunk.frame for _, chunk in items]
    assert all(frame.index.is_unique for frame in frames)
    rows = pd.concat(frames)
    assert len(rows) == 10 and sorted(rows.index) == sorted([2, 4, 6, 8, 10] * 2)
    assert sorted(rows["event_type"].value_counts().items()) == [("birth_date", 5), ("sex", 5)]


def test_write_hl7_writes_demographics_when_given(tmp_path, settings):
    plain, with_pid = tmp_path / "plain.hl7", tmp_path / "pid.hl7"
    write_hl7(plain, ROWS)
    write_hl7(with_pid, ROWS, demographics={"000123": ("1955-04-02", "F"), "000456": ("", "M")})
    assert b"||||" not in plain.read_bytes().split(b"\r")[1]             # the default output is as before
    labs, events, bad, _ = read_all(with_pid, settings)
    assert bad == []
    pd.testing.assert_frame_equal(labs, read(plain, settings)[0])
    assert sorted(zip(events["patient_id"], events["event_type"], events["value"], events["occurred_at"],
                      strict=True)) == [
        ("000123", "birth_date", "1955-04-02", "2025-03-01"),            # the last message of the patient
        ("000123", "sex", "F", "2025-03-01"),
        ("000456", "sex", "M", "2025-02-01T07:00:00+01:00"),
    ]


def test_an_obx_before_any_obr_is_counted_when_not_monitored_and_quarantined_when_monitored(tmp_path, settings):
    """A heart rate sent before the first OBR (a real feed does: the FHIR Converter's ORU-R01-01)
    has no identity, but bonewatch does not monitor it: it is counted (SPEC 2.5), not a bad row. A
    creatinine there cannot be stored without an identity: quarantined, saying why."""
    path = write(tmp_path / "early.hl7", [message(
        "1", "PID|1||P1", "OBX|1|NM|8867-4^Heart rate^LN||72|/min|||||F|||20250115083000",
        "OBX|2|NM|2160-0^^LN||1.1|mg/dL|||||F|||20250115083000", "OBR|1||A|C|||20250115",
        "OBX|1|NM|2160-0^^LN||1.2|mg/dL|||||F")])
    frame, bad, _ = read(path, settings)
    assert [(line, reason) for line, _, reason in bad] == [(4, "OBX without an OBR before it")]
    assert list(frame["result_id"]) == ["", "A|C|2160-0"]
    parsed = feeds.parse_labs(frame, settings, "d", RECEIVED)
    assert list(parsed.rows["result_id"]) == ["A|C|2160-0"] and parsed.rejected.empty
    assert parsed.codes[["code", "kind", "rows"]].to_dict("records") == [
        {"code": "8867-4", "kind": "not_monitored", "rows": 1}]
