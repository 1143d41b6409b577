"""The streaming job against a real redis-server: session keys, exactly-once, crash recovery, quarantine."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pandas as pd
import pytest
import redis

from features.online import OnlineStore
from features.online_keys import session_key
from streaming.job import COUNTS_KEY, GROUP, QUARANTINE_STREAM, STREAM, SessionStreamProcessor, publish

T0 = 1_767_225_600_000


def _catalog(client: redis.Redis) -> None:
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(10)], "category": [f"cat_{i % 2}" for i in range(10)],
                          "item_clicks_7d": 1.0, "item_impressions_7d": 10.0, "item_ctr_7d": 0.1, "publish_ts": T0})
    OnlineStore(client).materialize(pd.DataFrame({"user_id": ["u1"], "user_clicks_7d": [1.0]}), items, version="v1")


def _click(eid: str, item: str, k: int, session: str = "s1", etype: str = "click") -> dict:
    return {"event_id": eid, "user_id": "u1", "item_id": item, "event_type": etype, "timestamp": T0 + 1000 * k,
            "session_id": session, "position": k, "page_context": "home_feed", "device_type": "mobile",
            "dwell_time_ms": 1000, "schema_version": 1}


def _session(client: redis.Redis, sid: str = "s1") -> dict:
    return json.loads(client.get(session_key(sid)))


def test_clicks_reach_the_session_key_exactly_once(redis_client: redis.Redis) -> None:
    _catalog(redis_client)
    proc = SessionStreamProcessor(redis_client, consumer_name="c1")
    proc.ensure_group()
    proc.ensure_group()  # idempotent
    ids = publish(redis_client, [_click("e1", "i1", 1), _click("e2", "i3", 2), _click("e3", "i4", 3)])
    assert len(ids) == 3
    assert proc.process_once(count=10, block_ms=50) == 3
    state = _session(redis_client)
    assert state["last_items"] == ["i4", "i3", "i1"] and state["clicks"] == 3 and state["length"] == 3
    assert set(state["cat_weights"]) == {"cat_0", "cat_1"}  # categories from the online store's item table
    assert 0 < redis_client.ttl(session_key("s1")) <= 1800

    # a producer retry (same event ids) changes nothing
    publish(redis_client, [_click("e2", "i3", 2), _click("e3", "i4", 3)])
    assert proc.process_once(count=10, block_ms=50) == 0
    assert _session(redis_client) == state
    assert proc.stats["duplicates"] == 2
    assert redis_client.hgetall(COUNTS_KEY) == {"applied": "3", "duplicates": "2"}
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0


def test_crashed_consumer_entries_are_reclaimed_and_applied_once(redis_client: redis.Redis) -> None:
    _catalog(redis_client)
    crashed = SessionStreamProcessor(redis_client, consumer_name="crashed")
    crashed.ensure_group()
    publish(redis_client, [_click(f"r{k}", f"i{k}", k, session="s2") for k in range(4)])
    # the crashed consumer read the entries and died before applying or acknowledging them
    got = redis_client.xreadgroup(GROUP, "crashed", {STREAM: ">"}, count=10)
    assert len(got[0][1]) == 4 and not redis_client.exists(session_key("s2"))

    survivor = SessionStreamProcessor(redis_client, consumer_name="survivor")
    assert survivor.process_once(count=10, block_ms=20) == 0  # nothing new: they are pending elsewhere
    time.sleep(0.02)
    assert survivor.reclaim(min_idle_ms=10) == 4
    state = _session(redis_client, "s2")
    assert state["length"] == 4 and state["last_items"] == ["i3", "i2", "i1", "i0"]
    assert survivor.reclaim(min_idle_ms=0) == 0
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0
    assert _session(redis_client, "s2") == state

    # the crashed consumer restarts and re-processes its own pending list: already applied, nothing changes
    publish(redis_client, [_click("r9", "i9", 9, session="s2")])
    redis_client.xreadgroup(GROUP, "crashed", {STREAM: ">"}, count=10)
    state_before = _session(redis_client, "s2")
    restarted = SessionStreamProcessor(redis_client, consumer_name="crashed")
    assert restarted.process_pending() == 1
    assert _session(redis_client, "s2")["length"] == state_before["length"] + 1


def test_concurrent_consumers_never_lose_or_double_apply(redis_client: redis.Redis) -> None:
    _catalog(redis_client)
    events = [_click(f"c{k}", f"i{k % 10}", k, session=f"s{k % 3}") for k in range(300)]
    publish(redis_client, events)
    procs = [SessionStreamProcessor(redis_client, consumer_name=f"w{n}") for n in range(2)]
    procs[0].ensure_group()
    totals = [0, 0]

    def work(n: int) -> None:
        idle = 0
        while idle < 3:
            got = procs[n].process_once(count=7, block_ms=20)
            totals[n] += got
            idle = idle + 1 if got == 0 else 0

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(totals) == 300
    assert sum(_session(redis_client, f"s{s}")["length"] for s in range(3)) == 300
    assert redis_client.hgetall(COUNTS_KEY) == {"applied": "300"}


def test_invalid_events_are_quarantined_with_a_reason(redis_client: redis.Redis) -> None:
    _catalog(redis_client)
    proc = SessionStreamProcessor(redis_client, consumer_name="c1")
    proc.ensure_group()
    no_session = _click("q1", "i1", 1)
    no_session.pop("session_id")
    publish(redis_client, [no_session, _click("q2", "i1", 2, etype="teleport"), _click("q3", "", 3),
                           _click("ok", "i2", 4, session="s9")])
    redis_client.xadd(STREAM, {"event": "{not json"})
    assert proc.process_once(count=10, block_ms=50) == 1
    quarantined = redis_client.xrange(QUARANTINE_STREAM)
    reasons = [fields["reason"] for _, fields in quarantined]
    assert len(reasons) == 4
    assert any("session_id" in r for r in reasons) and any("teleport" in r for r in reasons)
    assert any("item_id" in r for r in reasons) and any("JSON" in r for r in reasons)
    assert json.loads(quarantined[0][1]["event"])["event_id"] == "q1"  # the raw event is kept
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0  # acknowledged, not left dangling
    # nothing lost: every entry is applied, a duplicate or quarantined, and the counters reconcile
    counts = {k: int(v) for k, v in redis_client.hgetall(COUNTS_KEY).items()}
    assert counts == {"applied": 1, "quarantined": 4} and sum(counts.values()) == redis_client.xlen(STREAM)
    assert _session(redis_client, "s9")["length"] == 1


def test_freshness_event_to_session_key(redis_client: redis.Redis) -> None:
    """Publish -> visible in the session key, with the job running in a thread (DESIGN: p99 <= 20 ms)."""
    _catalog(redis_client)
    proc = SessionStreamProcessor(redis_client, consumer_name="fresh")
    proc.ensure_group()
    stop = threading.Event()
    thread = threading.Thread(target=proc.run_forever, args=(stop,), kwargs={"block_ms": 50}, daemon=True)
    thread.start()
    reader = redis.Redis(connection_pool=redis_client.connection_pool)
    lat = []
    try:
        for k in range(150):
            key = session_key(f"f{k}")
            t = time.perf_counter()
            publish(redis_client, [_click(f"f{k}", "i1", k, session=f"f{k}")])
            while not reader.exists(key):
                if time.perf_counter() - t > 2:
                    raise AssertionError("event not visible within 2 s")
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        stop.set()
        thread.join(timeout=5)
    p50, p99 = np.percentile(lat, [50, 99])
    print(f"\nfreshness publish->session key over {len(lat)} events: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert p99 < 100  # DESIGN target is 20 ms; the bound here leaves room for a loaded CI box


def test_event_intake_accepts_valid_events_and_answers_errors_per_event(redis_client) -> None:
    from streaming.job import intake

    now = 1_767_225_600_000
    good = {"event_id": "in-1", "user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": now,
            "session_id": "s-in", "position": 0, "dwell_time_ms": 5_000, "schema_version": 1}
    batch = [good, {**good, "event_id": "in-2", "event_type": "teleport"}, {**good, "event_id": "in-3", "dwell_time_ms": -5},
             {**good, "event_id": "in-4", "timestamp": now + 3_600_000}, "not an object",
             {**good, "event_id": "in-5", "item_id": None}, {**good, "event_id": "in-6", "schema_version": 2}]
    out = intake(redis_client, batch, now_ms=now, stream="test:intake")
    assert out["accepted"] == ["in-1"] and len(out["stream_ids"]) == 1
    assert out["counts"] == {"received": 7, "accepted": 1, "quarantined": 6, "duplicates": 0}
    reasons = {e["index"]: e["reason"] for e in out["errors"]}
    assert "event_type" in reasons[1] and "dwell_time_ms_in_range" in reasons[2] and "timestamp_in_range" in reasons[3]
    assert "not a JSON object" in reasons[4] and "item_id" in reasons[5] and "schema_version_current" in reasons[6]
    assert redis_client.xlen("test:intake") == 1
    quarantined = redis_client.xrange(QUARANTINE_STREAM)
    assert len(quarantined) == 6 and {q[1]["reason"] for q in quarantined} == set(reasons.values())


def test_user_level_recent_categories_fold_across_sessions(redis_client) -> None:
    from features.functions import new_session_state, update_session
    from streaming.job import user_recent_key

    _catalog(redis_client)
    proc = SessionStreamProcessor(redis_client, consumer_name="c1")
    proc.ensure_group()
    events = [_click("ua", "i1", 1, session="sa"), _click("ub", "i3", 2, session="sb"), _click("uc", "i2", 3, session="sa")]
    publish(redis_client, events + [_click("ub", "i3", 2, session="sb")])  # a retry of ub changes nothing
    assert proc.process_once(count=10, block_ms=50) == 3
    expected = new_session_state()
    for ev in events:  # the same shared fold, over the user's events in stream order
        expected = update_session(expected, ev["event_type"], ev["item_id"], f"cat_{int(ev['item_id'][1:]) % 2}",
                                  ev["timestamp"])
    user = json.loads(redis_client.get(user_recent_key("u1")))
    assert user == expected and set(user["cat_weights"]) == {"cat_0", "cat_1"}
    assert 7 * 86400 - 5 < redis_client.ttl(user_recent_key("u1")) <= 7 * 86400
    assert 0 < redis_client.ttl(session_key("sa")) <= 30 * 60  # sessions expire after 30 min of inactivity


def test_trim_removes_only_what_every_group_finished(redis_client) -> None:
    from streaming.bronze import BRONZE_GROUP
    from streaming.retention import stream_lag, trim_processed

    _catalog(redis_client)
    publish(redis_client, [_click(f"t{k}", "i1", k, session=f"t{k % 5}") for k in range(30)])
    assert trim_processed(redis_client, STREAM) == 0  # no consumer group yet: nobody said they are done
    proc = SessionStreamProcessor(redis_client, consumer_name="c1")
    proc.ensure_group()
    redis_client.xgroup_create(STREAM, BRONZE_GROUP, id="0")
    assert proc.process_once(count=20, block_ms=20) == 20
    ids = [e[0] for e in redis_client.xrange(STREAM)]
    assert trim_processed(redis_client, STREAM) == 0  # bronze has landed nothing yet
    redis_client.xgroup_setid(STREAM, BRONZE_GROUP, ids[24])  # bronze is further than the sessionizer
    # a consumer read 5 more and died before acknowledging them: they must survive the trim
    redis_client.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=5)
    assert trim_processed(redis_client, STREAM) == 20 and redis_client.xlen(STREAM) == 10
    assert [e[0] for e in redis_client.xrange(STREAM)] == ids[20:]
    lag = stream_lag(redis_client, STREAM)
    assert lag["length"] == 10 and lag["groups"][GROUP]["pending"] == 5 and lag["groups"][GROUP]["lag_ms"] >= 0
    time.sleep(0.01)
    assert proc.reclaim(min_idle_ms=1) == 5 and proc.process_once(count=20, block_ms=20) == 5
    redis_client.xgroup_setid(STREAM, BRONZE_GROUP, ids[-1])
    assert trim_processed(redis_client, STREAM) == 10 and redis_client.xlen(STREAM) == 0
    assert stream_lag(redis_client, STREAM)["groups"][GROUP] == {"pending": 0, "last_delivered_id": ids[-1], "lag_ms": 0}
    assert _session(redis_client, "t0")["length"] == 6  # every event applied once, none lost to the trim


def test_intake_refuses_a_batch_past_the_backlog_limit(redis_client) -> None:
    import pytest

    from streaming.job import intake
    from streaming.retention import Backpressure

    good = [_click(f"bp{k}", "i1", k) for k in range(8)]
    assert intake(redis_client, good[:6], now_ms=T0 + 60_000, max_backlog=10)["counts"]["accepted"] == 6
    with pytest.raises(Backpressure, match="retry in") as err:
        intake(redis_client, good[6:] + [{"event_id": "bad"}] * 3, now_ms=T0 + 60_000, max_backlog=10)
    assert err.value.backlog == 6 and err.value.limit == 10
    assert redis_client.xlen(STREAM) == 6 and not redis_client.exists(QUARANTINE_STREAM)  # nothing written
    assert intake(redis_client, good[6:], now_ms=T0 + 60_000, max_backlog=10)["counts"]["accepted"] == 2


def test_stream_options_flags_win_over_the_environment() -> None:
    """`kairos stream`: building the parser reads no environment; the variables give the defaults, a flag wins,
    and a bad variable is an error naming it."""
    import argparse

    from streaming.options import StreamJobOptions, add_arguments, options_from_args

    parser = add_arguments(argparse.ArgumentParser())
    env = {"KAIROS_STREAM_CONSUMER": "c1", "KAIROS_SESSION_TTL_S": "600", "KAIROS_BRONZE_WINDOW_MS": "5000"}
    opts = options_from_args(parser.parse_args([]), env)
    assert (opts.consumer, opts.session_ttl_s, opts.bronze_window_ms) == ("c1", 600, 5000)
    opts = options_from_args(parser.parse_args(["--consumer", "c2", "--bronze-window-ms", "2000", "--no-bronze"]), env)
    assert (opts.consumer, opts.session_ttl_s, opts.bronze_window_ms, opts.bronze) == ("c2", 600, 2000, False)
    assert options_from_args(parser.parse_args([]), {}) == StreamJobOptions()
    with pytest.raises(ValueError, match="KAIROS_BRONZE_WINDOW_MS"):
        options_from_args(parser.parse_args([]), {"KAIROS_BRONZE_WINDOW_MS": "10s"})
