"""Data-quality monitoring end to end, on both stores: synthetic nights through the real nightly
run, the data team's emails on the real SMTP server, the dashboard opened in Debian's headless
Chromium with the network cut, and a grep of every dashboard file for the patients' identifiers."""

from __future__ import annotations

import json
import re
from datetime import date, timedelta

import pytest
from sqlalchemy import func, select

from bonewatch import pipeline
from bonewatch.cli import main
from bonewatch.config import load_settings, with_overrides
from bonewatch.dashboard import build
from bonewatch.store.tables import dq_feed_nights, dq_nights, dq_problems, dq_validations, outbox, quarantine
from tests.integration.dq_feeds import (
    ARTIFACTS,
    MISSING,
    PANEL_ROWS,
    PATIENTS,
    Night,
    OfflinePage,
    at,
    history,
    patient_ids_in,
    remote_references,
    run_nights,
)

FIRST = date(2025, 6, 20)
DATA_TEAM = ["clinical-data-team@hospital.example"]


@pytest.fixture
def quality_settings(engine, mailbox, tmp_path):
    """Settings on this test's store and SMTP server, with an inbox under tmp_path and the
    history backfill loaded."""
    settings = with_overrides(load_settings(), site__inbox=str(tmp_path / "inbox"))
    pipeline.ingest(settings, history(tmp_path / "history"))
    return settings


def clean_nights(n: int) -> list[Night]:
    return [Night(FIRST + timedelta(days=i)) for i in range(n)]


def feed_nights(engine, night: date) -> dict[str, dict]:
    with engine.connect() as conn:
        rows = conn.execute(select(dq_feed_nights).where(dq_feed_nights.c.night == night)).mappings().all()
    return {r["feed"]: dict(r) for r in rows}


def table_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar()
                for t in (dq_feed_nights, dq_nights, dq_problems, dq_validations, outbox)}


def only_to_data_team(mailbox) -> None:
    assert mailbox.envelopes, "no email was sent"
    for _sender, recipients in mailbox.envelopes:
        assert recipients == DATA_TEAM, "a data-quality email went to someone else than the data team"


def no_patient_ids_in_messages(mailbox) -> None:
    for message in mailbox.messages:
        text = message.as_string()
        assert not [pid for pid in PATIENTS if pid in text]


def db_name(engine) -> str:
    return engine.dialect.name


PLOTTED = ("() => document.querySelectorAll('.plotly-graph-div .main-svg').length > 0 "
           "|| document.querySelectorAll('.plotly-graph-div').length === 0")
# On a Data Docs page: the vendored libraries ran and Bootstrap's stylesheet applies.
GX_PAGE_READY = """() => [typeof jQuery, typeof jQuery.fn.bootstrapTable, typeof jQuery.fn.datepicker,
    typeof vegaEmbed, getComputedStyle(document.querySelector('nav.navbar')).display]"""


def open_offline(browser, path):
    """Open a dashboard file with every non-file request aborted; return (page, session)."""
    session = OfflinePage(browser)
    page = session.open(path)
    page.wait_for_function(PLOTTED)
    return page, session


def every_page(out) -> tuple[list, list]:
    """(the dashboard's HTML pages, its Data Docs' HTML pages) under `out`."""
    pages = sorted(p for p in out.rglob("*.html") if "vendor" not in p.relative_to(out).parts)
    docs = [p for p in pages if p.relative_to(out).parts[0] == build.DATADOCS]
    return [p for p in pages if p not in docs], docs


