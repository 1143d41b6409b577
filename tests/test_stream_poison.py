"""Poison in the stream (real redis-server, real Delta tables): entries that bypassed the intake (NaN, Infinity,
megabyte ids, a session state the fold cannot read) are quarantined or dead-lettered with their reason, the job
keeps going, the counts reconcile and both are landed in Delta; a wiped consumer group is re-created and
retention never trims what it has not finished meanwhile."""
from __future__ import annotations

import json
import time
from pathlib import Path


from assets.streaming import lag_decision
from features.online_keys import session_key
from lake.delta import DeltaLake
from streaming.bronze import (BRONZE_GROUP, BRONZE_TABLE, DEAD_LETTER_TABLE, QUARANTINE_TABLE, BronzeWriter,
                              bronze_rows, refused_landers)
from streaming.job import (COUNTS_KEY, DEAD_LETTER_STREAM, GROUP, QUARANTINE_STREAM, STREAM, SessionStreamProcessor,
                           publish)
from streaming.retention import stream_lag, trim_processed

NOW = int(time.time() * 1000) - 60_000


def _event(k: int, **over) -> dict:
    return {"event_id": f"p{k}", "user_id": f"u{k}", "session_id": f"s{k}", "item_id": "i1", "event_type": "click",
            "timestamp": NOW + k, "device_type": "mobile", "schema_version": 1, **over}


def test_poison_is_quarantined_or_dead_lettered_and_landed(redis_client, tmp_path: Path) -> None:
    proc = SessionStreamProcessor(redis_client, consumer_name="poison")
    proc.ensure_group()
    publish(redis_client, [_event(0), _event(1)])
    # what a producer writing to the stream directly can put there (Python's json writes NaN / Infinity)
    raw = [json.dumps(_event(2, timestamp=float("nan"))), json.dumps(_event(3, dwell_time_ms=float("inf"))),
           json.dumps(_event(4, session_id="s" * 1_000_000)), "[1, 2]"]
    for text in raw:
        redis_client.xadd(STREAM, {"event": text})
    # a session state the fold cannot read (written by an older, buggy version): that event is dead-lettered
    redis_client.set(session_key("s5"), json.dumps({"length": "many", "last_items": []}))
    publish(redis_client, [_event(5), _event(6)])

    for _ in range(3):  # a restart re-reads nothing: every entry was acknowledged with its outcome
        proc.process_pending()
        proc.process_once(count=100, block_ms=20)
    counts = {k: int(v) for k, v in redis_client.hgetall(COUNTS_KEY).items()}
    assert counts == {"applied": 3, "quarantined": 4, "dead_lettered": 1}
    assert sum(counts.values()) == redis_client.xlen(STREAM) and redis_client.xpending(STREAM, GROUP)["pending"] == 0
    reasons = {json.loads(f["event"]).get("event_id") if f["event"].startswith("{") else f["event"]: f["reason"]
               for _, f in redis_client.xrange(QUARANTINE_STREAM)}
    assert reasons["p2"].startswith("timestamp_not_null: timestamp nan")
    assert reasons["p3"].startswith("dwell_time_ms_is_integer")
    assert reasons["p4"].startswith("session_id_length") and len(reasons["p4"]) < 300
    assert "not a JSON object" in reasons["[1, 2]"]
    (entry, fields), = redis_client.xrange(DEAD_LETTER_STREAM)
    assert json.loads(fields["event"])["event_id"] == "p5" and fields["reason"].startswith("ValueError")
    assert json.loads(redis_client.get(session_key("s6")))["clicks"] == 1  # the batch around it applied

    # both land in Delta with their reason, once (a second flush adds nothing), and leave the streams
    lake = DeltaLake(str(tmp_path / "lake"))
    landers = refused_landers(redis_client, lake, window_ms=100, owner="t")
    time.sleep(0.2)  # the windows close
    for lander in landers:
        lander.ensure_group()
        lander.flush()
        lander.flush()
    quarantine = lake.read(QUARANTINE_TABLE)
    assert len(quarantine) == 4 and set(quarantine["reason"]) == set(reasons.values())
    dead = lake.read(DEAD_LETTER_TABLE)
    assert dead["source_stream_id"].tolist() == [fields["stream_id"]] and dead["reason"].str.startswith("ValueError").all()
    assert redis_client.xlen(QUARANTINE_STREAM) == 0 and redis_client.xlen(DEAD_LETTER_STREAM) == 0


