"""Ingestion benchmark: bronze → contract, dedup, bots → silver + quarantine → labels, through real Dagster runs.

    .venv/bin/python bench/ingest.py                      # 1M and 5M simulated events
    .venv/bin/python bench/ingest.py --events 1000000     # one size
    .venv/bin/python bench/ingest.py --events 1000000 --engine pandas spark   # both engines (silver and labels), same run

Each size runs in its own process (so its peak RSS is its own) against a fresh lake:
simulate (reported, not counted), then one range-backfill run of the daily
partitioned event assets, then the labels asset. Prints seconds per million events
per stage and the peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVENTS_PER_USER = 82_828 / 300  # the default world: 300 users, 14 days -> ~83k events


def _one(target: int, engine: str = "pandas") -> dict:
    from dagster import DagsterInstance, materialize

    from assets.ingestion import (LABELS, SILVER, SourceConfig, bronze_events, labels, load_source, silver_events,
                                  source_partitions)
    from lake.delta import DeltaLake
    from assets.resources import ArtifactsResource, LakeResource
    from ground.settings import Settings

    source = {"n_users": max(int(target / EVENTS_PER_USER), 10), "n_items": 2_000, "n_categories": 12, "days": 14,
              "seed": 7}
    t0 = time.perf_counter()
    events, _, _ = load_source(SourceConfig(**source))
    days = source_partitions(SourceConfig(**source))
    t_sim = time.perf_counter() - t0
    n = len(events)
    resources = {"lake": LakeResource(), "artifacts": ArtifactsResource()}
    with DagsterInstance.ephemeral() as instance:
        t1 = time.perf_counter()
        ingest = materialize([bronze_events, silver_events], instance=instance, resources=resources,
                             run_config={"ops": {"bronze_events": {"config": source},
                                                 "silver_events": {"config": {"engine": engine}}}},
                             tags={"dagster/asset_partition_range_start": days[0],
                                   "dagster/asset_partition_range_end": days[-1]})
        t_ingest = time.perf_counter() - t1
        steps = {e.step_key: e for e in ingest.all_events if e.event_type_value == "STEP_SUCCESS"}
        t2 = time.perf_counter()
        lab = materialize([labels], instance=instance, resources=resources,
                          run_config={"ops": {"labels": {"config": {"engine": engine}}}})
        t_labels = time.perf_counter() - t2
        assert ingest.success and lab.success
        checks = {e.check_name: e.passed for e in ingest.get_asset_check_evaluations()}
        meta = instance.get_latest_materialization_event(
            __import__("dagster").AssetKey(SILVER)).asset_materialization.metadata
    lake = DeltaLake(Settings.from_env().lake_uri)
    from lake.spark import stop_session

    stop_session()  # the JVM and its Python workers exit: their peak RSS lands in RUSAGE_CHILDREN
    step_s = {k: round(v.event_specific_data.duration_ms / 1000, 2) for k, v in steps.items()}
    return {
        "engine": engine, "events": n, "days": len(days), "simulate_s": round(t_sim, 1), "ingest_run_s": round(t_ingest, 1),
        "bronze_s": step_s.get("bronze_events"), "silver_s": step_s.get("silver_events"), "labels_s": round(t_labels, 1),
        "accepted": meta["accepted"].value, "quarantined": meta["quarantined"].value,
        "duplicates": meta["duplicates"].value, "bot_filtered": meta["bot_filtered"].value,
        "label_rows": lake.pin(LABELS).rows, "checks": checks,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "child_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 0),
        "cpu_s": round(sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                           for f in ("ru_utime", "ru_stime")), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--engine", nargs="+", default=["pandas"], choices=["pandas", "spark"],
                        help="silver_events and labels engine(s); each size runs once per engine, side by side")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-engine", default="pandas", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        logging.getLogger("kairos.spark").setLevel(logging.INFO)
        print(json.dumps(_one(args.one, args.one_engine)))
        return 0
    rows = []
    for target, engine in [(t, e) for t in args.events for e in args.engine]:
        with tempfile.TemporaryDirectory() as home:
            env = {**os.environ, "KAIROS_HOME": home, "DAGSTER_HOME": home}
            env.pop("KAIROS_LAKE_URI", None)
            print(f"[bench] {target:,} events, {engine} engine: simulating and ingesting (fresh lake in {home}) ...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--one", str(target), "--one-engine", engine], env=env, cwd=ROOT,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            for line in out.stderr.splitlines():  # the Spark steps' phase timings (ground.phases)
                if "phases:" in line or "; Spark session" in line:
                    print(f"[bench]   {line[line.find('silver'):][:600]}", flush=True)
            print(f"[bench] done: {r['events']:,} events in {r['ingest_run_s'] + r['labels_s']:.1f}s", flush=True)
    print("\nIngest + validate + dedup + bots + label (Dagster runs, Delta on local disk, 2 cores)")
    print(f"{'engine':>6} {'events':>10} {'days':>4} {'bronze s/M':>10} {'silver s/M':>10} {'labels s/M':>10} {'total s/M':>9} "
          f"{'peak RSS MB':>11} {'JVM+workers MB':>14} {'CPU s/M':>7}  accepted / quarantined / duplicates / bots, label rows, checks")
    for r in rows:
        m = r["events"] / 1e6
        total = r["ingest_run_s"] + r["labels_s"]
        print(f"{r['engine']:>6} {r['events']:>10,} {r['days']:>4} {r['bronze_s'] / m:>10.1f} {r['silver_s'] / m:>10.1f} "
              f"{r['labels_s'] / m:>10.1f} {total / m:>9.1f} {r['peak_rss_mb']:>11.0f} {r['child_peak_rss_mb']:>14.0f} "
              f"{r['cpu_s'] / m:>7.1f}  "
              f"{r['accepted']:,} / {r['quarantined']:,} / {r['duplicates']:,} / {r['bot_filtered']:,}, "
              f"{r['label_rows']:,}, {r['checks']}")
    print("(simulation time, not counted: " + ", ".join(f"{r['events']:,}: {r['simulate_s']}s" for r in rows) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