def test_late_and_missing_feeds_reach_the_data_team_and_the_dashboard(engine, quality_settings, mailbox,
                                                                       browser, tmp_path, capsys):
    last = FIRST + timedelta(days=2)
    specs = clean_nights(2) + [Night(last, labs_at=at(last, "03:12"), events_at=MISSING, run_at=at(last, "03:30"))]
    results = run_nights(quality_settings, tmp_path / "inbox", specs)

    assert [r["quality"]["rag"] for r in results[:2]] == [{"events": "green", "labs": "green"}] * 2
    assert results[-1]["quality"]["feeds"] == {"events": "missing", "labs": "late"}
    stored = feed_nights(engine, last)
    assert (stored["labs"]["status"], stored["labs"]["rag"]) == ("late", "amber")
    assert (stored["events"]["status"], stored["events"]["rag"]) == ("missing", "red")
    assert stored["labs"]["rows_total"] == 32 and stored["labs"]["rows_quarantined"] == 0

    # the data team hears about it once, the nurses not at all
    assert len(mailbox.messages) == 1
    only_to_data_team(mailbox)
    message = mailbox.messages[0]
    assert message["Subject"].strip() == f"bonewatch data quality, night {last}: events missing; labs late"
    body = message.get_body(("plain",)).get_content()
    assert "2 h 12 min after its deadline (01:00 on 2025-06-23)" in body
    assert "events: no delivery for night 2025-06-22" in body
    no_patient_ids_in_messages(mailbox)

    # a rerun of the night records the same and emails nothing new
    before = table_counts(engine)
    pipeline.nightly(quality_settings, last, now=at(last, "03:40"))
    assert table_counts(engine) == before and len(mailbox.messages) == 1

    # built by the command (in this process: a fresh interpreter spends ~10 s importing GX),
    # then opened offline in Chromium
    out = tmp_path / "dashboard"
    with pytest.raises(SystemExit) as done:
        main(["dashboard", "--out", str(out)])               # BONEWATCH_DATABASE_URL: this store
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"dashboard: {out / 'index.html'}"
    # plotly.js is written once beside the pages, not inlined into each (4.8 MB a page before)
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    assert max(p.stat().st_size for p in out.glob("*.html")) < 500_000

    page, session = open_offline(browser, out / "index.html")
    try:
        table = page.locator("#feed-status")
        assert table.is_visible()
        labs, events = table.locator("tr[data-feed=labs]"), table.locator("tr[data-feed=events]")
        assert (labs.get_attribute("data-status"), labs.get_attribute("data-rag")) == ("late", "amber")
        assert (events.get_attribute("data-status"), events.get_attribute("data-rag")) == ("missing", "red")
        assert labs.locator("td.status").inner_text() == "Late"
        assert events.locator("td.status").inner_text() == "Missing"
        assert "2 h 12 min late" in labs.inner_text()
        # the red/amber/green overview: a Plotly heatmap, one labelled cell per feed and night
        assert page.locator("#rag-overview svg.main-svg").count() > 0
        assert page.locator("#rag-overview .heatmaplayer .hm image").count() == 1
        assert page.locator("#rag-overview .heatmap-label").count() == 2 * 30
        assert page.locator("#alert-volume svg.main-svg").count() > 0
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"dashboard-late-missing-{db_name(engine)}.png"), full_page=True)
        assert session.errors == [] and session.blocked == []
    finally:
        session.close()
    assert patient_ids_in(out, PATIENTS) == {}
    assert remote_references(out) == {}


