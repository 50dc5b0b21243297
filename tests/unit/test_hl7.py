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
    """All rows (one frame), all bad rows, and the chunk sizes."""
    items = list(read_hl7(path, ctx(settings, chunk_rows)))
    assert all(kind == "labs" for kind, _ in items)
    frames = [chunk.frame for _, chunk in items]
    for frame in frames:
        assert list(frame.columns) == feeds.LAB_COLUMNS and frame.index.name == "line"
    frame = pd.concat(frames) if frames else pd.DataFrame(columns=feeds.LAB_COLUMNS)
    return frame, [bad for _, chunk in items for bad in chunk.bad_rows], [len(f) for f in frames]


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
    rows = [("P1", "A", "2160-0", "1", "mg/dL", "2025-01-01", "final"),
            ("P2", "B", "2160-0", "1", "mg/dL", "2025-01-01", "final"),
            ("P1", "C", "2160-0", "1", "mg/dL", "2025-01-01", "final")]
    assert hl7_result_ids(rows) == ["A-1", "B-1", "A-2"]


def test_separators_in_values_are_escaped_and_read_back(tmp_path, settings):
    path = tmp_path / "esc.hl7"
    write_hl7(path, [("P|1", "R^1", "2160-0", "see note", "mg&dL", "2025-01-01", "final")])
    frame, bad, _ = read(path, settings)
    assert bad == []
    assert frame.iloc[0].tolist()[:5] == ["P|1", "R^1-1", "2160-0", "see note", "mg&dL"]


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
    assert bad == [(10, "OBX|1|NM|2160-0^^LN||1.2|mg/dL|||||F|||20250115083000", "unsupported HL7 version '2.1'"),
                   (12, "OBX|2|NM|6768-6^^LN||110|U/L|||||F", "unsupported HL7 version '2.1'")]


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
    assert list(parsed.rejected["reason"]) == ["unparseable value '1-5'"]


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
    assert list(parsed.rejected["reason"]) == ["impossible date '20250230'"]


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
    assert list(parsed.rejected["reason"]) == ["unknown status 'Q'"]


def test_several_orders_and_patients_in_one_message(tmp_path, settings):
    path = write(tmp_path / "groups.hl7", [message(
        "1", "PID|1||P1", "ORC|RE", "OBR|1||A|C|||20250115", "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F",
        "OBR|2||B|C|||20250116", "OBX|1|NM|2160-0^^LN||2|mg/dL|||||F", "ZXX|local|segment",
        "PID|2||P2", "OBX|1|NM|2160-0^^LN||3|mg/dL|||||F", "OBR|1||C|C|||20250117",
        "OBX|1|NM|2160-0^^LN||4|mg/dL|||||F")])
    frame, bad, _ = read(path, settings)
    assert list(frame["result_id"]) == ["A-1", "B-1", "C-1"]
    assert list(frame["patient_id"]) == ["P1", "P1", "P2"]
    assert list(frame["collected_at"]) == ["2025-01-15", "2025-01-16", "2025-01-17"]
    assert [(line, reason) for line, _, reason in bad] == [(10, "OBX without an OBR order number")]


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
    assert list(frame.index) == [4, 6, 30, 32, 36]
    assert list(frame["result_id"]) == ["ORD1-1", "ORD1-2", "ORD7-1", "ORD7-2", "O8-1"]
    reasons = [(line, reason) for line, _, reason in bad]
    assert reasons[:6] == [
        (9, "message at line 7 has no PID segment"),
        (13, "PID-3 (patient id) is empty"),
        (16, "OBX without an OBR order number"),
        (18, "OBX without an OBR order number"),
        (20, "OBX-1 (set id) is empty"),
        (21, "not an ORU^R01 message (ADT^A01)"),
    ]
    assert reasons[6][0] == 24 and reasons[6][1].startswith("the HL7 message cannot be parsed (")
    assert len(reasons) == 7
    assert bad[0][1] == "OBX|1|NM|2160-0^^LN||1|mg/dL|||||F"
    assert bad[5][1].startswith("MSH|^~\\&|ADT")
    assert all("SECRET42" not in reason and "\n" not in reason and len(reason) <= 200 for _, _, reason in bad)
    parsed = feeds.parse_labs(frame, settings, "d", RECEIVED)
    assert list(parsed.rejected["reason"]) == ["unit '' cannot be converted for creatinine"]  # the cut-off OBX
    assert len(parsed.rows) == 4


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
    assert small_bad == big_bad and len(big_bad) == 1
    assert big_sizes == [len(rows)] and all(size <= 2 for size in small_sizes) and sum(small_sizes) == len(rows)
    assert len(small_sizes) == -(-len(rows) // 2)
