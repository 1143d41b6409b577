"""Spark reading the lake: the `kairos_delta` data source (delta-rs on the executors) beside Spark's own parquet
reader, on a local lake and on an S3 lake (moto's server on loopback), local[2] and a standalone master.

    .venv/bin/python bench/lake_read.py                          # 1M events, local[2] and standalone
    .venv/bin/python bench/lake_read.py --events 1000000 5000000 --no-standalone

One process writes a silver-shaped events table (seeded, 30 daily partitions) with delta-rs to a local folder and
to an S3 bucket, then for each configuration reads the pinned version and runs the aggregation a feature job
starts with (count, distinct users, dwell sum per event type) three times. It prints seconds per million events
(median of the three, side by side in one run: compare ratios, not absolute numbers, on a shared machine), the CPU
seconds of the Spark processes per million (driver JVM, and the worker with its executors on the standalone master, with their Python workers), and the peak
RSS of those process trees
during the reads (bounded by partition, not by table size, if it does not grow with events).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DAY_MS = 86_400_000


def events_frame(n: int, seed: int = 7):
    """A silver-shaped table of `n` events over 30 days (seeded)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    ts = 1_767_225_600_000 + rng.integers(0, 30 * DAY_MS, n)
    return pd.DataFrame({
        "event_id": [f"e{i:09d}" for i in range(n)],
        "user_id": [f"u{u:06d}" for u in rng.integers(0, max(n // 50, 10), n)],
        "item_id": [f"i{i:05d}" for i in rng.integers(0, 5_000, n)],
        "event_type": rng.choice(["impression", "click", "purchase", "share", "skip"], n, p=[.7, .2, .03, .02, .05]),
        "timestamp": ts,
        "session_id": [f"s{s:08d}" for s in rng.integers(0, max(n // 20, 10), n)],
        "dwell_time_ms": rng.integers(0, 120_000, n),
        "event_date": pd.to_datetime(ts, unit="ms", utc=True).strftime("%Y-%m-%d"),
    })


class TreeSampler:
    """CPU seconds and peak RSS of a process tree (the Spark JVM and its Python workers), sampled every 50 ms."""

    def __init__(self, *pids: int) -> None:
        import psutil

        self.roots = [psutil.Process(p) for p in pids]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self):
        out = []
        for root in self.roots:
            try:
                out += [root, *root.children(recursive=True)]
            except Exception:  # noqa: BLE001
                out.append(root)
        return out

    def cpu(self) -> float:
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
            except Exception:  # noqa: BLE001 - a worker that exited
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = 0
            for p in self._tree():
                try:
                    rss += p.memory_info().rss
                except Exception:  # noqa: BLE001
                    continue
            self.peak = max(self.peak, rss)
            time.sleep(0.05)

    def __enter__(self) -> "TreeSampler":
        self.peak = 0
        self.cpu0 = self.cpu()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_s = self.cpu() - self.cpu0


def _jvm_pid(spark) -> int:
    return int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())


def measure(spark, lake, table: str, reader: str, n: int, extra_pids: tuple[int, ...] = (), repeats: int = 3) -> dict:
    from pyspark.sql import functions as F

    from lake.spark_read import spark_read

    version = lake.version(table)
    walls = []
    with TreeSampler(_jvm_pid(spark), *extra_pids) as sampler:
        for _ in range(repeats):
            t0 = time.perf_counter()
            frame = spark_read(spark, lake, table, version, reader=reader)
            rows = (frame.groupBy("event_type")
                    .agg(F.count("*").alias("n"), F.countDistinct("user_id").alias("users"),
                         F.sum("dwell_time_ms").alias("dwell")).collect())
            walls.append(time.perf_counter() - t0)
            assert sum(r["n"] for r in rows) == n, (sum(r["n"] for r in rows), n)
    m = n / 1e6
    return {"s_per_M": round(statistics.median(walls) / m, 2), "cpu_s_per_M": round(sampler.cpu_s / repeats / m, 2),
            "peak_rss_gb": round(sampler.peak / 1e9, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--no-standalone", action="store_true", help="skip the standalone master")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from lake.delta import DeltaLake
    from lake.spark import spark_session, stop_session
    from orchestration.services import start_spark_standalone
    from tests._engines import moto_endpoint, new_bucket, s3_env

    work = Path(tempfile.mkdtemp(prefix="kairos-bench-lake-"))
    os.environ["KAIROS_HOME"] = str(work / "home")
    endpoint = moto_endpoint(work)
    os.environ.update(s3_env(endpoint))
    bucket = new_bucket(endpoint)
    lakes = {"local": DeltaLake(str(work / "lake")), "s3": DeltaLake(f"s3://{bucket}/lake")}
    tables = {}
    for n in args.events:
        frame = events_frame(n)
        for name, lake in lakes.items():
            t0 = time.perf_counter()
            lake.write(f"events_{n}", frame, partition_by=["event_date"])
            print(f"[write] {n:,} events to the {name} lake with delta-rs: {time.perf_counter() - t0:.1f} s", flush=True)
        tables[n] = f"events_{n}"
        del frame
    masters = [("local[2]", None)]
    if not args.no_standalone:
        master, worker = start_spark_standalone(work / "spark", cores=2, memory="2g")
        masters.append((master.url, (master, worker)))
    configs = [("local", "hadoop"), ("local", "python"), ("s3", "python")]
    results = []
    step, total = 0, len(masters) * len(args.events) * len(configs)
    for master, services in masters:
        stop_session()
        conf = {"spark.executor.memory": "1g"} if services else {}
        os.environ["KAIROS_SPARK_ALLOW_LOCAL_LAKE"] = "1"  # same machine: the worker does mount the local lake
        spark = spark_session(master, conf=conf)
        spark.range(1000).count()  # warm up the JVM and the executors
        for n in args.events:
            for lake_name, reader in configs:
                step += 1
                r = measure(spark, lakes[lake_name], tables[n], reader, n,
                            extra_pids=(services[1].process.pid,) if services else ())
                kind = "standalone" if services else master
                results.append({"master": kind, "lake": lake_name, "reader": reader, "events": n, **r})
                print(f"[{step}/{total}] {kind:<10} {lake_name:<5} {reader:<6} {n:>10,} events: {r['s_per_M']:6.2f} s/M, "
                      f"{r['cpu_s_per_M']:6.2f} CPU s/M, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        stop_session()
        if services:
            for s in services[::-1]:
                s.stop()
    print("\n| master | lake | reader | events | s/M (median of 3) | Spark CPU s/M | peak RSS of the Spark tree |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['master']} | {r['lake']} | {r['reader']} | {r['events']:,} | {r['s_per_M']} | {r['cpu_s_per_M']} | "
              f"{r['peak_rss_gb']} GB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