def test_unit_switch_and_bad_rows_reach_the_data_team_and_the_dashboard(engine, quality_settings, mailbox,
                                                                        browser, tmp_path):
    last = FIRST + timedelta(days=2)
    specs = clean_nights(2) + [Night(last, alp_unit="ukat/L", events_bad=6)]
    results = run_nights(quality_settings, tmp_path / "inbox", specs)

    assert results[-1]["quality"]["rag"] == {"events": "red", "labs": "amber"}
    stored = feed_nights(engine, last)
    assert (stored["events"]["rows_total"], stored["events"]["rows_quarantined"]) == (20, 6)
    assert stored["events"]["bad_row_rate"] == pytest.approx(0.30)
    switches = json.loads(stored["labs"]["unit_switches"])
    assert [(s["analyte"], s["unit"], s["rows"]) for s in switches] == [("alp", "ukat/L", 8)]
    # converted on ingest: the ALP distribution does not jump with the unit
    alp = json.loads(stored["labs"]["distributions"])["alp"]
    assert alp["history_p50"] is not None and abs(alp["p50"] - alp["history_p50"]) < 10

    assert len(mailbox.messages) == 1
    only_to_data_team(mailbox)
    message = mailbox.messages[0]
    assert message["Subject"].strip() == f"bonewatch data quality, night {last}: events bad rows; labs unit switch"
    body = message.get_body(("plain",)).get_content()
    assert "events: 30.0% of night 2025-06-22's rows were quarantined (6 of 20; threshold 5.0%)" in body
    assert "labs: alp arrived in 'ukat/L' (8 rows" in body and "usual: U/L" in body
    no_patient_ids_in_messages(mailbox)

    # the store keeps the bad rows as sent (with the MRNs): the dashboard must not show them
    with engine.connect() as conn:
        raw = " ".join(conn.execute(select(quarantine.c.raw)).scalars())
        reasons = " ".join(conn.execute(select(quarantine.c.reason)).scalars())
    assert PATIENTS[0] in raw and PATIENTS[1] in reasons

    out = tmp_path / "dashboard"
    index = build.build(engine, quality_settings, out, now=at(last, "07:00"))
    page, session = open_offline(browser, index)
    try:
        labs = page.locator("#feed-status tr[data-feed=labs]")
        events = page.locator("#feed-status tr[data-feed=events]")
        assert (labs.get_attribute("data-status"), labs.get_attribute("data-rag")) == ("on_time", "amber")
        assert (events.get_attribute("data-status"), events.get_attribute("data-rag")) == ("on_time", "red")
        assert "Unit switch" in labs.inner_text() and "'ukat/L'" in labs.inner_text()
        assert "30% quarantined" in events.inner_text() and "(30.0%)" in events.inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"dashboard-units-bad-rows-{db_name(engine)}.png"), full_page=True)
        assert session.errors == [] and session.blocked == []

        page = session.open(out / "feed-labs.html")
        page.wait_for_selector("#units-labs-alp svg.main-svg")
        assert sorted(page.locator("#units-labs-alp .legendtext").all_text_contents()) == ["U/L", "ukat/L"]
        assert page.locator("#dist-labs-alp .boxlayer .trace").count() == 1
        assert page.locator("#arrival-labs .bars .point").count() == 3        # one bar a recorded night
        assert page.locator(f"#feed-nights tr[data-night='{last}'][data-rag=amber]").count() == 1

        page = session.open(out / "quarantine.html")
        reasons_shown = page.locator("#quarantine-reasons").inner_text()
        assert "impossible birth date (not a calendar" in reasons_shown and "unparseable value «…»" in reasons_shown
        # where to look: file and line, never the value
        where = page.locator("#quarantine-reasons td.where").all_inner_texts()
        assert where and all(re.fullmatch(r"[\w.-]+\.csv, line \d+(; [\w.-]+\.csv, line \d+)*( …)?", w)
                             for w in where), where

        page = session.open(out / "validations.html")
        runs = page.locator("#validation-runs tbody tr")
        assert runs.count() == 6                                    # 3 nights x 2 feeds, one chunk each
        docs = page.locator("#validation-runs a").first.get_attribute("href")
        page = session.open(out / docs)                             # GX's page, made to open offline
        assert "Expectation Validation Result" in page.inner_text("body")
        assert session.errors == [] and session.blocked == []

        # every page of the dashboard and of its Data Docs, network cut: nothing fails, nothing
        # is asked of elsewhere, and the Data Docs' vendored CSS and JS do their work
        dashboard_pages, docs_pages = every_page(out)
        assert {p.name for p in dashboard_pages} >= {"index.html", "feed-labs.html", "feed-events.html",
                                                     "quarantine.html", "validations.html", "codes.html"}
        assert len(docs_pages) == 1 + 2 + 6            # GX's index, a page per suite, a page per run
        for path in dashboard_pages:
            session.open(path).wait_for_function(PLOTTED)
        for path in docs_pages:
            page = session.open(path)
            assert page.evaluate(GX_PAGE_READY) == ["function"] * 4 + ["flex"], path
        page = session.open(out / build.DATADOCS / "index.html")
        # drawn by bootstrap-table: 6 runs (Validation Results tab) and 2 suites (Expectation Suites tab)
        assert page.locator(".bootstrap-table tbody tr").count() == 6 + 2
        page.evaluate("() => document.fonts.ready")
        assert page.evaluate("""() => document.fonts.check('900 1em "Font Awesome 6 Free"')""")
        assert session.errors == [] and session.blocked == [] and session.failed == []
    finally:
        session.close()
    assert patient_ids_in(out, PATIENTS) == {}
    assert remote_references(out) == {}


