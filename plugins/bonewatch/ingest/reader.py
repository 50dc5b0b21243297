"""Stream a CSV delivery in chunks with pyarrow, keeping each row's source line number.

Rows with the wrong number of fields do not stop the file: they come back as bad rows (line,
text, reason) for quarantine. A file that cannot be read at all (empty, not UTF-8, missing header
columns) raises SourceUnreadable naming the file and the first bad line.
"""

from __future__ import annotations

import codecs
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from bonewatch.errors import SourceUnreadable


@dataclass
class Chunk:
    frame: pd.DataFrame                      # all columns as strings; index = source line
    bad_rows: list[tuple[int, str, str]] = field(default_factory=list)  # (line, raw, reason)


def _first_undecodable_line(path: Path) -> int:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError:
                return number
    return 0


def read_header(path: Path, required: list[str]) -> list[str]:
    """Check the header row; return the column names."""
    with path.open("rb") as handle:
        first = handle.readline()
    if not first.strip():
        raise SourceUnreadable(path, 1 if first else None, "the file is empty" if not first else "the header row is blank")
    try:
        header = first.decode("utf-8-sig").strip().split(",")
    except UnicodeDecodeError:
        raise SourceUnreadable(path, 1, "not UTF-8 text") from None
    columns = [c.strip().strip('"').lower() for c in header]
    missing = [c for c in required if c not in columns]
    if missing:
        raise SourceUnreadable(path, 1, f"header lacks column(s) {', '.join(missing)}")
    return columns


def read_chunks(path: Path, required: list[str], chunk_rows: int) -> Iterator[Chunk]:
    """Yield chunks of about `chunk_rows` rows; index of each frame = the row's line number."""
    columns = read_header(path, required)
    # pyarrow decodes a ragged row before handing it to the invalid-row handler; when the row is
    # not UTF-8 that fails inside pyarrow, which reports it through sys.unraisablehook (a traceback
    # on stderr) and then raises a parse error. The parse error becomes "not UTF-8 text" naming the
    # line (`_unreadable`); keep stderr clean meanwhile.
    previous_hook = sys.unraisablehook

    def quiet_decode_errors(unraisable) -> None:
        if not isinstance(unraisable.exc_value, UnicodeDecodeError):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_decode_errors
    try:
        yield from _read(path, columns, chunk_rows)
    finally:
        sys.unraisablehook = previous_hook


def _unreadable(path: Path, exc: pa.ArrowInvalid) -> SourceUnreadable:
    undecodable = _first_undecodable_line(path)
    if "UTF8" in str(exc).upper() or undecodable:
        return SourceUnreadable(path, undecodable or None, "not UTF-8 text")
    # pyarrow's message may quote the row ("Expected 7 columns, got 8: <the row>"): the row can hold
    # a patient identifier, and errors are logged and emailed. Keep the description, not the row.
    text = str(exc).splitlines()[0] if str(exc) else "CSV parse error"
    row = re.search(r"Row #(\d+)", text)
    described = re.match(r"(.*?got \d+)", text)
    reason = described.group(1) if described else text.split(":", 1)[0]
    return SourceUnreadable(path, int(row.group(1)) if row else None, reason[:200])


def _read(path: Path, columns: list[str], chunk_rows: int) -> Iterator[Chunk]:
    invalid: list[tuple[int, str, str]] = []

    def on_invalid(row) -> str:
        text = row.text or ""
        if text.strip() == "":
            invalid.append((row.number or 0, "", ""))  # blank line: skip, nothing to quarantine
        else:
            invalid.append((row.number or 0, text,
                            f"expected {row.expected_columns} fields, found {row.actual_columns}"))
        return "skip"

    block = max(1 << 16, min(chunk_rows * 64, 1 << 26))
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=columns, skip_rows=1, use_threads=False,
                                           block_size=block, encoding="utf8"),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False,
                                              ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            return
        raise _unreadable(path, exc) from None
    yield from _stream(path, reader, columns, chunk_rows, invalid)


def _stream(path: Path, reader, columns: list[str], chunk_rows: int,
            invalid: list[tuple[int, str, str]]) -> Iterator[Chunk]:
    skipped: list[int] = []
    position = 0
    pending: list[pd.DataFrame] = []
    pending_bad: list[tuple[int, str, str]] = []
    reported = 0
    try:
        for batch in reader:
            new_invalid = invalid[reported:]
            reported = len(invalid)
            skipped.extend(line for line, _, _ in new_invalid)   # pyarrow counts file lines from 1
            frame = batch.to_pandas()
            lines = np.arange(position, position + len(frame), dtype=np.int64) + 2
            for s in sorted(skipped):
                lines[lines >= s] += 1
            position += len(frame)
            frame.index = pd.Index(lines, name="line")
            frame = frame[(frame != "").any(axis=1)]  # blank lines carry nothing to keep
            pending_bad.extend((line, text, reason) for line, text, reason in new_invalid if reason)
            pending.append(frame)
            # Cut exactly `chunk_rows` rows a chunk, whatever pyarrow's block held: the chunk
            # size is a setting, and a tiny one must really give tiny chunks.
            joined = pd.concat(pending) if len(pending) > 1 else pending[0]
            start = 0
            while len(joined) - start >= chunk_rows:
                yield Chunk(joined.iloc[start:start + chunk_rows], pending_bad)
                pending_bad = []
                start += chunk_rows
            pending = [joined.iloc[start:]] if start < len(joined) else []
    except pa.ArrowInvalid as exc:
        raise _unreadable(path, exc) from None
    tail = invalid[reported:]
    pending_bad.extend((line, text, reason) for line, text, reason in tail if reason)
    if pending or pending_bad:
        yield Chunk(pd.concat(pending) if pending else pd.DataFrame(columns=columns), pending_bad)
