"""Crash safety of the real streaming job process: SIGKILL it mid-batch (twice), restart it, and prove that
every event was applied exactly once to the session and user keys and landed exactly once in bronze."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import redis

from features.functions import new_session_state, update_session
from features.online import OnlineStore
from features.online_keys import session_key
from ground.settings import PROJECT_ROOT
from lake.delta import DeltaLake
from streaming.bronze import BRONZE_GROUP, BRONZE_TABLE
from streaming.job import COUNTS_KEY, GROUP, STREAM, publish, user_recent_key

T0 = 1_767_225_600_000
N_USERS, N_EVENTS = 300, 6000
CATEGORY = {f"i{i}": f"cat_{i % 7}" for i in range(60)}


def _events() -> list[dict]:
    """Seeded traffic: 300 users with two sessions each, mixed event types, in timestamp order."""
    import random

    rng = random.Random(5)
    types = ["impression"] * 5 + ["click"] * 3 + ["add_to_cart", "purchase", "skip", "share"]
    out = []
    for k in range(N_EVENTS):
        u = rng.randrange(N_USERS)
        out.append({"event_id": f"e{k}", "user_id": f"u{u}", "session_id": f"s{u}-{rng.randrange(2)}",
                    "item_id": f"i{rng.randrange(60)}", "event_type": rng.choice(types), "timestamp": T0 + 10 * k,
                    "position": rng.randrange(20), "page_context": "home_feed", "device_type": "mobile",
                    "dwell_time_ms": rng.randrange(60_000), "schema_version": 1})
    return out


def _start(url: str, home: Path, consumer: str, log_path: Path, cli: bool = False) -> subprocess.Popen:
    """The job as its own process: `python -m streaming.job`, or the `kairos stream` CLI."""
    env = {**os.environ, "REDIS_URL": url, "KAIROS_HOME": str(home), "KAIROS_LAKE_URI": str(home / "lake"),
           "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    entry = ["-m", "orchestration.cli", "stream"] if cli else ["-m", "streaming.job"]
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, *entry, "--consumer", consumer, "--batch", "200",
                                 "--reclaim-idle-ms", "300", "--bronze-window-ms", "100",
                                 "--bronze-lock-ttl-ms", "1500"],
                                cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)


def _counts(client: redis.Redis) -> Counter:
    return Counter({k: int(v) for k, v in client.hgetall(COUNTS_KEY).items()})


def _kill_when(client: redis.Redis, proc: subprocess.Popen, applied_at_least: int, log_path: Path) -> int:
    """SIGKILL the job once it has applied `applied_at_least` events, while a batch is in flight (read, not yet
    committed); returns the entries it left pending."""
    deadline = time.time() + 90
    while _counts(client)["applied"] < applied_at_least:
        if proc.poll() is not None:
            raise AssertionError(f"streaming job exited early:\n{log_path.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"streaming job too slow:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.005)
    while not client.xpending(STREAM, GROUP)["pending"] and time.time() < deadline:
        pass  # a batch is read but not yet committed: kill now, mid-batch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    return int(client.xpending(STREAM, GROUP)["pending"])


def test_sigkill_mid_batch_loses_nothing_and_applies_nothing_twice(redis_server, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    items = pd.DataFrame({"item_id": list(CATEGORY), "category": list(CATEGORY.values()), "item_clicks_7d": 1.0,
                          "item_impressions_7d": 10.0, "item_ctr_7d": 0.1, "publish_ts": T0})
    OnlineStore(client).materialize(pd.DataFrame({"user_id": ["u0"], "user_clicks_7d": [1.0]}), items, version="v1")
    events = _events()
    retries = [dict(e) for e in events[::40]]  # producer retries: same ids, later in the stream
    publish(client, events[:4000])
    publish(client, retries[:50])
    for k in range(20):  # entries that can never be applied: quarantined with a reason
        client.xadd(STREAM, {"event": "{broken" if k % 2 else json.dumps({**events[k], "event_type": "teleport"})})
    total = 4000 + 50 + 20

    log_path = tmp_path / "stream.log"
    pending_at_kill = []
    job = _start(redis_server.url, tmp_path, "crashy", log_path)
    pending_at_kill.append(_kill_when(client, job, 1200, log_path))
    time.sleep(0.4)  # crashy's entries are now idle long enough to be reclaimed by another consumer (XAUTOCLAIM)
    job = _start(redis_server.url, tmp_path, "survivor", log_path)
    publish(client, events[4000:])  # the producer keeps going while the job crashes and restarts
    publish(client, retries[50:])
    total += (N_EVENTS - 4000) + (len(retries) - 50)
    pending_at_kill.append(_kill_when(client, job, 3500, log_path))
    job = _start(redis_server.url, tmp_path, "survivor", log_path, cli=True)  # resumes its own pending list
    print(f"\nentries pending at each SIGKILL: {pending_at_kill}")
    assert max(pending_at_kill) > 0, "the kills never hit a batch in flight"
    try:
        deadline = time.time() + 120
        lake = DeltaLake(str(tmp_path / "lake"))
        while True:
            c = _counts(client)
            bronze_done = client.xlen(STREAM) == 0  # trimmed only once every group (incl. bronze) finished
            if c["applied"] + c["duplicates"] + c["quarantined"] == total and bronze_done:
                break
            assert time.time() < deadline, f"not drained: {dict(c)}, length {client.xlen(STREAM)}\n" \
                                           f"{log_path.read_text()[-3000:]}"
            time.sleep(0.1)
    finally:
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=30)
    # SIGTERM to `kairos stream` is a clean stop: the batch finished, the dual-write process stopped, exit 0
    assert job.returncode == 0 and "streaming job stopped" in log_path.read_text(), log_path.read_text()[-3000:]

    # counters reconcile: every entry is applied, a duplicate, or quarantined; nothing pending
    assert _counts(client) == Counter({"applied": N_EVENTS, "duplicates": len(retries), "quarantined": 20})
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    # every session and user key equals a from-scratch fold of its events with the shared function
    sessions: dict[str, dict] = {}
    users: dict[str, dict] = {}
    for e in events:
        cat = CATEGORY[e["item_id"]]
        sessions[e["session_id"]] = update_session(sessions.get(e["session_id"], new_session_state()), e["event_type"],
                                                   e["item_id"], cat, e["timestamp"])
        users[e["user_id"]] = update_session(users.get(e["user_id"], new_session_state()), e["event_type"],
                                             e["item_id"], cat, e["timestamp"])
    got_sessions = dict(zip(sessions, client.mget([session_key(s) for s in sessions])))
    assert {s: json.loads(v) for s, v in got_sessions.items()} == sessions
    got_users = dict(zip(users, client.mget([user_recent_key(u) for u in users])))
    assert {u: json.loads(v) for u, v in got_users.items()} == users
    # the dual write: every stream entry that is an event object is in bronze exactly once (retries included:
    # bronze is raw, silver deduplicates), and nothing else
    bronze = lake.read(BRONZE_TABLE)
    assert len(bronze) == N_EVENTS + len(retries) + 10
    stream_entries = [(e["event_id"], e["event_type"]) for e in events + retries] + \
        [(events[k]["event_id"], "teleport") for k in range(0, 20, 2)]
    assert Counter(zip(bronze["event_id"], bronze["event_type"])) == Counter(stream_entries)
    groups = {g["name"]: g for g in client.xinfo_groups(STREAM)}
    assert groups[BRONZE_GROUP]["last-delivered-id"] == groups[GROUP]["last-delivered-id"]
