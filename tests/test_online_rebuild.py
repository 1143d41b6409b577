"""The online store comes back empty (Redis restarted without its data, or flushed): the sensor requests the
rebuild job at once, against a real DagsterInstance and a real redis-server, and stays quiet otherwise."""
from __future__ import annotations

import pandas as pd
import redis

from features.online import OnlineStore
from orchestration.sensors import empty_store_decision


def test_empty_store_decision() -> None:
    assert empty_store_decision("v3", "v3", 100.0, None) == (False, "online store serves snapshot v3")
    assert not empty_store_decision(None, None, 100.0, None)[0]  # never built: nothing to rebuild from
    fire, why = empty_store_decision(None, "v3", 1000.0, None)
    assert fire and "v3" in why
    assert not empty_store_decision(None, "v3", 1000.0, 900.0)[0] and empty_store_decision(None, "v3", 1300.0, 900.0)[0]


def test_sensor_requests_a_rebuild_when_redis_lost_the_snapshot(redis_server) -> None:
    from dagster import AssetMaterialization, DagsterInstance, RunRequest, SkipReason, build_sensor_context

    from orchestration.definitions import defs
    from assets.resources import RedisResource

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    sensor = defs.resolve_sensor_def("online_store_empty_sensor")
    resources = {"redis": RedisResource(url=redis_server.url)}
    with DagsterInstance.ephemeral() as instance:
        never = sensor(build_sensor_context(instance=instance, resources=resources))
        assert isinstance(never, SkipReason) and "never built" in never.skip_message
        instance.report_runless_asset_event(AssetMaterialization("online_features", metadata={"version": "u1-i1-5"}))
        items = pd.DataFrame({"item_id": ["i1"], "category": ["c"], "item_clicks_7d": 1.0, "item_impressions_7d": 1.0,
                              "item_ctr_7d": 1.0, "publish_ts": 0})
        OnlineStore(client).materialize(pd.DataFrame({"user_id": ["u1"], "user_clicks_7d": [1.0]}), items,
                                        version="u1-i1-5")
        serving = sensor(build_sensor_context(instance=instance, resources=resources))
        assert isinstance(serving, SkipReason) and "u1-i1-5" in serving.skip_message
        client.flushdb()  # what a Redis restarted without persistence looks like
        context = build_sensor_context(instance=instance, resources=resources)
        rebuild = sensor(context)
        assert isinstance(rebuild, RunRequest) and rebuild.job_name in (None, "refresh_online_store")
        assert rebuild.tags == {"kairos/trigger": "online_store_empty", "kairos/lost_version": "u1-i1-5"}
        again = sensor(build_sensor_context(instance=instance, resources=resources, cursor=context.cursor))
        assert isinstance(again, SkipReason) and "requested" in again.skip_message  # one rebuild, not one per tick