def test_missing_group_pauses_retention_alerts_and_is_recreated(redis_client, tmp_path: Path) -> None:
    lake = DeltaLake(str(tmp_path / "lake"))
    proc = SessionStreamProcessor(redis_client, consumer_name="g")
    proc.ensure_group()
    writer = BronzeWriter(redis_client, lake, STREAM, window_ms=100, owner="g")
    writer.ensure_group()
    publish(redis_client, [_event(k) for k in range(5)])
    assert proc.process_once(count=10, block_ms=20) == 5
    redis_client.xgroup_destroy(STREAM, BRONZE_GROUP)  # what a Redis restored without it looks like

    assert trim_processed(redis_client, STREAM, required=(GROUP, BRONZE_GROUP)) == 0
    assert trim_processed(redis_client, STREAM) == 0  # registered readers count even when not named
    assert redis_client.xlen(STREAM) == 5
    lag = stream_lag(redis_client, STREAM)
    assert lag["missing_groups"] == [BRONZE_GROUP]
    fire, why = lag_decision(lag, GROUP)
    assert fire and "kairos-bronze missing" in why and "retention is paused" in why

    time.sleep(0.2)
    landed = writer.flush()  # re-creates its group at the stream's beginning and lands what it never wrote
    assert sum(b.rows for b in landed) == 5 and writer.stats["groups_recreated"] == 1
    assert sorted(lake.read(BRONZE_TABLE)["event_id"]) == [f"p{k}" for k in range(5)]
    assert stream_lag(redis_client, STREAM)["missing_groups"] == []
    assert trim_processed(redis_client, STREAM, required=(GROUP, BRONZE_GROUP)) == 5


def test_a_session_belongs_to_its_first_user(redis_client) -> None:
    """Another user's event naming an existing session is quarantined, never folded into that session."""
    proc = SessionStreamProcessor(redis_client, consumer_name="own")
    proc.ensure_group()
    publish(redis_client, [_event(1, user_id="alice", session_id="shared")])
    assert proc.process_once(count=10, block_ms=20) == 1
    before = redis_client.get(session_key("shared"))
    publish(redis_client, [_event(2, user_id="mallory", session_id="shared"), _event(3, user_id="alice",
                                                                                     session_id="shared")])
    assert proc.process_once(count=10, block_ms=20) == 1  # alice's second event only
    state = json.loads(redis_client.get(session_key("shared")))
    assert state["length"] == json.loads(before)["length"] + 1
    (_, fields), = redis_client.xrange(QUARANTINE_STREAM)
    assert json.loads(fields["event"])["user_id"] == "mallory"
    assert fields["reason"].startswith("session_id_owned_by_another_user")
    # within one batch the first user in stream order claims a new session
    publish(redis_client, [_event(4, user_id="bob", session_id="fresh"), _event(5, user_id="eve", session_id="fresh")])
    assert proc.process_once(count=10, block_ms=20) == 1
    assert redis_client.get("kairos:session_owner:fresh") == "bob"


def test_json_nested_past_the_parsers_depth_is_quarantined_not_a_crash_loop(redis_client) -> None:
    """json.loads raises RecursionError (not ValueError) on deep nesting: that entry, read again after every
    restart, used to stop the job each time. Now it is quarantined like any non-JSON entry, and bronze skips it."""
    proc = SessionStreamProcessor(redis_client, consumer_name="deep")
    proc.ensure_group()
    redis_client.xadd(STREAM, {"event": "[" * 100_000 + "]" * 100_000})
    publish(redis_client, [_event(1)])
    assert proc.process_once(count=10, block_ms=20) == 1
    (_, fields), = redis_client.xrange(QUARANTINE_STREAM)
    assert fields["reason"] == "event is not valid JSON (RecursionError)"
    assert {k: int(v) for k, v in redis_client.hgetall(COUNTS_KEY).items()} == {"applied": 1, "quarantined": 1}
    rows, unusable = bronze_rows(redis_client.xrange(STREAM))
    assert unusable == 1 and rows["event_id"].tolist() == ["p1"]
