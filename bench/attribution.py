"""Where a bench step's time goes, by part of the system, in every thread: a sampling profiler.

    with attribution.sampling() as sampler:
        run_the_step()
    report = sampler.report()      # JSON-able

cProfile sees only the thread that started it; ingest writes to the store on a second thread
("store-<feed>", `pipeline._load`). Here a daemon thread wakes every ~10 ms (`time.sleep`), takes
`sys._current_frames()` and, for every other thread, classifies the thread's stack into one
category and counts one sample for (thread kind, category). Thread kinds: "main", "writer" (the
thread's name starts with "store-") and "other".

How a sample is classified (the stack is walked from the innermost frame outwards, modules by
`frame.f_globals["__name__"]`):

1. "idle (waiting for the other thread)": the innermost frame is a wait in `threading.py` or
   `queue.py` (`wait`, `get`, `put`, `join`, ...): the reader waiting to hand a chunk over, the
   writer waiting for one.
2. "imports": any frame of the stack is importlib's machinery (`co_filename` contains
   "importlib._bootstrap", i.e. `<frozen importlib._bootstrap>` and `_bootstrap_external`; not
   `importlib.resources`): an import in progress, whoever asked for it.
3. The first frame, from the innermost outwards, that belongs to one of these decides:
   "validation (Great Expectations)" for `great_expectations.*` and `bonewatch.quality`
   (GX counts as validation even when called from elsewhere), "parsing" for `bonewatch.ingest`
   (reader, parsing, feeds, sources, HL7, FHIR), "rules" for `bonewatch.rules` and
   `bonewatch.incremental`, "store" for `bonewatch.store` (reads, writes, state, alerts, courses).
   So pandas called from the parser is parsing, SQLAlchemy called from `bonewatch.store` is store.
4. "store" again when no such frame exists but the innermost frame is in `sqlalchemy`, `psycopg`,
   `adbc_driver_*` or `sqlite3` (e.g. the engine's migration called from `bonewatch.pipeline`).
5. "other": the rest (pipeline glue, configuration, bench code, the interpreter's shutdown).

Per category the report also keeps "inner": which library the innermost Python frame belongs to
(the top-level package of its module: pandas, numpy, pyarrow, sqlalchemy, bonewatch, ...), the
three largest shares. And "python_share": the fraction of the main thread's samples whose
innermost frame is our own Python code (`bonewatch.*`) rather than a library's.

The limit: a sampler made of Python sees Python frames only. A thread inside a C function
(SQLite's `executemany`, Arrow compute, a numpy kernel, a regex) is seen at the Python frame that
called it. So "store" includes SQLite's C time when `bonewatch.store` called it (what we want),
and an "inner" of "bonewatch" means our Python code or a C function it called directly (the
sqlite3 module's `executemany` is such a call). A sample is taken only when the sampler holds
the GIL, so a thread that holds the GIL for a long C call without releasing it delays the sample
rather than being missed; `seconds` are samples times the measured mean interval (elapsed time /
wakes: `time.sleep` overshoots on a loaded machine), so they add up to the step's wall time.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager

IDLE = "idle (waiting for the other thread)"
IMPORTS = "imports"
VALIDATION = "validation (Great Expectations)"
PARSING = "parsing"
RULES = "rules"
STORE = "store"
OTHER = "other"

# module prefix -> category, for step 3 (first match from the innermost frame outwards)
_PACKAGES = (("great_expectations", VALIDATION), ("bonewatch.quality", VALIDATION),
             ("bonewatch.ingest", PARSING), ("bonewatch.rules", RULES), ("bonewatch.incremental", RULES),
             ("bonewatch.store", STORE))
_DRIVERS = ("sqlalchemy", "psycopg", "adbc_driver_", "sqlite3")      # step 4: innermost frame
_WAITS = {"wait", "get", "put", "join", "_wait_for_tstate_lock", "acquire"}


def _module_category(name: str) -> str | None:
    for prefix, category in _PACKAGES:
        if name == prefix or name.startswith(prefix + "."):
            return category
    return None


def _library(name: str) -> str:
    return name.split(".", 1)[0] or "?"


def thread_kind(name: str, is_main: bool) -> str:
    if is_main:
        return "main"
    return "writer" if name.startswith("store-") else "other"


class Sampler:
    """Counts (thread kind, category) and the innermost frame's library, every `interval` s."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.counts: dict[str, Counter] = defaultdict(Counter)          # kind -> category -> n
        self.inner: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (kind, category) -> lib -> n
        self.ours: Counter = Counter()                                  # main: innermost is bonewatch.*
        self.threads: dict[str, set[str]] = defaultdict(set)            # kind -> thread names seen
        self.wakes = 0
        self.elapsed = 0.0
        self._categories: dict[str, str | None] = {}    # module name -> category (a cache)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attribution-sampler", daemon=True)

    # -- classification ---------------------------------------------------------------------------
    def _category_of(self, module: str) -> str | None:
        try:
            return self._categories[module]
        except KeyError:
            found = self._categories[module] = _module_category(module)
            return found

    def classify(self, frame) -> tuple[str, str]:
        """(category, library of the innermost frame) for a thread's innermost frame."""
        code = frame.f_code
        module = frame.f_globals.get("__name__") or ""
        library = _library(module)
        filename = code.co_filename
        if code.co_name in _WAITS and filename.endswith(("threading.py", "queue.py")):
            return IDLE, library
        found = None
        f = frame
        while f is not None:
            if "importlib._bootstrap" in f.f_code.co_filename or "importlib/_bootstrap" in f.f_code.co_filename:
                return IMPORTS, library
            if found is None:
                found = self._category_of(f.f_globals.get("__name__") or "")
            f = f.f_back
        if found is None:
            found = STORE if module.startswith(_DRIVERS) else OTHER
        return found, library

    # -- sampling -----------------------------------------------------------------------------------
    def sample(self, frames: dict, names: dict[int, str], main_id: int, own_id: int) -> None:
        for ident, frame in frames.items():
            if ident == own_id:
                continue
            name = names.get(ident, "")
            kind = thread_kind(name, ident == main_id)
            self.threads[kind].add(name)
            category, library = self.classify(frame)
            self.counts[kind][category] += 1
            self.inner[(kind, category)][library] += 1
            if kind == "main":
                self.ours[library == "bonewatch"] += 1

    def _run(self) -> None:
        own_id, main_id = threading.get_ident(), threading.main_thread().ident
        names: dict[int, str] = {}
        started = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(self.interval)
            frames = sys._current_frames()
            if any(ident not in names for ident in frames):
                names = {t.ident: t.name for t in threading.enumerate()}
            self.sample(frames, names, main_id, own_id)
            del frames
            self.wakes += 1
        self.elapsed = time.perf_counter() - started

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    # -- the report ---------------------------------------------------------------------------------
    def report(self) -> dict:
        """{"interval_ms", "mean_interval_ms", "samples", "seconds", "python_share", "threads" (names
        seen per kind, ten at most), "by_thread": {kind: {category: {"share", "seconds", "inner": {library: share}}}}}; shares
        are of the thread kind's samples, categories largest first."""
        mean = self.elapsed / self.wakes if self.wakes else 0.0
        by_thread: dict[str, dict] = {}
        for kind in sorted(self.counts, key=("main", "writer", "other").index):
            counts = self.counts[kind]
            total = sum(counts.values())
            by_thread[kind] = {}
            for category, n in counts.most_common():
                inner = self.inner[(kind, category)]
                by_thread[kind][category] = {
                    "share": round(n / total, 3), "seconds": round(n * mean, 2),
                    "inner": {lib: round(m / n, 3) for lib, m in inner.most_common(3)}}
        main = sum(self.ours.values())
        return {"interval_ms": round(self.interval * 1000, 3), "mean_interval_ms": round(mean * 1000, 3),
                "samples": self.wakes, "seconds": round(self.elapsed, 2),
                "python_share": round(self.ours[True] / main, 3) if main else None,
                "threads": {kind: sorted(names)[:10] for kind, names in self.threads.items()},
                "by_thread": by_thread}


@contextmanager
def sampling(interval: float = 0.01):
    """Sample every thread while the block runs; `report()` after the block."""
    sampler = Sampler(interval).start()
    try:
        yield sampler
    finally:
        sampler.stop()


def summary(report: dict) -> str:
    """One line: `main: store 41% (123 s), parsing 20%, ...; writer: store 95%, idle 5%`. Threads
    of kind "other" (tqdm's monitor, a GX thread pool) are left out while they are idle 95 % of the
    time or more; the report keeps them."""
    parts = []
    for kind, categories in report["by_thread"].items():
        if kind == "other" and categories.get(IDLE, {}).get("share", 0) >= 0.95:
            continue
        cells = []
        for i, (category, figures) in enumerate(categories.items()):
            if i and round(100 * figures["share"]) < 1:
                continue
            name = "idle" if category == IDLE else category
            cell = f"{name} {100 * figures['share']:.0f}%"
            if i == 0:
                cell += f" ({figures['seconds']:.1f} s)"
            cells.append(cell)
        parts.append(f"{kind}: " + ", ".join(cells))
    if report.get("python_share") is not None:
        parts.append(f"our Python code innermost in {100 * report['python_share']:.0f}% of main's samples")
    return "; ".join(parts)
