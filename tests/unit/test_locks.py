"""The two locks: requirements.runtime.lock (the Docker image) is what the product needs at run
time, derived mechanically from requirements.lock (`scripts/split_lock.py`), with the same
versions, and without a test or development tool; `make test`/`make demo` install both."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import split_lock  # noqa: E402  (scripts/ is not a package)

#: Tools that must never reach the production image (and what only they pull in).
DEV_ONLY = {"pytest", "pytest-xdist", "execnet", "iniconfig", "hypothesis", "sortedcontainers", "ruff",
            "playwright", "pyee", "duckdb", "pyinstrument", "coverage", "pytest-cov", "setuptools"}


def _pins(path: Path) -> dict[str, str]:
    return {split_lock.normalize(e["name"]): e["version"]
            for e in split_lock.parse_lock(path.read_text(encoding="utf-8")).values()}


def test_runtime_lock_is_up_to_date_with_the_rule():
    """Re-running the split gives the committed file (after a change to requirements.lock, e.g. a
    merged pin, run `python scripts/split_lock.py`)."""
    text, _ = split_lock.build()
    assert (REPO / "requirements.runtime.lock").read_text(encoding="utf-8") == text


def test_runtime_lock_is_a_subset_of_the_dev_lock_with_the_same_versions():
    runtime, dev = _pins(REPO / "requirements.runtime.lock"), _pins(REPO / "requirements.lock")
    assert runtime and set(runtime) <= set(dev)
    assert {name: version for name, version in runtime.items() if dev[name] != version} == {}
    assert runtime["apache-airflow"] == dev["apache-airflow"]
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", v) for v in runtime.values()), "every version pinned"


def test_no_test_tool_in_the_runtime_lock():
    runtime = _pins(REPO / "requirements.runtime.lock")
    assert DEV_ONLY & set(runtime) == set()
    assert not [name for name in runtime if name.startswith("pytest")]
    # ... and they are still in the development lock that `make test` installs
    assert {"pytest", "playwright", "duckdb", "ruff", "hypothesis"} <= set(_pins(REPO / "requirements.lock"))


def test_every_package_dependency_is_a_runtime_root():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {split_lock.normalize(re.split(r"[\[<>=!~;\s]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    roots = set(split_lock.read_roots((REPO / "requirements.runtime.in").read_text(encoding="utf-8")))
    assert declared <= roots
    assert declared <= set(_pins(REPO / "requirements.runtime.lock"))


def test_the_closure_follows_the_via_annotations():
    lock = """\
top==1.0
    # via -r requirements.in
child==2.0
    # via
    #   top
    #   tool
tool==3.0
    # via -r requirements.in
leaf==4.0
    # via child
"""
    entries = split_lock.parse_lock(lock)
    keep, missing = split_lock.runtime_closure(entries, ["top", "absent"])
    assert keep == {"top", "child", "leaf"} and missing == ["absent"]
    text = split_lock.render(entries, keep, ["top"])
    assert "tool==" not in text and "    # via top\n" in text and "-r requirements.runtime.in" in text


def test_make_installs_both_locks():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    rule = makefile[makefile.index("$(STAMP):"):].split("\n\n", 1)[0]
    assert "requirements.runtime.lock" in rule.splitlines()[0] and "requirements.lock" in rule.splitlines()[0]
    assert "-r requirements.runtime.lock -r requirements.lock" in rule
