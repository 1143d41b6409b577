"""The online store against a real redis-server: versioned snapshots, atomic flip, one-round-trip reads."""
from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pandas as pd
import redis

from features.functions import new_session_state, update_session
from features.online import CURRENT_KEY, OnlineStore, items_key, popular_key, session_key, user_key
from orchestration.services import EmbeddedRedis


def _users(n: int, scale: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": [f"u{i:05d}" for i in range(n)],
        "feature_ts": 1_000,
        "user_clicks_7d": [float(i) * scale for i in range(n)],
        "user_impressions_30d": [10.0 * i for i in range(n)],
        "user_ctr_30d": [np.nan if i == 1 else 0.1 for i in range(n)],
        "user_category_clicks_30d": [None if i == 2 else json.dumps({"cat_00": i, "cat_01": 1}) for i in range(n)],
    })


def _items(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [f"i{i:05d}" for i in range(n)],
        "item_clicks_7d": [float(n - i) for i in range(n)],
        "item_impressions_7d": [100.0] * n,
        "item_ctr_7d": [np.nan if i == 3 else 0.05 for i in range(n)],
        "category": [f"cat_{i % 3:02d}" for i in range(n)],
        "publish_ts": [1_700_000_000_000 + i for i in range(n)],
    })


class CountingConnection(redis.Connection):
    """A real connection that counts how many times the test thread writes a request batch (one per
    round trip); background loads in other threads are not the request path and are not counted."""

    sends = 0

    def send_packed_command(self, command, check_health=True):  # noqa: ANN001
        if threading.current_thread() is threading.main_thread():
            CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


def test_materialize_flips_current_only_after_a_complete_snapshot(redis_client: redis.Redis) -> None:
    store = OnlineStore(redis_client)
    r1 = store.materialize(_users(50), _items(30), version="v1", popular=["i00002", "i00001"])
    assert redis_client.get(CURRENT_KEY) == "v1"
    assert r1["users_written"] == 50 and r1["items_written"] == 30

    r2 = store.materialize(_users(60, scale=2.0), _items(40), version="v2")
    assert redis_client.get(CURRENT_KEY) == "v2" and r2["previous_version"] == "v1"
    # v2 is complete
    assert all(redis_client.exists(user_key("v2", f"u{i:05d}")) for i in range(60))
    assert len(json.loads(redis_client.get(items_key("v2")))["data"]["item_id"]) == 40
    assert json.loads(redis_client.get(popular_key("v2")))[:2] == ["i00000", "i00001"]  # by item_clicks_7d
    assert redis_client.ttl(user_key("v2", "u00000")) > 0
    # the previous version is kept (readers mid-request, instant rollback) ...
    assert redis_client.exists(items_key("v1"))
    store.materialize(_users(5), _items(5), version="v3")
    # ... anything older is gone
    assert not redis_client.keys("kairos:fs:v1:*")
    assert redis_client.exists(items_key("v2")) and redis_client.get(CURRENT_KEY) == "v3"
    # re-running the same snapshot (same Delta versions -> same version id) is idempotent and keeps v2
    store.materialize(_users(5), _items(5), version="v3")
    assert redis_client.exists(items_key("v2")) and redis_client.exists(user_key("v3", "u00004"))
    assert redis_client.zrange("kairos:fs:versions", 0, -1) == ["v2", "v3"]

    # NaN and missing values are not written (readers fall back to registry defaults); JSON survives
    row = store.fetch("u00001", None)[0]
    assert "user_ctr_30d" not in row and row["user_clicks_7d"] == 1.0
    assert "user_category_clicks_30d" not in store.fetch("u00002", None)[0]
    assert json.loads(store.fetch("u00003", None)[0]["user_category_clicks_30d"]) == {"cat_00": 3, "cat_01": 1}


def test_fetch_is_one_round_trip_and_follows_the_live_version(redis_server: EmbeddedRedis,
                                                              redis_client: redis.Redis) -> None:
    OnlineStore(redis_client).materialize(_users(20), _items(10), version="v1")
    state = new_session_state()
    for k, item in enumerate(["i00001", "i00004"]):
        state = update_session(state, "click", item, "cat_01", 1_000 + k)
    redis_client.set(session_key("s1"), json.dumps(state), ex=60)

    pool = redis.ConnectionPool.from_url(redis_server.url, decode_responses=True, connection_class=CountingConnection)
    store = OnlineStore(redis.Redis(connection_pool=pool))
    store.fetch("u00000", "s1")  # first contact: learns the live version and loads its item table
    CountingConnection.sends = 0
    user, session, version = store.fetch("u00007", "s1")
    assert CountingConnection.sends == 1
    assert version == "v1" and user["user_clicks_7d"] == 7.0
    assert session["last_items"] == ["i00004", "i00001"] and session["clicks"] == 2

    # unknown user / session -> None, still one round trip
    CountingConnection.sends = 0
    assert store.fetch("nobody", "no-session") == (None, None, "v1")
    assert CountingConnection.sends == 1

    # a new snapshot goes live: requests keep reading the previous (complete) snapshot, still in one
    # round trip, until the new item table is in memory (loaded in the background), then switch
    OnlineStore(redis_client).materialize(_users(20, scale=3.0), _items(10), version="v2")
    CountingConnection.sends = 0
    user, _, version = store.fetch("u00007", "s1")
    assert version == "v1" and user["user_clicks_7d"] == 7.0 and CountingConnection.sends == 1
    deadline = time.time() + 5
    while version != "v2" and time.time() < deadline:
        time.sleep(0.01)
        user, _, version = store.fetch("u00007", "s1")
    assert version == "v2" and user["user_clicks_7d"] == 21.0
    assert store.item_table("v2").version == "v2"


def test_item_table_is_loaded_once_per_version(redis_client: redis.Redis) -> None:
    store = OnlineStore(redis_client)
    store.materialize(_users(3), _items(12), version="v1")
    table = store.item_table("v1")
    assert store.item_table("v1") is table  # cached in-process
    frame = store.items("v1")
    assert list(frame.columns)[:2] == ["item_id", "item_clicks_7d"] and len(frame) == 12
    assert math.isnan(frame.loc[3, "item_ctr_7d"]) and frame.loc[0, "category"] == "cat_00"
    cols = table.columns_for(["i00004", "unknown"])
    assert cols["category"].tolist() == ["cat_01", None]
    assert cols["item_clicks_7d"][0] == 8.0 and math.isnan(cols["item_clicks_7d"][1])
    assert store.popular("v1")[0] == "i00000"
    assert store.items(None).empty
