"""Feature-store benchmark: the online item store against Feast on one redis-server, and the Spark as-of join.

    .venv/bin/python bench/feature_store.py --items 10000 100000 1000000      # online store vs Feast
    .venv/bin/python bench/feature_store.py --items 10000 --rows 1000000      # + as-of join at 1M label rows

Feast (0.67.0, pinned) needs older prometheus_client / tenacity than Kairos, so it runs in its own environment
layered over .venv (Kairos's packages stay untouched; pip installs only what Feast adds or pins differently):

    python3.11 -m venv .bench/feast && echo "$PWD/.venv/lib/python3.11/site-packages" \\
        > .bench/feast/lib/python3.11/site-packages/zz_kairos.pth \
        && .bench/feast/bin/pip install -r bench/requirements-feast.txt    # feast==0.67.0 and what it pins

(`--feast-python PATH` or KAIROS_FEAST_PYTHON point elsewhere; without it the Feast columns are skipped.)

Per catalog size, on one real redis-server: both stores are written with the same users and items (the store
columns the ranker reads: 7 user, 6 item, including the top-20 co-clicked items map), then rounds alternate
Kairos / Feast over the same requests (user + session + 200 candidates), for two candidate mixes: `uniform`
over the whole catalog (the in-process row cache barely helps: the cold case) and `skewed` (Zipf: popular items
recur, as ANN / trending candidates do). Prints p50/p99 per mix, the speed-up, process start to the first
answer (a fresh interpreter), Redis bytes per item (used_memory delta of the item write) and materialization
rows/s. The two answers are cross-checked value by value on every Feast request.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from features.online import OnlineStore
from features.online_keys import session_key, user_key
from orchestration.services import start_redis

log = logging.getLogger("bench.features")
ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("feast_worker.py")
CANDIDATES = 200
SEED = 0


def _pct(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def make_world(n_users: int, n_items: int, seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded users and items with every store column, co-clicked maps of 20 items like the batch job's."""
    rng = np.random.default_rng(seed)
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(n_users)],
                          "user_clicks_7d": rng.poisson(5, n_users).astype(float),
                          "user_impressions_30d": rng.poisson(80, n_users).astype(float),
                          "user_ctr_30d": rng.random(n_users) * 0.2,
                          "user_category_clicks_30d": ['{"cat_01": 3.0, "cat_02": 1.0}'] * n_users,
                          "user_avg_session_length_7d": rng.random(n_users) * 10,
                          "user_category_decayed_30d": ['{"cat_01": 2.5, "cat_02": 0.7}'] * n_users,
                          "signup_ts": rng.integers(1_700_000_000_000, 1_767_000_000_000, n_users)})
    neighbours = rng.integers(0, n_items, (n_items, 20))
    counts = rng.integers(1, 50, (n_items, 20))
    co = ["{" + ",".join(f'"i{j}":{c}.0' for j, c in zip(nb, ct)) + "}" for nb, ct in zip(neighbours.tolist(), counts.tolist())]
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                          "item_clicks_7d": rng.poisson(20, n_items).astype(float),
                          "item_impressions_7d": rng.poisson(200, n_items).astype(float),
                          "item_ctr_7d": rng.random(n_items) * 0.2,
                          "category": [f"cat_{i % 40:02d}" for i in range(n_items)],
                          "publish_ts": 1_767_225_600_000 - rng.integers(0, 90 * 86_400_000, n_items),
                          "co_items_30d": co})
    return users, items


def make_requests(n: int, n_users: int, n_items: int, mix: str, rng: np.random.Generator) -> list[dict]:
    """Requests with 200 distinct candidates each: uniform over the catalog, or Zipf-skewed (rank^-1.1)."""
    if mix == "skewed":
        weights = 1.0 / np.arange(1, n_items + 1) ** 1.1
        cdf = np.cumsum(weights) / weights.sum()
        perm = rng.permutation(n_items)  # popularity rank -> item
    out = []
    for _ in range(n):
        if mix == "uniform":
            cands = rng.choice(n_items, CANDIDATES, replace=False)
        else:
            picked: dict[int, None] = {}
            while len(picked) < CANDIDATES:
                for r in np.searchsorted(cdf, rng.random(CANDIDATES * 2)).tolist():
                    picked.setdefault(int(perm[min(r, n_items - 1)]), None)
            cands = list(picked)[:CANDIDATES]
        out.append({"user": f"u{int(rng.integers(0, n_users))}", "session": "s1",
                    "items": [f"i{int(i)}" for i in cands]})
    return out


