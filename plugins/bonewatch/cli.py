"""The `bonewatch` command line (SPEC section 7).

Errors are one plain line on stderr (exit 1 for a run that finished with failures, 2 for bad
usage); `--debug` shows the traceback. No patient identifier is ever logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import date
from pathlib import Path

import click

from bonewatch.errors import BonewatchError

log = logging.getLogger("bonewatch")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("great_expectations", "alembic", "mail.log", "yagmail", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(ctx: click.Context):
    from bonewatch.config import load_settings

    if ctx.obj.get("settings") is None:
        ctx.obj["settings"] = load_settings(ctx.obj.get("config"))
    return ctx.obj["settings"]


class _Date(click.ParamType):
    name = "YYYY-MM-DD"

    def convert(self, value, param, ctx):
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not a date like 2025-06-30", param, ctx)


DATE = _Date()


class _BadValue(click.ClickException):
    """A bad option value, said in one line (no usage block), exit code 2 as for bad usage."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"bonewatch: {self.format_message()}", err=True)


class _Partition(click.ParamType):
    name = "i/N"

    def convert(self, value, param, ctx):
        from bonewatch.model import parse_partition

        if isinstance(value, tuple):
            return value
        try:
            return parse_partition(value)
        except ValueError as exc:
            raise _BadValue(f"--partition {exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", type=click.Path(dir_okay=False), envvar="BONEWATCH_CONFIG",
              help="Configuration file (TOML). Default: the packaged default.toml.")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
@click.version_option(package_name="bonewatch")
@click.pass_context
def cli(ctx: click.Context, config: str | None, debug: bool, verbose: bool) -> None:
    """bonewatch: nightly lab monitoring and alerting for myeloma patients on bone-modifying
    agents (zoledronic acid, pamidronate, denosumab).

    \b
    A typical night:
      bonewatch db upgrade                  create or migrate the store
      bonewatch ingest inbox/2025-06-30     load the night's files (CSV, HL7 v2, FHIR)
      bonewatch pull                        read new rows from the SQL sources, if any
      bonewatch evaluate --as-of 2025-06-30 run every rule as of that night
      bonewatch notify                      email the digests the outbox holds
    or all of it at once: bonewatch nightly --as-of 2025-06-30

    The store is BONEWATCH_DATABASE_URL (default: SQLite under the data folder).
    Try `bonewatch demo` to see the whole pipeline on a synthetic cohort.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(config=config, debug=debug)
    _setup_logging(verbose)


@cli.group()
def db() -> None:
    """Manage the store (SQLite or PostgreSQL)."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create the store, or migrate it to the newest schema (Alembic)."""
    from bonewatch import pipeline
    from bonewatch.store import db as store_db

    settings = _settings(ctx)
    engine = pipeline.engine_for(settings, migrate=True)
    click.echo(f"store at revision {store_db.head_revision(engine)} ({engine.url.render_as_string(hide_password=True)})")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--partition", help="Night the files belong to (YYYY-MM-DD), for the ledger.")
@click.option("--feed", type=click.Choice(["labs", "events", "hl7", "fhir"]),
              help="Load only the files of this feed (the Airflow ingest tasks run one feed each).")
@click.pass_context
def ingest(ctx: click.Context, paths: tuple[str, ...], partition: str | None, feed: str | None) -> None:
    """Load lab and clinical files or folders, whatever their format.

    \b
    Formats, from the file name and, where that is not enough, the content:
      *.csv          lab results (SPEC 2.1)       *.events.csv   clinical events (SPEC 2.4)
      *.hl7          HL7 v2 ORU^R01, 2.3-2.5.1    *.json         FHIR R4 Bundle
      *.ndjson       FHIR R4 bulk export (one resource a line; Patient files load first)

    Bad rows go to quarantine with a reason naming the file and line (or Bundle entry) and the
    good rows of the same file are kept; a file that cannot be read is reported with its name and
    line, and the exit code is 1. A file already ingested (same bytes) is skipped.
    """
    from bonewatch import pipeline

    summary = pipeline.ingest(_settings(ctx), paths, partition=partition, progress=sys.stderr.isatty(), feed=feed)
    _report_ingest(ctx, summary, "file(s)")


