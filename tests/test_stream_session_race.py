"""Two real consumers of one group (real redis-server, the product loop `run_forever` in two threads, each with its
own connection) race over many new sessions, each named by events of two different users. The claim of a session
is atomic: every session's folded state holds one user's events only, the other user's events are quarantined
(`session_id_owned_by_another_user`), the owner key expires with the session key, and the counters reconcile."""
from __future__ import annotations

import json
import random
import threading
import time

import redis

from features.online_keys import session_key, session_owner_key
from streaming.job import (APPLY, COUNTS_KEY, DUPLICATE, GROUP, QUARANTINE_STREAM, REFUSED, STREAM,
                           SessionStreamProcessor, plan_events, publish, user_recent_key)

N_SESSIONS, PER_USER = 150, 3
NOW = int(time.time() * 1000) - 60_000


def _events(rng: random.Random) -> list[dict]:
    """Per session k: users a{k} and b{k}, PER_USER clicks each on their own items, interleaved in the stream."""
    out = []
    for k in range(N_SESSIONS):
        evs = [{"event_id": f"{u}{k}-{j}", "user_id": f"{u}{k}", "session_id": f"s{k}", "item_id": f"{u}{k}-i{j}",
                "event_type": "click", "timestamp": NOW + j, "device_type": "mobile", "schema_version": 1}
               for u in ("a", "b") for j in range(PER_USER)]
        rng.shuffle(evs)
        out.extend(evs)
    return out


def test_two_consumers_never_share_a_session_between_users(redis_server) -> None:
    admin = redis.Redis.from_url(redis_server.url, decode_responses=True)
    admin.flushdb()
    rng = random.Random(16)
    events = _events(rng)
    dups = rng.sample(events, 60)  # producer retries that bypassed the intake: same event ids again
    procs = [SessionStreamProcessor(redis.Redis.from_url(redis_server.url, decode_responses=True), f"race{n}")
             for n in range(2)]
    procs[0].ensure_group()
    publish(admin, events)
    stop = threading.Event()
    threads = [threading.Thread(target=p.run_forever, args=(stop,), daemon=True,
                                kwargs={"count": 2 + n, "block_ms": 10, "trim_every_s": 3600.0, "log_every_s": 3600.0})
               for n, p in enumerate(procs)]
    for t in threads:
        t.start()
    publish(admin, dups)
    total = len(events) + len(dups)
    deadline = time.time() + 120
    while time.time() < deadline:
        counts = {k: int(v) for k, v in admin.hgetall(COUNTS_KEY).items()}
        if sum(counts.values()) >= total and admin.xpending(STREAM, GROUP)["pending"] == 0:
            break
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=30)

    assert all(p.stats["batches"] > 0 for p in procs)  # both consumers took part
    quarantined: dict[str, list[str]] = {}
    for _, fields in admin.xrange(QUARANTINE_STREAM):
        assert fields["reason"].startswith("session_id_owned_by_another_user"), fields["reason"]
        quarantined.setdefault(json.loads(fields["event"])["session_id"], []).append(json.loads(fields["event"])["event_id"])
    for k in range(N_SESSIONS):
        sid = f"s{k}"
        owner = admin.get(session_owner_key(sid))
        assert owner in (f"a{k}", f"b{k}")
        loser = f"b{k}" if owner == f"a{k}" else f"a{k}"
        state = json.loads(admin.get(session_key(sid)))
        assert state["length"] == PER_USER and sorted(state["last_items"]) == [f"{owner}-i{j}" for j in range(PER_USER)]
        assert set(quarantined[sid]) == {f"{loser}-{j}" for j in range(PER_USER)}  # every one of the loser's events
        assert not admin.exists(user_recent_key(loser))  # nothing of the loser was folded anywhere
        with admin.pipeline(transaction=True) as pipe:  # one instant: the owner expires exactly with the session
            ttl_session, ttl_owner = pipe.pttl(session_key(sid)).pttl(session_owner_key(sid)).execute()
        assert ttl_session > 0 and abs(ttl_session - ttl_owner) <= 1

    counts = {k: int(v) for k, v in admin.hgetall(COUNTS_KEY).items()}
    owners = {f"s{k}": admin.get(session_owner_key(f"s{k}")) for k in range(N_SESSIONS)}
    dup_won = sum(owners[e["session_id"]] == e["user_id"] for e in dups)
    assert counts.get("applied") == N_SESSIONS * PER_USER
    assert counts.get("duplicates", 0) == dup_won
    assert counts.get("quarantined") == N_SESSIONS * PER_USER + len(dups) - dup_won
    pending = admin.xpending(STREAM, GROUP)["pending"]
    assert pending == 0 and admin.xlen(STREAM) == total == sum(counts.values()) + pending


def test_plan_events_claims_for_the_first_user_and_refuses_the_rest() -> None:
    ev = lambda eid, user, sid: {"event_id": eid, "user_id": user, "session_id": sid}  # noqa: E731
    events = [ev("1", "bob", "new"), ev("2", "eve", "new"), ev("3", "bob", "new"), ev("1", "bob", "new"),
              ev("4", "eve", "old"), ev("5", "mallory", "old"), ev("5", "mallory", "old"), ev("6", "eve", "x")]
    outcomes, owners = plan_events(events, [False, False, False, False, False, False, False, True], {"old": "eve"})
    assert outcomes == [APPLY, REFUSED, APPLY, DUPLICATE, APPLY, REFUSED, REFUSED, DUPLICATE]
    assert owners == {"new": "bob", "old": "eve"}  # a duplicate claims nothing ("x" stays unowned)
