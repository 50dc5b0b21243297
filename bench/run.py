"""`make bench`: the backfill, a night and a rerun on SQLite and PostgreSQL, against DuckDB.

    python -m bench.run [--scales 100k,1M,10M] [--stores sqlite,postgresql] [--chunk-size N]
                        [--profile | --attribute]

For each scale (backfill lab rows; about 100 rows a patient) it generates the feeds once
(bench/generate.py, fixed seed, reused from bench/out/), times the DuckDB reference on the same
lab CSV, then for each store: a backfill into a fresh store (ingest + validate + store +
evaluate; its evaluation covers every patient, so it is also the scaling measurement). At the largest
scale it also runs the night (the night's deliveries over the backfilled store, then the
incremental evaluation) and a rerun of the same night (nothing new). Every step runs in its own
process (bench/steps.py) which reports its wall time and peak RSS. `--attribute` samples every
thread of every step every 10 ms (bench/attribution.py) and prints, after the table, where the
backfill's, night's and rerun's time went by thread: store, parsing, validation, rules, imports.

Writes bench/results.json, prints a table, and ends with one line:
`bench: backfill R1x floor, night R2x floor, rerun R3x floor, peak RSS N MiB` (ratios to the
DuckDB time of the largest scale in this run, the worse of the two stores; RSS of the largest
backfill).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from bench import attribution
from bench.generate import LAST_HISTORY_DAY, generate

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
PG_ADMIN = os.environ.get("BONEWATCH_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SCALES = {"100k": 100_000, "1M": 1_000_000, "10M": 10_000_000}


def run_step(step: str, args: dict) -> dict:
    """Run one step in a fresh interpreter; return its JSON report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")}
    done = subprocess.run([sys.executable, "-m", "bench.steps", step, json.dumps(args)], cwd=ROOT.parent,
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"bench: step {step} failed ({args.get('url', args.get('csv'))})")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Store:
    """A throwaway store: a SQLite file under bench/out/stores, or a PostgreSQL database."""

    def __init__(self, kind: str, label: str):
        self.kind = kind
        if kind == "sqlite":
            folder = OUT / "stores"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{label}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            self.path, self.url = path, f"sqlite:///{path}"
        else:
            import psycopg

            self.name = f"bonewatch_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{self.name}"')
            self.url = PG_ADMIN.rsplit("/", 1)[0] + f"/{self.name}"

    def drop(self) -> None:
        if self.kind == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        else:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="100k,1M,10M")
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--chunk-size", type=int, default=100_000,
                        help="[ingest] chunk_size for the bench (rows a chunk)")
    parser.add_argument("--profile", action="store_true", help="cProfile every step into bench/out/prof/")
    parser.add_argument("--attribute", action="store_true",
                        help="sample every thread every 10 ms and attribute each step's time to store, parsing, "
                             "validation, rules, imports")
    parser.add_argument("--formats-scale", default="100k",
                        help="scale at which the labs are also ingested as HL7, a FHIR Bundle and NDJSON ('' = skip)")
    parser.add_argument("--small-files", type=int, default=300,
                        help="one-row files ingested into a fresh SQLite store: the cost a file (0 = skip)")
    options = parser.parse_args()
    if options.profile and options.attribute:
        parser.error("--profile and --attribute exclude each other (the sampler would see cProfile's cost)")
    scales = [s.strip() for s in options.scales.split(",") if s.strip()]
    stores = [s.strip() for s in options.stores.split(",") if s.strip()]
    data_dir = OUT / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    prof = OUT / "prof"
    if options.profile:
        prof.mkdir(parents=True, exist_ok=True)
    results: dict = {"chunk_size": options.chunk_size, "cores": os.cpu_count(), "scales": {}}

    def args_for(store: Store, scale: str, step: str, **extra) -> dict:
        args = {"url": store.url, "data_dir": str(data_dir), "chunk_size": options.chunk_size, **extra}
        if options.profile:
            args["profile"] = str(prof / f"{scale}-{store.kind}-{step}.prof")
        if options.attribute:
            args["attribute"] = True
        return args

    for scale in scales:
        feeds = generate(OUT, SCALES[scale])
        entry = {"rows": feeds.rows, "patients": feeds.patients, "csv_mib": round(feeds.meta["history_bytes"] / 2**20, 1),
                 "night_rows": feeds.meta["night_rows"], "stores": {}}
        entry["duckdb"] = run_step("duckdb", {"csv": str(feeds.history_labs)})
        print(f"{scale}: duckdb {entry['duckdb']['seconds']:.2f}s", flush=True)
        for kind in stores:
            store = Store(kind, f"{scale}-{kind}")
            try:
                steps = {}
                steps["backfill"] = run_step("backfill", args_for(
                    store, scale, "backfill", labs=str(feeds.history_labs), events=str(feeds.history_events),
                    as_of=LAST_HISTORY_DAY.isoformat()))
                if scale == scales[-1]:
                    night = {"night_dir": str(feeds.night_dir), "as_of": feeds.night.isoformat()}
                    steps["night"] = run_step("night", args_for(store, scale, "night", **night))
                    steps["rerun"] = run_step("rerun", args_for(store, scale, "rerun", **night))
                    # the EHR's calls, on the store of the bench's size (issue 17)
                    entry.setdefault("cds_hooks", {})[kind] = run_step("cds_hooks", args_for(store, scale, "cds_hooks"))
                entry["stores"][kind] = steps
                print(f"{scale} {kind}: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in steps.items()), flush=True)
            finally:
                store.drop()
        if scale == options.formats_scale and "sqlite" in stores:
            entry["formats"] = {}
            csv_backfill = entry["stores"]["sqlite"]["backfill"]
            written = run_step("write_formats", {"out": str(OUT), "rows": SCALES[scale]})["paths"]
            for fmt, path in written.items():
                store = Store("sqlite", f"{scale}-{fmt}")
                try:
                    entry["formats"][fmt] = run_step("ingest_format", args_for(store, scale, f"ingest-{fmt}",
                                                                               path=str(path)))
                finally:
                    store.drop()
            print(f"{scale} formats: csv labs+events {csv_backfill['ingest_s']:.1f}s, " + ", ".join(
                f"{fmt} labs {r['seconds']:.1f}s" for fmt, r in entry["formats"].items()), flush=True)
        results["scales"][scale] = entry
    if options.small_files and "sqlite" in stores:
        store = Store("sqlite", f"small-files-{options.small_files}")
        try:
            results["small_files"] = run_step("small_files", args_for(store, "small", "small-files",
                                                                      files=options.small_files))
        finally:
            store.drop()
    (ROOT / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print_table(results, scales, stores)


def print_table(results: dict, scales: list[str], stores: list[str]) -> None:
    rows = [("scale", "store", "step", "rows", "patients", "seconds", "x duckdb", "peak RSS MiB", "notes")]
    for scale in scales:
        entry = results["scales"][scale]
        floor = entry["duckdb"]["seconds"]
        rows.append((scale, "duckdb", "read + baseline/latest/delta", entry["rows"], entry["patients"],
                     f"{floor:.2f}", "1.0", f"{entry['duckdb']['peak_rss_mib']:.0f}", f"{entry['csv_mib']} MiB CSV"))
        for kind in stores:
            for step, r in entry["stores"].get(kind, {}).items():
                note = ""
                if step == "backfill":
                    note = (f"ingest {r['ingest_s']:.1f}s ({(r['accepted'] + r['quarantined']) / r['ingest_s'] / 1000:.0f}k "
                            f"rows/s, labs + events) + evaluate {r['evaluate_s']:.1f}s "
                            f"({1000 * r['evaluate_s'] / max(r['patients'], 1):.2f}s per 1k patients)")
                elif step in ("night", "rerun"):
                    note = (f"ingest {r['ingest_s']:.1f}s + evaluate {r['evaluate_s']:.1f}s "
                            f"({r['patients']} patients re-evaluated)")
                if parts := r.get("ingest_parts"):
                    note += " [ingest: " + ", ".join(f"{part} {value:.1f}s" for part, value in parts.items()) + "]"
                if (parts := r.get("evaluate_parts")) and r.get("patients"):
                    note += " [evaluate: " + ", ".join(f"{part} {value:.1f}s" for part, value in parts.items()) + "]"
                if rss := r.get("rss_mib"):
                    note += (f" [RSS MiB: ingest peak {rss['ingest_peak']:.0f}, after ingest {rss['after_ingest']:.0f},"
                             f" evaluate peak {rss['evaluate_peak']:.0f}]")
                rows.append((scale, kind, step, entry["rows"] if step != "night" else entry["night_rows"],
                             r.get("patients", ""), f"{r['seconds']:.2f}", f"{r['seconds'] / floor:.1f}",
                             f"{r['peak_rss_mib']:.0f}", note))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    for scale in scales:
        for kind in stores:
            for step, r in results["scales"][scale]["stores"].get(kind, {}).items():
                if step in ("backfill", "night", "rerun") and r.get("attribution"):
                    print(f"attribution {scale} {kind} {step}, {attribution.summary(r['attribution'])}")
    for scale in scales:
        for fmt, r in results["scales"][scale].get("formats", {}).items():
            total = r["accepted"] + r["quarantined"]
            print(f"ingest as {fmt} ({scale} lab rows, SQLite): {r['seconds']:.1f}s, "
                  f"{total / max(r['seconds'], 1e-9) / 1000:.0f}k rows/s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    if small := results.get("small_files"):
        print(f"ingest of {small['files']} one-row files (SQLite): {small['seconds']:.1f}s, "
              f"{small['ms_per_file']:.0f} ms a file ({small['cpu_ms_per_file']:.0f} ms CPU)")
    for kind, r in results["scales"][scales[-1]].get("cds_hooks", {}).items():
        print(f"CDS Hooks ({kind}, {scales[-1]} store, a patient with 5 years of history): patient-view "
              f"{r['patient_view_ms']:.0f} ms ({r['patient_view_cpu_ms']:.0f} ms CPU), order-sign "
              f"{r['order_sign_ms']:.0f} ms ({r['order_sign_cpu_ms']:.0f} ms CPU), medians; first calls "
              f"{r['patient_view_first_ms']:.0f} / {r['order_sign_first_ms']:.0f} ms")
    # evaluation slope: the backfill's evaluation is a full one (every patient is new)
    for kind in stores:
        cells = []
        for scale in scales:
            r = results["scales"][scale]["stores"].get(kind, {}).get("backfill")
            if r:
                cells.append(f"{r['patients']} patients {r['evaluate_s']:.1f}s "
                             f"({1000 * r['evaluate_s'] / max(r['patients'], 1):.2f}s per 1k)")
        print(f"evaluation slope ({kind}): " + ", ".join(cells))
    last = results["scales"][scales[-1]]
    floor = last["duckdb"]["seconds"]
    steps = [last["stores"][k] for k in stores if k in last["stores"]]

    def worst(step: str) -> float:
        return max((s[step]["seconds"] for s in steps if step in s), default=float("nan")) / floor

    rss = max((s["backfill"]["peak_rss_mib"] for s in steps), default=float("nan"))
    print(f"bench: backfill {worst('backfill'):.1f}x floor, night {worst('night'):.1f}x floor, "
          f"rerun {worst('rerun'):.2f}x floor, peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT.parent))
    if "--clean" in sys.argv:
        shutil.rmtree(OUT, ignore_errors=True)
        sys.argv.remove("--clean")
    main()
