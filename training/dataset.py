"""The training set: labels joined point-in-time to features, split by time.

Each labeled impression gets, per feature group, the newest snapshot stamped
strictly before its timestamp (an as-of join in Spark), plus session features
replayed with the very function the streaming job applies (invariant 2).
Splits are by time with a gap, never random.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

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


def split_boundaries(max_ts: int, config: SplitConfig, timestamps: Any = None,
                     quantile_ts: float | None = None) -> SplitBoundaries:
    """The windows; a `test_quantile` split needs the rows' timestamps, or their quantile computed where they are
    (`quantile_ts`: Spark's exact `percentile`, the same linear interpolation as NumPy's default)."""
    end = int(max_ts) + 1
    test_start = end - int(config.test_days * DAY_MS)
    if config.test_quantile is not None:
        import numpy as np

        if (timestamps is None and quantile_ts is None) or not 0.0 < config.test_quantile < 1.0:
            raise ValueError(f"test_quantile must be in (0, 1) and needs the rows' timestamps, got {config.test_quantile}")
        test_start = int(quantile_ts if quantile_ts is not None
                         else np.quantile(np.asarray(timestamps, dtype=np.int64), config.test_quantile))
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
    # an equi-join on (key, age window): a snapshot joins its own window and the next one, so the range condition
    # is evaluated on at most two windows of the key's snapshots, not on all of them (2 years of daily item
    # snapshots is ~730 candidate pairs per label row under a key-only join)
    width = F.lit(max(math.ceil(max_age_days), 1) * DAY_MS)  # at least max_age: two windows cover it
    window = F.floor(F.col(ts_col) / width)
    snap = snap.withColumn("_snap_window", F.explode(F.array(window, window + F.lit(1))))
    labels = labels.withColumn("_label_window", F.floor(F.col("timestamp") / width))
    cond = (
        (labels[key] == snap["_snap_key"])
        & (labels["_label_window"] == snap["_snap_window"])
        & (snap[ts_col] < labels["timestamp"])
        & (snap[ts_col] >= labels["timestamp"] - F.lit(max_age_days * DAY_MS))
    )
    joined = labels.join(snap, cond, "left").drop("_snap_key", "_snap_window", "_label_window")
    w = Window.partitionBy("event_id").orderBy(F.col(ts_col).desc_nulls_last())
    return joined.withColumn("_rn", F.row_number().over(w)).where("_rn = 1").drop("_rn")


def session_features_spark(spark: Any, events: Any, item_category: dict[str, str], buckets: int | None = None) -> Any:
    """Session features per impression, replayed per session in Spark with the shared fold.

    Sessions are hashed into `buckets` groups (default: two per core) and one pandas call replays a whole
    bucket (replay_session_features folds each session of its frame separately): a group per session cost one
    Arrow batch and one Python call per session, ~1 ms each, 350 s on a 1M-click log of short sessions."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    schema = T.StructType(
        [T.StructField("event_id", T.StringType())]
        + [T.StructField(c, T.DoubleType()) for c in SESSION_COLUMNS[:-1]]
        + [T.StructField("session_last_items", T.StringType())]
    )
    cats = spark.sparkContext.broadcast(item_category)

    def replay(pdf: pd.DataFrame) -> pd.DataFrame:
        return replay_session_features(pdf, cats.value)

    n_buckets = max(int(buckets or 0), 2 * spark.sparkContext.defaultParallelism)
    return (
        events.select("event_id", "session_id", "event_type", "item_id", "timestamp")
        .withColumn("_session_bucket", F.abs(F.hash("session_id")) % F.lit(n_buckets))
        .groupBy("_session_bucket")
        .applyInPandas(lambda pdf: replay(pdf.drop(columns="_session_bucket")), schema=schema)
    )


# rows of one executor task in the final pass (users are bucketed so one bucket's rows and history fit in memory)
ROWS_PER_TASK = 200_000
# the order every reader sees (the join's output has none): reproducible samples and time-ordered splits
ROW_ORDER = ["timestamp", "event_id"]


def finish_rows(rows: pd.DataFrame, consumed: pd.DataFrame, bounds: SplitBoundaries) -> pd.DataFrame:
    """Split, defaults and the user's recent items for rows of some users, given those users' consumed events.

    Runs on the executors, one bucket of users at a time, so no step needs the whole set in one process."""
    rows = rows.copy()
    rows["split"] = assign_split(rows["timestamp"], bounds)
    rows = rows[rows["split"] != "gap"]
    for c in SESSION_COLUMNS[:-1]:
        rows[c] = rows[c].fillna(0.0)
    rows["session_last_items"] = rows["session_last_items"].fillna(json.dumps([]))
    # the user's latest consumed items before each row (what the server reads from the online store's user row)
    rows["user_recent_items"] = recent_items_before(consumed, rows) if len(rows) else pd.Series(dtype=object)
    return rows


