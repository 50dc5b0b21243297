"""SQLAlchemy Core tables. Alembic migrations in sql/versions mirror these definitions.

Natural keys everywhere, so every write is an upsert and a rerun changes nothing:
deliveries by content hash, results by the lab's result id, events by a hash of their fields,
alerts by (patient, rule, episode), outbox messages by (recipient, night).
"""

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
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
    Column("rows_not_monitored", Integer, nullable=False, default=0, server_default="0",
           comment="valid codes of analytes bonewatch does not monitor, and unmapped or ignored local codes"),
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
    Column("collected_basis", String(32), nullable=False, default="", server_default="",
           comment="'' the result's own time; else where collected_at came from (FHIR DiagnosticReport, issued)"),
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
    # 0003: re-notify bookkeeping (unacknowledged high-severity alerts are re-sent)
    Column("last_notified_night", Date, comment="night of the last digest a server accepted with it"),
    Column("notify_count", Integer, nullable=False, default=0, server_default="0",
           comment="digests accepted with it (all recipients)"),
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
    # 0003: ready-made messages (queue_message) and back-off
    Column("message_key", String(200), comment="caller's key of a ready-made message"),
    Column("body_text", Text, comment="ready-made messages only"),
    Column("body_html", Text),
    Column("next_attempt_at", DateTime, comment="back-off: not retried before this (UTC)"),
    # 0008: claimed before sending
    Column("claimed_by", String(64), comment="the flush sending it: process and host"),
    Column("claimed_until", DateTime, comment="the claim holds until then (UTC); expired: any flush may take it"),
    Index("ux_outbox_kind_key_recipient", "kind", "message_key", "recipient", unique=True),
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


