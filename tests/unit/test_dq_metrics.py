"""The data-quality core on tiny hand-built frames: feed status against the deadline, red/amber/
green, unit switches, bad-row rates, reasons without patient data, and which problems page."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bonewatch.dashboard import metrics
from bonewatch.dashboard.metrics import FeedRule, Thresholds

UTC = ZoneInfo("UTC")
NIGHT = date(2025, 6, 30)
DUE = datetime(2025, 7, 1, 1, 0)          # 01:00 on the morning after, naive UTC
RULES = {"labs": FeedRule("01:00", True), "events": FeedRule("01:00", True)}


def delivery(feed="labs", arrived=DUE - timedelta(minutes=30), total=100, accepted=100, quarantined=0,
             units=None, status="loaded", did="d1"):
    return {"delivery_id": did, "feed": feed, "status": status, "arrived_at": arrived, "rows_total": total,
            "rows_accepted": accepted, "rows_quarantined": quarantined, "expectations_passed": 10,
            "expectations_failed": 1 if quarantined else 0,
            "units": json.dumps(units if units is not None else {"alp": {"U/L": accepted}})}


def assess(rows, *, now=DUE + timedelta(minutes=30), reasons=None, values=None, unit_history=None,
           p50=None, tz=UTC, feeds=RULES, resent=None):
    return metrics.assess_night(
        NIGHT, feeds=feeds, default_rule=FeedRule("01:00", False),
        deliveries=pd.DataFrame(rows, columns=["delivery_id", "feed", "status", "arrived_at", "rows_total",
                                               "rows_accepted", "rows_quarantined", "expectations_passed",
                                               "expectations_failed", "units"]),
        reasons=pd.DataFrame(reasons or [], columns=["feed", "reason", "rows"]),
        values=pd.DataFrame(values or [], columns=["feed", "analyte", "value"]),
        unit_history=unit_history if unit_history is not None else {"labs": {"alp": {"U/L": 500}}},
        p50_history=p50 or {}, thresholds=Thresholds(), tz=tz, now=now, resent=resent)


def by_feed(result):
    return {r["feed"]: r for r in result.rows}


def test_deadline_is_local_time_on_the_morning_after():
    assert metrics.deadline_at(NIGHT, "01:00", UTC) == DUE
    # Europe/Zurich is UTC+2 in summer: 01:00 local is 23:00 UTC the evening before
    assert metrics.deadline_at(NIGHT, "01:00", ZoneInfo("Europe/Zurich")) == datetime(2025, 6, 30, 23, 0)
    with pytest.raises(ValueError):
        metrics.parse_hhmm("25:00")


@pytest.mark.parametrize(("arrived", "now", "status", "rag"), [
    (DUE - timedelta(minutes=1), DUE + timedelta(hours=1), "on_time", "green"),
    (DUE, DUE + timedelta(hours=1), "on_time", "green"),                     # exactly at the deadline
    (DUE + timedelta(minutes=1), DUE + timedelta(hours=1), "late", "amber"),
    (None, DUE + timedelta(minutes=1), "missing", "red"),
    (None, DUE - timedelta(minutes=1), "pending", "grey"),                   # not due yet
])
def test_status_against_the_deadline(arrived, now, status, rag):
    rows = [delivery(arrived=arrived)] if arrived is not None else []
    labs = by_feed(assess(rows, now=now))["labs"]
    assert (labs["status"], labs["rag"]) == (status, rag)


def test_one_feed_late_one_missing_gives_two_problems_red_first_in_the_email():
    result = assess([delivery(arrived=DUE + timedelta(hours=2, minutes=12))], now=DUE + timedelta(hours=3))
    feeds = by_feed(result)
    assert feeds["labs"]["status"] == "late" and feeds["events"]["status"] == "missing"
    assert {(p.feed, p.issue) for p in result.problems} == {("labs", "late"), ("events", "missing")}
    late = next(p for p in result.problems if p.issue == "late")
    assert "2 h 12 min after its deadline" in late.text
    notice = metrics.data_team_notice(NIGHT, result.problems, "Site")
    assert notice.subject == "bonewatch data quality, night 2025-06-30: events missing; labs late"
    assert notice.text.index("[RED]") < notice.text.index("[AMBER]")


def test_optional_feed_that_sends_nothing_is_not_missing():
    result = assess([delivery()], feeds={"labs": RULES["labs"], "hl7": FeedRule("01:00", False)})
    assert by_feed(result)["hl7"]["status"] == "not_expected"
    assert by_feed(result)["hl7"]["rag"] == "grey"
    assert result.problems == []


def test_unconfigured_feed_is_shown_and_never_missing():
    result = assess([delivery(), delivery(feed="fhir", did="d2")], feeds={"labs": RULES["labs"]})
    assert by_feed(result)["fhir"]["status"] == "on_time"
    assert by_feed(result)["fhir"]["expected"] is False


@pytest.mark.parametrize(("quarantined", "rag", "problem"), [
    (5, "green", False),     # exactly 5 %: not over the threshold
    (6, "amber", True),
    (24, "amber", True),
    (25, "red", True),       # at the red rate
    (30, "red", True),
])
def test_bad_row_rate(quarantined, rag, problem):
    rows = [delivery(total=100, accepted=100 - quarantined, quarantined=quarantined)]
    result = assess(rows, reasons=[("labs", "unparseable value «abc»", quarantined)])
    labs = by_feed(result)["labs"]
    assert labs["bad_row_rate"] == quarantined / 100
    assert labs["rag"] == rag
    assert any(p.issue == "bad_rows" for p in result.problems) is problem


def test_nothing_usable_is_red():
    labs = by_feed(assess([delivery(total=10, accepted=0, quarantined=10, units={})]))["labs"]
    assert labs["rag"] == "red"


def test_unit_switch_is_a_new_scale_not_a_new_spelling():
    history = {"labs": {"alp": {"U/L": 500}, "creatinine": {"mg/dL": 400}}}
    switched = assess([delivery(units={"alp": {"ukat/L": 30, "IU/L": 10}, "creatinine": {"mg/dL": 40}})],
                      unit_history=history)
    labs = by_feed(switched)["labs"]
    assert [(s["analyte"], s["unit"], s["rows"]) for s in labs["unit_switches"]] == [("alp", "ukat/L", 30)]
    assert labs["rag"] == "amber"
    problem = next(p for p in switched.problems if p.issue == "unit_switch:alp")
    assert "'ukat/L'" in problem.text and "usual: U/L" in problem.text
    # an analyte the feed never sent before is new, not switched
    new = assess([delivery(units={"ggt": {"ukat/L": 3}})], unit_history={"labs": {"alp": {"U/L": 5}}})
    assert by_feed(new)["labs"]["unit_switches"] == []


def test_distributions_against_history():
    values = [("labs", "alp", v) for v in range(80, 181)] + [("labs", "creatinine", 1.0)]
    labs = by_feed(assess([delivery()], values=values, p50={"labs": {"alp": [100.0, 120.0, 140.0]}}))["labs"]
    alp = labs["distributions"]["alp"]
    assert (alp["n"], alp["p50"], alp["p05"], alp["p95"], alp["history_p50"]) == (101, 130.0, 85.0, 175.0, 120.0)
    assert labs["distributions"]["creatinine"]["history_p50"] is None
    assert "calcium" not in labs["distributions"]


def test_a_resent_file_arrived_but_brings_nothing_new():
    resent = pd.DataFrame([{"feed": "events", "night": "2025-06-29", "rows_total": 0, "arrived_at": DUE},
                           {"feed": "labs", "night": "2025-06-28", "rows_total": 40, "arrived_at": DUE}])
    result = assess([], resent=resent)
    feeds = by_feed(result)
    # a header-only file is the same every night: on time, nothing to report
    assert (feeds["events"]["status"], feeds["events"]["rag"], feeds["events"]["resent"]) == ("on_time", "green", 1)
    # yesterday's full file again: it arrived, but the export looks stuck
    assert (feeds["labs"]["status"], feeds["labs"]["rag"]) == ("on_time", "amber")
    assert [p.issue for p in result.problems] == ["resent"]
    assert "night 2025-06-28" in result.problems[0].text


def test_an_unreadable_file_is_counted_against_its_feed_not_as_missing():
    """A lab CSV that could not be read: the labs feed did send, so it is red and "unreadable",
    never "missing"; the feed is named in the problem (not "unknown")."""
    result = assess([delivery(feed="events", did="e1"),
                     delivery(feed="labs", status="failed", did="bad", total=0, accepted=0)])
    feeds = by_feed(result)
    assert (feeds["labs"]["status"], feeds["labs"]["rag"], feeds["labs"]["deliveries"]) == ("unreadable", "red", 1)
    assert feeds["events"]["rag"] == "green"
    assert [(p.feed, p.issue) for p in result.problems] == [("labs", "unreadable")]
    assert result.problems[0].text.startswith("labs: 1 file(s) for night 2025-06-30 could not be read")
    assert "unknown" not in feeds and metrics.UNREADABLE_FEED not in feeds
    assert result.unreadable_files == 1
    # one of its files unreadable, another loaded on time: on time, but red for the unreadable one
    mixed = by_feed(assess([delivery(), delivery(feed="events", did="e1"),
                            delivery(feed="labs", status="failed", did="bad", total=0, accepted=0)]))
    assert (mixed["labs"]["status"], mixed["labs"]["rag"]) == ("on_time", "red")


def test_an_unreadable_file_of_an_optional_feed_is_red_for_that_feed():
    result = assess([delivery(), delivery(feed="events", did="e1"),
                     delivery(feed="hl7", status="failed", did="bad", total=0, accepted=0)])
    hl7 = by_feed(result)["hl7"]
    assert (hl7["status"], hl7["rag"], hl7["expected"]) == ("unreadable", "red", False)


@pytest.mark.parametrize("ledger_feed", ["unreadable", "unknown"])   # "unknown": the ledger before issue 15
def test_files_whose_feed_cannot_be_told_form_the_unreadable_row(ledger_feed):
    from bonewatch.ingest import sources

    assert metrics.UNREADABLE_FEED == sources.UNREADABLE_FEED == "unreadable"
    result = assess([delivery(), delivery(feed="events", did="e1"),
                     delivery(feed=ledger_feed, status="failed", did="bad", total=0, accepted=0)])
    row = by_feed(result)["unreadable"]
    assert (row["status"], row["rag"], row["deliveries"]) == ("unreadable", "red", 1)
    assert [(p.feed, p.issue) for p in result.problems] == [("unreadable", "unreadable")]
    assert "unknown" not in by_feed(result)


def test_an_expected_feed_that_sent_nothing_is_missing_and_an_optional_one_is_not():
    """The night with only an events file: an expected labs feed that sent nothing, not even its
    header-only file, is missing (red); a feed configured as not expected is grey, never red."""
    only_events = [delivery(feed="events", did="e1")]
    assert by_feed(assess(only_events))["labs"]["rag"] == "red"
    optional = by_feed(assess(only_events, feeds={**RULES, "labs": FeedRule("01:00", False)}))["labs"]
    assert (optional["status"], optional["rag"]) == ("not_expected", "grey")
    # the labs' header-only file (no results tonight) is a delivery: on time, green
    header_only = by_feed(assess([*only_events, delivery(total=0, accepted=0, units={})]))["labs"]
    assert (header_only["status"], header_only["rag"]) == ("on_time", "green")


def test_reasons_are_public_and_grouped_by_what_they_say():
    reasons = [("labs", "unknown status «DOE JOHN»", 3), ("labs", "unknown status «MRN 44556677»", 2),
               ("labs", "unparseable value 'O'BRIEN'", 1)]          # a reason stored before the marks
    row = by_feed(assess([delivery()], reasons=reasons))["labs"]
    assert row["quarantine_reasons"] == {"unknown status «…»": 5, "unparseable value «…»": 1}


def test_old_nights_are_recorded_but_not_paged():
    result = assess([], now=DUE + timedelta(days=30))
    assert {p.issue for p in result.problems} == {"missing"}
    assert metrics.pageable(result.problems, result.rows, DUE + timedelta(days=30), Thresholds()) == []
    assert len(metrics.pageable(result.problems, result.rows, DUE + timedelta(hours=47), Thresholds())) == 2


def test_alert_volume_and_acknowledgement_latency():
    alerts = pd.DataFrame({
        "rule": ["RENAL_HOLD", "RENAL_HOLD", "DOSE_BAND", "REVIEW_1Y"],
        "raised_on": [NIGHT, NIGHT, NIGHT, NIGHT - timedelta(days=1)],
        "severity": ["high", "high", "high", "medium"],
        "notified_at": [datetime(2025, 7, 1, 2), datetime(2025, 7, 1, 2), None, datetime(2025, 6, 30, 2)],
        "acknowledged_at": [datetime(2025, 7, 1, 8), None, None, datetime(2025, 6, 30, 14)],
    })
    assert metrics.alert_volume(alerts, NIGHT) == {"DOSE_BAND": 1, "RENAL_HOLD": 2}
    latency = metrics.ack_latency(alerts)
    assert latency["all"] == {"notified": 3, "acknowledged": 2, "waiting": 1, "median_h": 9.0, "p90_h": 11.4,
                              "max_h": 12.0}
    assert latency["high"]["median_h"] == 6.0
    assert metrics.ack_latency(alerts.iloc[0:0])["all"] == {"notified": 0, "acknowledged": 0, "waiting": 0}


@given(st.permutations([delivery(did="a", arrived=DUE - timedelta(hours=1), total=50, accepted=45, quarantined=5),
                        delivery(did="b", arrived=DUE + timedelta(minutes=5), total=50, accepted=50)]))
def test_row_order_does_not_matter(rows):
    labs = by_feed(assess(rows))["labs"]
    assert (labs["status"], labs["rows_total"], labs["bad_row_rate"], labs["arrived_at"]) == \
        ("late", 100, 0.05, DUE + timedelta(minutes=5))
