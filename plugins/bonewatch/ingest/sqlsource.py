"""A SQL source (issue: real hospital feeds): lab rows pulled from a table or view in another
database through SQLAlchemy, above a high-water mark, so each night reads only what is new.

The source is configured under `[sources.<name>]` (`config.SqlSource`): the table, the watermark
column (a value that only grows with every insert or correction: a row-version sequence, or an
update timestamp) and which source column holds each canonical lab column. Rows stream from a
server-side cursor in batches and come out as the same `("labs", Chunk)` items as a lab CSV, so
they meet exactly the same parsing, validation and quarantine. Each row's "line" is its ordinal
in the pull. The high-water mark is saved in the same transaction as the rows (`pipeline.pull`):
a pull that fails stores nothing and the next one reads the same rows again.

A source timestamp without a time zone is hospital-local time, as in the CSV feed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from bonewatch.config import SqlSource
from bonewatch.errors import SourceUnavailable
from bonewatch.ingest.feeds import LAB_COLUMNS
from bonewatch.ingest.reader import Chunk


@dataclass
class Mark:
    """A high-water mark: the value, and its kind so it can be bound back with the right type."""

    value: object
    kind: str

    @classmethod
    def of(cls, value: object) -> Mark:
        if isinstance(value, bool):
            return cls(int(value), "int")
        if isinstance(value, int):
            return cls(value, "int")
        if isinstance(value, float):
            return cls(value, "float")
        if isinstance(value, datetime):
            return cls(value, "datetime")
        if isinstance(value, date):
            return cls(value, "date")
        try:                                    # Decimal and other numbers
            number = float(value)               # type: ignore[arg-type]
            return cls(int(number), "int") if number.is_integer() else cls(number, "float")
        except (TypeError, ValueError):
            return cls(str(value), "text")

    @classmethod
    def load(cls, text: str, kind: str) -> Mark:
        parse = {"int": int, "float": float, "datetime": datetime.fromisoformat,
                 "date": date.fromisoformat, "text": str}[kind]
        return cls(parse(text), kind)

    def text(self) -> str:
        return self.value.isoformat() if isinstance(self.value, date | datetime) else str(self.value)


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  an unparseable URL: say nothing of it
        return "(unparseable URL)"


def source_engine(name: str, source: SqlSource) -> sa.Engine:
    url = source.resolved_url()
    if not url:
        raise SourceUnavailable(f"SQL source {name!r} has no URL: set {source.url_env or 'url'}")
    from bonewatch.store.db import make_engine

    try:
        return make_engine(url)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise SourceUnavailable(f"SQL source {name!r} ({safe_url(url)}): {type(exc).__name__}") from None


def _text(values: pd.Series) -> pd.Series:
    """Source values as the strings a CSV would carry (None -> "", timestamps as ISO-8601)."""
    def render(value: object) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return ""
        if isinstance(value, datetime | date):
            return value.isoformat()
        return str(value)

    return values.map(render).astype(object)


def read_sql(name: str, source: SqlSource, engine: sa.Engine, after: Mark | None,
             state: dict) -> Iterator[tuple[str, Chunk]]:
    """Stream the rows with a watermark above `after`, in watermark order, as lab chunks.
    `state` receives "mark" (the largest watermark read) and "rows" as the pull goes."""
    schema, _, table_name = source.table.rpartition(".")
    mapping = {column: source.columns.get(column, column) for column in LAB_COLUMNS}
    table = sa.table(table_name, *(sa.column(c) for c in {*mapping.values(), source.watermark}),
                     schema=schema or None)
    mark = table.c[source.watermark]
    query = sa.select(*(table.c[mapping[c]].label(c) for c in LAB_COLUMNS), mark.label("_watermark"))
    if after is not None:
        query = query.where(mark > sa.bindparam("after", after.value))
    query = query.order_by(mark)
    state.setdefault("rows", 0)
    position = 0
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=source.batch_rows).execute(query)
            for batch in result.partitions(source.batch_rows):
                frame = pd.DataFrame(batch, columns=[*LAB_COLUMNS, "_watermark"])
                state["mark"] = Mark.of(frame["_watermark"].iloc[-1])
                state["rows"] += len(frame)
                frame = frame[LAB_COLUMNS].apply(_text)
                frame.index = pd.Index(range(position + 1, position + len(frame) + 1), name="line")
                position += len(frame)
                yield "labs", Chunk(frame)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        raise SourceUnavailable(f"SQL source {name!r} ({safe_url(source.resolved_url())}): {reason}") from None


def delivery_id(name: str, after: Mark | None, empty_night: str | None = None) -> str:
    """A pull's ledger id: the source and the watermark it read above. The high-water mark, not
    the ledger, keeps pulls from reading a row twice; an empty pull is recorded once a night
    (`empty_night`) so the dashboard sees the feed arrive."""
    text = "\x1f".join(["sql", name, f"{after.kind}:{after.text()}" if after else "", empty_night or ""])
    return hashlib.sha256(text.encode()).hexdigest()
