"""Stream a CSV delivery in chunks with pyarrow, keeping each row's source line number.

Rows with the wrong number of fields do not stop the file: they come back as bad rows (line,
text, reason) for quarantine; so does a row longer than `[ingest] max_row_bytes`, which is never
read into memory whole (`LongLines`). A file that cannot be read at all (empty, not UTF-8, missing
header columns) raises SourceUnreadable naming the file and the first bad line.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bonewatch.errors import SourceUnreadable

if TYPE_CHECKING:   # imported where a file is read: the ledger check of a rerun needs none of them
    import pandas as pd
    import pyarrow as pa

#: `[ingest] max_row_bytes` when no setting is at hand (1 MiB: a lab row is ~100 bytes, a FHIR
#: resource a few kB; a longer "row" is a broken export, not data)
MAX_ROW_BYTES = 1 << 20
#: how much of an oversize row the quarantine keeps as its raw text
RAW_KEPT = 1000
_EOL = re.compile(rb"\r\n|\r|\n")
_LF = re.compile(rb"\n")


def too_long(limit: int) -> str:
    """The quarantine reason of a row longer than `limit` bytes (quotes nothing of the row)."""
    return f"row longer than {limit:,} bytes ([ingest] max_row_bytes): not read"


class LongLines(io.RawIOBase):
    """A file, read as a binary stream in which every line longer than `limit` bytes (terminator
    excluded; `\\r\\n`, `\\r` and `\\n` end a line, or `\\n` alone with `cr=False`) is replaced by an
    empty line, so the other lines keep their numbers. `cut` collects `(line number, first RAW_KEPT bytes)` of each line replaced.
    At most `limit` bytes of a line are held at a time: a 2 GB line costs no more memory than a short one.
    """

    def __init__(self, handle, limit: int, *, cr: bool = True):
        super().__init__()
        self.handle, self.limit = handle, max(1, int(limit))
        # `cr`: a lone `\r` ends a line too (CSV, HL7); NDJSON lines end at `\n` only
        self.cr, self.eol = cr, (_EOL if cr else _LF)
        # read at most `limit` bytes at once, so that only the first line of a block can be too long
        self.block = min(self.limit, 1 << 20)
        self.pending = b""          # the current line so far (at most `limit` + 1 bytes)
        self.ready = bytearray()    # bytes to hand out
        self.line = 1               # the number of the line `pending` belongs to
        self.skipping = False       # inside a line too long: drop bytes up to its end
        self.eof = False
        self.cut: list[tuple[int, bytes]] = []

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while len(self.ready) < len(buffer) and not self.eof:
            self._feed(self.handle.read(self.block))
        n = min(len(buffer), len(self.ready))
        buffer[:n] = self.ready[:n]
        del self.ready[:n]
        return n

    def close(self) -> None:
        self.handle.close()
        super().close()

    def _feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
        buf = self.pending + data
        # a `\r\n` may straddle two blocks: keep a trailing `\r` back until the next one
        held = 1 if self.cr and buf.endswith(b"\r") and not self.eof else 0
        work = buf[:len(buf) - held]
        first = self.eol.search(work)
        if first is None:                       # no line ends here: all of it is the current line
            if self.skipping:
                self.pending = buf[len(work):]
            elif len(work) > self.limit:
                self._cut(work)
                self.pending = buf[len(work):]
            else:
                self.pending = buf
                if self.eof:
                    self.ready += buf
                    self.pending = b""
            return
        if self.skipping:
            self.skipping = False
            work = work[first.start():]         # the long line's end: an empty line in its place
        elif first.start() > self.limit:
            self._cut(work[:first.start()])
            self.skipping = False
            work = work[first.start():]
        last = max(work.rfind(b"\n"), work.rfind(b"\r") if self.cr else -1)
        done, rest = work[:last + 1], work[last + 1:] + buf[len(buf) - held:]
        self.line += done.count(b"\n") + (done.count(b"\r") - done.count(b"\r\n") if self.cr else 0)
        self.ready += done
        if len(rest) > self.limit + held:       # cannot happen while a block is at most `limit`
            self._cut(rest)
            rest = b""
        self.pending = rest
        if self.eof and rest:
            self.ready += rest
            self.pending = b""

    def _cut(self, head: bytes) -> None:
        self.cut.append((self.line, head[:RAW_KEPT]))
        self.skipping = not self.eof


def cut_rows(cut: list[tuple[int, bytes]], limit: int) -> list[tuple[int, str, str]]:
    """`LongLines.cut` entries -> bad rows (line, the row's first bytes, reason)."""
    return [(line, head.decode("utf-8", "replace") + " [...]", too_long(limit)) for line, head in cut]


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


def read_header(path: Path, required: list[str], max_row_bytes: int = MAX_ROW_BYTES) -> list[str]:
    """Check the header row; return the column names."""
    with path.open("rb") as handle:
        first = handle.readline(max_row_bytes + 2)
    if len(first) > max_row_bytes + 1:
        raise SourceUnreadable(path, 1, f"the header row is longer than {max_row_bytes:,} bytes ([ingest] max_row_bytes)")
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


def read_chunks(path: Path, required: list[str], chunk_rows: int,
                max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Chunk]:
    """Yield chunks of about `chunk_rows` rows; index of each frame = the row's line number. A row
    longer than `max_row_bytes` is a bad row of its own (`too_long`); the rest of the file is read."""
    columns = read_header(path, required, max_row_bytes)
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
        with LongLines(path.open("rb"), max_row_bytes) as stream:
            yield from _read(path, stream, columns, chunk_rows)
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


def _read(path: Path, stream: LongLines, columns: list[str], chunk_rows: int) -> Iterator[Chunk]:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv

    invalid: list[tuple[int, str, str]] = []

    def on_invalid(row) -> str:
        text = row.text or ""
        if text.strip() == "":
            invalid.append((row.number or 0, "", ""))  # blank line: skip, nothing to quarantine
        else:
            invalid.append((row.number or 0, text,
                            f"expected {row.expected_columns} fields, found {row.actual_columns}"))
        return "skip"

    # a row must fit in one block (pyarrow: "straddling object straddles two block boundaries"):
    # rows longer than the limit never reach pyarrow (`LongLines`), the others fit
    block = max(1 << 16, min(chunk_rows * 64, 1 << 26), stream.limit + 16)
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=columns, skip_rows=1, use_threads=False,
                                           block_size=block, encoding="utf8"),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False,
                                              ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            if stream.cut:
                yield Chunk(pd.DataFrame(columns=columns), cut_rows(stream.cut, stream.limit))
            return
        raise _unreadable(path, exc) from None
    yield from _stream(path, reader, stream, columns, chunk_rows, invalid)


def _stream(path: Path, reader, stream: LongLines, columns: list[str], chunk_rows: int,
            invalid: list[tuple[int, str, str]]) -> Iterator[Chunk]:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

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
            pending_bad.extend(cut_rows(stream.cut, stream.limit))
            stream.cut.clear()
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
    pending_bad.extend(cut_rows(stream.cut, stream.limit))
    if pending or pending_bad:
        yield Chunk(pd.concat(pending) if pending else pd.DataFrame(columns=columns), pending_bad)


def file_digest(path: Path) -> str:
    """The delivery id: SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
