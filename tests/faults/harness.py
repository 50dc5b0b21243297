"""The fault harness behind `make faults`: real bonewatch processes, real failures, then the
invariants, against a clean run of the same nights.

A synthetic cohort (`bonewatch.synth`) is loaded into a base store once: its history and every
night but the last few. Each scenario copies the base store (SQLite: the backup API; PostgreSQL:
`CREATE DATABASE ... TEMPLATE`), runs the remaining nights, and on one of them (the *fault
night*, the one whose clean run sends the most digests) does something bad with real processes:

    kill:<point>        `bonewatch nightly` SIGKILLed at a fault point (`bonewatch.faults`)
    smtp-drop           the SMTP server keeps a message, then hangs up instead of answering 250
    two-ingests         two `bonewatch ingest` of the night's folder started at the same moment
    two-notifies        the night ingested and evaluated, then two `bonewatch notify` at the same
                        moment against an SMTP server that takes 0.3 s to answer each message
    two-nightlies       two `bonewatch nightly` of the same night started at the same moment
    backfill-beside     the fault night's `bonewatch nightly` beside a backfill of the nights
                        before it (a second process), oldest first
    store-lost          the store's connections are cut mid-run (PostgreSQL: every backend of
                        the database terminated; SQLite, which has no server: the process killed)
    store-restart       PostgreSQL itself restarted mid-run (`pg_ctlcluster ... restart`; full
                        run only: it cuts every other user of the server too)

The soak (`--soak-nights`, 365 in `make faults`) runs a year of nights of the cohort twice, once
clean and once with a random fault on about one night in eight, and compares the two stores.

After the fault the night is run again (what the next Airflow try does), the other nights as
usual. Then the scenario's store and mail are compared with the clean run's:

- rows lost / duplicated: lab results and clinical events missing from the store, quarantine
  rows missing or recorded twice;
- alerts lost: an alert of the clean run missing, different, or not notified as often;
- duplicate sends: a Message-ID the SMTP server received twice. Inside the documented window
  (the server took the message but the process never recorded it: `kill:notify.accepted`,
  `smtp-drop`) they are counted apart, as `window`;
- PHI hits: a patient id or birth date of the cohort in a process's output or log, or in a
  data-team email.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from bonewatch import pipeline, synth
from bonewatch.config import load_settings
from bonewatch.notify.catcher import MailCatcher
from bonewatch.store import db
from bonewatch.store.tables import alerts, clinical_events, lab_results, quarantine

KILLS = ("ingest.chunk", "ingest.ledger", "evaluate.batch", "notify.claimed", "notify.accepted")
SIDE_BY_SIDE = ("two-ingests", "two-notifies", "two-nightlies", "backfill-beside")
SCENARIOS = tuple(f"kill:{p}" for p in KILLS) + ("smtp-drop", "store-lost", "store-restart") + SIDE_BY_SIDE
#: faults after which the SMTP server may hold a message the outbox never recorded
WINDOW = {"kill:notify.accepted", "smtp-drop"}
LEASE_S = 1.0          # [notify] claim_lease_s of the harness: a dead flush's claim expires fast
CONFIG = """
[site]
inbox = "{inbox}"
data_dir = "{data}"
[ingest]
chunk_size = 25             # several chunks a file, so `ingest.chunk` falls between two
[notify]
claim_lease_s = {lease}
retry_backoff_s = 0
charts = false
[database]
lock_wait_s = 300
"""


@dataclass
class Outcome:
    """What one scenario left behind, compared with the clean run."""

    scenario: str
    store: str
    rows_lost: int = 0
    rows_duplicated: int = 0
    alerts_lost: int = 0
    alerts_extra: int = 0
    duplicate_sends: int = 0
    window: int = 0                 # duplicates inside the documented window
    phi_hits: int = 0
    killed: int = 0                 # processes that died of the fault (proof the fault happened)
    notes: list[str] = field(default_factory=list)

    @property
    def faulted(self) -> bool:
        """The fault really happened (a process died of it, the server dropped a message), or
        the scenario is one of processes side by side, where nothing is meant to die."""
        return bool(self.killed) or self.scenario in SIDE_BY_SIDE

    @property
    def ok(self) -> bool:
        return self.faulted and not (self.rows_lost or self.rows_duplicated or self.alerts_lost
                                     or self.alerts_extra or self.duplicate_sends or self.phi_hits)


# ---- stores ---------------------------------------------------------------------------------

class Stores:
    """Throwaway stores of one kind: `new()` an empty one, `copy(url)` a copy, `drop_all()`."""

    def __init__(self, kind: str, folder: Path, pg_admin: str = "postgresql://postgres@127.0.0.1:5432/postgres"):
        self.kind, self.folder, self.pg_admin = kind, folder, pg_admin
        self.made: list[str] = []

    def new(self) -> str:
        if self.kind == "sqlite":
            url = f"sqlite:///{self.folder / f'store-{uuid.uuid4().hex[:8]}.db'}"
        else:
            name = f"bonewatch_faults_{uuid.uuid4().hex[:10]}"
            self._admin(f'CREATE DATABASE "{name}"')
            url = str(make_url(self.pg_admin).set(database=name))
        self.made.append(url)
        return url

    def copy(self, url: str) -> str:
        if self.kind == "sqlite":
            target = self.new()
            with sqlite3.connect(make_url(url).database) as src, sqlite3.connect(make_url(target).database) as dst:
                src.backup(dst)
            return target
        name, source = f"bonewatch_faults_{uuid.uuid4().hex[:10]}", make_url(url).database
        # a template must have no sessions: this process's pooled connections (pre-ping reconnects)
        self._admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{source}' "
                    "AND pid <> pg_backend_pid()")
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
        target = str(make_url(self.pg_admin).set(database=name))
        self.made.append(target)
        return target

    def drop_all(self) -> None:
        if self.kind == "postgresql":
            for url in self.made:
                self._admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        engine = create_engine(self.pg_admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(sql))
        engine.dispose()


# ---- running nights -------------------------------------------------------------------------

class Night:
    """Runs nights against one store: in this process (the clean parts) or as `bonewatch nightly`
    processes (the faulted parts), all sending to one SMTP catcher."""

    def __init__(self, config: Path, url: str, mail: MailCatcher, outputs: list[str]):
        self.config, self.url, self.mail, self.outputs = config, url, mail, outputs
        self.env = {**os.environ, "BONEWATCH_CONFIG": str(config), "BONEWATCH_DATABASE_URL": url,
                    "BONEWATCH_SMTP_HOST": "127.0.0.1", "BONEWATCH_SMTP_PORT": str(mail.port),
                    "BONEWATCH_SMTP_STARTTLS": "false"}
        self.env.pop("BONEWATCH_FAULT", None)
        self.settings = load_settings(config, env=self.env)

    def here(self, night: date) -> dict:
        """The night in this process (what Airflow's next try does after a failure)."""
        return pipeline.nightly(self.settings, night)

    def start(self, *args: str, fault: str | None = None) -> subprocess.Popen:
        env = dict(self.env, **({"BONEWATCH_FAULT": fault} if fault else {}))
        # -v: the processes log at INFO, and the PHI scan reads every line of it
        return subprocess.Popen([sys.executable, "-m", "bonewatch.cli", "-v", *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait(self, *processes: subprocess.Popen) -> list[int]:
        codes = []
        for process in processes:
            out, err = process.communicate(timeout=600)
            self.outputs += [out, err]
            codes.append(process.returncode)
        return codes


def run_scenario(name: str, night: Night, nights: list[date], fault_night: date) -> int:
    """Run the nights with the scenario's fault on `fault_night`; return how many processes
    the fault killed."""
    killed = 0
    for current in nights:
        if current != fault_night:
            night.here(current)
            continue
        iso = current.isoformat()
        if name.startswith("kill:"):
            (code,) = night.wait(night.start("nightly", "--as-of", iso, fault=name.split(":", 1)[1]))
            killed += code == -signal.SIGKILL
        elif name == "smtp-drop":
            night.mail.drop_after_data(1)
            night.here(current)                  # one message stays pending, its copy on the server
            killed += night.mail.handler.drop_after_data == 0      # a message was dropped
            night.mail.handler.drop_after_data = 0                  # none sent tonight: no fault later
        elif name == "two-ingests":
            folder = str(night.settings.inbox / iso)
            night.wait(*(night.start("ingest", "--partition", iso, folder) for _ in range(2)))
        elif name == "two-notifies":
            pipeline.ingest(night.settings, pipeline.partition_paths(night.settings, current), partition=iso)
            pipeline.evaluate(night.settings, current)
            pipeline.quality_check(night.settings, current, paths=pipeline.partition_paths(night.settings, current))
            night.mail.slow(0.3)
            night.wait(*(night.start("notify", "--night", iso) for _ in range(2)))
            night.mail.slow(0)
        elif name == "two-nightlies":
            night.wait(night.start("nightly", "--as-of", iso), night.start("nightly", "--as-of", iso))
        elif name == "backfill-beside":
            # the four nights before, run again (a backfill over past nights), oldest first
            earlier = [(current - timedelta(days=n)).isoformat() for n in range(4, 0, -1)]
            night.wait(night.start("nightly", "--as-of", iso), _backfill(night, earlier))
        elif name in ("store-lost", "store-restart"):
            process = night.start("nightly", "--as-of", iso)
            killed += _lose_store(night.url, process, restart=name == "store-restart")
            night.wait(process)
        else:
            raise ValueError(f"unknown scenario {name!r}")
        time.sleep(LEASE_S * 1.2)                # a dead flush's claim runs out
        night.here(current)                      # the retry
    return killed


def _backfill(night: Night, isos: list[str]) -> subprocess.Popen:
    """Nights, oldest first, in one process of their own (as `airflow backfill` would queue them)."""
    code = ("import sys\nfrom datetime import date\nfrom bonewatch import pipeline\n"
            "from bonewatch.config import load_settings\nsettings = load_settings()\n"
            "for iso in sys.argv[1:]:\n    pipeline.nightly(settings, date.fromisoformat(iso))\n")
    return subprocess.Popen([sys.executable, "-c", code, *isos], env=night.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _lose_store(url: str, process: subprocess.Popen, restart: bool = False) -> int:
    """Cut the store away from a running process; return 1 once a cut hit it."""
    if restart:
        if make_url(url).get_backend_name() != "postgresql":
            raise ValueError("store-restart needs PostgreSQL")
        time.sleep(1.5)
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart"], check=True,
                       capture_output=True, timeout=120)
        return int(process.poll() is None or process.returncode != 0)
    if make_url(url).get_backend_name() != "postgresql":
        # SQLite has no server to lose: the closest real fault is the process's own death
        time.sleep(1.5)
        process.send_signal(signal.SIGKILL)
        return 1
    admin = create_engine(str(make_url(url).set(database="postgres")), isolation_level="AUTOCOMMIT")
    hit = 0
    deadline = time.monotonic() + 20
    with admin.connect() as conn:
        while process.poll() is None and time.monotonic() < deadline and not hit:
            hit = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                    "WHERE datname = :db AND pid <> pg_backend_pid()"),
                               {"db": make_url(url).database}).scalar() or 0
            time.sleep(0.3)
    admin.dispose()
    return int(bool(hit))


# ---- comparing ------------------------------------------------------------------------------

def snapshot(url: str) -> dict:
    """What the invariants compare, read from a store."""
    engine = db.make_engine(url)
    with engine.connect() as conn:
        labs = Counter(conn.execute(select(lab_results.c.result_id, lab_results.c.value, lab_results.c.status)).all())
        events = Counter(conn.execute(select(clinical_events.c.patient_id, clinical_events.c.event_type,
                                             clinical_events.c.occurred_at, clinical_events.c.value)).all())
        quarantined = Counter(conn.execute(select(quarantine.c.file_name, quarantine.c.source_line,
                                                  quarantine.c.reason)).all())
        alert_rows = {r.alert_id: (r.rule, r.episode, r.severity, r.status, r.notify_count, r.last_notified_night)
                      for r in conn.execute(select(alerts))}
        pending = conn.execute(text("SELECT count(*) FROM outbox WHERE status = 'pending'")).scalar()
        patients = {p for (p,) in conn.execute(select(func.distinct(lab_results.c.patient_id)))}
        births = {v for (v,) in conn.execute(select(clinical_events.c.value)
                                             .where(clinical_events.c.event_type == "birth_date"))}
    engine.dispose()
    return {"labs": labs, "events": events, "quarantine": quarantined, "alerts": alert_rows, "pending": pending,
            "patients": patients, "births": births}


def compare(outcome: Outcome, clean: dict, faulted: dict, mail: MailCatcher, outputs: list[str]) -> None:
    for kind in ("labs", "events", "quarantine"):
        lost = clean[kind] - faulted[kind]
        extra = faulted[kind] - clean[kind]
        outcome.rows_lost += sum(lost.values())
        outcome.rows_duplicated += sum(extra.values())
        if lost or extra:
            outcome.notes.append(f"{kind}: {sum(lost.values())} lost, {sum(extra.values())} extra")
    for alert_id, row in clean["alerts"].items():
        if faulted["alerts"].get(alert_id) != row:
            outcome.alerts_lost += 1
    outcome.alerts_extra = len(set(faulted["alerts"]) - set(clean["alerts"]))
    if outcome.alerts_lost or outcome.alerts_extra:
        outcome.notes.append(f"alerts: {outcome.alerts_lost} lost or different, {outcome.alerts_extra} extra")
    if faulted["pending"]:
        outcome.notes.append(f"{faulted['pending']} message(s) still pending")
    copies = Counter(m["Message-ID"] for m in mail.messages)
    twice = sum(n - 1 for n in copies.values() if n > 1)
    if outcome.scenario in WINDOW:
        outcome.window, twice = min(twice, 1), max(twice - 1, 0)
    outcome.duplicate_sends = twice
    secrets = {p for p in clean["patients"] if len(p) >= 4} | {b for b in clean["births"] if b}
    team = [m.as_string() for m in mail.messages if "data quality" in str(m["Subject"]).lower()]
    outcome.phi_hits = sum(1 for text_ in outputs + team for s in secrets if s in text_)


# ---- the run --------------------------------------------------------------------------------

@dataclass
class Plan:
    scenarios: tuple[str, ...] = SCENARIOS
    stores: tuple[str, ...] = ("sqlite", "postgresql")
    patients: int = 24
    nights: int = 16
    tail: int = 3                    # nights each scenario runs on top of the base store
    soak_nights: int = 0             # 0: no soak
    soak_rate: float = 0.125         # share of the soak's nights that get a fault


#: `make test`'s short version: the claim, the window and the locks, on both stores
SHORT = {"sqlite": ("kill:ingest.ledger", "kill:notify.accepted", "two-notifies"),
         "postgresql": ("two-notifies", "store-lost")}


def _cohort(workdir: Path, name: str, patients: int, *, seed: int, nights: int) -> tuple[Path, Path, list[date]]:
    """A synthetic cohort's feeds in `workdir/<name>-feeds` (made anew), a config naming its inbox,
    and its nights in order."""
    feeds = workdir / f"{name}-feeds"
    if feeds.exists():
        shutil.rmtree(feeds)
    manifest = synth.generate(feeds, patients=patients, seed=seed, nights=nights)
    first = date.fromisoformat(manifest["first_night"])
    config = workdir / f"{name}.toml"
    config.write_text(CONFIG.format(inbox=feeds / "inbox", data=workdir / "data", lease=LEASE_S), "utf-8")
    return feeds, config, [first + timedelta(days=i) for i in range(nights)]


def run(plan: Plan, workdir: Path, progress=lambda message: None) -> list[Outcome]:
    """Every scenario of the plan on every store; returns their outcomes."""
    workdir.mkdir(parents=True, exist_ok=True)
    feeds, config, every = _cohort(workdir, "faults", plan.patients, seed=11, nights=plan.nights)
    head, tail = every[:-plan.tail], every[-plan.tail:]
    outcomes = []
    for kind in plan.stores:
        stores = Stores(kind, workdir)
        try:
            with MailCatcher() as mail:
                base = stores.new()
                outputs: list[str] = []
                night = Night(config, base, mail, outputs)
                pipeline.engine_for(night.settings, migrate=True)
                pipeline.ingest(night.settings, [feeds / "history"], partition="history")
                for current in head:
                    night.here(current)
                progress(f"{kind}: base store ready ({len(head)} nights)")
                clean_url = stores.copy(base)
                mail.clear()
                clean_night = Night(config, clean_url, mail, [])
                sent_per_night = {}
                for current in tail:
                    before = len(mail.messages)
                    clean_night.here(current)
                    sent_per_night[current] = len(mail.messages) - before
                fault_night = max(tail, key=lambda d: (sent_per_night[d], d))
                clean = snapshot(clean_url)
            for name in plan.scenarios:
                if name == "store-restart" and kind != "postgresql":
                    continue
                with MailCatcher() as mail:
                    outputs = []
                    night = Night(config, stores.copy(base), mail, outputs)
                    outcome = Outcome(name, kind)
                    outcome.killed = run_scenario(name, night, tail, fault_night)
                    compare(outcome, clean, snapshot(night.url), mail, outputs)
                    if not outcome.faulted:
                        outcome.notes.append("the fault never happened")
                outcomes.append(outcome)
                progress(f"{kind} {name}: {'ok' if outcome.ok else 'FAILED'} ({outcome.killed} killed, "
                         f"{outcome.window} in the window) {'; '.join(outcome.notes)}")
        finally:
            stores.drop_all()
    return outcomes


def soak(plan: Plan, workdir: Path, kind: str, progress=lambda message: None) -> Outcome:
    """A year (plan.soak_nights) of nights run clean and with random faults; compare the two."""
    import random

    rng = random.Random(2026)
    feeds, config, every = _cohort(workdir, "soak", plan.patients, seed=13, nights=plan.soak_nights)
    choices = [f"kill:{p}" for p in KILLS] + ["smtp-drop"]
    outcome = Outcome(f"soak of {plan.soak_nights} nights", kind)
    stores = Stores(kind, workdir)
    try:
        runs = {}
        for label in ("clean", "faulted"):
            with MailCatcher() as mail:
                outputs: list[str] = []
                night = Night(config, stores.new(), mail, outputs)
                pipeline.engine_for(night.settings, migrate=True)
                pipeline.ingest(night.settings, [feeds / "history"], partition="history")
                for i, current in enumerate(every):
                    fault = rng.choice(choices) if label == "faulted" and rng.random() < plan.soak_rate else None
                    if fault:
                        outcome.killed += run_scenario(fault, night, [current], current)
                        outcome.window += fault in WINDOW
                    else:
                        night.here(current)
                    if i % 30 == 29:
                        progress(f"{kind} soak {label}: {i + 1} nights")
                runs[label] = (snapshot(night.url), mail.messages[:], outputs)
        windows = outcome.window
        probe = MailCatcher()
        probe.handler.messages.extend(runs["faulted"][1])
        compare(outcome, runs["clean"][0], runs["faulted"][0], probe, runs["faulted"][2])
        # every fault inside the window may leave one copy more; compare counts that
        copies = Counter(m["Message-ID"] for m in runs["faulted"][1])
        twice = sum(n - 1 for n in copies.values() if n > 1)
        outcome.window = min(twice, windows)
        outcome.duplicate_sends = twice - outcome.window
    finally:
        stores.drop_all()
    return outcome


def summary_line(outcomes: list[Outcome]) -> str:
    """The one line `make faults` prints."""
    total = lambda attr: sum(getattr(o, attr) for o in outcomes)  # noqa: E731
    return (f"faults: {len(outcomes)} scenarios run, rows lost {total('rows_lost')}, "
            f"rows duplicated {total('rows_duplicated')}, alerts lost {total('alerts_lost') + total('alerts_extra')}, "
            f"duplicate sends {total('duplicate_sends')} (documented window: {total('window')}), "
            f"PHI hits {total('phi_hits')}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenario names")
    parser.add_argument("--workdir", default="data/faults", help="where the cohort and SQLite stores go")
    parser.add_argument("--soak-nights", type=int, default=0,
                        help="also run a soak of this many nights (make faults: 365), on the first store")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per scenario as it ends")
    args = parser.parse_args(argv)
    plan = Plan(scenarios=tuple(args.scenarios.split(",")), stores=tuple(args.stores.split(",")),
                soak_nights=args.soak_nights)
    workdir = Path(args.workdir).resolve()
    if not args.verbose:
        # the clean nights run in this process: their warnings (a header-only file, an SMTP
        # server hanging up on purpose) are the scenarios' business, not the one line's
        logging.getLogger("bonewatch").setLevel(logging.ERROR)
    progress = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else (lambda m: None)
    outcomes = run(plan, workdir, progress)
    if plan.soak_nights:
        outcomes.append(soak(plan, workdir, plan.stores[0], progress))
    for outcome in outcomes:
        if not outcome.ok:
            print(f"FAILED {outcome.store} {outcome.scenario}: {'; '.join(outcome.notes)}", file=sys.stderr)
    print(summary_line(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