def test_old_nights_are_recorded_but_page_no_one(engine, quality_settings, mailbox, tmp_path):
    """A replay or backfill long after the nights: the dashboard shows what happened, nobody is
    emailed about deliveries weeks ago."""
    last = FIRST + timedelta(days=1)
    specs = [Night(FIRST, run_at=at(FIRST, "09:00", days=40)),
             Night(last, labs_at=MISSING, events_at=MISSING, run_at=at(last, "09:00", days=40))]
    run_nights(quality_settings, tmp_path / "inbox", specs)
    assert {f: r["status"] for f, r in feed_nights(engine, last).items()} == {"labs": "missing", "events": "missing"}
    assert mailbox.messages == []
    with engine.connect() as conn:
        problems = conn.execute(select(dq_problems.c.feed, dq_problems.c.message_key)).all()
    assert sorted(problems) == [("events", None), ("labs", None)]


def test_an_empty_store_builds_a_dashboard_that_says_so_and_serve_can_mount_it(engine, settings, tmp_path):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from bonewatch.web import create_app

    password = "dashboard-password-for-tests"
    configured = with_overrides(settings, quality__dashboard_dir=str(tmp_path / "dq"),
                                quality__dashboard_password=password, notify__ack_secret="k" * 32)
    index = build.build(engine, configured, build.default_folder(configured), now=at(FIRST, "07:00"))
    assert index == tmp_path / "dq" / "index.html"
    assert "No nightly run has been recorded yet" in index.read_text("utf-8")
    app = create_app(configured, engine=engine)    # what `bonewatch serve` serves, login included

    async def fetch(*paths: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bonewatch",
                                     auth=(configured.quality.dashboard_user, password)) as client:
            return [await client.get(path) for path in paths]

    # in a thread of its own: the session's Playwright (sync API) keeps an event loop on this one
    with ThreadPoolExecutor(1) as pool:
        index_page, quarantine_page = pool.submit(asyncio.run, fetch("/dashboard/", "/dashboard/quarantine.html")).result()
    assert index_page.status_code == 200 and "No nightly run has been recorded yet" in index_page.text
    assert quarantine_page.status_code == 200


def test_migration_0004_matches_the_tables(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from bonewatch.store.tables import metadata

    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    ours = [d for d in diffs if "dq_" in repr(d)]
    assert ours == []


def test_full_panels_leave_the_dashboard_green_and_email_nobody(engine, quality_settings, mailbox, tmp_path):
    """SPEC 2.5: a night of real panels (a CBC and a metabolic panel around the monitored analytes)
    is not a night of bad rows; an unmapped local creatinine code is listed until it is mapped."""
    specs = [Night(FIRST + timedelta(days=i), panels=True, local_creatinine="CRE-LOCAL") for i in range(2)]
    results = run_nights(quality_settings, tmp_path / "inbox", specs)
    assert [r["quality"]["rag"] for r in results] == [{"events": "green", "labs": "green"}] * 2
    labs = feed_nights(engine, FIRST + timedelta(days=1))["labs"]
    per_patient = len(PANEL_ROWS) + 1
    assert (labs["rows_quarantined"], labs["bad_row_rate"], labs["rows_not_monitored"]) == (0, 0.0, 8 * per_patient)
    assert labs["rows_accepted"] == 32 and json.loads(labs["quarantine_reasons"]) == {}
    assert mailbox.messages == [], "nobody is emailed about a night of full panels"

    out = tmp_path / "dashboard"
    build.build(engine, quality_settings, out, now=at(FIRST, "07:00", days=2))
    codes = (out / "codes.html").read_text("utf-8")
    # a local code is feed text (it could be a name): masked here, in full on the command line
    assert '<table class="grid" id="unmapped-codes">' in codes and "<code>•••-•••••</code>" in codes
    assert "CRE-LOCAL" not in codes
    assert "local code(s)</a> are not in" in (out / "index.html").read_text("utf-8")
    assert patient_ids_in(out, PATIENTS) == {}

    mapped = with_overrides(quality_settings, ingest__code_map={**quality_settings.ingest.code_map,
                                                                "CRE-LOCAL": "14682-9"})
    build.build(engine, mapped, out, now=at(FIRST, "07:00", days=2))
    codes = (out / "codes.html").read_text("utf-8")
    assert 'id="unmapped-codes-empty"' in codes and "mapped since: creatinine" in codes
    assert "local code(s)</a> are not in" not in (out / "index.html").read_text("utf-8")