def _report_ingest(ctx: click.Context, summary, noun: str) -> None:
    for loaded in summary.per_file:
        click.echo(f"  {loaded['file']}: " + (loaded["note"] if "note" in loaded else
                   f"{loaded['accepted']} accepted, {loaded['not_monitored']} not monitored, "
                   f"{loaded['quarantined']} quarantined"))
    click.echo(f"{summary.files} {noun}: {summary.accepted} rows accepted, {summary.not_monitored} not monitored, "
               f"{summary.quarantined} quarantined"
               + (f", {summary.skipped_files} already ingested" if summary.skipped_files else "")
               + (f", {summary.failed_files} unreadable" if summary.failed_files else ""))
    for error in summary.errors:
        click.echo(f"error: {error}", err=True)
    ctx.exit(1 if summary.failed_files else 0)


@cli.command()
@click.argument("sources", nargs=-1)
@click.option("--partition", help="Night the pull belongs to (YYYY-MM-DD), for the ledger.")
@click.pass_context
def pull(ctx: click.Context, sources: tuple[str, ...], partition: str | None) -> None:
    """Pull new lab rows from the SQL sources of the configuration ([sources.NAME]).

    Each source is read above its high-water mark (the largest watermark already loaded), so a
    second pull reads only rows added or corrected since. With no SOURCES, every configured one.
    A source that cannot be reached is reported in one line and the exit code is 1.
    """
    from bonewatch import pipeline

    summary = pipeline.pull(_settings(ctx), sources or None, partition=partition, progress=sys.stderr.isatty())
    _report_ingest(ctx, summary, "source(s)")


@cli.command()
@click.option("--as-of", "as_of", type=DATE, required=True, help="The night to evaluate (YYYY-MM-DD).")
@click.option("--partition", type=_Partition(),
              help="Evaluate only partition i of N of the patients (0 <= i < N), e.g. 0/4.")
@click.pass_context
def evaluate(ctx: click.Context, as_of: date, partition: tuple[int, int] | None) -> None:
    """Run every rule as of a night and update the alerts. Running it twice changes nothing.

    \b
    Split over processes or hosts: run the N partitions side by side, then once without
    --partition, which finishes the night (it finds no patient left, and marks the open
    alerts of the patients not evaluated as seen tonight):
      bonewatch evaluate --as-of 2025-06-30 --partition 0/2 &
      bonewatch evaluate --as-of 2025-06-30 --partition 1/2 &
      wait && bonewatch evaluate --as-of 2025-06-30
    A patient's partition is a stable hash of its id. Partitions of one split never wait for
    each other; a whole evaluation waits for them, and they for it.
    """
    from bonewatch import pipeline

    summary = pipeline.evaluate(_settings(ctx), as_of, partition=partition)
    rules = ", ".join(f"{rule} {n}" for rule, n in summary.by_rule.items()) or "none"
    where = f" partition {summary.partition}" if summary.partition else ""
    click.echo(f"{as_of}{where}: {summary.patients} patients, {summary.findings} findings ({rules}); "
               f"{summary.new_alerts} new alert(s), {summary.resolved_alerts} resolved")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json", "fhir"]), default="table", show_default=True,
              help="json: one object a line; fhir: one FHIR R4 DetectedIssue a line (NDJSON).")
@click.option("--status", multiple=True, type=click.Choice(["open", "notified", "acknowledged", "resolved"]),
              help="Only these statuses (repeatable). Default: every status.")
@click.pass_context
def alerts(ctx: click.Context, fmt: str, status: tuple[str, ...]) -> None:
    """List alerts. JSON is one object a line; FHIR is one R4 DetectedIssue a line, validated."""
    from bonewatch import pipeline
    from bonewatch.store import alerts as store_alerts
    from bonewatch.store import silences

    engine = pipeline.engine_for(_settings(ctx))
    with engine.connect() as conn:
        rows = store_alerts.list_alerts(conn, list(status))
        muted = silences.silenced_alerts(conn, pipeline._now(), [r for r in rows if r["status"] != "resolved"])
    if fmt == "json":
        for row in rows:
            # `silenced`: null, or the silence that holds it now (until, reason, by, silence_id)
            click.echo(json.dumps({**row, "silenced": muted.get(row["alert_id"])}, sort_keys=True, default=str))
        return
    if fmt == "fhir":
        from bonewatch.export import detected_issue_lines

        for line in detected_issue_lines(rows):
            click.echo(line)
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} alert(s)")
    for column in ("alert_id", "patient_id", "rule", "severity", "raised_on", "status"):
        table.add_column(column, overflow="fold")
    table.add_column("silenced", no_wrap=True)
    table.add_column("summary", overflow="fold")
    for row in rows:
        held = muted.get(row["alert_id"])
        table.add_row(row["alert_id"], row["patient_id"], row["rule"], row["severity"], str(row["raised_on"]),
                      row["status"], f"until {held['until']:%Y-%m-%d %H:%M} UTC by {held['by']}" if held else "",
                      str(row["evidence"].get("summary", "")))
    _console(width=160).print(table)