def build_training_set(spark: Any, labels: Any, events: Any, user_snaps: Any, item_snaps: Any,
                       items: pd.DataFrame, config: SplitConfig) -> tuple[Any, SplitBoundaries]:
    """Join labels to features as of each impression, add session features, split by time.

    Returns a Spark DataFrame (write it with `lake.spark.spark_write`; read it back with `read_training_set`):
    the set is built and written by the executors and never collected into the driver."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    lab = labels.select("event_id", "user_id", "item_id", "session_id", "timestamp", "position",
                        "device_type", "page_context", "label", "label_binary")
    quantile = F.percentile("timestamp", F.lit(config.test_quantile)) if config.test_quantile is not None \
        else F.lit(None)
    stats = lab.agg(F.count(F.lit(1)).alias("n"), F.max("timestamp").alias("hi"), quantile.alias("q")).first()
    if not stats["n"]:
        raise ValueError("the training set is empty: no labeled impressions (is the attribution window longer than the data?)")
    bounds = split_boundaries(int(stats["hi"]), config, quantile_ts=stats["q"])
    with_user = as_of_join(spark, lab, user_snaps, "user_id", config.max_feature_age_days)
    with_item = as_of_join(spark, with_user, item_snaps, "item_id", config.max_feature_age_days)
    item_category = dict(zip(items["item_id"], items["category"]))
    replay = events.select("event_id", "session_id", "event_type", "item_id", "timestamp")
    if "negative_kind" in labels.columns:  # catalog negatives get the session state of their moment, like impressions
        replay = replay.unionByName(labels.where(F.col("negative_kind") == "easy").select(
            "event_id", "session_id", F.lit(CANDIDATE_EVENT).alias("event_type"), "item_id", "timestamp"))
    sess = session_features_spark(spark, replay, item_category, buckets=-(-int(stats["n"]) // ROWS_PER_TASK))
    catalog = spark.createDataFrame(items[["item_id", "category", "publish_ts"]])
    full = (
        with_item.join(sess, "event_id", "left")
        .join(F.broadcast(catalog), "item_id", "left")
        .withColumn("query_id", F.col("session_id"))
        .withColumn("request_ts", F.col("timestamp"))
    )
    consumed = (events.where(F.col("event_type").isin(*sorted(CONSUMED_TYPES)))
                .select("user_id", "item_id", "event_type", "timestamp"))
    buckets = max(2 * spark.sparkContext.defaultParallelism, -(-int(stats["n"]) // ROWS_PER_TASK))
    bucket = F.abs(F.hash("user_id")) % F.lit(buckets)
    columns = full.columns
    schema = T.StructType(list(full.schema.fields)
                          + [T.StructField("split", T.StringType()), T.StructField("user_recent_items", T.StringType())])
    names = [f.name for f in schema.fields]

    def finish(rows: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
        if rows.empty:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in names})
        return finish_rows(rows[columns], history, bounds)[names]

    log.info("training set: %s labeled rows, %s user buckets, split %s", stats["n"], buckets, bounds.as_dict())
    out = (full.withColumn("_bucket", bucket).groupBy("_bucket")
           .cogroup(consumed.withColumn("_bucket", bucket).groupBy("_bucket"))
           .applyInPandas(finish, schema=schema))
    return out, bounds


def read_training_set(store: Any, table: str, version: int, columns: list[str] | None = None,
                      filters: list[tuple] | None = None) -> pd.DataFrame:
    """A training set version in its one row order (time, then event id), whatever files the executors wrote;
    `columns` / `filters` (pyarrow DNF, e.g. [("split", "=", "train")]) read only those columns / rows: the same
    rows, in the same order, as filtering the whole set after reading it."""
    import pyarrow.compute as pc

    arrow = store.read_arrow(table, version=version, columns=columns, filters=filters)
    order = [c for c in ROW_ORDER if c in arrow.column_names]
    if order:  # sorted in Arrow (a stable sort; strings by their bytes = code points, as Python compares them),
        # then converted once: a pandas sort of the converted frame built a categorical of the event ids and copied
        # every column twice (the take, then reset_index), a third of reading a 2y-200k training set
        arrow = arrow.take(pc.sort_indices(arrow, sort_keys=[(c, "ascending") for c in order]))
    return arrow.to_pandas()


def stored_columns(store: Any, table: str, version: int, wanted: Iterable[str]) -> list[str]:
    """Those of `wanted` (once each, in order) that the table's `version` holds: a read of the columns some code
    needs, where a column that was never written reads as absent (as it would in the whole frame)."""
    stored = set(store.columns(table, version))
    return [c for c in dict.fromkeys(wanted) if c in stored]


def leak_count(frame: pd.DataFrame) -> int:
    """Rows whose joined snapshot is not strictly older than the row (must be 0: point-in-time correctness)."""
    leaks = 0
    for col in ("user_id_feature_ts", "item_id_feature_ts"):
        m = frame[col].notna()
        leaks += int((frame.loc[m, col] >= frame.loc[m, "timestamp"]).sum())
    return leaks
