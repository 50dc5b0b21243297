"""bench/attribution.py: the sampler attributes each thread's time by the modules on its stack."""

from __future__ import annotations

import queue
import sys
import threading
import types

from bench import attribution

BUSY = """
import time

def busy(seconds):
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n
"""


def _fake_module(name: str) -> types.ModuleType:
    """A module named `name` whose `busy` runs in its namespace (so `f_globals["__name__"]` is it)."""
    module = types.ModuleType(name)
    exec(compile(BUSY, f"<{name}>", "exec"), module.__dict__)
    return module


def test_main_rules_writer_store_and_idle_thread():
    rules, store = _fake_module("bonewatch.rules.fake"), _fake_module("bonewatch.store.fake")
    writer = threading.Thread(target=store.busy, args=(0.3,), name="store-x")
    blocked = threading.Thread(target=lambda: _drain(queue.Queue()), name="waiter")
    with attribution.sampling() as sampler:
        writer.start()
        blocked.start()
        rules.busy(0.15)
        # the waiter's own stack, while it is blocked (the "other" kind also holds whatever threads
        # the test runner has, e.g. pytest-xdist's, busy or not)
        waiting = sys._current_frames()[blocked.ident]
        rules.busy(0.15)
        writer.join()
        blocked.join()
    report = sampler.report()

    assert report["samples"] > 5
    assert report["interval_ms"] == 10
    main, writer_ = (report["by_thread"][kind] for kind in ("main", "writer"))
    assert main.get("rules", {}).get("share", 0) > 0.5, main
    assert main["rules"]["inner"].get("bonewatch", 0) > 0.5, main
    assert writer_.get("store", {}).get("share", 0) > 0.5, writer_
    assert sampler.classify(waiting)[0] == attribution.IDLE
    assert report["python_share"] > 0.5
    assert sum(c["seconds"] for c in main.values()) > 0.1


def _drain(q: queue.Queue) -> None:
    try:
        q.get(timeout=0.3)
    except queue.Empty:
        pass


def test_classify_by_innermost_package_imports_first():
    sampler = attribution.Sampler()
    parsing = _fake_module("bonewatch.ingest.fake")
    gx = types.ModuleType("great_expectations.fake")
    exec("import sys\ndef here():\n    return sys._getframe()\n", gx.__dict__)
    parsing.__dict__["gx"] = gx
    exec("def call():\n    return gx.here()\n", parsing.__dict__)
    assert sampler.classify(parsing.call()) == (attribution.VALIDATION, "great_expectations")
    exec("import sys\ndef here():\n    return sys._getframe()\n", parsing.__dict__)
    assert sampler.classify(parsing.here()) == (attribution.PARSING, "bonewatch")
    # no bonewatch frame of a known part: "other", unless the innermost frame is a database driver
    assert sampler.classify(_frame_in("bonewatch.pipeline"))[0] == attribution.OTHER
    assert sampler.classify(_frame_in("sqlalchemy.engine.fake")) == (attribution.STORE, "sqlalchemy")


def _frame_in(name: str):
    module = types.ModuleType(name)
    exec("import sys\ndef here():\n    return sys._getframe()\n", module.__dict__)
    return module.here()


def test_summary_line():
    report = {"by_thread": {
        "main": {"store": {"share": 0.41, "seconds": 123.0, "inner": {}}, "parsing": {"share": 0.2, "seconds": 60.0,
                                                                                      "inner": {}}},
        "writer": {"store": {"share": 0.95, "seconds": 10.0, "inner": {}},
                   attribution.IDLE: {"share": 0.05, "seconds": 0.5, "inner": {}}},
        "other": {attribution.IDLE: {"share": 0.97, "seconds": 9.0, "inner": {}}}}, "python_share": 0.1}
    assert attribution.summary(report) == ("main: store 41% (123.0 s), parsing 20%; writer: store 95% (10.0 s), "
                                           "idle 5%; our Python code innermost in 10% of main's samples")