def _console(width: int | None = None):
    """The console every table of stored values is printed with: no markup and no highlighting,
    so a value the feeds sent (a patient id holding `[/bold]`) prints as sent and cannot break the
    table or style it."""
    from rich.console import Console

    return Console(width=width, markup=False, highlight=False, emoji=False)


@cli.command()
@click.option("--night", type=DATE, help="Night whose digests to queue (default: the latest evaluated night).")
@click.option("--retry-now", is_flag=True,
              help="Retry messages that failed recently now, without waiting out their back-off.")
@click.pass_context
def notify(ctx: click.Context, night: date | None, retry_now: bool) -> None:
    """Queue the digests of new alerts (and reminders of unacknowledged urgent ones) and send
    what the outbox holds (SMTP). A message the server did not accept stays pending, with the
    error recorded, and is retried with back-off on the next run; the exit code is then 1."""
    from bonewatch import pipeline
    from bonewatch.store import alerts as store_alerts

    settings = _settings(ctx)
    if night is None:
        with pipeline.engine_for(settings).connect() as conn:
            night = store_alerts.latest_night(conn)
    if night is None:
        click.echo("nothing to send: no night has been evaluated")
        return
    summary = pipeline.notify(settings, night, retry_now=retry_now)
    click.echo(f"{summary.sent} message(s) sent, {summary.failed} left pending, "
               f"{summary.alerts_notified} alert(s) notified"
               + (f", {summary.deferred} waiting out a back-off (--retry-now to try now)" if summary.deferred else "")
               + (f", {summary.elsewhere} being sent by another run" if summary.elsewhere else ""))
    for error in summary.errors:
        click.echo(f"error: {error}", err=True)
    ctx.exit(1 if summary.failed else 0)


@cli.command()
@click.argument("alert_id")
@click.option("--by", "by", required=True, help="Who acknowledges (name or initials).")
@click.pass_context
def ack(ctx: click.Context, alert_id: str, by: str) -> None:
    """Acknowledge an alert: it will not be re-sent."""
    from bonewatch import pipeline
    from bonewatch.errors import NotFound
    from bonewatch.store import alerts as store_alerts

    engine = pipeline.engine_for(_settings(ctx))
    with engine.begin() as conn:
        previous = store_alerts.acknowledge(conn, alert_id, by, pipeline._now())
    if not previous:
        raise NotFound(f"no alert {alert_id}")
    click.echo(f"{alert_id} acknowledged by {by}" if previous in ("open", "notified")
               else f"{alert_id} was already {previous}")


@cli.command()
@click.argument("alert_id", required=False)
@click.option("--patient", "patient_id", help="Silence this patient's alerts (MRN) instead of one alert.")
@click.option("--rule", help="With --patient: only the alerts of this rule (e.g. RENAL_HOLD).")
@click.option("--for", "duration", required=True, metavar="DURATION",
              help="How long: a whole number and h, d or w (12h, 14d, 2w); at most [notify] silence_max_days.")
@click.option("--reason", required=True, help="Why it is handled outside bonewatch (kept with the silence).")
@click.option("--by", "by", required=True, help="Who silences it (name or initials).")
@click.pass_context
def silence(ctx: click.Context, alert_id: str | None, patient_id: str | None, rule: str | None, duration: str,
            reason: str, by: str) -> None:
    """Silence an alert for a stated time, with a reason, without acknowledging it.

    \b
      bonewatch silence 1a2b3c4d5e6f --for 14d --reason "infusion cancelled" --by "R. Nurse"
      bonewatch silence --patient 000123 --rule RENAL_HOLD --for 2w --reason "hospice care" --by RN

    While the silence holds, its alerts are not emailed, not re-sent as reminders, and show as
    silenced in `bonewatch alerts`; their status does not change. A --patient silence also covers
    the alerts of that patient raised later while it holds. When it ends (it expires, or
    `bonewatch unsilence`), the next nightly run emails its alerts again if their condition still
    holds, and not if they resolved meanwhile. Every silence is in the audit table.
    """
    from bonewatch import pipeline
    from bonewatch.errors import SilenceError
    from bonewatch.store import silences

    settings = _settings(ctx)
    if rule and rule not in settings.rules:
        raise SilenceError(f"--rule {rule!r} is not a rule id (see `bonewatch rules`)")
    length = silences.parse_duration(duration, settings.notify.silence_max_days)
    with pipeline.engine_for(settings).begin() as conn:
        made = silences.create(conn, alert_id=alert_id, patient_id=patient_id, rule=rule, duration=length,
                               reason=reason, by=by, at=pipeline._now())
    click.echo(f"silence {made['silence_id']}: {silences.matcher_text(made)} silenced until "
               f"{made['ends_at']:%Y-%m-%d %H:%M} UTC by {made['created_by']} "
               f"({len(made['covers'])} alert(s) now); end it early with "
               f"`bonewatch unsilence {made['silence_id']} --by NAME`")


