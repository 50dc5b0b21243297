"""Vectorised parsers shared by every feed: instants, numbers with censoring, statuses.

Each parser returns the parsed values and a Series of rejection reasons ("" when the row is fine),
so a feed can quarantine exactly the rows that fail and keep the rest.

A reason that quotes what the feed sent (a value, a date, a code, a unit) quotes it through
`quote` / `quote_series` only, between `«` and `»`. The quoted part is feed text and may be patient
data (a name or an MRN in a coded field, a birth date): it stays in the quarantine table, for
`bonewatch quarantine` on the command line, and every other channel (dashboard, dq metrics,
data-team emails, logs) shows `public_reason(reason)`, where each quoted part is `«…»`.
"""

from __future__ import annotations

import re
from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

_OFFSET = r"(?:Z|[+-]\d{2}:?\d{2})$"
_NUMBER = r"^\s*(?P<censor>[<>]=?)?\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*$"
EARLIEST = pd.Timestamp("1900-01-01")
#: what `str.splitlines` breaks a line at, and NUL (no PostgreSQL text holds it): a reason that
#: quotes sent text shows each of them as a space, so that it stays one line that can be stored
NOT_IN_A_REASON = "[\x00\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]"

#: the marks around the part of a reason that quotes feed text (`quote`); a value cannot contain
#: them (each becomes its single-angle twin), so the quoted part always ends at the first `»`
QUOTE_OPEN, QUOTE_CLOSE = "«", "»"
#: what the public form of a reason shows for each quoted part
WITHHELD = QUOTE_OPEN + "…" + QUOTE_CLOSE
_MARKS = str.maketrans({QUOTE_OPEN: "‹", QUOTE_CLOSE: "›"})
# a quoted part, or one cut short (a reason truncated by someone): to the end
_QUOTED_PART = re.compile(QUOTE_OPEN + "[^" + QUOTE_CLOSE + "]*(?:" + QUOTE_CLOSE + "|$)")


def quote(value: object, limit: int = 40) -> str:
    """Feed text -> the marked quotation a reason carries: `«value»`, cut at `limit` characters,
    the marks inside the value replaced so that the quotation is unambiguous."""
    return QUOTE_OPEN + str(value)[:limit].translate(_MARKS) + QUOTE_CLOSE


def quote_series(values: pd.Series, limit: int = 40) -> pd.Series:
    """`quote` for a Series of strings (vectorised)."""
    text = values.astype("string").fillna("").str.slice(0, limit)
    text = text.str.replace(QUOTE_OPEN, "‹", regex=False).str.replace(QUOTE_CLOSE, "›", regex=False)
    return QUOTE_OPEN + text + QUOTE_CLOSE


def public_reason(reason: object) -> str:
    """A quarantine reason fit for every channel but the operator's command line: one line, at
    most 200 characters, each quoted part (`quote`) replaced by `«…»`. So
    "unknown code «DOE JOHN»" -> "unknown code «…»": reasons that differ only by the value they
    quoted become one, which is also what the dashboard groups by. Idempotent.

    A reason stored before quotations were marked quoted between apostrophes; no reason written
    since has an apostrophe outside its quotations, so everything from the first apostrophe to the
    last (or to the end) is withheld as well.
    """
    text = _QUOTED_PART.sub(WITHHELD, " ".join(str(reason).split()))
    if "'" in text:
        first, last = text.index("'"), text.rindex("'")
        text = text[:first] + WITHHELD + (text[last + 1:] if last > first else "")
    return text[:200]


STATUS_MAP = {
    "final": "final", "f": "final",
    "corrected": "corrected", "c": "corrected", "amended": "corrected",
    "preliminary": "preliminary", "p": "preliminary", "registered": "preliminary",
    "cancelled": "cancelled", "canceled": "cancelled", "x": "cancelled",
    "entered-in-error": "cancelled",
}
STATUS_RANK = {"preliminary": 0, "final": 1, "corrected": 2, "cancelled": 3}


