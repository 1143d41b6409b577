"""The bronze dual write against a real redis-server and a real Delta table: rows land in the bronze
schema, a replayed window writes nothing, the contract reads the rows, the stream->table lag is measured."""
from __future__ import annotations

import json
import time

import pandas as pd
import pytest
import redis

from data_contracts.schema import BRONZE_SCHEMA
from lake.delta import DeltaLake
from streaming.bronze import BRONZE_GROUP, BRONZE_TABLE, BronzeWriter, bronze_rows, window_of
from streaming.job import STREAM, publish
from streaming.retention import stream_lag

WINDOW_MS = 200


def _event(k: int, **over) -> dict:
    ev = {"event_id": f"b{k}", "user_id": f"u{k % 3}", "item_id": f"i{k % 5}", "event_type": "click",
          "timestamp": 1_767_225_600_000 + k, "session_id": f"s{k % 4}", "position": k % 10,
          "page_context": "home_feed", "device_type": "mobile", "dwell_time_ms": 1500, "schema_version": 1}
    ev.update(over)
    return ev


def _wait_closed(client: redis.Redis) -> None:
    """Sleep until the window of the newest entry has closed on Redis' clock."""
    last = client.xinfo_stream(STREAM)["last-generated-id"]
    _, end = window_of(int(last.split("-")[0]), WINDOW_MS)
    while True:
        sec, usec = client.time()
        if sec * 1000 + usec // 1000 >= end:
            return
        time.sleep(0.02)


def test_bronze_table_name_is_the_ingestion_assets_table() -> None:
    from assets.ingestion import BRONZE

    assert BRONZE_TABLE == BRONZE


def test_bronze_rows_have_the_bronze_schema_and_keep_bad_values_for_the_contract() -> None:
    entries = [("1767225600123-0", {"event": json.dumps(_event(1))}),
               ("1767225600124-0", {"event": json.dumps(_event(2, timestamp="yesterday", source="app"))}),
               ("1767225600125-0", {"event": "{not json"})]
    frame, unusable = bronze_rows(entries)
    assert unusable == 1 and list(frame.columns) == BRONZE_SCHEMA.names and len(frame) == 2
    assert frame["received_at"].tolist() == [1767225600123, 1767225600124]
    assert frame["ingest_date"].tolist() == ["2026-01-01", "2026-01-01"]
    assert frame["source"].tolist() == ["stream", "app"]
    assert pd.isna(frame["timestamp"].iloc[1])  # not an integer: null, which the contract quarantines
    with pytest.raises(ValueError, match="must divide a day"):
        BronzeWriter(None, None, STREAM, window_ms=7_000)


def test_windows_land_once_and_a_replay_writes_nothing(redis_client: redis.Redis, tmp_path) -> None:
    lake = DeltaLake(str(tmp_path / "lake"))
    writer = BronzeWriter(redis_client, lake, STREAM, window_ms=WINDOW_MS, owner="w1")
    writer.ensure_group()
    assert writer.flush() == []  # empty stream: nothing to do, no table
    publish(redis_client, [_event(k) for k in range(50)])
    redis_client.xadd(STREAM, {"event": "[1, 2]"})  # not an object: counted, never a row
    _wait_closed(redis_client)
    first = writer.flush()
    assert first and not any(b.skipped for b in first)
    bronze = lake.read(BRONZE_TABLE)
    assert sorted(bronze["event_id"]) == sorted(f"b{k}" for k in range(50))
    assert sum(b.unusable for b in first) == 1
    ids = [e[0] for e in redis_client.xrange(STREAM)]
    assert first[0].batch_id.startswith(f"{STREAM}:{ids[0]}..") and first[-1].last_id == ids[-1]
    assert writer.cursor() == ids[-1]
    version = lake.version(BRONZE_TABLE)

    # a crash after the Delta commit but before the cursor moved: the same windows are written again -> no-op
    redis_client.xgroup_setid(STREAM, BRONZE_GROUP, "0")
    replay = writer.flush()
    assert [b.batch_id for b in replay] == [b.batch_id for b in first] and all(b.skipped for b in replay)
    assert lake.version(BRONZE_TABLE) == version and len(lake.read(BRONZE_TABLE)) == 50

    # a second writer cannot race the first one while it holds the lock
    other = BronzeWriter(redis_client, lake, STREAM, window_ms=WINDOW_MS, owner="w2")
    publish(redis_client, [_event(k) for k in range(50, 60)])
    _wait_closed(redis_client)
    assert other.flush() == []
    more = writer.flush()
    assert sum(b.rows for b in more) == 10 and len(lake.read(BRONZE_TABLE)) == 60
    assert stream_lag(redis_client, STREAM)["groups"][BRONZE_GROUP]["lag_ms"] == 0  # caught up


def test_bronze_lag_is_the_age_of_the_oldest_event_not_in_the_table(redis_client: redis.Redis, tmp_path) -> None:
    writer = BronzeWriter(redis_client, DeltaLake(str(tmp_path / "lake")), STREAM, window_ms=60_000, owner="w1")
    writer.ensure_group()
    publish(redis_client, [_event(1)])
    time.sleep(0.15)
    assert writer.flush() == []  # the minute-long window is still open
    lag = stream_lag(redis_client, STREAM)["groups"][BRONZE_GROUP]
    assert 150 <= lag["lag_ms"] < 5_000 and lag["pending"] == 0


def test_the_batch_contract_reads_what_the_stream_wrote(redis_client: redis.Redis, tmp_path) -> None:
    from data_contracts.events import validate_events

    lake = DeltaLake(str(tmp_path / "lake"))
    writer = BronzeWriter(redis_client, lake, STREAM, window_ms=WINDOW_MS, owner="w1")
    writer.ensure_group()
    publish(redis_client, [_event(k) for k in range(20)] + [_event(99, event_type="teleport")])
    _wait_closed(redis_client)
    writer.flush()
    bronze = lake.read(BRONZE_TABLE)
    now = int(bronze["received_at"].max()) + 1000
    result = validate_events(bronze.drop(columns=["ingest_date"]), run_id="t", now_ms=now)
    assert len(result.accepted) == 20 and len(result.quarantined) == 1 and result.reconciles()