@cli.command("silences")
@click.option("--all", "everything", is_flag=True, help="Also the silences that have expired or were ended.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def silences_list(ctx: click.Context, everything: bool, fmt: str) -> None:
    """List the silences in force: what they match, who made them, why, and until when."""
    from bonewatch import pipeline
    from bonewatch.store import silences

    with pipeline.engine_for(_settings(ctx)).connect() as conn:
        rows = silences.list_silences(conn, pipeline._now(), everything=everything)
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps({k: row[k] for k in ("silence_id", "state", "alert_id", "patient_id", "rule",
                                                       "starts_at", "ends_at", "reason", "created_by", "ended_at",
                                                       "ended_by", "alerts")}, default=str))
        return
    if not rows:
        click.echo("no silences" if everything else "no active silences (--all lists the ended ones)")
        return
    from rich.table import Table

    table = Table("id", "state", "matches", "alerts", "until (UTC)", "by", "reason",
                  title=f"{len(rows)} silence(s)")
    for row in rows:
        state = row["state"] + (f" by {row['ended_by']}" if row["state"] == "ended" else "")
        table.add_row(str(row["silence_id"]), state, silences.matcher_text(row), " ".join(row["alerts"]) or "-",
                      f"{silences.until(row):%Y-%m-%d %H:%M}", row["created_by"], row["reason"])
    _console(width=180).print(table)


@cli.command()
@click.argument("silence_id", type=int)
@click.option("--by", "by", required=True, help="Who ends it (name or initials).")
@click.pass_context
def unsilence(ctx: click.Context, silence_id: int, by: str) -> None:
    """End a silence early: the next nightly run emails its alerts again if still open."""
    from bonewatch import pipeline
    from bonewatch.store import silences

    with pipeline.engine_for(_settings(ctx)).begin() as conn:
        row = silences.end(conn, silence_id, by=by, at=pipeline._now())
    click.echo(f"silence {silence_id} ({silences.matcher_text(row)}) ended by {row['ended_by']}")


@cli.command()
@click.option("--as-of", "as_of", type=DATE, required=True, help="The night to run (YYYY-MM-DD).")
@click.pass_context
def nightly(ctx: click.Context, as_of: date) -> None:
    """The whole nightly run, as the Airflow DAGs run it: ingest `<inbox>/<night>/`, evaluate, notify."""
    from bonewatch import pipeline

    result = pipeline.nightly(_settings(ctx), as_of)
    i, e, n = result["ingest"], result["evaluate"], result["notify"]
    click.echo(f"{as_of}: ingested {i['accepted']} rows ({i['quarantined']} quarantined); "
               f"{e['findings']} findings, {e['new_alerts']} new alert(s); {n['sent']} email(s) sent")
    for error in i["errors"] + n["errors"]:
        click.echo(f"error: {error}", err=True)
    ctx.exit(1 if i["failed_files"] or n["failed"] else 0)


@cli.command()
@click.option("--patients", type=click.IntRange(1), default=60, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write the feeds into.")
@click.option("--last-night", type=DATE, default="2025-06-30", show_default=True)
@click.option("--nights", type=click.IntRange(14), default=30, show_default=True,
              help="Nights in the window (at least 14, so every planted finding fits).")
@click.option("--format", "fmt", type=click.Choice(["csv", "hl7", "fhir", "ndjson"]), default="csv",
              show_default=True,
              help="Feed format: lab/events CSV, HL7 v2 ORU (+ events CSV), FHIR R4 Bundles, or FHIR bulk NDJSON.")
def synth(patients: int, seed: int, out: str, last_night: date, nights: int, fmt: str) -> None:
    """Write a synthetic cohort (history + one inbox folder a night) and expected_alerts.jsonl,
    the ground truth the generator planted. The same seed gives the same cohort in every format."""
    from bonewatch import synth as generator

    manifest = generator.generate(Path(out), patients=patients, seed=seed, last_night=last_night, nights=nights,
                                  fmt=fmt)
    click.echo(f"wrote {manifest['patients']} patients, nights {manifest['first_night']}..{manifest['last_night']}, "
               f"to {out}")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), help="Demo folder (default: <data dir>/demo).")
