"""SQLAlchemy Core tables. Alembic migrations in sql/versions mirror these definitions.

Natural keys everywhere, so every write is an upsert and a rerun changes nothing:
deliveries by content hash, results by the lab's result id, events by a hash of their fields,
alerts by (patient, rule, episode), outbox messages by (recipient, night).
"""

from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("delivery_id", String(64), primary_key=True, comment="sha256 of the file's bytes"),
    Column("feed", String(64), nullable=False),
    Column("file_name", String(512), nullable=False),
    Column("fmt", String(16), nullable=False),
    Column("partition", String(16)),
    Column("received_at", DateTime, nullable=False),
    Column("rows_total", Integer, nullable=False, default=0),
    Column("rows_accepted", Integer, nullable=False, default=0),
    Column("rows_quarantined", Integer, nullable=False, default=0),
    Column("expectations_passed", Integer, nullable=False, default=0),
    Column("expectations_failed", Integer, nullable=False, default=0),
    Column("units", Text, comment="JSON: canonical analyte -> {unit as sent: rows}"),
    Column("status", String(16), nullable=False, comment="loaded | failed"),
    Column("error", Text),
)

lab_results = Table(
    "lab_results",
    metadata,
    Column("result_id", String(200), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("analyte", String(32), nullable=False),
    Column("code", String(32), nullable=False, comment="code as sent"),
    Column("value", Float, nullable=False, comment="canonical unit; the bound when censored"),
    Column("censor", String(1), nullable=False, default="", comment="'<', '>' or ''"),
    Column("unit", String(16), nullable=False, comment="canonical unit"),
    Column("orig_value", String(64), nullable=False),
    Column("orig_unit", String(32), nullable=False),
    Column("collected_at", DateTime, nullable=False, comment="UTC"),
    Column("collected_date", Date, nullable=False, comment="hospital-local calendar date"),
    Column("status", String(16), nullable=False),
    Column("status_rank", Integer, nullable=False),
    Column("delivery_id", String(64), nullable=False),
    Column("source_line", Integer, nullable=False),
    Index("ix_lab_results_patient", "patient_id", "analyte", "collected_date"),
)

clinical_events = Table(
    "clinical_events",
    metadata,
    Column("event_key", String(64), primary_key=True, comment="sha256 of the event's fields"),
    Column("patient_id", String(64), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("occurred_at", DateTime, nullable=False, comment="UTC"),
    Column("occurred_date", Date, nullable=False, comment="hospital-local calendar date"),
    Column("value", String(128), nullable=False, default=""),
    Column("detail", String(256), nullable=False, default=""),
    Column("delivery_id", String(64), nullable=False),
    Column("source_line", Integer, nullable=False),
    Index("ix_clinical_events_patient", "patient_id", "event_type", "occurred_date"),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("delivery_id", String(64), primary_key=True),
    Column("source_line", Integer, primary_key=True),
    Column("feed", String(64), nullable=False),
    Column("file_name", String(512), nullable=False),
    Column("reason", Text, nullable=False),
    Column("raw", Text, nullable=False, comment="the row as sent; may hold PHI, never shown"),
)

alerts = Table(
    "alerts",
    metadata,
    Column("alert_id", String(16), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("rule", String(40), nullable=False),
    Column("rule_version", String(24), nullable=False),
    Column("severity", String(8), nullable=False),
    Column("episode", String(64), nullable=False),
    Column("observed_on", Date, nullable=False),
    Column("raised_on", Date, nullable=False, comment="first night it was found"),
    Column("last_seen_on", Date, nullable=False),
    Column("resolved_on", Date),
    Column("action", Text, nullable=False),
    Column("citation", Text, nullable=False),
    Column("evidence", Text, nullable=False, comment="JSON"),
    Column("status", String(16), nullable=False, comment="open|notified|acknowledged|resolved"),
    Column("notified_at", DateTime),
    Column("acknowledged_by", String(128)),
    Column("acknowledged_at", DateTime),
    Index("ix_alerts_patient", "patient_id", "rule"),
    Index("ix_alerts_status", "status"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("message_id", String(128), primary_key=True, comment="stable per recipient and night"),
    Column("recipient", String(256), nullable=False),
    Column("night", Date, nullable=False),
    Column("kind", String(16), nullable=False, comment="digest | data_team"),
    Column("alert_ids", Text, nullable=False, comment="JSON list"),
    Column("subject", Text, nullable=False),
    Column("status", String(16), nullable=False, comment="pending | sent | cancelled"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("created_at", DateTime, nullable=False),
    Column("sent_at", DateTime),
)

runs = Table(
    "runs",
    metadata,
    Column("run_key", String(64), primary_key=True, comment="<kind>:<night>"),
    Column("kind", String(16), nullable=False),
    Column("night", Date, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("status", String(16), nullable=False),
    Column("summary", Text, comment="JSON counts"),
)
