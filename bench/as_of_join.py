"""The training set's point-in-time as-of join (training/dataset.py as_of_join) before/after on one Spark slice.

    .venv/bin/python bench/as_of_join.py                      # 200k labels, 2 years of daily snapshots, vs c71f4af
    .venv/bin/python bench/as_of_join.py --labels 50000 --ref HEAD~1

Labels over 2 years joined to daily item snapshots (the costly side: every label of an item met all of the
item's ~730 snapshots under a key-only join) and user snapshots, with the function as of git `--ref` (exec'd
from `git show`) and the working tree's; prints CPU (the local JVM + this process) and wall
seconds of each and checks the joined rows are equal as sorted sets. Not a test.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DAY = 86_400_000


def frames(n_labels: int, n_users: int, n_items: int, days: int, seed: int):
    rng = np.random.default_rng(seed)
    t0 = 1_600_000_000_000 // DAY * DAY
    ts = t0 + rng.integers(DAY, days * DAY, n_labels)
    lab = pd.DataFrame({"event_id": [f"e{i}" for i in range(n_labels)],
                        "user_id": np.char.add("u", rng.integers(0, n_users, n_labels).astype(str)),
                        "item_id": np.char.add("i", (rng.zipf(1.3, n_labels) % n_items).astype(str)),
                        "timestamp": ts})
    d = np.arange(days)
    item_snaps = pd.DataFrame({"item_id": np.repeat([f"i{i}" for i in range(n_items)], days),
                               "feature_ts": np.tile(t0 + d * DAY, n_items),
                               "item_clicks_7d": rng.random(n_items * days)})
    item_snaps["category"], item_snaps["publish_ts"] = "c", 0
    # users: a snapshot on the days they were active (a random subset)
    keep = rng.random(n_users * days) < 0.05
    user_snaps = pd.DataFrame({"user_id": np.repeat([f"u{i}" for i in range(n_users)], days)[keep],
                               "feature_ts": np.tile(t0 + d * DAY, n_users)[keep],
                               "user_clicks_30d": rng.random(int(keep.sum()))})
    return lab, user_snaps, item_snaps


def old_as_of_join(ref: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:training/dataset.py"], check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType("dataset_at_ref")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(src, f"{ref}:training/dataset.py", "exec"), module.__dict__)
    return module.as_of_join


def jvm_cpu(spark) -> float:
    """CPU seconds of the local-mode JVM (driver and executors are its threads) plus this Python process."""
    pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    t = os.times()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + t.user + t.system


def run(spark, fn, lab, us, its):
    c0, w0 = jvm_cpu(spark), time.perf_counter()
    joined = fn(spark, fn(spark, lab, us, "user_id", 1), its, "item_id", 1)
    rows = joined.toPandas()
    return rows, jvm_cpu(spark) - c0, time.perf_counter() - w0


def digest(df: pd.DataFrame) -> str:
    df = df[sorted(df.columns)].sort_values("event_id").reset_index(drop=True)
    return hashlib.sha256(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, default=200_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--days", type=int, default=730)
    p.add_argument("--ref", default="c71f4af")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    from pyspark.sql import SparkSession

    from training.dataset import as_of_join as new

    spark = (SparkSession.builder.master("local[2]").config("spark.sql.shuffle.partitions", "8")
             .config("spark.ui.enabled", "false").getOrCreate())
    lab, us, its = frames(a.labels, a.users, a.items, a.days, a.seed)
    print(f"slice: {len(lab):,} labels, {len(us):,} user snapshots, {len(its):,} item snapshots")
    s = [spark.createDataFrame(f).cache() for f in (lab, us, its)]
    for f in s:
        f.count()
    before, bc, bw = run(spark, old_as_of_join(a.ref), *s)
    after, ac, aw = run(spark, new, *s)
    print(f"before ({a.ref}): cpu {bc:.1f} s  wall {bw:.1f} s")
    print(f"after (worktree): cpu {ac:.1f} s  wall {aw:.1f} s   cpu ratio {bc / max(ac, 1e-9):.1f}x")
    hb, ha = digest(before), digest(after)
    print(f"rows {len(before):,} / {len(after):,}; sorted-row sha256 {hb} / {ha}; identical: {hb == ha}")
    spark.stop()
    if hb != ha:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