@click.option("--patients", type=click.IntRange(1), default=60, show_default=True)
@click.option("--nights", type=click.IntRange(14), default=30, show_default=True,
              help="Nights in the window (at least 14, so every planted finding fits).")
@click.pass_context
def demo(ctx: click.Context, out: str | None, patients: int, nights: int) -> None:
    """A synthetic cohort through the whole pipeline on SQLite, emails caught by a local SMTP
    server; prints where to look."""
    from bonewatch import demo as demo_run

    settings = _settings(ctx)
    folder = Path(out) if out else settings.data_dir / "demo"
    report = demo_run.run(settings, folder, patients=patients, nights=nights, progress=sys.stderr.isatty())
    for line in report:
        click.echo(line)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535),
              help="Port (default: the port of [site] ack_base_url, else 8099).")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int | None) -> None:
    """Serve the acknowledgement links of the emails and the data-quality dashboard (a small web
    app; stop with Ctrl-C).

    Needs BONEWATCH_ACK_SECRET, the key the emails' links were signed with (at least 32
    characters). Point [site] ack_base_url at where nurses reach this server (hospital network
    only; put a TLS reverse proxy in front of it).

    The dashboard (built by `bonewatch dashboard`) is served at /dashboard only when
    BONEWATCH_DASHBOARD_PASSWORD is set (at least 16 characters): HTTP Basic login as
    [quality] dashboard_user (default data-team) with that password. Without it /dashboard
    answers 404. The ack links need no login: their signed token is the credential.

    The CDS Hooks 2.0 service for the EHR answers at /cds-services (patient-view: the patient's
    open alerts as cards; order-sign: a draft zoledronic acid or pamidronate order checked at
    signing). Every call needs the EHR's signed JWT: trust an EHR in [cds_hooks.issuers]
    (its iss and its JWK Set or PEM key) and set [cds_hooks] base_url to the URL it calls.
    """
    from urllib.parse import urlsplit

    from bonewatch import web

    settings = _settings(ctx)
    web.require_secret(settings)
    port = port or urlsplit(settings.site.ack_base_url).port or 8099
    click.echo(f"serving acknowledgement links on http://{host}:{port} (Ctrl-C stops)", err=True)
    if settings.quality.dashboard_password:
        click.echo(f"dashboard at http://{host}:{port}/dashboard/ (login: {settings.quality.dashboard_user})", err=True)
    else:
        click.echo("dashboard not served: set BONEWATCH_DASHBOARD_PASSWORD to serve it behind a login", err=True)
    web.serve(settings, host, port)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder to write into (default: [quality] dashboard_dir, else <data dir>/dashboard).")
@click.option("--through", type=DATE, help="Last night to show (default: the latest night a run recorded).")
@click.pass_context
def dashboard(ctx: click.Context, out: str | None, through: date | None) -> None:
    """Build the data-quality dashboard (static HTML that opens offline) and the GX Data Docs of
    the validation runs in its window; prints the path of its index.html."""
    from bonewatch import pipeline
    from bonewatch.dashboard import build

    settings = _settings(ctx)
    folder = Path(out) if out else build.default_folder(settings)
    index = build.build(pipeline.engine_for(settings), settings, folder, now=pipeline._now(), through=through)
    click.echo(f"dashboard: {index}")


@cli.command()
@click.argument("alert_id")
@click.pass_context
def explain(ctx: click.Context, alert_id: str) -> None:
    """Explain an alert: its evidence, the arithmetic, the rule and its citation, in plain words."""
    from bonewatch import pipeline
    from bonewatch.errors import NotFound
    from bonewatch.explain import explain_alert
    from bonewatch.store import alerts as store_alerts
    from bonewatch.store.courses import courses_of

    settings = _settings(ctx)
    with pipeline.engine_for(settings).connect() as conn:
        rows = store_alerts.list_alerts(conn, alert_id=alert_id)
        if not rows:
            raise NotFound(f"no alert {alert_id}")
        courses = courses_of(conn, rows[0]["patient_id"])
    click.echo(explain_alert(rows[0], settings, courses))


