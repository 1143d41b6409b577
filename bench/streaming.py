"""Streaming benchmark: sustained events/s on one core, XADD -> session-key freshness, in-session adaptation.

    .venv/bin/python bench/streaming.py                        # all three parts
    .venv/bin/python bench/streaming.py --events 50000 --no-adaptation

1. Throughput: a backlog of `--events` seeded events (3,000 users, two sessions each, a 400-item catalog
   with categories) is drained by one SessionStreamProcessor in this process pinned to one CPU core;
   prints events/s for the sessionizer alone and for the bronze dual write (rows/s into Delta).
2. Freshness: the real job (`python -m streaming.job`, bronze dual write on) runs as its own process;
   a producer thread XADDs background traffic at a steady rate while probe events are XADDed every
   20 ms and their session key is polled; prints p50/p99 XADD -> readable per rate.
3. In-session adaptation: a world built through the real asset graph (Dagster, Spark, Delta, MLflow),
   the BentoML server and the streaming job; for each of `--users` users and a seeded category, the
   share of that category in the top-10 without clicks vs after three clicks in it, posted through
   `POST /v1/events` and applied by the job.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = 1_767_225_600_000


def _events(n: int, n_users: int, n_items: int, seed: int, prefix: str = "e") -> list[dict]:
    rng = random.Random(seed)
    types = ["impression"] * 5 + ["click"] * 3 + ["add_to_cart", "purchase", "skip", "share"]
    return [{"event_id": f"{prefix}{k}", "user_id": f"u{(u := rng.randrange(n_users))}",
             "session_id": f"s{u}-{rng.randrange(2)}", "item_id": f"i{rng.randrange(n_items)}",
             "event_type": rng.choice(types), "timestamp": T0 + 10 * k, "position": rng.randrange(20),
             "page_context": "home_feed", "device_type": "mobile", "dwell_time_ms": rng.randrange(60_000),
             "schema_version": 1} for k in range(n)]


def _catalog(client, n_items: int) -> None:
    from features.online import OnlineStore

    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)], "category": [f"cat_{i % 12}" for i in range(n_items)],
                          "item_clicks_7d": 1.0, "item_impressions_7d": 10.0, "item_ctr_7d": 0.1, "publish_ts": T0})
    OnlineStore(client).materialize(pd.DataFrame({"user_id": ["u0"], "user_clicks_7d": [1.0]}), items, version="bench")


def throughput(url: str, n: int, home: Path) -> None:
    import redis

    from lake.delta import DeltaLake
    from streaming.bronze import BronzeWriter
    from streaming.job import STREAM, SessionStreamProcessor, publish

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # this process: one core
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    _catalog(client, 400)
    events = _events(n, 3000, 400, seed=1)
    for k in range(0, n, 5000):
        publish(client, events[k:k + 5000])
    proc = SessionStreamProcessor(client, consumer_name="bench")
    proc.ensure_group()

    def redis_cpu() -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    t, cpu, rcpu = time.perf_counter(), time.process_time(), redis_cpu()
    while proc.process_once(count=500, block_ms=1) or proc.lag()["pending"]:
        pass
    secs, cpu, rcpu = time.perf_counter() - t, time.process_time() - cpu, redis_cpu() - rcpu
    assert proc.stats["applied"] == n, proc.stats
    load = os.getloadavg()[0]
    print(f"\n1. Throughput, one process pinned to one core, {n} events (3,000 users, 6,000 sessions), "
          f"load average {load:.1f} on {os.cpu_count()} cores:")
    print(f"   sessionizer (session + user keys, markers, XACK: one transaction per batch of 500): "
          f"{n / secs:,.0f} events/s wall ({secs:.1f} s); {n / cpu:,.0f} events per CPU-second of the job "
          f"(what one free core sustains); redis-server {1e6 * rcpu / n:.0f} us CPU per event")
    writer = BronzeWriter(client, DeltaLake(str(home / "lake-throughput")), STREAM, window_ms=1000, owner="bench")
    writer.ensure_group()
    time.sleep(1.0)  # let the last window close
    t, cpu = time.perf_counter(), time.process_time()
    batches = writer.flush()
    secs, cpu = time.perf_counter() - t, time.process_time() - cpu
    rows = sum(b.rows for b in batches)
    print(f"   bronze dual write (JSON -> bronze rows -> Delta, idempotent batches): {rows:,} rows in {len(batches)} "
          f"micro-batches, {rows / secs:,.0f} rows/s wall ({secs:.1f} s), {rows / cpu:,.0f} rows per CPU-second")
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def _start_job(url: str, home: Path, consumer: str, bronze: bool = True) -> subprocess.Popen:
    """`python -m streaming.job` with its defaults (10 s bronze windows) as its own process."""
    env = {**os.environ, "REDIS_URL": url, "KAIROS_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(home / f"stream-{consumer}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "streaming.job", "--consumer", consumer,
                             *([] if bronze else ["--no-bronze"])], cwd=str(ROOT), env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _wait_applied(client, event: dict, timeout_s: float) -> None:
    """Publish one event and wait until the job applied it (the job process is up and reading)."""
    from features.online_keys import session_key
    from streaming.job import publish

    publish(client, [event])
    deadline = time.time() + timeout_s
    while not client.exists(session_key(event["session_id"])):
        if time.time() > deadline:
            raise RuntimeError(f"the streaming job applied nothing within {timeout_s} s: see its log under KAIROS_HOME")
        time.sleep(0.05)


def freshness(url: str, home: Path, rates: list[int], seconds: float, bronze: bool = True) -> None:
    import redis

    from features.online_keys import session_key
    from streaming.job import STREAM, publish

    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    _catalog(client, 400)
    job = _start_job(url, home, f"fresh-{'bronze' if bronze else 'nobronze'}", bronze=bronze)
    try:
        _wait_applied(client, {"event_id": "warm-up", "user_id": "warm", "session_id": "warm-up", "item_id": "i1",
                               "event_type": "click", "timestamp": T0, "schema_version": 1}, timeout_s=120)
        print(f"\n2. Freshness XADD -> session key readable (real job process, bronze dual write "
              f"{'on' if bronze else 'off'}, load average {os.getloadavg()[0]:.1f}):")
        for rate in rates:
            stop = threading.Event()
            background = _events(int(rate * seconds * 1.5) + 10, 3000, 400, seed=rate, prefix=f"bg{rate}-")

            def produce(stop: threading.Event = stop, background: list = background, rate: float = rate) -> None:
                producer = redis.Redis.from_url(url, decode_responses=True)
                k, t0, step = 0, time.perf_counter(), 0.01
                while not stop.is_set() and k < len(background):
                    due = int((time.perf_counter() - t0) * rate)
                    if due > k:
                        publish(producer, background[k:due])
                        k = due
                    time.sleep(step)

            thread = threading.Thread(target=produce, daemon=True)
            thread.start()
            lat: list[float] = []
            saturated = False
            end = time.time() + seconds
            k = 0
            while time.time() < end and not saturated:
                sid = f"probe-{rate}-{k}"
                ev = {"event_id": f"p{rate}-{k}", "user_id": f"probe{k}", "session_id": sid, "item_id": "i1",
                      "event_type": "click", "timestamp": T0 + k, "schema_version": 1}
                key = session_key(sid)
                t = time.perf_counter()
                publish(client, [ev])
                while not client.exists(key):
                    time.sleep(0.0002)  # poll gently: a busy loop would compete with the job for the CPU
                    if time.perf_counter() - t > 10:
                        saturated = True  # the job cannot keep up with this rate: the backlog only grows
                        break
                if not saturated:
                    lat.append((time.perf_counter() - t) * 1000)
                k += 1
                time.sleep(0.02)
            stop.set()
            thread.join()
            if saturated or not lat:
                print(f"   background {rate:>5} events/s: saturated (a probe waited > 10 s behind the backlog)")
                while client.xlen(STREAM) and time.time() < end + 120:  # let the job drain before the next rate
                    time.sleep(0.2)
                continue
            p50, p99 = np.percentile(lat, [50, 99])
            print(f"   background {rate:>5} events/s: {len(lat)} probes, p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                  f"max {max(lat):.2f} ms", flush=True)
    finally:
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=30)


def adaptation(home: Path, redis_server, n_users: int) -> None:
    import httpx
    import redis

    from ground.settings import Settings
    from lake.delta import DeltaLake
    from orchestration.cli import data_clock_ms, materialize_all
    from orchestration.services import free_port
    from serving.server import start_server, stop_server, wait_ready

    settings = Settings.from_env()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    print(f"\n3. In-session adaptation: building the world through the asset graph in {home} ...", flush=True)
    run = materialize_all(settings, {"source": "simulator"})
    print(f"   asset graph: {run['seconds']:.0f} s", flush=True)
    lake = DeltaLake(settings.lake_uri)
    items = lake.read("catalog_items", columns=["item_id", "category"])
    cat_of = dict(zip(items["item_id"], items["category"]))
    by_cat = items.groupby("category")["item_id"].apply(list).to_dict()
    users = lake.read("catalog_users", columns=["user_id"])["user_id"].tolist()
    now_ms = data_clock_ms(settings)
    port = free_port()
    proc = start_server(port, env={**os.environ, "KAIROS_ACCESS_LOG": "0"})
    job = _start_job(redis_server.url, home, "adapt")
    _wait_applied(client, {"event_id": "warm-up", "user_id": "warm", "session_id": "warm-up", "item_id": "i1",
                           "event_type": "click", "timestamp": now_ms, "schema_version": 1}, timeout_s=120)
    rng = random.Random(3)
    before, after, lift_users = [], [], 0
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout_s=240, proc=proc)
        with httpx.Client(base_url=base, timeout=30) as http:
            for user in rng.sample(users, min(n_users, len(users))):
                cat = rng.choice(sorted(by_cat))
                body = {"user_id": user, "surface": "home_feed",
                        "context": {"session_id": f"control-{user}", "device_type": "mobile", "timestamp_ms": now_ms + 5000},
                        "request_config": {"num_results": 10, "candidate_pool_size": 200}}
                control = http.post("/v1/personalize", json=body).json()
                sid = f"clicks-{user}"
                clicked = rng.sample(by_cat[cat], 3)
                events = [{"event_id": f"adapt-{user}-{k}", "user_id": user, "item_id": item, "event_type": "click",
                           "timestamp": now_ms + 1000 * (k + 1), "session_id": sid, "position": k,
                           "page_context": "home_feed", "device_type": "mobile", "dwell_time_ms": 30_000,
                           "schema_version": 1} for k, item in enumerate(clicked)]
                answer = http.post("/v1/events", json={"events": events}).json()
                assert len(answer["accepted"]) == 3, answer
                deadline = time.time() + 10
                while time.time() < deadline:
                    raw = client.get(f"kairos:session:{sid}")
                    if raw and json.loads(raw)["length"] >= 3:
                        break
                    time.sleep(0.005)
                treated = http.post("/v1/personalize", json={**body, "context": {**body["context"], "session_id": sid}}).json()
                b = sum(cat_of.get(i["item_id"]) == cat for i in control["ranked_items"]) / max(len(control["ranked_items"]), 1)
                a = sum(cat_of.get(i["item_id"]) == cat for i in treated["ranked_items"]) / max(len(treated["ranked_items"]), 1)
                before.append(b)
                after.append(a)
                lift_users += a > b
        print(f"   {len(before)} users, a seeded category each, three clicks posted to /v1/events and applied by the job:")
        print(f"   category share of the next top-10: {np.mean(before):.3f} without the clicks -> {np.mean(after):.3f} "
              f"after them (x{np.mean(after) / max(np.mean(before), 1e-9):.1f}); share rose for {lift_users}/{len(before)} "
              f"users, fell for {sum(a < b for a, b in zip(after, before))}; served_by {treated.get('served_by')}")
    finally:
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=30)
        stop_server(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rates", type=int, nargs="+", default=[200, 1000, 3000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--no-adaptation", action="store_true")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="kairos-bench-streaming-"))
    os.environ["KAIROS_HOME"] = str(home)
    for k in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "KAIROS_LAKE_URI", "REDIS_URL"):
        os.environ.pop(k, None)
    from ground.settings import Settings
    from orchestration.cli import prepare_home
    from orchestration.services import start_redis

    prepare_home(Settings.from_env())
    server = start_redis(home / "redis")
    os.environ["REDIS_URL"] = server.url
    try:
        throughput(server.url, args.events, home)
        freshness(server.url, home, args.rates, args.seconds)
        freshness(server.url, home, args.rates[:1], args.seconds, bronze=False)
        if not args.no_adaptation:
            adaptation(home, server, args.users)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
