"""Exactly once with real processes: two flushes of one outbox at the same moment against a slow
SMTP server, two ingests of one file at once, a second run of a night while the first holds it.
Each runs on the SQLite file and on the real PostgreSQL; the processes are real `bonewatch`
commands started side by side (a thread in this process would share its connections' locks)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from datetime import date, datetime, timedelta

from sqlalchemy import select, update

from bonewatch.config import load_settings
from bonewatch.notify import outbox
from bonewatch.store import locks
from bonewatch.store.tables import deliveries, lab_results
from tests.integration.alerting import (
    alert_row,
    alert_rows,
    audit_rows,
    insert_alerts,
    outbox_rows,
    write_feeds,
)

NIGHT = date(2025, 6, 5)


def start(*args: str, **env: str) -> subprocess.Popen:
    """`bonewatch <args>` as its own process, with this test's environment (plus `env`)."""
    return subprocess.Popen([sys.executable, "-m", "bonewatch.cli", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*processes: subprocess.Popen) -> list[tuple[int, str, str]]:
    return [(p.wait(timeout=120), *p.communicate()) for p in processes]


def test_two_flushes_at_once_send_each_message_once(engine, settings, mailbox):
    """Two `bonewatch notify` started together against a server that takes 1 s to answer DATA:
    before the claim both sent every message (two copies, two `send` rows, notify_count 2)."""
    insert_alerts(engine, alert_row("P-1", "RENAL_HOLD", "high"), alert_row("P-2", "ALP_RISE_BORTEZOMIB", "medium"))
    for key in ("one", "two"):
        outbox.queue_message(engine, kind="data_quality", recipients=["data@hospital.example"], night=NIGHT,
                             subject=f"data quality {key}", text="feeds late", html=None, key=key)
    mailbox.slow(1.0)

    results = finish(start("notify", "--night", NIGHT.isoformat()), start("notify", "--night", NIGHT.isoformat()))

    assert [code for code, _, _ in results] == [0, 0], results
    ids = Counter(m["Message-ID"] for m in mailbox.messages)
    assert len(ids) == 3 and set(ids.values()) == {1}, ids          # the digest and two notices, once each
    sends = Counter(r["message_id"] for r in audit_rows(engine) if r["event"] == "send")
    assert sends == Counter(dict.fromkeys(ids, 1))
    assert {r["status"] for r in outbox_rows(engine)} == {"sent"}
    assert {r["claimed_by"] for r in outbox_rows(engine)} == {None}
    assert [a["notify_count"] for a in alert_rows(engine).values()] == [1, 1]


def test_a_message_claimed_by_a_running_flush_is_left_to_it(engine, mailbox):
    settings = load_settings()      # after `mailbox` pointed the SMTP settings at the catcher
    outbox.queue_message(engine, kind="data_quality", recipients=["data@hospital.example"], night=NIGHT,
                         subject="notice", text="feeds late", html=None, key="k")
    now = datetime(2025, 6, 6, 3, 0)
    with engine.begin() as conn:
        conn.execute(update(outbox.outbox).values(claimed_by="bonewatch flush pid 1@other",
                                                  claimed_until=now + timedelta(minutes=5)))

    held = outbox.flush(engine, settings, now=now)
    assert (held.sent, held.failed, held.elsewhere) == (0, 0, 1) and mailbox.messages == []

    # the claimant died: once its lease has run out, the next flush takes the message over
    taken = outbox.flush(engine, settings, now=now + timedelta(minutes=6))
    assert (taken.sent, taken.elsewhere) == (1, 0) and len(mailbox.messages) == 1
    assert outbox_rows(engine)[0]["claimed_until"] is None


def test_new_alerts_never_join_a_digest_being_sent(engine, settings, mailbox):
    """A row claimed by a flush is not extended (its message is on the wire without them): the
    new alert gets a follow-up digest of its own."""
    insert_alerts(engine, alert_row("P-1", "RENAL_HOLD", "high"))
    outbox.queue_digests(engine, settings, NIGHT)
    with engine.begin() as conn:
        conn.execute(update(outbox.outbox).values(claimed_by="a flush", claimed_until=datetime(2999, 1, 1)))
    insert_alerts(engine, alert_row("P-2", "RENAL_HOLD", "high"))

    assert outbox.queue_digests(engine, settings, NIGHT) == 1
    rows = outbox_rows(engine)
    assert len(rows) == 2 and sorted(len(eval(r["alert_ids"])) for r in rows) == [1, 1]
    assert len({r["message_id"] for r in rows}) == 2


def test_two_ingests_of_one_file_at_once_load_it_once(engine, settings, tmp_path):
    """The ledger check sat outside the file's transaction: both processes loaded the file (the
    rows came out right, the work and the printed counts doubled)."""
    rows = [f"P-{i},r{i},2160-0,{80 + i % 40},umol/L,2025-06-0{1 + i % 4}T08:00:00,final" for i in range(3000)]
    folder = write_feeds(tmp_path / "feed", rows, [])

    results = finish(start("ingest", str(folder)), start("ingest", str(folder)))

    assert [code for code, _, _ in results] == [0, 0], results
    last_lines = sorted(out.strip().splitlines()[-1] for _, out, _ in results)
    assert last_lines == ["1 file(s): 0 rows accepted, 0 not monitored, 0 quarantined, 1 already ingested",
                          "1 file(s): 3000 rows accepted, 0 not monitored, 0 quarantined"], results
    with engine.connect() as conn:
        assert len(conn.execute(select(deliveries)).all()) == 1
        assert len(conn.execute(select(lab_results.c.result_id)).all()) == 3000


def test_a_second_run_of_a_night_waits_then_names_the_holder(engine, settings, tmp_path):
    with locks.hold(engine, f"night {NIGHT.isoformat()}", wait_s=0, holder="bonewatch nightly pid 4242@ward-7"):
        code, out, err = finish(start("nightly", "--as-of", NIGHT.isoformat(), BONEWATCH_LOCK_WAIT_S="0.5"))[0]
    assert code == 1 and out == ""
    assert err.strip() == (f"bonewatch: night {NIGHT.isoformat()} is held by bonewatch nightly pid 4242@ward-7; "
                           "gave up after waiting 0.5 s (retry when it has finished)")


def test_a_flush_that_fails_unexpectedly_hands_its_claim_back(engine, mailbox):
    """A configuration error while sending (a login without TLS, refused before connecting) is no
    SMTP refusal: the message is handed back at once, not held for the lease (10 minutes)."""
    import pytest

    from bonewatch.config import with_overrides
    from bonewatch.errors import ConfigError

    settings = with_overrides(load_settings(), smtp__user="relay-account")
    outbox.queue_message(engine, kind="data_quality", recipients=["data@hospital.example"], night=NIGHT,
                         subject="notice", text="feeds late", html=None, key="k")
    with pytest.raises(ConfigError):
        outbox.flush(engine, settings)
    (row,) = outbox_rows(engine)
    assert (row["status"], row["claimed_by"], row["claimed_until"]) == ("pending", None, None)
    assert mailbox.messages == []