# 0003: every alert state change and every send attempt, append-only. No patient identifier:
# alert ids are opaque, recipients are mailbox addresses, details are SMTP replies.
alert_audit = Table(
    "alert_audit",
    metadata,
    Column("audit_id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime, nullable=False, comment="UTC, wall clock"),
    Column("night", Date, comment="the night being processed, if any"),
    Column("alert_id", String(16)),
    Column("message_id", String(128)),
    Column("event", String(24), nullable=False,
           comment="raised|reopened|resolved|notified|acknowledged|send|cancelled"),
    Column("from_status", String(16)),
    Column("to_status", String(16)),
    Column("actor", String(160), nullable=False, comment="evaluate | outbox | cli:<name> | web:<name>"),
    Column("result", String(16), nullable=False, comment="ok | accepted | failed"),
    Column("detail", Text, comment="recipient, SMTP reply; never patient data"),
    Index("ix_alert_audit_alert", "alert_id", "at"),
    Index("ix_alert_audit_message", "message_id"),
)


# ---- 0004: data-quality monitoring (bonewatch.dashboard) -------------------------------------
# Per night and per feed, what arrived, when, and how good it was; the nightly run writes these
# (upserts keyed on the night), the dashboard reads them. No patient identifier in any of them.

dq_arrivals = Table(
    "dq_arrivals",
    metadata,
    Column("delivery_id", String(64), primary_key=True, comment="deliveries.delivery_id"),
    Column("arrived_at", DateTime, nullable=False, comment="UTC: when the file reached the inbox"),
    Column("basis", String(16), nullable=False, comment="file_mtime | ingested"),
)

dq_feed_nights = Table(
    "dq_feed_nights",
    metadata,
    Column("night", Date, primary_key=True),
    Column("feed", String(64), primary_key=True),
    Column("expected", Boolean, nullable=False),
    Column("deadline_at", DateTime, nullable=False, comment="UTC"),
    Column("arrived_at", DateTime, comment="UTC: the night's last delivery of the feed"),
    Column("status", String(16), nullable=False,
           comment="on_time | late | missing | pending | not_expected | unreadable"),
    Column("rag", String(8), nullable=False, comment="red | amber | green | grey"),
    Column("deliveries", Integer, nullable=False),
    Column("resent", Integer, nullable=False, comment="files identical to an earlier delivery"),
    Column("rows_total", Integer, nullable=False),
    Column("rows_accepted", Integer, nullable=False),
    Column("rows_quarantined", Integer, nullable=False),
    Column("rows_not_monitored", Integer, nullable=False, default=0, server_default="0",
           comment="skipped for their code (not monitored, unmapped, ignored): not in the bad-row rate"),
    Column("bad_row_rate", Float, nullable=False),
    Column("expectations_passed", Integer, nullable=False),
    Column("expectations_failed", Integer, nullable=False),
    Column("quarantine_reasons", Text, nullable=False, comment="JSON {reason without patient data: rows}"),
    Column("units", Text, nullable=False, comment="JSON {analyte: {unit as sent: rows}}"),
    Column("unit_switches", Text, nullable=False, comment="JSON list"),
    Column("distributions", Text, nullable=False, comment="JSON {analyte: {n, p05..p95, history_p50}}"),
    Column("notes", Text, nullable=False, comment="JSON list of problems, plain text"),
    Column("recorded_at", DateTime, nullable=False),
)

dq_nights = Table(
    "dq_nights",
    metadata,
    Column("night", Date, primary_key=True),
    Column("alerts_raised", Integer, nullable=False),
    Column("alerts_by_rule", Text, nullable=False, comment="JSON {rule: alerts first raised this night}"),
    Column("ack_latency", Text, nullable=False, comment="JSON, alerts raised in the window, as of the run"),
    Column("unreadable_files", Integer, nullable=False),
    Column("recorded_at", DateTime, nullable=False),
)

dq_validations = Table(
    "dq_validations",
    metadata,
    Column("delivery_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True, comment="chunk number within the delivery"),
    Column("feed", String(64), nullable=False),
    Column("night", Date),
    Column("suite", String(64), nullable=False),
    Column("success", Boolean, nullable=False),
    Column("evaluated", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("validated_at", DateTime, nullable=False),
    Column("result", Text, nullable=False, comment="GX validation result JSON, unexpected-row lists removed"),
    Index("ix_dq_validations_night", "night"),
)

dq_problems = Table(
    "dq_problems",
    metadata,
    Column("night", Date, primary_key=True),
    Column("feed", String(64), primary_key=True),
    Column("issue", String(64), primary_key=True, comment="late | missing | bad_rows | unit_switch:<analyte> | unreadable"),
    Column("severity", String(8), nullable=False),
    Column("text", Text, nullable=False),
    Column("found_at", DateTime, nullable=False),
    Column("message_key", String(200), comment="outbox key of the data-team email; NULL when not emailed"),
)

# 0005: the evaluation index (issue: performance). One row per patient: what the next
# incremental evaluation must re-read. Loads mark patients (dirty_from); an evaluation records the
# night it saw, the rule set it ran, and the next night on which that patient's findings can change
# with no new data (a course's 12/24-month review, a lapse, a monitoring window closing...).
patient_index = Table(
    "patient_index",
    metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("dirty_from", Date, comment="earliest day of data loaded since its last evaluation; NULL: none"),
    Column("dirty_seq", Integer, nullable=False, default=0, server_default="0",
           comment="bumped by every load that marks it; an evaluation clears dirty_from only if unchanged"),
    Column("evaluated_on", Date, comment="night of its last evaluation"),
    Column("evaluated_with", String(16), comment="digest of the rule code and configuration used"),
    Column("next_due_on", Date, comment="first night after evaluated_on when findings can change without new data"),
    Index("ix_patient_index_next_due_on", "next_due_on"),
    Index("ix_patient_index_dirty_from", "dirty_from"),
)

course_states = Table(
    "course_states",
    metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("agent_class", String(16), primary_key=True),
    Column("course_start", Date, primary_key=True),
    Column("last_dose", Date, nullable=False),
    Column("course_end", Date, nullable=False),
    Column("status", String(16), nullable=False, comment="active | held | discontinued"),
    Column("hold_reason", String(64), nullable=False),
    Column("renal_baseline_scr", Float),
    Column("renal_baseline_date", Date),
    Column("renal_baseline_crcl", Float),
    Column("baseline_note", Text, nullable=False),
    Column("as_of", Date, nullable=False, comment="the night this state was computed for"),
)

# 0006: real hospital feeds (issue: HL7, FHIR, SQL). FHIR resources name their patient by a
# reference (`Patient/<id>`); a bulk export sends Patients in one file and Observations in another,
# so the MRN of every Patient resource seen is kept for later deliveries.
patient_refs = Table(
    "patient_refs",
    metadata,
    Column("ref", String(200), primary_key=True, comment="Patient/<resource id>"),
    Column("patient_id", String(64), nullable=False, comment="the MRN the Patient resource carried"),
    Column("delivery_id", String(64), nullable=False),
)

# The high-water mark of each SQL source: the next pull reads rows with a larger watermark only.
source_watermarks = Table(
    "source_watermarks",
    metadata,
    Column("source", String(64), primary_key=True),
    Column("watermark", Text, nullable=False, comment="the largest watermark read, rendered as text"),
    Column("kind", String(16), nullable=False, comment="int | float | datetime | date | text"),
    Column("rows_read", Integer, nullable=False, default=0),
    Column("updated_at", DateTime, nullable=False, comment="UTC, when the pull committed"),
)

# 0007: real feeds (issue 13). Results whose code bonewatch does not use are not bad rows (SPEC
# 2.5): each delivery counts them per code, so the data team sees which local codes to map (or to
# ignore in configuration) without a quarantine row per result.
delivery_codes = Table(
    "delivery_codes",
    metadata,
    Column("delivery_id", String(64), primary_key=True),
    Column("code", String(32), primary_key=True, comment="the code as sent (a valid LOINC, or a local code)"),
    Column("kind", String(16), nullable=False, comment="not_monitored (LOINC) | unmapped (local) | ignored"),
    Column("feed", String(64), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("first_collected", Date, comment="earliest collection day among its rows, when one parsed"),
    Column("last_collected", Date),
)

# 0009: nights that read what changed (issue 16). Each evaluated patient's history as the last
# evaluation read it (the rule analytes' results and every event), one Arrow IPC record batch a table, so
# a night reads one row a patient plus the rows collected since the patient's `dirty_from`.
patient_state = Table(
    "patient_state",
    metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("state_with", String(32), nullable=False,
           comment="rules digest and state format it was written with; another one: whole history is read"),
    Column("labs", LargeBinary, nullable=False, comment="Arrow IPC record batch: the patient's results"),
    Column("events", LargeBinary, nullable=False, comment="Arrow IPC record batch: the patient's events"),
    Column("as_of", Date, nullable=False, comment="the night of the evaluation that wrote it"),
)

# 0010: silences (issue 17). A nurse mutes an alert she handled outside bonewatch for a stated time,
# with a reason, without acknowledging it (Alertmanager's model): a silence is its own record, not
# an alert status. It matches one alert, or a patient's alerts (optionally of one rule), those
# raised later while it holds included. Nothing is deleted: an ended silence keeps who and why.
silences = Table(
    "silences",
    metadata,
    Column("silence_id", Integer, primary_key=True, autoincrement=True),
    Column("alert_id", String(16), comment="matcher: this alert; NULL for a patient matcher"),
    Column("patient_id", String(64), comment="matcher: every alert of this patient (with rule: of that rule)"),
    Column("rule", String(40), comment="with patient_id: only this rule; NULL: every rule"),
    Column("starts_at", DateTime, nullable=False, comment="UTC"),
    Column("ends_at", DateTime, nullable=False, comment="UTC: it expires then"),
    Column("reason", Text, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("created_at", DateTime, nullable=False, comment="UTC"),
    Column("ended_at", DateTime, comment="UTC: unsilenced early"),
    Column("ended_by", String(128)),
    Column("released_at", DateTime,
           comment="UTC: the notify run that, after its end, queued its still-live alerts again"),
    Index("ix_silences_ends_at", "ends_at"),
    Index("ix_silences_patient", "patient_id"),
    Index("ix_silences_alert", "alert_id"),
)
