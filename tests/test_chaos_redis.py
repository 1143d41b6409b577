"""Chaos: the embedded redis-server SIGKILLed mid-load and restarted on its directory, while a producer posts
through the intake (retrying what was not acknowledged, as a client of POST /v1/events does) and the real
streaming job process (sessionizer + bronze dual write) keeps running. Nothing acknowledged is lost: every
acknowledged event is in Redis right after the restart, applied exactly once, and in bronze exactly once;
the consumer groups, their positions and the online store come back with the AOF."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import redis

from features.online import OnlineStore
from ground.settings import PROJECT_ROOT
from lake.delta import DeltaLake
from orchestration.services import redis_durability, start_redis
from streaming.bronze import BRONZE_GROUP, BRONZE_TABLE
from streaming.intake import intake, intake_key
from streaming.job import COUNTS_KEY, GROUP, STREAM

N_EVENTS, BATCH = 2400, 20


def _events(t0: int) -> list[dict]:
    return [{"event_id": f"c{k}", "user_id": f"u{k % 50}", "session_id": f"s{k % 50}", "item_id": f"i{k % 40}",
             "event_type": "click" if k % 3 else "impression", "timestamp": t0 + k, "position": k % 10,
             "device_type": "mobile", "schema_version": 1} for k in range(N_EVENTS)]


class Producer(threading.Thread):
    """Posts batches through `intake`; a batch that fails (Redis down, loading, unconfirmed) is retried until
    acknowledged. Records what was acknowledged and when."""

    def __init__(self, url: str, events: list[dict]) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=2, socket_connect_timeout=1)
        self.events, self.acknowledged, self.failures, self.duplicates = events, [], 0, 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for k in range(0, len(self.events), BATCH):
                batch = self.events[k:k + BATCH]
                while True:
                    try:
                        out = intake(self.client, batch)
                        break
                    except Exception:  # noqa: BLE001 - Redis killed/restarting: retry the same batch
                        self.failures += 1
                        time.sleep(0.05)
                assert not out["errors"], out["errors"]
                self.duplicates += out["counts"]["duplicates"]
                self.acknowledged.extend(out["accepted"])
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc


def _start_job(url: str, home: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": url, "KAIROS_HOME": str(home), "KAIROS_LAKE_URI": str(home / "lake"),
           "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "streaming.job", "--consumer", "chaos", "--batch", "200",
                                 "--bronze-window-ms", "100", "--bronze-lock-ttl-ms", "1500"],
                                cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)


def test_redis_sigkill_mid_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    job = None
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=5)
        assert redis_durability(client) == {"appendonly": True, "appendfsync": "always", "durable": True,
                                            "loss_window": "none"}
        items = pd.DataFrame({"item_id": [f"i{k}" for k in range(40)], "category": [f"cat_{k % 4}" for k in range(40)],
                              "item_clicks_7d": 1.0, "item_impressions_7d": 10.0, "item_ctr_7d": 0.1,
                              "publish_ts": 1_767_225_600_000})
        OnlineStore(client).materialize(pd.DataFrame({"user_id": ["u0"], "user_clicks_7d": [1.0]}), items, version="v1")
        log_path = tmp_path / "stream.log"
        job = _start_job(server.url, tmp_path, log_path)
        events = _events(int(time.time() * 1000) - 3_600_000)
        deadline = time.time() + 120
        while not {GROUP, BRONZE_GROUP} <= {g["name"] for g in client.xinfo_groups(STREAM)} if client.exists(STREAM) \
                else True:  # the job is up: both of its groups exist
            assert job.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        producer = Producer(server.url, events)
        producer.start()
        # mid-load: a third acknowledged, the job applying them
        while len(producer.acknowledged) < N_EVENTS // 3 or not int(client.hget(COUNTS_KEY, "applied") or 0):
            assert time.time() < deadline and producer.is_alive(), f"producer stuck: {producer.error}"
            time.sleep(0.01)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        acknowledged_at_kill = list(producer.acknowledged)
        time.sleep(1.0)  # the producer and the job hit a dead Redis meanwhile
        server = start_redis(tmp_path / "redis", port=server.port)  # same directory: the AOF is replayed
        client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=5)

        # right after the restart: every event acknowledged before the kill is there, and the online store too
        recorded = client.mget([intake_key(e) for e in acknowledged_at_kill])
        lost = [e for e, sid in zip(acknowledged_at_kill, recorded) if sid is None]
        assert not lost, f"{len(lost)} acknowledged events lost, e.g. {lost[:5]}"
        assert OnlineStore(client).current_version() == "v1"
        assert {g["name"] for g in client.xinfo_groups(STREAM)} >= {GROUP, BRONZE_GROUP}

        t_restart = time.time()
        producer.join(timeout=180)
        t_produced = time.time()
        assert not producer.is_alive() and producer.error is None, producer.error
        assert sorted(producer.acknowledged) == sorted(e["event_id"] for e in events)
        lake = DeltaLake(str(tmp_path / "lake"))
        deadline = time.time() + 180
        while True:
            counts = Counter({k: int(v) for k, v in client.hgetall(COUNTS_KEY).items()})
            landed = len(lake.read(BRONZE_TABLE, columns=["event_id"])) if lake.exists(BRONZE_TABLE) else 0
            if counts["applied"] >= N_EVENTS and landed >= N_EVENTS and client.xlen(STREAM) == 0:
                break
            assert job.poll() is None, f"streaming job died:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"not drained: {dict(counts)}, bronze {landed}, length " \
                                           f"{client.xlen(STREAM)}\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        print(f"\nchaos: {len(acknowledged_at_kill)} acknowledged at the SIGKILL, 0 lost; {producer.failures} failed "
              f"attempts retried, {producer.duplicates} answered as already written; {N_EVENTS} acknowledged in "
              f"all, applied {counts['applied']}, bronze rows {landed}; producer done {t_produced - t_restart:.1f} s "
              f"after the restart, drained {time.time() - t_produced:.1f} s later")
        # exactly once: applied once each, no duplicate entry ever reached the stream, bronze = acknowledged
        assert counts == Counter({"applied": N_EVENTS})
        bronze = lake.read(BRONZE_TABLE, columns=["event_id"])
        assert Counter(bronze["event_id"]) == Counter(producer.acknowledged)
    finally:
        if job is not None and job.poll() is None:
            job.send_signal(signal.SIGTERM)
            job.wait(timeout=60)
        server.stop()