def factorized_map(values: pd.Series, mapping, default=None) -> pd.Series:
    """`values.map(mapping)` (a dict or a function) computed once per distinct value: feeds carry
    a handful of codes, units and statuses in millions of rows."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    lookup = mapping.get if isinstance(mapping, dict) else mapping
    mapped = np.empty(len(uniques) + 1, dtype=object)   # the last slot serves missing values
    mapped[:-1] = [lookup(u) for u in uniques]
    mapped[-1] = default
    return pd.Series(mapped[codes], index=values.index, dtype=object)


def parse_instants(raw: pd.Series, tz: ZoneInfo, latest: datetime) -> tuple[pd.Series, pd.Series, pd.Series]:
    """ISO-8601 strings -> (UTC naive timestamps, local calendar days as midnight timestamps, reasons).

    With an offset the instant is exact; without one it is hospital-local time (SPEC 2.1). A date
    alone means local midnight. Impossible dates (2025-02-30) and dates before 1900 or after
    `latest` (the delivery's arrival plus a day) are rejected.
    """
    text = raw.astype("string").str.strip().fillna("")
    # Years pandas cannot hold (before 1678, after 2262) would overflow its timestamps: they are
    # out of range anyway, so set them aside before parsing. (ISO-8601 parsing reads a leading
    # minus as a year before 1: "-1", "-0001-01-01".)
    year = pd.to_numeric(text.str.extract(r"^(\d{4}|-\d+)", expand=False), errors="coerce")
    out_of_bounds = (year.notna() & ((year < 1700) | (year > 2200))).to_numpy()
    sent = text
    text = text.mask(out_of_bounds, "")
    # Fast path: the shape nearly every feed sends (local time, seconds, no offset) parses with
    # one exact format; everything else takes the general ISO-8601 path below.
    naive = pd.to_datetime(text, format="%Y-%m-%dT%H:%M:%S", errors="coerce")
    rest = naive.isna() & (text != "")
    has_offset = pd.Series(False, index=raw.index)
    if rest.any():
        has_offset[rest] = text[rest].str.contains(_OFFSET, regex=True, na=False)
        general = rest & ~has_offset
        if general.any():
            naive[general] = pd.to_datetime(text[general], format="ISO8601", errors="coerce")
    local_rows = ~has_offset & naive.notna()
    utc = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]")
    if local_rows.any():
        localised = naive[local_rows].dt.tz_localize(tz, ambiguous="NaT", nonexistent="shift_forward")
        utc[local_rows] = localised.dt.tz_convert("UTC")
    if has_offset.any():
        utc[has_offset] = pd.to_datetime(text[has_offset], format="ISO8601", errors="coerce", utc=True)
    utc_naive = utc.dt.tz_localize(None).astype("datetime64[us]")
    local_date = utc.dt.tz_convert(tz).dt.tz_localize(None).dt.normalize().astype("datetime64[us]")
    # Each reason is set only where some row needs it: on a clean chunk (the rule) none does, and
    # a boolean assignment costs pandas ~0.1 ms however few rows (a one-row file pays it each time).
    reasons = pd.Series("", index=raw.index, dtype="object")
    missing = (text == "").to_numpy()
    if missing.any():
        reasons[missing] = "missing date"
    bad = ((text != "") & utc_naive.isna()).to_numpy()
    if bad.any():
        reasons[bad] = "impossible date " + quote_series(text[bad])
    latest_ts = pd.Timestamp(latest).tz_localize(None) if pd.Timestamp(latest).tzinfo else pd.Timestamp(latest)
    out_of_range = ((utc_naive.notna() & ((utc_naive < EARLIEST) | (utc_naive > latest_ts))) | out_of_bounds).to_numpy()
    if out_of_range.any():
        reasons[out_of_range] = "date out of range " + quote_series(sent[out_of_range])
    return utc_naive, local_date, reasons


def parse_numbers(raw: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """'1.2', '<5', '>1000' -> (float, censor '<' / '>' / '', reasons). Censored values are kept."""
    text = raw.astype("string").fillna("")
    # Fast path: plain numbers convert in C; only what fails (censored, garbage) meets the regex.
    number = pd.to_numeric(text, errors="coerce").astype("float64")
    censor = pd.Series("", index=raw.index, dtype="object")
    rest = number.isna() & (text != "")
    if rest.any():
        parts = text[rest].str.extract(_NUMBER)
        number[rest] = pd.to_numeric(parts["number"], errors="coerce").astype("float64")
        censor[rest] = parts["censor"].fillna("").str.slice(0, 1).astype("object")
    reasons = pd.Series("", index=raw.index, dtype="object")
    bad = (number.isna() | ~np.isfinite(number.fillna(0.0))).to_numpy()
    if bad.any():
        reasons[bad] = "unparseable value " + quote_series(text[bad])
        reasons[(text.str.strip() == "").to_numpy()] = "missing value"
    return number, censor, reasons


def parse_statuses(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Result statuses (also HL7 F/C/P/X and FHIR names) -> (canonical status, reasons)."""
    text = raw.astype("string").str.strip().str.lower().fillna("")
    status = factorized_map(text, STATUS_MAP)
    reasons = pd.Series("", index=raw.index, dtype="object")
    unknown = status.isna().to_numpy()
    if unknown.any():      # (a missing status is an unknown one too)
        reasons[unknown] = "unknown status " + quote_series(raw.astype("string").fillna("")[unknown], 20)
        reasons[(text == "").to_numpy()] = "missing status"
    return status, reasons


def first_reason(*reason_series: pd.Series) -> pd.Series:
    """Combine per-check reasons: the first non-empty reason of each row wins."""
    combined = reason_series[0].to_numpy(dtype=object, copy=True)
    for series in reason_series[1:]:
        empty = combined == ""
        if not empty.any():
            break
        combined[empty] = series.to_numpy(dtype=object)[empty]
    return pd.Series(combined, index=reason_series[0].index, dtype=object)
