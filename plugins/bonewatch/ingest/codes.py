"""The codes list of SPEC 2.5: results skipped for their code, per code, for the data team.

A valid LOINC of an analyte bonewatch does not monitor is "not monitored"; a local code missing
from `[ingest.code_map]` is "unmapped" (the data team maps it, or silences it with `[ingest]
ignore_codes`). Deliveries record what they skipped (`delivery_codes`); this module reads it back
classified by the configuration in force now, so a code mapped since drops off the list.
A code field is feed text all the same: a value not shaped like a code was quarantined at ingest
and never reaches this list, but a surname or an MRN *is* shaped like a local code (CREA, 44556677).
So the full list is for the command line (`bonewatch codes`), and the dashboard shows
`public_codes`: LOINC codes (a valid check digit) and the codes the hospital's configuration names
in full, every other local code masked ("CRE-LOCAL" -> "•••-•••••").
"""

from __future__ import annotations

import re

import pandas as pd
from sqlalchemy import Connection, func, select

from bonewatch.config import Settings
from bonewatch.store.tables import deliveries, delivery_codes
from bonewatch.units import is_loinc

#: codes of resources other than results (FHIR Condition, Procedure, MedicationAdministration) that
#: bonewatch does not follow: stored as "<kind>:<code>", never mapped by the lab code map
RESOURCE_PREFIXES = ("Condition:", "Procedure:", "Medication:")
COLUMNS = ["code", "status", "analyte", "rows", "feeds", "first_seen", "last_seen", "first_collected",
           "last_collected"]
#: the order the list is shown in: what needs the data team first
STATUS_ORDER = {"unmapped": 0, "not_monitored": 1, "ignored": 2, "mapped": 3}


def load(conn: Connection, settings: Settings, *, everything: bool = False) -> pd.DataFrame:
    """One row per code seen (columns `COLUMNS`): its status under the current configuration
    (`unmapped`, `not_monitored`, `ignored`, or `mapped` once the hospital mapped it), the rows
    skipped, the feeds that sent it, first and last seen (delivery days, UTC), first and last
    collection day. Without `everything`, only the unmapped local codes: the data team's to-do list."""
    from bonewatch.ingest.feeds import code_kinds

    c, d = delivery_codes.c, deliveries.c
    rows = conn.execute(
        select(c.code, c.feed, func.sum(c.rows), func.min(d.received_at), func.max(d.received_at),
               func.min(c.first_collected), func.max(c.last_collected))
        .select_from(delivery_codes.join(deliveries, d.delivery_id == c.delivery_id))
        .group_by(c.code, c.feed)).all()
    raw = pd.DataFrame(rows, columns=["code", "feed", "rows", "first_seen", "last_seen", "first_collected",
                                      "last_collected"])
    if raw.empty:
        return pd.DataFrame(columns=COLUMNS)
    merged = (raw.groupby("code", sort=True)
              .agg(rows=("rows", "sum"), feeds=("feed", lambda f: ", ".join(sorted(set(f)))),
                   first_seen=("first_seen", "min"), last_seen=("last_seen", "max"),
                   first_collected=("first_collected", "min"), last_collected=("last_collected", "max"))
              .reset_index())
    analyte, kind = code_kinds(merged["code"].astype("string"), settings)
    merged["status"] = kind.where(kind != "", "mapped").to_numpy()
    merged.loc[merged["code"].str.startswith(RESOURCE_PREFIXES), "status"] = "not_monitored"
    merged["analyte"] = analyte.fillna("").to_numpy()
    merged["rows"] = merged["rows"].astype("int64")
    for column in ("first_seen", "last_seen"):
        merged[column] = pd.to_datetime(merged[column]).dt.date
    for column in ("first_collected", "last_collected"):
        merged[column] = pd.to_datetime(merged[column]).dt.date
    if not everything:
        merged = merged[merged["status"] == "unmapped"]
    order = merged["status"].map(STATUS_ORDER)
    merged = merged.assign(_o=order, _r=-merged["rows"]).sort_values(["_o", "_r", "code"]).drop(columns=["_o", "_r"])
    return merged[COLUMNS].reset_index(drop=True)


def public_code(code: str, known: set[str]) -> str:
    """The form of a code fit for the dashboard: in full when it is a valid LOINC or named by the
    configuration (`known`), else each letter and digit masked ("Medication:" and the like, which
    bonewatch adds, stay)."""
    prefix = next((p for p in RESOURCE_PREFIXES if code.startswith(p)), "")
    bare = code[len(prefix):]
    if is_loinc(bare) or code in known or bare in known:
        return code
    return prefix + re.sub(r"[^\W_]", "•", bare)


def public_codes(frame: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """`load`'s frame with each code in its public form (`public_code`)."""
    if frame.empty:
        return frame
    known = set(settings.ingest.code_map) | set(settings.ingest.code_map.values()) | set(settings.ingest.ignore_codes)
    return frame.assign(code=[public_code(str(c), known) for c in frame["code"]])
