"""Serving assets: the latest feature snapshot materialized into Redis (the online store)."""

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, asset

from assets.features import ITEM_FEATURES, USER_FEATURES
from assets.ingestion import ITEMS
from compliance.versions import source_version
from orchestration.resources import LakeResource, RedisResource

ONLINE_FEATURES = "online_features"
POPULAR_LIST_SIZE = 500
CATALOG_COLUMNS = ("category", "publish_ts")  # item store columns the catalog owns (newest values win)


@asset(deps=[USER_FEATURES, ITEM_FEATURES, ITEMS], group_name="serving",
       code_version=source_version(__file__, "features/online.py"),
       description="The newest snapshot in Redis under a version key; readers switch to it atomically.")
def online_features(context: AssetExecutionContext, lake: LakeResource, redis: RedisResource) -> MaterializeResult:
    from features.online import OnlineStore

    store = lake.lake()
    u_pin, i_pin = store.pin(USER_FEATURES), store.pin(ITEM_FEATURES)
    users = store.read(USER_FEATURES, version=u_pin.version)
    items = store.read(ITEM_FEATURES, version=i_pin.version)
    users = users[users["feature_ts"] == users["feature_ts"].max()]
    newest = items["feature_ts"].max()
    items = items[items["feature_ts"] == newest]
    # every catalog item is servable, even one without recent activity (defaults apply)
    catalog = store.read(ITEMS)
    catalog = catalog[[c for c in ("item_id", *CATALOG_COLUMNS) if c in catalog]]  # a catalog may lack a category
    items = catalog.merge(items.drop(columns=list(CATALOG_COLUMNS), errors="ignore"), on="item_id", how="left")
    items["feature_ts"] = items["feature_ts"].fillna(newest)
    popular = items.sort_values("item_clicks_7d", ascending=False, na_position="last")["item_id"].head(POPULAR_LIST_SIZE).tolist()
    version = f"u{u_pin.version}-i{i_pin.version}-{int(newest)}"
    online = OnlineStore(redis.client())
    result = online.materialize(users, items, version=version, popular=popular)
    context.log.info(f"materialized {len(users)} users and {len(items)} items to Redis as {version}")
    meta = {"version": version, "users": len(users), "items": len(items),
            "user_features_version": u_pin.version, "item_features_version": i_pin.version, "snapshot_ts": int(newest)}
    meta.update({k: v for k, v in (result or {}).items() if isinstance(v, (int, float, str, bool))})
    return MaterializeResult(metadata=meta, data_version=DataVersion(version))  # the Redis snapshot version
