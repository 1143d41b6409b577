"""Benchmark: what a right-to-be-forgotten request costs as the stores grow.

For each size it writes synthetic Delta tables (events partitioned by day, labels, a training
set, user features) and fills a real embedded Redis (feature-store user hashes under two versions,
session keys, an event stream and an impression stream), then runs `forget_user` for one user
with the immediate purge and with a 168 h retention policy, and prints seconds per step and rows
scanned per second. The delete predicate hashes the id (so the Delta log never names the user),
which means every file is scanned: the cost is linear in the table size.

    .venv/bin/python bench/privacy.py --rows 200000 1000000
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(root: Path, rows: int, users: int, seed: int = 7) -> None:
    """Synthetic lake tables with a user_id column (seeded)."""
    from lake.delta import DeltaLake

    rng = np.random.default_rng(seed)
    lake = DeltaLake(str(root / "lake"))
    uid = np.char.add("u", np.char.zfill(rng.integers(0, users, rows).astype(str), 6))
    ts = 1_767_225_600_000 + rng.integers(0, 14 * 86_400_000, rows)
    events = pd.DataFrame({"event_id": [f"e{i}" for i in range(rows)], "user_id": uid,
                           "session_id": np.char.add(uid, np.char.add("-s", (ts // 3_600_000 % 7).astype(str))),
                           "item_id": rng.integers(0, 5000, rows).astype(str), "timestamp": ts,
                           "event_date": pd.to_datetime(ts, unit="ms").strftime("%Y-%m-%d")})
    lake.write("silver_events", events, partition_by=["event_date"])
    lake.write("bronze_events", events, partition_by=["event_date"])
    lake.write("labels", events.sample(frac=0.5, random_state=seed).assign(label=rng.random(rows // 2)))
    lake.write("training_set", events.sample(frac=0.5, random_state=seed + 1).assign(f0=rng.random(rows // 2)))
    feats = pd.DataFrame({"user_id": np.unique(uid)}).assign(user_clicks_7d=1.0, feature_ts=0)
    lake.write("user_features", feats)


def fill_redis(client, users: int, sessions_per_user: int = 2, stream_entries: int = 50_000) -> None:
    import json

    from features.online_keys import user_key

    pipe = client.pipeline(transaction=False)
    for v in ("v1", "v2"):
        client.zadd("kairos:fs:versions", {v: time.time()})
        for u in range(users):
            pipe.hset(user_key(v, f"u{u:06d}"), mapping={"user_clicks_7d": "1.0"})
    client.set("kairos:fs:current", "v2")
    for u in range(users):
        for s in range(sessions_per_user):
            pipe.set(f"kairos:session:u{u:06d}-s{s}", "{}")
    for i in range(stream_entries):
        u = i % users
        pipe.xadd("kairos:events", {"event": json.dumps({"user_id": f"u{u:06d}", "event_id": f"live{i}",
                                                         "session_id": f"u{u:06d}-s0"})})
    pipe.execute()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--users", type=int, default=10_000)
    args = parser.parse_args(argv)
    from compliance.forget import forget_user
    from ground.settings import Settings, redis_client
    from orchestration.services import start_redis

    print(f"{'rows/table':>11} {'policy':>9} {'redis s':>8} {'delta s':>8} {'total s':>8} {'rows scanned/s':>15} "
          f"{'deleted':>8}")
    for rows in args.rows:
        for policy in (0.0, 168.0):
            root = Path(tempfile.mkdtemp(prefix="kairos-bench-forget-"))
            os.environ["KAIROS_HOME"] = str(root)
            os.environ.pop("KAIROS_LAKE_URI", None)
            build(root, rows, args.users)
            server = start_redis(root / "redis")
            client = redis_client(server.url)
            fill_redis(client, args.users)
            settings = Settings.from_env()
            from compliance import forget as f

            t0 = time.perf_counter()
            sessions, events = f._user_sessions_and_events(f.DeltaLake(settings.lake_uri),
                                                           f.user_tables(f.DeltaLake(settings.lake_uri)), "u000042")
            f.forget_in_redis(client, "u000042", sessions, events)
            t_redis = time.perf_counter() - t0
            server.stop()
            # a fresh copy of the world for the whole request (the Redis part above ran on it once)
            server = start_redis(root / "redis2")
            client = redis_client(server.url)
            fill_redis(client, args.users)
            t1 = time.perf_counter()
            row = forget_user(settings, "u000043", requested_by="bench", reason="benchmark", retention_hours=policy,
                              redis_client=client)
            total = time.perf_counter() - t1
            scanned = rows * 3  # silver + bronze + half-size labels and training set
            print(f"{rows:>11,} {('purge' if policy == 0 else f'{policy:.0f} h'):>9} {t_redis:>8.2f} "
                  f"{total - t_redis:>8.2f} {total:>8.2f} {scanned / max(total - t_redis, 1e-9):>15,.0f} "
                  f"{row['total_deleted']:>8}")
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
