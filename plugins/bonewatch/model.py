"""Plain data shared by the functional core and the shell."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum

#: facts about a patient that hold for every night, whenever delivered (SPEC 2.5)
TIMELESS_EVENTS = ("birth_date", "sex")


class Severity(StrEnum):
    """How soon a nurse should act; digests list high first."""

    HIGH = "high"
    MEDIUM = "medium"
    INFO = "info"

    @property
    def rank(self) -> int:
        return {"high": 0, "medium": 1, "info": 2}[self.value]


@dataclass(frozen=True)
class Finding:
    """One rule's verdict for one patient and episode, as of a night.

    `episode` is derived from the data (e.g. the date the hold began), so the same finding on the
    next night has the same key and is the same alert.
    """

    patient_id: str
    rule: str
    rule_version: str
    severity: Severity
    episode: str
    observed_on: date
    action: str
    citation: str
    evidence: dict = field(default_factory=dict, compare=False)

    @property
    def alert_id(self) -> str:
        return alert_id(self.patient_id, self.rule, self.episode)


def alert_id(patient_id: str, rule: str, episode: str) -> str:
    """Stable, opaque alert id: the same (patient, rule, episode) always gives the same id."""
    digest = hashlib.sha256(f"{patient_id}\x1f{rule}\x1f{episode}".encode()).hexdigest()
    return f"A{digest[:15]}"


#: the most patient partitions an evaluation may be split into (`bonewatch evaluate --partition`)
MAX_PARTITIONS = 1024


def partition_of(patient_id: str, parts: int) -> int:
    """The partition (0 .. parts - 1) a patient belongs to when an evaluation is split in `parts`:
    the first 8 bytes of the SHA-256 of the id, modulo `parts`. The same in every process, host and
    Python version (unlike `hash()`, which is salted per process)."""
    return int.from_bytes(hashlib.sha256(str(patient_id).encode()).digest()[:8], "big") % parts


def parse_partition(value: str) -> tuple[int, int]:
    """`"i/N"` as (i, N), with 0 <= i < N <= MAX_PARTITIONS; ValueError with a one-line reason."""
    text = str(value).strip()
    left, sep, right = text.partition("/")
    if not sep or not left.strip().isdigit() or not right.strip().isdigit():
        raise ValueError(f"{text!r} is not i/N (e.g. 0/4)")
    part, parts = int(left), int(right)
    if not 1 <= parts <= MAX_PARTITIONS:
        raise ValueError(f"{text}: N must be between 1 and {MAX_PARTITIONS}")
    if part >= parts:
        raise ValueError(f"{text}: i must be below N (0 .. {parts - 1})")
    return part, parts
