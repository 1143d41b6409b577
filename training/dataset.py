"""The training set: labels joined point-in-time to features, split by time.

Each labeled impression gets, per feature group, the newest snapshot stamped
strictly before its timestamp (an as-of join in Spark), plus session features
replayed with the very function the streaming job applies (invariant 2).
Splits are by time with a gap, never random.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from data_contracts.schema import DAY_MS, HOUR_MS
from features.functions import CANDIDATE_EVENT, replay_session_features
from features.history import CONSUMED_TYPES, recent_items_before
from features.registry import SNAPSHOT_MAX_AGE_DAYS

log = logging.getLogger("kairos.dataset")

SESSION_COLUMNS = ["session_length", "session_clicks", "session_category_share", "session_item_seen",
                   "seconds_since_last_event", "session_last_items"]


@dataclass(frozen=True)
class SplitConfig:
    """Time split: the last `test_days` are test, the `validation_days` before them validation."""

    validation_days: float = 2.0
    test_days: float = 2.0
    gap_hours: float = 0.0
    # an as-of match older than this is treated as missing (bounds the join)
    max_feature_age_days: int = SNAPSHOT_MAX_AGE_DAYS
    # if set, the test window starts at this quantile of the rows' timestamps instead (test_days ignored)
    test_quantile: float | None = None


@dataclass(frozen=True)
class SplitBoundaries:
    validation_start_ms: int
    test_start_ms: int
    end_ms: int
    gap_ms: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def split_boundaries(max_ts: int, config: SplitConfig, timestamps: Any = None) -> SplitBoundaries:
    end = int(max_ts) + 1
    test_start = end - int(config.test_days * DAY_MS)
    if config.test_quantile is not None:
        import numpy as np

        if timestamps is None or not 0.0 < config.test_quantile < 1.0:
            raise ValueError(f"test_quantile must be in (0, 1) and needs the rows' timestamps, got {config.test_quantile}")
        test_start = int(np.quantile(np.asarray(timestamps, dtype=np.int64), config.test_quantile))
    gap = int(config.gap_hours * HOUR_MS)
    valid_start = test_start - gap - int(config.validation_days * DAY_MS)
    return SplitBoundaries(valid_start, test_start, end, gap)


def assign_split(ts: pd.Series, b: SplitBoundaries) -> pd.Series:
    """'train' | 'validation' | 'test' | 'gap' (gap rows are dropped)."""
    out = pd.Series("train", index=ts.index, dtype=object)
    out[ts >= b.validation_start_ms - b.gap_ms] = "gap"
    out[(ts >= b.validation_start_ms) & (ts < b.test_start_ms - b.gap_ms)] = "validation"
    out[(ts >= b.test_start_ms - b.gap_ms) & (ts < b.test_start_ms)] = "gap"
    out[ts >= b.test_start_ms] = "test"
    return out


def as_of_join(spark: Any, labels: Any, snapshots: Any, key: str, max_age_days: int) -> Any:
    """For each label row, the snapshot of `key` with the greatest feature_ts strictly before its timestamp."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ts_col = f"{key}_feature_ts"
    snap = snapshots.withColumnRenamed("feature_ts", ts_col).withColumnRenamed(key, "_snap_key")
    if key == "item_id":  # item attributes come from the catalog, not the snapshot
        snap = snap.drop("category", "publish_ts")
    cond = (
        (labels[key] == snap["_snap_key"])
        & (snap[ts_col] < labels["timestamp"])
        & (snap[ts_col] >= labels["timestamp"] - F.lit(max_age_days * DAY_MS))
    )
    joined = labels.join(snap, cond, "left").drop("_snap_key")
    w = Window.partitionBy("event_id").orderBy(F.col(ts_col).desc_nulls_last())
    return joined.withColumn("_rn", F.row_number().over(w)).where("_rn = 1").drop("_rn")


def session_features_spark(spark: Any, events: Any, item_category: dict[str, str]) -> Any:
    """Session features per impression, replayed per session in Spark with the shared fold."""
    from pyspark.sql import types as T

    schema = T.StructType(
        [T.StructField("event_id", T.StringType())]
        + [T.StructField(c, T.DoubleType()) for c in SESSION_COLUMNS[:-1]]
        + [T.StructField("session_last_items", T.StringType())]
    )
    cats = spark.sparkContext.broadcast(item_category)

    def replay(pdf: pd.DataFrame) -> pd.DataFrame:
        return replay_session_features(pdf, cats.value)

    return (
        events.select("event_id", "session_id", "event_type", "item_id", "timestamp")
        .groupBy("session_id")
        .applyInPandas(replay, schema=schema)
    )


def build_training_set(spark: Any, labels: Any, events: Any, user_snaps: Any, item_snaps: Any,
                       items: pd.DataFrame, config: SplitConfig) -> tuple[pd.DataFrame, SplitBoundaries]:
    """Join labels to features as of each impression, add session features, split by time."""
    from pyspark.sql import functions as F

    lab = labels.select("event_id", "user_id", "item_id", "session_id", "timestamp", "position",
                        "device_type", "page_context", "label", "label_binary")
    with_user = as_of_join(spark, lab, user_snaps, "user_id", config.max_feature_age_days)
    with_item = as_of_join(spark, with_user, item_snaps, "item_id", config.max_feature_age_days)
    item_category = dict(zip(items["item_id"], items["category"]))
    replay = events.select("event_id", "session_id", "event_type", "item_id", "timestamp")
    if "negative_kind" in labels.columns:  # catalog negatives get the session state of their moment, like impressions
        replay = replay.unionByName(labels.where(F.col("negative_kind") == "easy").select(
            "event_id", "session_id", F.lit(CANDIDATE_EVENT).alias("event_type"), "item_id", "timestamp"))
    sess = session_features_spark(spark, replay, item_category)
    catalog = spark.createDataFrame(items[["item_id", "category", "publish_ts"]])
    full = (
        with_item.join(sess, "event_id", "left")
        .join(F.broadcast(catalog), "item_id", "left")
        .withColumn("query_id", F.col("session_id"))
        .withColumn("request_ts", F.col("timestamp"))
    )
    pdf = full.toPandas()
    if pdf.empty:
        raise ValueError("the training set is empty: no labeled impressions (is the attribution window longer than the data?)")
    bounds = split_boundaries(int(pdf["timestamp"].max()), config, pdf["timestamp"].to_numpy())
    pdf["split"] = assign_split(pdf["timestamp"], bounds)
    pdf = pdf[pdf["split"] != "gap"].sort_values(["timestamp", "event_id"], kind="mergesort").reset_index(drop=True)
    for c in SESSION_COLUMNS[:-1]:
        pdf[c] = pdf[c].fillna(0.0)
    pdf["session_last_items"] = pdf["session_last_items"].fillna(json.dumps([]))
    # the user's latest consumed items before each row (what the server reads from the online store's user row)
    consumed = (events.where(F.col("event_type").isin(*sorted(CONSUMED_TYPES)))
                .select("user_id", "item_id", "event_type", "timestamp").toPandas())
    pdf["user_recent_items"] = recent_items_before(consumed, pdf)
    log.info("training set: %s rows (%s)", len(pdf), pdf["split"].value_counts().to_dict())
    return pdf, bounds
