"""Labels on Spark: `build_labels` itself, run per bucket of whole users on the executors.

Every label row depends on its own user's events (attribution by user and item, the catalog negatives a user was
never shown, drawn per positive from a counter seeded by its event id) except the negatives' popularity, which
counts engagements over every user: a first pass counts them per item in the JVM (`item_engagements`' rule:
ENGAGEMENT_EVENT_TYPES with ENGAGEMENT_KEYS set; one row per item reaches the driver, with its events and their
last timestamp), a second calls `build_labels` per bucket with those counts, the one Python pass over the events.
Forgotten users leave in the JVM too: the exclusion mask runs once per distinct user id, and a broadcast anti-join
drops their events. So the Spark engine writes the pandas engine's rows, and a bucket's memory is bounded
by its users' events (`USER_BUCKET_ROWS`), not by the log.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from data_contracts.schema import EVENT_COLUMNS
from ingestion.labels import ENGAGEMENT_EVENT_TYPES, ENGAGEMENT_KEYS, LABEL_COLUMNS, LabelConfig, build_labels

USER_BUCKET_ROWS = 500_000  # about this many events per bucket of users labeled in one pandas call
LABEL_DDL = ("event_id string, user_id string, item_id string, session_id string, timestamp long, position long, "
             "device_type string, page_context string, label double, label_binary long, n_engagements long, "
             "negative_kind string")

# rows of forgotten users: (user ids) -> mask, built by the caller from the exclusion list (compliance.exclusion)
ForgottenMask = Callable[[pd.Series], np.ndarray]


@dataclass
class SparkLabels:
    frame: Any            # the label rows (a Spark DataFrame, LABEL_DDL), not collected
    as_of_ms: int
    forgotten: int        # events of forgotten users left out
    n_events: int


def _forgotten_users(forgotten: ForgottenMask):
    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for users in frames:
            yield users[forgotten(users["user_id"])]
    return run


def _label(as_of_ms: int, config: LabelConfig, catalog: list[str] | None, engagements: pd.Series):
    def run(rows: pd.DataFrame) -> pd.DataFrame:
        lab = build_labels(rows.drop(columns=["bucket"]), as_of_ms=as_of_ms, config=config, catalog_item_ids=catalog,
                           engagements=engagements)
        lab = lab[LABEL_COLUMNS]
        return lab.astype({"position": "Int64", "timestamp": "int64", "label": "float64", "label_binary": "int64",
                           "n_engagements": "int64"})
    return run


def labels_on_spark(spark: Any, events: Any, config: LabelConfig, catalog_item_ids: Sequence[str] | None = None,
                    forgotten: ForgottenMask | None = None, n_rows: int | None = None) -> SparkLabels:
    """Label silver `events` (a Spark DataFrame with EVENT_COLUMNS) as `build_labels` does (module docstring),
    as of the last kept event + 1 ms (what the labels asset labels at, so every event counts for popularity).
    `n_rows`: the events' row count when the caller knows it (a Delta pin), else counted here (sizes the buckets)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    n = events.count() if n_rows is None else int(n_rows)
    n_buckets = max(spark.sparkContext.defaultParallelism, n // USER_BUCKET_ROWS)
    kept = events.select(*EVENT_COLUMNS)
    if forgotten is not None:  # the mask runs once per distinct user, not per event; their rows leave in the JVM
        gone = (events.select("user_id").where(F.col("user_id").isNotNull()).distinct()
                .mapInPandas(_forgotten_users(forgotten), "user_id string"))
        kept = kept.join(F.broadcast(gone), "user_id", "left_anti").select(*EVENT_COLUMNS)
    rows = (kept.withColumn("bucket", F.pmod(F.xxhash64("user_id"), F.lit(n_buckets)))
            .repartition(n_buckets, "bucket").persist(StorageLevel.MEMORY_AND_DISK))
    try:
        # per item (one row per item reaches the driver): its engagements (`item_engagements`' rule), its events
        # and their last timestamp; the null item's group holds the events without an item
        counted = F.col("event_type").isin(list(ENGAGEMENT_EVENT_TYPES))
        for c in ENGAGEMENT_KEYS:
            counted = counted & F.col(c).isNotNull()
        per_item = rows.groupBy("item_id").agg(F.sum(F.when(counted, 1).otherwise(0)).alias("engaged"),
                                               F.count(F.lit(1)).alias("n"), F.max("timestamp").alias("max_ts")).collect()
        engaged = {r["item_id"]: int(r["engaged"]) for r in per_item if r["item_id"] is not None and r["engaged"]}
        n_kept = sum(int(r["n"]) for r in per_item)
        stamps = [int(r["max_ts"]) for r in per_item if r["max_ts"] is not None]
        catalog = list(catalog_item_ids) if catalog_item_ids is not None else sorted(
            str(r["item_id"]) for r in per_item if r["item_id"] is not None)
        as_of = (max(stamps) if stamps else -1) + 1
        engagements = pd.Series(engaged, dtype="int64")
        frame = (rows.groupBy("bucket").applyInPandas(_label(as_of, config, catalog, engagements), LABEL_DDL)
                 .persist(StorageLevel.MEMORY_AND_DISK))
        frame.count()
    finally:
        rows.unpersist()
    forgotten_events = n - n_kept
    return SparkLabels(frame=frame, as_of_ms=as_of, forgotten=forgotten_events, n_events=n_kept)


__all__ = ["LABEL_DDL", "SparkLabels", "USER_BUCKET_ROWS", "labels_on_spark"]
