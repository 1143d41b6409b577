"""The online store against a real redis-server: versioned snapshots, atomic flip, one-round-trip reads,
per-item rows read for exactly the candidates, incremental writes, pointer keys that expire with their data."""
from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pandas as pd
import pytest
import redis

from features.functions import co_engagement, new_session_state, update_session
from features.online import OnlineStore
from features.online_keys import CURRENT_KEY, VERSIONS_KEY, items_key, meta_key, popular_key, published_key, rev_key, session_key, text_key, user_key
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


def _items(n: int, clicks: float | None = None) -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [f"i{i:05d}" for i in range(n)],
        "feature_ts": 1_000,
        "item_clicks_7d": [float(n - i) if clicks is None else clicks for i in range(n)],
        "item_impressions_7d": [100.0] * n,
        "item_ctr_7d": [np.nan if i == 3 else 0.05 for i in range(n)],
        "category": [f"cat_{i % 3:02d}" for i in range(n)],
        "publish_ts": [1_700_000_000_000 + i for i in range(n)],
        "co_items_30d": [None if i == 0 else json.dumps({f"i{(i + 1) % n:05d}": 3.0, f"i{(i + 2) % n:05d}": 1.0})
                         for i in range(n)],
    })


class CountingConnection(redis.Connection):
    """A real connection that counts how many times the test thread writes a request batch (one per
    round trip)."""

    sends = 0

    def send_packed_command(self, command, check_health=True):  # noqa: ANN001
        if threading.current_thread() is threading.main_thread():
            CountingConnection.sends += 1
        return super().send_packed_command(command, check_health)


def _counting_store(redis_server: EmbeddedRedis, **kwargs) -> OnlineStore:
    pool = redis.ConnectionPool.from_url(redis_server.url, decode_responses=True, connection_class=CountingConnection)
    return OnlineStore(redis.Redis(connection_pool=pool), **kwargs)


def _reset_counts(client: redis.Redis | None = None) -> None:
    CountingConnection.sends = 0
    if client is not None:
        client.config_resetstat()


