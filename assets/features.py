"""Feature assets: daily snapshots in Spark (offline store), the point-in-time training set."""

from typing import TYPE_CHECKING, Any

from dagster import (AssetCheckResult, AssetCheckSpec, AssetExecutionContext, AssetSpec, MaterializeResult,
                     MetadataValue, asset, multi_asset)

from assets.ingestion import ITEMS, LABELS, SILVER, USERS
from compliance.versions import delta_data_version, source_version
from features.registry import registry_version
from training.dataset import SplitConfig
from assets.config import dataclass_config, to_dataclass
from assets.resources import LakeResource, SparkResource

USER_FEATURES = "user_features"
ITEM_FEATURES = "item_features"
TRAINING_SET = "training_set"
SNAPSHOT_CODE = source_version(__file__, "features/batch.py", "features/functions.py", "features/registry.py")
TRAINING_SET_CODE = source_version(__file__, "training/dataset.py", "features/functions.py", "features/registry.py")


@multi_asset(
    specs=[
        AssetSpec(USER_FEATURES, deps=[SILVER, ITEMS, USERS], group_name="features", code_version=SNAPSHOT_CODE,
                  description="Daily user feature snapshots (feature_ts = snapshot midnight; only earlier events)."),
        AssetSpec(ITEM_FEATURES, deps=[SILVER, ITEMS], group_name="features", code_version=SNAPSHOT_CODE,
                  description="Daily item feature snapshots."),
    ],
)
def feature_snapshots(context: AssetExecutionContext, lake: LakeResource, spark: SparkResource):
    from features.batch import item_snapshots, user_snapshots

    store = lake.lake()
    ev_pin, it_pin, us_pin = store.pin(SILVER), store.pin(ITEMS), store.pin(USERS)
    events = spark.read_table(store, SILVER, ev_pin.version)
    items = spark.read_table(store, ITEMS, it_pin.version)
    catalog_users = spark.read_table(store, USERS, us_pin.version)
    u = spark.write_table(store, USER_FEATURES, user_snapshots(spark.session(), events, items, catalog_users))
    i = spark.write_table(store, ITEM_FEATURES, item_snapshots(spark.session(), events, items))
    users = store.read(USER_FEATURES, version=u.version, columns=["feature_ts"])
    itemf = store.read(ITEM_FEATURES, version=i.version, columns=["feature_ts"])
    common: dict[str, Any] = {"silver_version": ev_pin.version, "catalog_users_version": us_pin.version,
              "feature_registry_version": registry_version()}
    yield MaterializeResult(asset_key=USER_FEATURES, metadata={"rows": u.rows, "delta_version": u.version,
                                                               "snapshots": int(users["feature_ts"].nunique()), **common},
                            data_version=delta_data_version(USER_FEATURES, u.version))
    yield MaterializeResult(asset_key=ITEM_FEATURES, metadata={"rows": i.rows, "delta_version": i.version,
                                                               "snapshots": int(itemf["feature_ts"].nunique()), **common},
                            data_version=delta_data_version(ITEM_FEATURES, i.version))


# SplitConfig's windows. test_quantile, if set: the test window starts at this quantile of the labeled rows'
# timestamps (test_days is ignored): 0.8 = the last 20% of the log, whatever its time span
if TYPE_CHECKING:
    TrainingSetConfig = Any
else:
    TrainingSetConfig = dataclass_config("TrainingSetConfig", SplitConfig,
                                         ("validation_days", "test_days", "test_quantile", "gap_hours"), __name__)


@asset(
    deps=[LABELS, USER_FEATURES, ITEM_FEATURES, SILVER, ITEMS],
    group_name="features",
    code_version=TRAINING_SET_CODE,
    check_specs=[AssetCheckSpec("point_in_time_correct", asset=TRAINING_SET, blocking=True,
                                description="Rows whose feature snapshot is not strictly older than the row (leakage): must be 0. Blocking: nothing trains on a leaking set.")],
    description="Labels joined as-of to feature snapshots and replayed session features; split by time with a gap.",
)
def training_set(context: AssetExecutionContext, config: TrainingSetConfig, lake: LakeResource, spark: SparkResource):
    from training.dataset import build_training_set, leak_count, read_training_set

    store = lake.lake()
    pins = {t: store.pin(t) for t in (LABELS, SILVER, USER_FEATURES, ITEM_FEATURES, ITEMS)}
    read = {t: spark.read_table(store, t, p.version) for t, p in pins.items()}
    items = store.read(ITEMS, version=pins[ITEMS].version)
    built, bounds = build_training_set(spark.session(), read[LABELS], read[SILVER], read[USER_FEATURES],
                                       read[ITEM_FEATURES], items,
                                       to_dataclass(config, SplitConfig))
    out = spark.write_table(store, TRAINING_SET, built)  # written by the executors, never collected
    frame = read_training_set(store, TRAINING_SET, out.version, columns=[
        "timestamp", "split", "label_binary", "user_id_feature_ts", "item_id_feature_ts"])
    leaks = leak_count(frame)
    splits = frame["split"].value_counts().to_dict()
    context.log.info(f"training set: {len(frame)} rows {splits}")
    inputs = {f"{t}_version": p.version for t, p in pins.items()}
    yield MaterializeResult(metadata={
        "rows": len(frame), "delta_version": out.version, **inputs,
        "splits": MetadataValue.json(splits),
        "split_boundaries": MetadataValue.json(bounds.as_dict()),
        "positive_rate": round(float(frame["label_binary"].mean()), 4) if len(frame) else 0.0,
    }, data_version=delta_data_version(TRAINING_SET, out.version))
    yield AssetCheckResult(check_name="point_in_time_correct", passed=leaks == 0,
                           metadata={"rows_with_future_features": leaks},
                           description="Every joined feature snapshot is stamped strictly before its row's event time.")