@cli.command()
@click.option("--all", "everything", is_flag=True,
              help="Every code seen: also the LOINC codes not monitored, the ignored and the mapped ones.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def codes(ctx: click.Context, everything: bool, fmt: str) -> None:
    """List the codes whose results were skipped rather than stored (SPEC 2.5).

    \b
    unmapped       a local code missing from [ingest.code_map]: map it to a LOINC there,
                   or list it in [ingest] ignore_codes if the hospital does not need it
    not_monitored  a valid LOINC of an analyte bonewatch does not use (a CBC's haemoglobin)
    ignored        listed in [ingest] ignore_codes
    mapped         mapped since it was seen (its later results are stored)

    By default only the unmapped codes: the data team's to-do list. Neither kind is a bad row:
    quarantine is for rows bonewatch should use and cannot. Re-send the files of a code you
    have just mapped to load its earlier results.
    """
    from bonewatch import pipeline
    from bonewatch.ingest import codes as code_list

    settings = _settings(ctx)
    engine = pipeline.engine_for(settings)
    with engine.connect() as conn:
        frame = code_list.load(conn, settings, everything=everything)
    if fmt == "json":
        for row in frame.to_dict("records"):
            click.echo(json.dumps({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}))
        return
    if frame.empty:
        click.echo("no unmapped local codes" if not everything else "no skipped codes")
        return
    from rich.table import Table

    table = Table("code", "status", "rows", "feeds", "first seen", "last seen", "collected")
    for row in frame.itertuples(index=False):
        status = f"mapped: {row.analyte}" if row.status == "mapped" else row.status
        table.add_row(row.code, status, str(row.rows), row.feeds, str(row.first_seen), str(row.last_seen),
                      f"{row.first_collected or ''} .. {row.last_collected or ''}")
    _console().print(table)


@cli.command()
@click.option("--night", type=DATE, help="Only the files of this night (the ledger's partition).")
@click.option("--feed", help="Only this feed (labs, events, hl7, fhir, or a SQL source's feed).")
@click.option("--limit", type=click.IntRange(1), default=200, show_default=True, help="At most this many rows.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def quarantine(ctx: click.Context, night: date | None, feed: str | None, limit: int, fmt: str) -> None:
    """List quarantined rows: feed, file, line and the full reason, with the value it quotes.

    This is the clinical channel: the reason may quote what the feed sent (a code, a value, a
    date), which can be patient data, so it is shown here and nowhere else (the dashboard and the
    data-team emails show each quoted value as «…»). The row as sent stays in the store.
    """
    from sqlalchemy import select

    from bonewatch import pipeline
    from bonewatch.store.tables import deliveries
    from bonewatch.store.tables import quarantine as quarantined

    q, d = quarantined.c, deliveries.c
    query = (select(d.partition, q.feed, q.file_name, q.source_line, q.reason)
             .select_from(quarantined.join(deliveries, d.delivery_id == q.delivery_id))
             .order_by(d.partition.desc(), q.file_name, q.source_line).limit(limit))
    if night is not None:
        query = query.where(d.partition == night.isoformat())
    if feed:
        query = query.where(q.feed == feed)
    with pipeline.engine_for(_settings(ctx)).connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps({"night": row["partition"], "feed": row["feed"], "file": row["file_name"],
                                   "line": row["source_line"], "reason": row["reason"]}, ensure_ascii=False))
        return
    if not rows:
        click.echo("no quarantined rows")
        return
    from rich.table import Table

    table = Table("night", "feed", "file", "line", "reason", title=f"{len(rows)} quarantined row(s)")
    for row in rows:
        table.add_row(str(row["partition"] or ""), row["feed"], row["file_name"], str(row["source_line"]),
                      row["reason"])
    _console(width=200).print(table)


@cli.command("rules")
@click.pass_context
def rules_table(ctx: click.Context) -> None:
    """Print every rule with its thresholds, action and source (Markdown), from the configuration."""
    from bonewatch.explain import rules_markdown

    click.echo(rules_markdown(_settings(ctx)))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one plain line on error, the traceback only with --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="bonewatch", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)   # ctx.exit(n) comes back as a return value
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except BonewatchError as exc:
        if debug:
            raise
        click.echo(f"bonewatch: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # an unexpected failure still gets one line, unless --debug
        if debug:
            raise
        # its type only: the message of a database or library error can quote the values it was
        # given (patient ids, feed text), and this line ends up in cron mails and task logs
        click.echo(f"bonewatch: unexpected {type(exc).__name__} (run with --debug for details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
