"""Patient partitions (`bonewatch evaluate --partition i/N`): a stable hash of the patient id,
the same in every process and Python version, and the one-line parsing of "i/N"."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bonewatch.model import MAX_PARTITIONS, parse_partition, partition_of


def test_partition_of_is_pinned():
    # the first 8 bytes of SHA-256, big-endian, modulo N: these values must never change, or a
    # night split across workers running two versions would evaluate some patients twice, some never
    assert [partition_of(p, 4) for p in ("000123", "P-1", "MRN-0042")] == [2, 2, 0]
    assert [partition_of(p, 7) for p in ("000123", "P-1", "MRN-0042")] == [0, 2, 6]
    assert partition_of("anything", 1) == 0


def test_partition_of_is_the_same_in_another_process():
    """Python's `hash()` of a str is salted per process; this must not be."""
    ids = [f"P-{i}" for i in range(50)]
    code = f"from bonewatch.model import partition_of; print([partition_of(p, 5) for p in {ids!r}])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PYTHONPATH": ":".join(sys.path)})
    assert other.stdout.strip() == str([partition_of(p, 5) for p in ids])


@given(st.text(min_size=1, max_size=30), st.integers(min_value=1, max_value=MAX_PARTITIONS))
def test_every_patient_is_in_exactly_one_partition(patient_id, parts):
    assert [i for i in range(parts) if partition_of(patient_id, parts) == i] == [partition_of(patient_id, parts)]


def test_partitions_are_roughly_even():
    counts = [0] * 4
    for i in range(4000):
        counts[partition_of(f"{i:06d}", 4)] += 1
    assert min(counts) > 900, counts


@pytest.mark.parametrize(("text", "expected"), [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2 / 8 ", (2, 8)),
                                                 (f"0/{MAX_PARTITIONS}", (0, MAX_PARTITIONS))])
def test_parse_partition(text, expected):
    assert parse_partition(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("4/4", "4/4: i must be below N (0 .. 3)"),
    ("0/0", f"0/0: N must be between 1 and {MAX_PARTITIONS}"),
    (f"0/{MAX_PARTITIONS + 1}", f"N must be between 1 and {MAX_PARTITIONS}"),
    ("1", "'1' is not i/N (e.g. 0/4)"),
    ("-1/3", "'-1/3' is not i/N (e.g. 0/4)"),
    ("a/b", "'a/b' is not i/N (e.g. 0/4)"),
])
def test_parse_partition_refuses_in_one_line(text, message):
    with pytest.raises(ValueError) as raised:
        parse_partition(text)
    assert message in str(raised.value) and "\n" not in str(raised.value)
