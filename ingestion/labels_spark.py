"""Labels on Spark: `build_labels` itself, run per bucket of whole users on the executors.

Every label row depends on its own user's events (attribution by user and item, the catalog negatives a user was
never shown, drawn per positive from a counter seeded by its event id) except the negatives' popularity, which
counts engagements over every user: a first pass sums `item_engagements` over the buckets (one row per item reaches
the driver, with the log's last timestamp and the rows of forgotten users), a second calls `build_labels` per
bucket with those counts. So the Spark engine writes the pandas engine's rows, and a bucket's memory is bounded
by its users' events (`USER_BUCKET_ROWS`), not by the log.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from data_contracts.schema import EVENT_COLUMNS
from ingestion.labels import LABEL_COLUMNS, LabelConfig, build_labels, item_engagements

USER_BUCKET_ROWS = 500_000  # about this many events per bucket of users labeled in one pandas call
LABEL_DDL = ("event_id string, user_id string, item_id string, session_id string, timestamp long, position long, "
             "device_type string, page_context string, label double, label_binary long, n_engagements long, "
             "negative_kind string")
_STATS_DDL = "kind string, key string, value long"

# rows of forgotten users: (user ids) -> mask, built by the caller from the exclusion list (compliance.exclusion)
ForgottenMask = Callable[[pd.Series], np.ndarray]


@dataclass
class SparkLabels:
    frame: Any            # the label rows (a Spark DataFrame, LABEL_DDL), not collected
    as_of_ms: int
    forgotten: int        # events of forgotten users left out
    n_events: int


def _kept(rows: pd.DataFrame, forgotten: ForgottenMask | None) -> pd.DataFrame:
    if forgotten is None or rows.empty:
        return rows
    return rows[~forgotten(rows["user_id"])]


def _stats(forgotten: ForgottenMask | None, with_items: bool):
    def run(rows: pd.DataFrame) -> pd.DataFrame:
        kept = _kept(rows, forgotten)
        counts = item_engagements(kept)
        parts = [pd.DataFrame({"kind": "engagements", "key": counts.index.astype(str), "value": counts.to_numpy()}),
                 pd.DataFrame({"kind": ["forgotten", "events", "max_ts"], "key": "",
                               "value": [len(rows) - len(kept), len(kept),
                                         int(kept["timestamp"].max()) if len(kept) else -1]})]
        if with_items:
            items = kept["item_id"].dropna().unique()
            parts.append(pd.DataFrame({"kind": "item", "key": items.astype(str), "value": 0}))
        return pd.concat(parts, ignore_index=True).astype({"value": "int64"})
    return run


def _label(as_of_ms: int, config: LabelConfig, catalog: list[str] | None, engagements: pd.Series,
           forgotten: ForgottenMask | None):
    def run(rows: pd.DataFrame) -> pd.DataFrame:
        kept = _kept(rows.drop(columns=["bucket"]), forgotten)
        lab = build_labels(kept, as_of_ms=as_of_ms, config=config, catalog_item_ids=catalog,
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
    rows = (events.select(*EVENT_COLUMNS).withColumn("bucket", F.pmod(F.xxhash64("user_id"), F.lit(n_buckets)))
            .repartition(n_buckets, "bucket").persist(StorageLevel.MEMORY_AND_DISK))
    try:
        by_bucket = rows.groupBy("bucket")
        stats = (by_bucket.applyInPandas(_stats(forgotten, catalog_item_ids is None), _STATS_DDL)
                 .groupBy("kind", "key").agg(F.sum("value").alias("total"), F.max("value").alias("top")).collect())
        engaged = {r["key"]: int(r["total"]) for r in stats if r["kind"] == "engagements"}
        totals = {r["kind"]: (int(r["top"]) if r["kind"] == "max_ts" else int(r["total"]))
                  for r in stats if r["kind"] in ("forgotten", "events", "max_ts")}
        catalog = list(catalog_item_ids) if catalog_item_ids is not None else sorted(
            r["key"] for r in stats if r["kind"] == "item")
        as_of = totals.get("max_ts", -1) + 1
        engagements = pd.Series(engaged, dtype="int64")
        frame = (rows.groupBy("bucket").applyInPandas(_label(as_of, config, catalog, engagements, forgotten), LABEL_DDL)
                 .persist(StorageLevel.MEMORY_AND_DISK))
        frame.count()
    finally:
        rows.unpersist()
    return SparkLabels(frame=frame, as_of_ms=as_of, forgotten=totals.get("forgotten", 0),
                       n_events=totals.get("events", 0))


__all__ = ["LABEL_DDL", "SparkLabels", "USER_BUCKET_ROWS", "labels_on_spark"]