def _commands(client: redis.Redis) -> dict[str, int]:
    """Commands the server executed since the last reset (its own count, whichever client sent them)."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_").upper(): int(v["calls"]) for k, v in stats.items()
            if k.removeprefix("cmdstat_") not in ("info", "config", "client", "hello", "ping")}


def test_materialize_flips_current_only_after_a_complete_snapshot(redis_client: redis.Redis) -> None:
    store = OnlineStore(redis_client)
    r1 = store.materialize(_users(50), _items(30), version="v1", popular=["i00002", "i00001"])
    assert redis_client.get(CURRENT_KEY) == "v1"
    assert r1["users_written"] == 50 and r1["items_written"] == 30

    r2 = store.materialize(_users(60, scale=2.0), _items(40), version="v2")
    assert redis_client.get(CURRENT_KEY) == "v2" and r2["previous_version"] == "v1"
    # v2 is complete: one packed row per item, the fresh index, the text dictionary
    assert all(redis_client.exists(user_key("v2", f"u{i:05d}")) for i in range(60))
    assert redis_client.hlen(items_key("v2")) == 40 and redis_client.zcard(published_key("v2")) == 40
    assert redis_client.lrange(text_key("v2", "category"), 0, -1) == ["cat_00", "cat_01", "cat_02"]
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
    assert redis_client.zrange(VERSIONS_KEY, 0, -1) == ["v2", "v3"]
    assert redis_client.hlen(items_key("v3")) == 5 and not redis_client.keys("*:tmp:*")  # no scratch keys left

    # NaN and missing values are not written (readers fall back to registry defaults); JSON survives
    row = store.fetch("u00001", None)[0]
    assert "user_ctr_30d" not in row and row["user_clicks_7d"] == 1.0
    assert "user_category_clicks_30d" not in store.fetch("u00002", None)[0]
    assert json.loads(store.fetch("u00003", None)[0]["user_category_clicks_30d"]) == {"cat_00": 3, "cat_01": 1}


def test_item_rows_round_trip_and_are_read_for_exactly_the_candidates(redis_server: EmbeddedRedis,
                                                                     redis_client: redis.Redis) -> None:
    items = _items(5000)
    OnlineStore(redis_client).materialize(_users(3), items, version="v1")
    store = _counting_store(redis_server)
    _reset_counts(redis_client)
    _, _, version = store.fetch("u00001", None)  # first contact: current, then user + meta + rev (no item rows)
    assert version == "v1" and _commands(redis_client) == {"GET": 2, "HGETALL": 1, "HMGET": 1}
    table = store.item_table(version)
    cands = ["i00004", "unknown", "i00003", "i00000", "i04999", "i00004"]
    _reset_counts(redis_client)
    cols = table.columns_for(cands)
    # one HMGET of the distinct ids (plus, once per version, the category dictionary) - never the catalog
    assert _commands(redis_client) == {"HMGET": 1, "LRANGE": 1} and store.table_loads == 5
    assert cols["category"].tolist() == ["cat_01", None, "cat_00", "cat_00", "cat_01", "cat_01"]
    assert cols["item_clicks_7d"][0] == 4996.0 and math.isnan(cols["item_clicks_7d"][1])
    assert math.isnan(cols["item_ctr_7d"][2]) and cols["item_ctr_7d"][0] == pytest.approx(0.05, rel=1e-7)
    assert cols["publish_ts"][4] == 1_700_000_004_999  # float64: ms timestamps are exact
    assert cols["co_items_30d"][3] is None and cols["co_items_30d"][1] is None
    co = cols["co_items_30d"][0]
    assert dict(co.items()) == {"i00005": 3.0, "i00006": 1.0} and co.get("i00006") == 1.0 and co.get("i0000") is None
    # the shared feature function reads the packed map exactly like the JSON the batch job wrote
    hist = [["i00006", "i00001"]] * 6
    parsed = [json.loads(v) if isinstance(v, str) else None for v in items.set_index("item_id").reindex(cands)["co_items_30d"]]
    assert co_engagement(cols["co_items_30d"].tolist(), hist).tolist() == co_engagement(parsed, hist).tolist()

    # the same rows again come from the in-process LRU: no round trip at all
    _reset_counts(redis_client)
    again = store.item_table(version).columns_for(cands)
    assert CountingConnection.sends == 0 and _commands(redis_client) == {} and store.table_hits == 5
    assert again["category"].tolist() == cols["category"].tolist()
    assert store.item_table(version).co_items_for(["i00001", "i00000"]) == {"i00001": {"i00002": 3.0, "i00003": 1.0}}
    # Redis holds < 200 bytes per (small) item row: no JSON blob per version
    assert redis_client.memory_usage(items_key("v1"), samples=0) / 5000 < 200


def test_the_row_cache_is_bounded(redis_client: redis.Redis) -> None:
    OnlineStore(redis_client).materialize(_users(1), _items(100), version="v1")
    store = OnlineStore(redis_client, item_cache_rows=10)
    store.fetch("u00000", None)
    table = store.item_table("v1")
    for k in range(10):
        table.columns_for([f"i{j:05d}" for j in range(10 * k, 10 * k + 10)])
        assert store.cached_rows <= 10
    table.columns_for([f"i{j:05d}" for j in range(90, 100)])
    assert store.table_hits == 10  # the last ten are the ones kept


def test_fetch_is_one_round_trip_and_switches_version_atomically(redis_server: EmbeddedRedis,
                                                                 redis_client: redis.Redis) -> None:
    OnlineStore(redis_client).materialize(_users(20), _items(10), version="v1")
    state = new_session_state()
    for k, item in enumerate(["i00001", "i00004"]):
        state = update_session(state, "click", item, "cat_01", 1_000 + k)
    redis_client.set(session_key("s1"), json.dumps(state), ex=60)

    store = _counting_store(redis_server)
    store.fetch("u00000", "s1")  # first contact: learns the live version
    _reset_counts()
    user, session, version = store.fetch("u00007", "s1")
    assert CountingConnection.sends == 1
    assert version == "v1" and user["user_clicks_7d"] == 7.0
    assert session["last_items"] == ["i00004", "i00001"] and session["clicks"] == 2

    # unknown user / session -> None, still one round trip
    _reset_counts()
    assert store.fetch("nobody", "no-session") == (None, None, "v1")
    assert CountingConnection.sends == 1

    # a new snapshot goes live: the next request reads it whole (user and item rows of v2), with no bulk
    # load: one extra round trip, once, then one again
    OnlineStore(redis_client).materialize(_users(20, scale=3.0), _items(10, clicks=42.0), version="v2")
    _reset_counts()
    user, _, version = store.fetch("u00007", "s1")
    assert version == "v2" and user["user_clicks_7d"] == 21.0 and CountingConnection.sends == 2
    assert store.item_table(version).columns_for(["i00001"])["item_clicks_7d"][0] == 42.0
    _reset_counts()
    store.fetch("u00007", "s1")
    assert CountingConnection.sends == 1


def test_no_mixed_reads_while_versions_switch(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> None:
    """Each snapshot k has user and item values k: a request must never pair a user of one with items of
    another, however materializations and reads interleave (real threads, real Redis)."""
    writer = OnlineStore(redis.Redis.from_url(redis_server.url, decode_responses=True))
    writer.materialize(_users(5, scale=0.0).assign(user_clicks_7d=1.0), _items(200, clicks=1.0), version="s1")
    stop = threading.Event()
    done = {"versions": 1}

    def materialize_more() -> None:
        for k in range(2, 9):
            writer.materialize(_users(5).assign(user_clicks_7d=float(k)), _items(200, clicks=float(k)),
                               version=f"s{k}")
            done["versions"] = k
        stop.set()

    reader = OnlineStore(redis.Redis.from_url(redis_server.url, decode_responses=True), item_cache_rows=100)
    thread = threading.Thread(target=materialize_more)
    thread.start()
    reads = mixed = 0
    seen: set[float] = set()
    rng = np.random.default_rng(3)
    while not stop.is_set() or reads < 50:
        user, _, version = reader.fetch("u00001", None)
        cols = reader.item_table(version).columns_for([f"i{j:05d}" for j in rng.integers(0, 200, 50)])
        reads += 1
        values = set(cols["item_clicks_7d"].tolist())
        mixed += values != {user["user_clicks_7d"]}
        seen.add(user["user_clicks_7d"])
    thread.join()
    assert mixed == 0 and reads >= 50 and done["versions"] == 8 and len(seen) >= 2


def test_incremental_item_writes_reach_every_cache_and_the_fresh_channel(redis_server: EmbeddedRedis,
                                                                         redis_client: redis.Redis) -> None:
    OnlineStore(redis_client).materialize(_users(2), _items(50), version="v1")
    server = _counting_store(redis_server)  # a serving process with a warm cache
    server.fetch("u00000", None)
    before = server.item_table("v1").columns_for(["i00007", "i00008"])
    assert before["item_clicks_7d"].tolist() == [43.0, 42.0]
    assert server.item_table("v1").fresh_window()[0][0] == "i00049"

    # another process writes one changed item and one new item (with a category the version never had)
    now_ms = int(time.time() * 1000)
    changed = pd.DataFrame({"item_id": ["i00007", "new-1"], "item_clicks_7d": [999.0, 1.0],
                            "category": ["cat_01", "cat_new"], "publish_ts": [1_700_000_000_007, now_ms]})
    out = OnlineStore(redis.Redis.from_url(redis_server.url, decode_responses=True)).write_items(changed)
    assert out == {"version": "v1", "items_written": 2, "seq": 1}
    assert redis_client.hlen(items_key("v1")) == 51 and redis_client.hget(rev_key("v1"), "seq") == "1"

    # the server's next request sees the seq move and drops exactly those rows; the rest stay cached
    server.fetch("u00000", None)
    loads = server.table_loads
    table = server.item_table("v1")
    after = table.columns_for(["i00007", "i00008", "new-1"])
    assert after["item_clicks_7d"].tolist() == [999.0, 42.0, 1.0]
    assert after["category"].tolist() == ["cat_01", "cat_02", "cat_new"]
    assert math.isnan(after["item_impressions_7d"][0])  # a written row replaces the item whole
    assert server.table_loads - loads == 2  # i00008 came from the cache
    ids, published = table.fresh_window()
    assert ids[0] == "new-1" and published[0] == now_ms  # visible to the fresh channel at once
    # the row expires with its version
    assert abs(redis_client.pttl(items_key("v1")) - redis_client.pttl(meta_key("v1"))) < 1000


def test_unknown_columns_are_refused_before_anything_is_written(redis_client: redis.Redis) -> None:
    store = OnlineStore(redis_client)
    with pytest.raises(ValueError, match=r"item column\(s\) \['price'\] are not declared.*features/registry.py"):
        store.materialize(_users(3), _items(5).assign(price=1.0), version="v1")
    with pytest.raises(ValueError, match=r"user column\(s\) \['age'\]"):
        store.materialize(_users(3).assign(age=30), _items(5), version="v1")
    assert redis_client.get(CURRENT_KEY) is None and not redis_client.keys("kairos:fs:*")
    store.materialize(_users(3), _items(5), version="v1")
    with pytest.raises(ValueError, match="price"):
        store.write_items(pd.DataFrame({"item_id": ["i1"], "price": [2.0]}))
    with pytest.raises(ValueError, match="does not exist"):
        store.write_items(pd.DataFrame({"item_id": ["i1"]}), version="nope")


def test_a_catalog_without_categories_is_served(redis_client: redis.Redis) -> None:
    items = _items(6).drop(columns=["category", "co_items_30d"])
    OnlineStore(redis_client).materialize(_users(2), items, version="v1")
    store = OnlineStore(redis_client)
    _, _, version = store.fetch("u00000", None)
    table = store.item_table(version)
    cols = table.columns_for(["i00001", "i00002"])
    assert cols["category"].tolist() == [None, None] and cols["item_clicks_7d"].tolist() == [5.0, 4.0]
    assert table.category.get("i00001") is None and table.co_items_for(["i00001"]) == {}
    assert not redis_client.exists(text_key("v1", "category"))


def test_pointer_keys_live_exactly_as_long_as_the_data(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> None:
    store = OnlineStore(redis_client)
    store.materialize(_users(3), _items(5), version="long", ttl_s=60)
    store.materialize(_users(3), _items(5), version="short", ttl_s=2)
    data_ttl = redis_client.pttl(items_key("short"))
    for key in (CURRENT_KEY, meta_key("short"), user_key("short", "u00001"), published_key("short"),
                rev_key("short"), popular_key("short"), text_key("short", "category")):
        assert abs(redis_client.pttl(key) - data_ttl) < 200, key  # one instant for the pointer and the data
    # the version list lives as long as its longest-lived member
    assert abs(redis_client.pttl(VERSIONS_KEY) - redis_client.pttl(items_key("long"))) < 200

    reader = OnlineStore(redis.Redis.from_url(redis_server.url, decode_responses=True))
    assert reader.fetch("u00001", None)[2] == "short"
    time.sleep(data_ttl / 1000 + 0.3)
    # the pointer went with the data: nothing names a version that is gone
    assert redis_client.get(CURRENT_KEY) is None and not redis_client.exists(items_key("short"))
    assert reader.fetch("u00001", None) == (None, None, None)
    assert reader.item_table(None).columns_for(["i00001"])["category"].tolist() == [None]
    # the next snapshot prunes the expired member from the list
    store.materialize(_users(3), _items(5), version="next", ttl_s=60)
    assert redis_client.zrange(VERSIONS_KEY, 0, -1) == ["long", "next"]


def test_sample_items_reads_rows_for_monitoring(redis_client: redis.Redis) -> None:
    OnlineStore(redis_client).materialize(_users(2), _items(30), version="v1")
    frame = OnlineStore(redis_client).sample_items("v1", n=10)
    assert len(frame) >= 10 and set(frame["category"]) <= {"cat_00", "cat_01", "cat_02"}
    assert frame["item_ctr_7d"].isna().sum() <= 1


def test_categories_for_the_streaming_job_follow_incremental_writes(redis_client: redis.Redis) -> None:
    OnlineStore(redis_client).materialize(_users(1), _items(10), version="v1")
    job_store = OnlineStore(redis_client)  # the streaming job's store never calls fetch()
    _reset_counts(redis_client)
    assert job_store.categories("v1", ["i00001", "i00002", "nope", "i00001"]) == \
        {"i00001": "cat_01", "i00002": "cat_02", "nope": None}
    assert _commands(redis_client)["HMGET"] == 3  # rev (twice on first contact) + one for the rows
    OnlineStore(redis_client).write_items(pd.DataFrame({"item_id": ["i00001"], "category": ["cat_moved"]}))
    assert job_store.categories("v1", ["i00001", "i00002"]) == {"i00001": "cat_moved", "i00002": "cat_02"}


def test_the_online_features_asset_writes_packed_rows_in_a_dagster_run(tmp_path, redis_server: EmbeddedRedis,
                                                                       redis_client: redis.Redis) -> None:
    """The asset as Dagster runs it: newest snapshot rows from Delta (feature_ts bookkeeping included), every
    catalog item servable, one version id from the pinned Delta versions."""
    from dagster import materialize

    from assets.serving import online_features
    from lake.delta import DeltaLake
    from assets.resources import LakeResource, RedisResource

    lake = DeltaLake(str(tmp_path / "lake"))
    users = _users(4)
    lake.write("user_features", pd.concat([users.assign(feature_ts=1_000), users.assign(feature_ts=2_000)]))
    items = _items(6).drop(columns=["feature_ts"])
    snap = items.iloc[:4]
    lake.write("item_features", pd.concat([snap.assign(feature_ts=1_000), snap.assign(feature_ts=2_000,
                                                                                       item_clicks_7d=7.0)]))
    lake.write("catalog_items", items[["item_id", "category", "publish_ts"]].assign(title="t"))
    result = materialize([online_features], resources={"lake": LakeResource(root=str(tmp_path / "lake")),
                                                       "redis": RedisResource(url=redis_server.url)})
    assert result.success
    meta = result.asset_materializations_for_node("online_features")[0].metadata
    version = meta["version"].value
    assert redis_client.get(CURRENT_KEY) == version and meta["items_written"].value == 6
    store = OnlineStore(redis_client)
    store.fetch("u00001", None)
    cols = store.item_table(version).columns_for(["i00000", "i00005"])
    assert cols["item_clicks_7d"][0] == 7.0 and math.isnan(cols["item_clicks_7d"][1])  # no activity: defaults
    assert cols["category"].tolist() == ["cat_00", "cat_02"]


def test_the_fresh_index_keeps_only_the_newest_items(redis_client: redis.Redis, monkeypatch) -> None:
    import features.online_write as online_write

    monkeypatch.setattr(online_write, "PUBLISHED_KEEP", 8)
    store = OnlineStore(redis_client)
    store.materialize(_users(1), _items(30), version="v1")
    assert redis_client.zrevrange(published_key("v1"), 0, -1) == [f"i{i:05d}" for i in range(29, 21, -1)]
    store.write_items(pd.DataFrame({"item_id": ["new"], "publish_ts": [1_800_000_000_000]}))
    assert redis_client.zcard(published_key("v1")) == 8 and redis_client.zrevrange(published_key("v1"), 0, 0) == ["new"]


def test_a_session_is_read_only_by_its_owner(redis_client) -> None:
    """The streaming job binds a session to its first user; the read side honours it: another user's request
    naming that session id is served without it (no one personalizes from someone else's clicks)."""
    import json as _json

    from features.online import OnlineStore
    from features.online_keys import session_key, session_owner_key

    redis_client.set(session_key("shared-s"), _json.dumps({"last_items": ["i1"], "length": 1}))
    redis_client.set(session_owner_key("shared-s"), "owner-u")
    store = OnlineStore(redis_client)
    assert store.fetch("owner-u", "shared-s")[1]["last_items"] == ["i1"]
    assert store.fetch("other-u", "shared-s")[1] is None
    redis_client.set(session_key("free-s"), _json.dumps({"last_items": ["i2"], "length": 1}))  # no owner yet
    assert store.fetch("anyone", "free-s")[1]["last_items"] == ["i2"]


def test_decoded_co_item_maps_are_cached_per_version_and_follow_writes(redis_client: redis.Redis) -> None:
    """A row read once serves its co-item map lazily (a PackedMap: a catalog read uniformly decodes nothing it will not
    see again); read again from the row cache, it is decoded once per (version, epoch) into a WeightMap held with the
    version (the same object on the next read, its total summed); an incremental write of the row replaces it, a new
    version serves its own and the old version's maps go with the old version."""
    from features.functions import WeightMap
    from features.online_codec import PackedMap

    OnlineStore(redis_client).materialize(_users(1), _items(10), version="v1")
    store = OnlineStore(redis_client)
    store.fetch("u00000", None)
    ids = ["i00001", "i00000", "i00002"]
    lazy = store.item_table("v1").columns_for(ids)["co_items_30d"]
    assert lazy[1] is None and type(lazy[0]) is PackedMap and dict(lazy[0].items()) == {"i00002": 3.0, "i00003": 1.0}
    assert lazy[0].keys() == ["i00002", "i00003"] and dict(lazy[0]) == {"i00002": 3.0, "i00003": 1.0}
    assert not store._states["v1"].decoded("co_items_30d")  # nothing decoded for rows seen once
    first = store.item_table("v1").columns_for(ids)["co_items_30d"]
    assert first[1] is None and isinstance(first[0], WeightMap)
    assert dict(first[0]) == {"i00002": 3.0, "i00003": 1.0} and first[0].total == 4.0
    again = store.item_table("v1").columns_for(["i00001"])["co_items_30d"]
    assert again[0] is first[0]  # the version's cached map, not decoded again
    OnlineStore(redis_client).write_items(pd.DataFrame({"item_id": ["i00001"],
                                                        "co_items_30d": [json.dumps({"i00009": 2.5})]}))
    store.fetch("u00000", None)  # the round trip that carries the version's rev
    store.item_table("v1").columns_for(["i00001"])  # the rewritten row, read once: lazy again
    moved = store.item_table("v1").columns_for(["i00001", "i00002"])["co_items_30d"]
    assert dict(moved[0]) == {"i00009": 2.5} and moved[0].total == 2.5
    assert moved[1] is first[2]  # rows the write did not touch stay cached
    OnlineStore(redis_client).materialize(_users(1), _items(10, clicks=1.0), version="v2")
    store.fetch("u00000", None)  # adopts v2
    store.item_table("v2").columns_for(["i00001"])
    fresh = store.item_table("v2").columns_for(["i00001"])["co_items_30d"]
    assert dict(fresh[0]) == {"i00002": 3.0, "i00003": 1.0} and fresh[0] is not first[0]
    assert set(store._states) == {"v1", "v2"} and store._states["v2"].decoded("co_items_30d") == {"i00001": fresh[0]}
    assert store._states["v2"].decoded("co_items_30d")["i00001"] is fresh[0]
