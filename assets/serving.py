"""Serving assets: the latest feature snapshot materialized into Redis (the online store)."""

from typing import Any

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, asset

from assets.features import ITEM_FEATURES, USER_FEATURES
from assets.ingestion import ITEMS, SILVER
from compliance.versions import source_version
from assets.resources import LakeResource, RedisResource

ONLINE_FEATURES = "online_features"


@asset(deps=[USER_FEATURES, ITEM_FEATURES, ITEMS, SILVER], group_name="serving",
       code_version=source_version(__file__, "features/online.py", "features/history.py"),
       description="The newest snapshot in Redis under a version key; readers switch to it atomically.")
def online_features(context: AssetExecutionContext, lake: LakeResource, redis: RedisResource) -> MaterializeResult:
    from features.online import OnlineStore

    from features.history import consumed_items, serving_snapshot

    store = lake.lake()
    u_pin, i_pin = store.pin(USER_FEATURES), store.pin(ITEM_FEATURES)
    s_pin = store.pin(SILVER) if store.exists(SILVER) else None
    catalog = store.read(ITEMS)  # a catalog may lack a category (then categories read as missing)
    # what each user already consumed: excluded by the server, pooled by the user tower without a session
    consumed = (consumed_items(store.read(SILVER, version=s_pin.version,
                                          columns=["user_id", "item_id", "event_type", "timestamp"]))
                if s_pin is not None else None)  # no silver table (features loaded from elsewhere): no history
    users, items, popular, newest = serving_snapshot(store.read(USER_FEATURES, version=u_pin.version),
                                                     store.read(ITEM_FEATURES, version=i_pin.version), catalog,
                                                     consumed=consumed)
    version = f"u{u_pin.version}-i{i_pin.version}-{int(newest)}"
    online = OnlineStore(redis.client())
    result = online.materialize(users, items, version=version, popular=popular)
    context.log.info(f"materialized {len(users)} users and {len(items)} items to Redis as {version}")
    meta: dict[str, Any] = {"version": version, "users": len(users), "items": len(items),
            "user_features_version": u_pin.version, "item_features_version": i_pin.version, "snapshot_ts": int(newest)}
    meta.update({k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str, bool))})
    return MaterializeResult(metadata=meta, data_version=DataVersion(version))  # the Redis snapshot version
