"""Write requirements.runtime.lock: the part of requirements.lock the product needs at run time.

    python scripts/split_lock.py            # rewrite requirements.runtime.lock
    python scripts/split_lock.py --check    # exit 1 if it is out of date (the tests do this)

The rule, mechanical so that it can be re-applied after any change to requirements.lock (a new
pin, a merge): the runtime lock holds every package of requirements.lock reachable from the roots
named in requirements.runtime.in, following the lock's own "# via" annotations (package X
"via Y" means Y needs X), with exactly the lock's versions. Nothing is resolved again, so the two
files cannot disagree. requirements.lock stays the development lock (`make test`, `make demo`):
the runtime lock plus the development tools (pytest, playwright, duckdb, ruff, hypothesis...).

A root that requirements.lock does not pin yet is reported on stderr and skipped: pin it in
requirements.lock (with its dependencies), then run this again.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
ROOTS = REPO / "requirements.runtime.in"
RUNTIME = REPO / "requirements.runtime.lock"

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>\S+)")
HEADER = """\
# The run-time dependencies of bonewatch (the Docker image installs this file), generated from
# requirements.lock by `python scripts/split_lock.py` from the roots in requirements.runtime.in.
# Do not edit: change requirements.lock or requirements.runtime.in and run the script again.
"""


def normalize(name: str) -> str:
    """PEP 503: `Foo_Bar.baz` and `foo-bar-baz` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, dict]:
    """{normalized name: {"line": "name==version", "via": [parents]}} of a uv-style lock."""
    entries: dict[str, dict] = {}
    current = None
    for raw in text.splitlines():
        match = PIN.match(raw)
        if match:
            current = {"line": raw.strip(), "name": match["name"], "version": match["version"], "via": []}
            entries[normalize(match["name"])] = current
            continue
        comment = raw.strip()
        if current is None or not comment.startswith("#"):
            continue
        body = comment.lstrip("#").strip()
        if body.startswith("via"):
            body = body[3:].strip()
        if body:
            current["via"].append(body)
    return entries


def read_roots(text: str) -> list[str]:
    """The root names of requirements.runtime.in (one requirement a line; specifiers ignored)."""
    roots = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            roots.append(normalize(re.split(r"[\[<>=!~;\s]", line, maxsplit=1)[0]))
    return roots


def runtime_closure(entries: dict[str, dict], roots: list[str]) -> tuple[set[str], list[str]]:
    """(the names reachable from `roots` through the "via" edges, the roots the lock lacks)."""
    needs: dict[str, set[str]] = {name: set() for name in entries}
    for name, entry in entries.items():
        for parent in entry["via"]:
            parent = normalize(parent)
            if parent in needs:
                needs[parent].add(name)
    missing = [root for root in roots if root not in entries]
    seen: set[str] = set()
    todo = [root for root in roots if root in entries]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(needs[name] - seen)
    return seen, missing


def render(entries: dict[str, dict], keep: set[str], roots: list[str]) -> str:
    """The runtime lock: the kept pins in the lock's order, each with its runtime parents."""
    out = [HEADER]
    for name, entry in entries.items():
        if name not in keep:
            continue
        parents = sorted({normalize(p) for p in entry["via"] if normalize(p) in keep})
        if name in roots:
            parents.insert(0, "-r requirements.runtime.in")
        out.append(entry["line"] + "\n")
        if len(parents) == 1:
            out.append(f"    # via {parents[0]}\n")
        elif parents:
            out.append("    # via\n" + "".join(f"    #   {p}\n" for p in parents))
    return "".join(out)


def build() -> tuple[str, list[str]]:
    entries = parse_lock(LOCK.read_text(encoding="utf-8"))
    roots = read_roots(ROOTS.read_text(encoding="utf-8"))
    keep, missing = runtime_closure(entries, roots)
    return render(entries, keep, roots), missing


def main(argv: list[str]) -> int:
    text, missing = build()
    for root in missing:
        print(f"split_lock: {root} is in requirements.runtime.in but not pinned in requirements.lock: skipped",
              file=sys.stderr)
    if "--check" in argv:
        if not RUNTIME.exists() or RUNTIME.read_text(encoding="utf-8") != text:
            print("requirements.runtime.lock is out of date: run python scripts/split_lock.py", file=sys.stderr)
            return 1
        return 0
    RUNTIME.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
