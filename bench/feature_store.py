"""Feature-store benchmark: online fetch (user + session + 200 items) and Spark as-of join throughput.

    .venv/bin/python bench/feature_store.py                 # online fetch + as-of join at 1M label rows
    .venv/bin/python bench/feature_store.py --rows 1000000 5000000

Prints p50/p99 of one request's feature fetch against a real redis-server, and
rows/s of the point-in-time join (training.dataset.as_of_join) in Spark local mode.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from features.online import OnlineStore
from ingestion.schema import DAY_MS
from orchestration.services import spark_session, start_redis
from training.dataset import as_of_join

log = logging.getLogger("bench.features")


def _pct(values: list[float]) -> str:
    a = np.asarray(values)
    return f"p50 {np.percentile(a, 50):.3f} ms  p99 {np.percentile(a, 99):.3f} ms  (n={len(a)})"


def bench_online(n_users: int = 10_000, n_items: int = 20_000, requests: int = 2_000) -> None:
    import redis

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp))
        try:
            client = redis.Redis.from_url(server.url, decode_responses=True)
            users = pd.DataFrame({"user_id": [f"u{i}" for i in range(n_users)],
                                  "user_clicks_7d": rng.poisson(5, n_users).astype(float),
                                  "user_impressions_30d": rng.poisson(80, n_users).astype(float),
                                  "user_ctr_30d": rng.random(n_users) * 0.2,
                                  "user_category_clicks_30d": ['{"cat_01": 3.0, "cat_02": 1.0}'] * n_users})
            items = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                                  "item_clicks_7d": rng.poisson(20, n_items).astype(float),
                                  "item_impressions_7d": rng.poisson(200, n_items).astype(float),
                                  "item_ctr_7d": rng.random(n_items) * 0.2,
                                  "category": [f"cat_{i % 12:02d}" for i in range(n_items)],
                                  "publish_ts": np.full(n_items, 1_767_225_600_000)})
            store = OnlineStore(client)
            t = time.perf_counter()
            store.materialize(users, items, version="bench-v1")
            print(f"materialize {n_users} users + {n_items} items: {time.perf_counter() - t:.2f}s")
            client.set("kairos:session:s1", '{"last_items": ["i1", "i2"], "cat_weights": {"cat_01": 1.0}, '
                                            '"length": 3, "clicks": 2, "last_ts": 1767225600000}')
            table = store.item_table(store.current_version())
            fetch, full = [], []
            for k in range(requests):
                cands = [f"i{j}" for j in rng.integers(0, n_items, 200)]
                t0 = time.perf_counter()
                user, session, version = store.fetch(f"u{k % n_users}", "s1")
                t1 = time.perf_counter()
                store.item_table(version).columns_for(cands)
                t2 = time.perf_counter()
                fetch.append((t1 - t0) * 1000)
                full.append((t2 - t0) * 1000)
            assert user is not None and session is not None and len(table.row) == n_items
            print(f"online fetch, user + session (one round trip): {_pct(fetch)}")
            print(f"online fetch, user + session + 200 item rows:   {_pct(full)}")
        finally:
            server.stop()


def bench_as_of(rows: int, n_users: int = 50_000, days: int = 30) -> None:
    spark = spark_session()
    from pyspark.sql import functions as F

    t0 = 1_767_225_600_000
    labels = (spark.range(rows)
              .withColumn("event_id", F.col("id").cast("string"))
              .withColumn("user_id", F.concat(F.lit("u"), (F.col("id") % n_users).cast("string")))
              .withColumn("timestamp", (F.lit(t0) + (F.rand(1) * days * DAY_MS)).cast("long"))
              .drop("id"))
    snaps = (spark.range(n_users).withColumn("user_id", F.concat(F.lit("u"), F.col("id").cast("string")))
             .crossJoin(spark.range(1, days + 1).withColumnRenamed("id", "d"))
             .withColumn("feature_ts", (F.lit(t0) + F.col("d") * DAY_MS).cast("long"))
             .withColumn("user_clicks_7d", F.rand(2) * 10).drop("id", "d"))
    labels, snaps = labels.cache(), snaps.cache()
    labels.count(), snaps.count()
    t = time.perf_counter()
    out = as_of_join(spark, labels, snaps, "user_id", max_age_days=3)
    n = out.where(F.col("user_id_feature_ts").isNotNull()).count()
    dt = time.perf_counter() - t
    print(f"as-of join: {rows:,} label rows x {n_users * days:,} snapshot rows -> {n:,} matched in {dt:.1f}s "
          f"= {rows / dt:,.0f} rows/s")
    labels.unpersist(), snaps.unpersist()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--skip-online", action="store_true")
    args = parser.parse_args()
    if not args.skip_online:
        bench_online()
    for rows in args.rows:
        bench_as_of(rows)


if __name__ == "__main__":
    main()