def kairos_answer(store: OnlineStore, req: dict) -> tuple[float, float, list]:
    """(wall ms, this process's CPU ms, values to cross-check) of one request's feature fetch."""
    c0, t0 = time.process_time(), time.perf_counter()
    user, _session, version = store.fetch(req["user"], req["session"])
    cols = store.item_table(version).columns_for(req["items"])
    ms, cpu = (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000
    return ms, cpu, [user["user_clicks_7d"], cols["item_clicks_7d"][:3].tolist()]


class GcWatch:
    """The collections Python's garbage collector runs while it is entered, each timed (gc.callbacks): which
    requests a collection landed in, and how long each paused the process."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int]] = []  # (ms, generation)
        self._t = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.pauses.append(((time.perf_counter() - self._t) * 1000, int(info["generation"])))

    def __enter__(self) -> "GcWatch":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


class Feast:
    """The Feast worker process (its own interpreter), driven over JSON lines."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=str(ROOT))

    def call(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Feast worker ({self.python}) exited; run it by hand to see why")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        try:
            self.call(cmd="quit")
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        self.proc.wait(timeout=30)


def first_answer_kairos(url: str, req: dict) -> tuple[float, float]:
    """(ms from process start to the first answer, ms of it inside the process after imports)."""
    code = ("import time, json, sys; t0 = time.perf_counter()\n"
            "from features.online import OnlineStore\n"
            "t1 = time.perf_counter(); s = OnlineStore.from_url(sys.argv[1], timeout_s=5.0)\n"
            "req = json.loads(sys.argv[2]); u, _, v = s.fetch(req['user'], req['session'])\n"
            "cols = s.item_table(v).columns_for(req['items']); assert u is not None and len(cols['category']) == 200\n"
            "print(json.dumps({'in_process_ms': (time.perf_counter() - t1) * 1000}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, url, json.dumps(req)], capture_output=True, text=True,
                         env=env, check=True, cwd=str(ROOT))
    wall = (time.perf_counter() - t) * 1000
    return wall, json.loads(out.stdout.strip().splitlines()[-1])["in_process_ms"]


def first_answer_feast(python: str, addr: str, repo: str, req: dict) -> tuple[float, float]:
    t = time.perf_counter()
    worker = Feast(python)
    out = worker.call(cmd="first_answer", redis=addr, repo=repo, request=req)
    wall = (time.perf_counter() - t) * 1000
    worker.close()
    return wall, out["ms_in_process"]


def bench_size(n_items: int, n_users: int, rounds: int, per_round: int, feast_per_round: int,
               feast_python: str | None, cache_rows: int) -> dict:
    import redis

    step = f"[{n_items:,} items]"
    with tempfile.TemporaryDirectory(prefix="kairos-bench-fs-") as tmp:
        server = start_redis(Path(tmp))
        feast = None
        try:
            client = redis.Redis.from_url(server.url, decode_responses=True)
            addr = server.url.split("//")[1].split("/")[0]
            users, items = make_world(n_users, n_items)
            print(f"{step} 1/5 world generated: {n_users:,} users, {n_items:,} items", flush=True)
            writer = OnlineStore(client)
            before = int(client.info("memory")["used_memory"])
            res = writer.materialize(users, items, version="bench-v1")
            delta = int(client.info("memory")["used_memory"]) - before
            pipe = client.pipeline(transaction=False)
            for uid in users["user_id"]:
                pipe.memory_usage(user_key("bench-v1", uid), samples=0)
            user_bytes = sum(int(b or 0) for b in pipe.execute())
            k_item_s = res["seconds"] - res["user_write_seconds"]
            out = {"items": n_items, "kairos_bytes_per_item": (delta - user_bytes) / n_items,
                   "kairos_item_rows_per_s": n_items / k_item_s, "kairos_user_rows_per_s": n_users / res["user_write_seconds"]}
            client.set(session_key("s1"), json.dumps({"last_items": ["i1", "i2"], "cat_weights": {"cat_01": 1.0},
                                                      "length": 3, "clicks": 2, "last_ts": 1767225600000}))
            print(f"{step} 2/5 Kairos materialized in {res['seconds']:.1f}s", flush=True)
            if feast_python:
                feast = Feast(feast_python)
                repo = str(Path(tmp) / "feast")
                feast.call(cmd="setup", redis=addr, repo=repo)
                for view, frame in (("users", users), ("items", items)):
                    path = Path(tmp) / f"{view}.parquet"
                    frame.to_parquet(path)
                    w = feast.call(cmd="write", view=view, parquet=str(path))
                    out[f"feast_{view[:-1]}_rows_per_s"] = w["rows"] / w["seconds"]
                    if view == "items":
                        out["feast_bytes_per_item"] = w["used_memory_delta"] / n_items
                print(f"{step} 3/5 Feast materialized", flush=True)
            rng = np.random.default_rng(SEED + 1)
            store = OnlineStore.from_url(server.url, timeout_s=5.0)
            store.item_cache_rows = cache_rows
            for mix in ("uniform", "skewed"):
                k_ms: list[float] = []
                f_ms: list[float] = []
                k_cpu: list[float] = []
                f_cpu: list[float] = []
                hits0, loads0 = store.table_hits, store.table_loads
                in_gc: list[bool] = []  # did a collection run inside this request
                watch = GcWatch()
                for _ in range(rounds):
                    reqs = make_requests(per_round, n_users, n_items, mix, rng)
                    answers = []
                    with watch:
                        for q in reqs:
                            n0 = len(watch.pauses)
                            answers.append(kairos_answer(store, q))
                            in_gc.append(len(watch.pauses) > n0)
                    k_ms += [a[0] for a in answers]
                    k_cpu += [a[1] for a in answers]
                    if feast is not None:
                        got = feast.call(cmd="round", requests=reqs[:feast_per_round])
                        f_ms += got["ms"]
                        f_cpu += got["cpu_ms"]
                        for (_, _, mine), theirs in zip(answers, got["checks"]):
                            if mine[0] != theirs[0] or mine[1] != theirs[1]:
                                raise AssertionError(f"Kairos and Feast disagree: {mine} vs {theirs}")
                hits, loads = store.table_hits - hits0, store.table_loads - loads0
                out[f"{mix}_kairos"] = _pct(k_ms)
                out[f"{mix}_hit_rate"] = hits / max(hits + loads, 1)
                out[f"{mix}_n"] = (len(k_ms), len(f_ms))
                out[f"{mix}_kairos_cpu"] = float(np.mean(k_cpu))
                clean = [ms for ms, g in zip(k_ms, in_gc) if not g]
                out[f"{mix}_gc"] = {"collections": len(watch.pauses), "gen2": sum(g == 2 for _, g in watch.pauses),
                                    "max_ms": max((p for p, _ in watch.pauses), default=0.0),
                                    "requests_hit": sum(in_gc), "p99_without": _pct(clean)[1] if clean else float("nan")}
                if f_ms:
                    out[f"{mix}_feast"] = _pct(f_ms)
                    out[f"{mix}_feast_cpu"] = float(np.mean(f_cpu))
            print(f"{step} 4/5 {rounds} interleaved rounds per mix done", flush=True)
            probe = make_requests(1, n_users, n_items, "uniform", rng)[0]
            out["kairos_first"] = first_answer_kairos(server.url, probe)
            if feast is not None:
                out["feast_first"] = first_answer_feast(feast_python, addr, str(Path(tmp) / "feast"), probe)
            print(f"{step} 5/5 first answers measured", flush=True)
        finally:
            if feast is not None:
                feast.close()
            server.stop()
    return out


def report(results: list[dict]) -> None:
    print("\nuser + session + 200 items, one request at a time (p50 / p99 ms; Feast rounds interleaved):")
    print(f"{'items':>10} {'mix':>8} {'Kairos p50':>11} {'p99':>8} {'CPU':>7} {'LRU hits':>9} {'Feast p50':>10} "
          f"{'p99':>9} {'CPU':>8} {'x p50':>6} {'x p99':>6} {'x CPU':>6}  n (Kairos/Feast)")
    for r in results:
        for mix in ("uniform", "skewed"):
            k50, k99 = r[f"{mix}_kairos"]
            kc = r[f"{mix}_kairos_cpu"]
            f = r.get(f"{mix}_feast")
            fs = (f"{f[0]:10.2f} {f[1]:9.2f} {r[f'{mix}_feast_cpu']:8.2f} {f[0] / k50:6.0f} {f[1] / k99:6.0f} "
                  f"{r[f'{mix}_feast_cpu'] / kc:6.0f}") if f else f"{'-':>10} {'-':>9} {'-':>8} {'-':>6} {'-':>6} {'-':>6}"
            print(f"{r['items']:>10,} {mix:>8} {k50:11.3f} {k99:8.3f} {kc:7.3f} {r[f'{mix}_hit_rate']:9.1%} {fs}  "
                  f"{r[f'{mix}_n']}")
    print("(CPU = mean client CPU ms per request in the answering process; the Redis server's CPU is not in it)")
    print("Kairos requests and Python's garbage collector (collections that ran inside a request):")
    for r in results:
        for mix in ("uniform", "skewed"):
            g = r[f"{mix}_gc"]
            print(f"{r['items']:>10,} {mix:>8}  {g['collections']} collections ({g['gen2']} full) in "
                  f"{g['requests_hit']} of {r[f'{mix}_n'][0]} requests, longest pause {g['max_ms']:.2f} ms; p99 of the "
                  f"requests without one {g['p99_without']:.3f} ms (all: {r[f'{mix}_kairos'][1]:.3f})")
    print("\nprocess start to first answer (ms; in-process part after imports), Redis bytes per item, rows/s:")
    for r in results:
        kw, ki = r["kairos_first"]
        line = (f"{r['items']:>10,}  Kairos {kw:7.0f} ms ({ki:6.1f}) {r['kairos_bytes_per_item']:6.0f} B/item "
                f"{r['kairos_item_rows_per_s']:9,.0f} item rows/s {r['kairos_user_rows_per_s']:8,.0f} user rows/s")
        if "feast_first" in r:
            fw, fi = r["feast_first"]
            line += (f" | Feast {fw:7.0f} ms ({fi:6.1f}) {r['feast_bytes_per_item']:6.0f} B/item "
                     f"{r['feast_item_rows_per_s']:9,.0f} item rows/s {r['feast_user_rows_per_s']:8,.0f} user rows/s")
        print(line)


def bench_as_of(rows: int, n_users: int = 50_000, days: int = 30) -> None:
    from pyspark.sql import functions as F

    from data_contracts.schema import DAY_MS
    from lake.spark import spark_session
    from training.dataset import as_of_join

    spark = spark_session()
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


def _default_feast_python() -> str | None:
    for candidate in (os.environ.get("KAIROS_FEAST_PYTHON"), str(ROOT / ".bench" / "feast" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="*", default=[10_000], help="catalog sizes (online store)")
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per candidate mix")
    parser.add_argument("--requests", type=int, default=300, help="Kairos requests per round")
    parser.add_argument("--feast-requests", type=int, default=20, help="Feast requests per round (it is slow)")
    parser.add_argument("--feast-python", default=_default_feast_python(), help="interpreter with feast==0.67.0")
    parser.add_argument("--no-feast", action="store_true")
    parser.add_argument("--cache-rows", type=int, default=50_000, help="the store's in-process row LRU")
    parser.add_argument("--rows", type=int, nargs="*", default=[], help="as-of join sizes (label rows)")
    args = parser.parse_args()
    feast_python = None if args.no_feast else args.feast_python
    if not feast_python and not args.no_feast:
        print("Feast not found (see this script's docstring to create .bench/feast); Kairos figures only")
    results = []
    for n in args.items:
        results.append(bench_size(n, args.users, args.rounds, args.requests, args.feast_requests, feast_python,
                                  args.cache_rows))
        report(results[-1:])  # each size as soon as it is measured (the 1M size takes a while)
    if len(results) > 1:
        print("\n==== all sizes ====")
        report(results)
    for rows in args.rows:
        bench_as_of(rows)


if __name__ == "__main__":
    main()
