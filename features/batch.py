"""Batch features in Spark: daily snapshots for the offline store, all days in one pass.

A snapshot stamped `feature_ts = D` (midnight UTC) aggregates only events with
timestamp < D, so any row joined to it as-of sees the past alone. Snapshots are
written to Delta; the latest one is what the online store serves.

Cost is linear in events, not in calendar days: each (entity, day) aggregate is
exploded into the snapshot days its window reaches (day+1 .. day+window, an equi-key
fan-out of at most `window` rows), then summed per (entity, snapshot day). No join
against the calendar, so a 20-year log with sparse activity costs what its events
cost; days without activity inside an entity's window produce no row for it.
"""
from __future__ import annotations

from typing import Any

from features.functions import CTR_PRIOR_CLICKS, CTR_PRIOR_IMPRESSIONS
from features.registry import CATEGORY_HALF_LIFE_DAYS, CO_ITEMS_TOP_K, ITEM_STORE_COLUMNS, USER_STORE_COLUMNS
from ingestion.schema import DAY_MS

USER_WINDOW_DAYS = 30
USER_SHORT_WINDOW_DAYS = 7
ITEM_WINDOW_DAYS = 7
ENGAGED = ("click",)


def _last_snapshot_day(events: Any) -> int:
    """The newest snapshot day: the day after the last event (it covers every event so far)."""
    from pyspark.sql import functions as F

    hi = events.agg(F.max("day").alias("hi")).collect()[0]["hi"]
    if hi is None:
        raise ValueError("no events to build feature snapshots from: materialize silver_events first")
    return int(hi) + 1


def _fan_out(frame: Any, window_days: int, last_snap: int) -> Any:
    """Each row of day d once per snapshot day its window reaches: d+1 .. min(d+window, last_snap)."""
    from pyspark.sql import functions as F

    upper = F.least(F.col("day") + F.lit(window_days), F.lit(last_snap))
    return frame.where(F.col("day") + 1 <= F.lit(last_snap)).withColumn(
        "snap_day", F.explode(F.sequence(F.col("day") + 1, upper)))


def _with_day(events: Any) -> Any:
    from pyspark.sql import functions as F

    return events.withColumn("day", F.floor(F.col("timestamp") / F.lit(DAY_MS)).cast("long"))


def _smoothed(clicks: Any, impressions: Any) -> Any:
    from pyspark.sql import functions as F

    return (clicks + F.lit(CTR_PRIOR_CLICKS)) / (impressions + F.lit(CTR_PRIOR_IMPRESSIONS))


def user_snapshots(spark: Any, events: Any, items: Any, users: Any | None = None) -> Any:
    """user_id, feature_ts and USER_STORE_COLUMNS: click/impression windows, session length, category maps, signup."""
    from pyspark.sql import functions as F

    ev = _with_day(events)
    daily = ev.groupBy("user_id", "day").agg(
        F.sum(F.when(F.col("event_type").isin(*ENGAGED), 1).otherwise(0)).alias("clicks"),
        F.sum(F.when(F.col("event_type") == "impression", 1).otherwise(0)).alias("impressions"),
        F.count("*").alias("events"),
        F.countDistinct("session_id").alias("sessions"),
    )
    last_snap = _last_snapshot_day(ev)
    joined = _fan_out(daily, USER_WINDOW_DAYS, last_snap)
    recent = F.col("day") >= F.col("snap_day") - USER_SHORT_WINDOW_DAYS
    agg = joined.groupBy("user_id", "snap_day").agg(
        F.sum(F.when(recent, F.col("clicks")).otherwise(0)).cast("double").alias("user_clicks_7d"),
        F.sum("impressions").cast("double").alias("user_impressions_30d"),
        F.sum("clicks").cast("double").alias("clicks_30d"),
        F.sum(F.when(recent, F.col("events")).otherwise(0)).cast("double").alias("events_7d"),
        F.sum(F.when(recent, F.col("sessions")).otherwise(0)).cast("double").alias("sessions_7d"),
    )
    cat_daily = (
        ev.where(F.col("event_type").isin(*ENGAGED))
        .join(items.select("item_id", "category"), "item_id")
        .groupBy("user_id", "day", "category").agg(F.count("*").alias("c"))
    )
    # a click d days before the snapshot weighs 0.5 ** ((d - 1) / half-life): yesterday counts fully
    decay = F.pow(F.lit(0.5), (F.col("snap_day") - F.col("day") - 1) / F.lit(CATEGORY_HALF_LIFE_DAYS))
    cat = (
        _fan_out(cat_daily, USER_WINDOW_DAYS, last_snap)
        .groupBy("user_id", "snap_day", "category")
        .agg(F.sum("c").cast("double").alias("c"), F.round(F.sum(F.col("c") * decay), 6).alias("cd"))
        .groupBy("user_id", "snap_day")
        .agg(F.to_json(F.map_from_entries(F.sort_array(F.collect_list(F.struct("category", "c"))))).alias("user_category_clicks_30d"),
             F.to_json(F.map_from_entries(F.sort_array(F.collect_list(F.struct("category", "cd"))))).alias("user_category_decayed_30d"))
    )
    out = (
        agg.join(cat, ["user_id", "snap_day"], "left")
        .withColumn("user_ctr_30d", _smoothed(F.col("clicks_30d"), F.col("user_impressions_30d")))
        .withColumn("user_avg_session_length_7d",
                    F.when(F.col("sessions_7d") > 0, F.col("events_7d") / F.col("sessions_7d")).otherwise(F.lit(0.0)))
        .withColumn("feature_ts", (F.col("snap_day") * F.lit(DAY_MS)).cast("long"))
    )
    if users is not None:
        out = out.join(users.select("user_id", F.col("signup_ts").cast("long").alias("signup_ts")), "user_id", "left")
    else:
        out = out.withColumn("signup_ts", F.lit(None).cast("long"))
    return out.select("user_id", "feature_ts", *USER_STORE_COLUMNS)


def item_snapshots(spark: Any, events: Any, items: Any) -> Any:
    """item_id, feature_ts and ITEM_STORE_COLUMNS: 7d clicks/impressions/CTR, catalog fields, co-clicked items."""
    from pyspark.sql import functions as F

    ev = _with_day(events).where(F.col("item_id").isNotNull())
    daily = ev.groupBy("item_id", "day").agg(
        F.sum(F.when(F.col("event_type").isin(*ENGAGED), 1).otherwise(0)).alias("clicks"),
        F.sum(F.when(F.col("event_type") == "impression", 1).otherwise(0)).alias("impressions"),
    )
    last_snap = _last_snapshot_day(ev)
    agg = (
        _fan_out(daily, ITEM_WINDOW_DAYS, last_snap)
        .groupBy("item_id", "snap_day")
        .agg(F.sum("clicks").cast("double").alias("item_clicks_7d"), F.sum("impressions").cast("double").alias("item_impressions_7d"))
    )
    # outer: an item co-clicked inside the 30-day window keeps its neighbours even without clicks in the last 7 days
    return (
        agg.join(co_items(ev, last_snap), ["item_id", "snap_day"], "outer")
        # such an item had no clicks or impressions in 7 days: 0, not missing
        .withColumn("item_clicks_7d", F.coalesce(F.col("item_clicks_7d"), F.lit(0.0)))
        .withColumn("item_impressions_7d", F.coalesce(F.col("item_impressions_7d"), F.lit(0.0)))
        .join(items.select("item_id", "category", "publish_ts"), "item_id", "left")
        .withColumn("item_ctr_7d", _smoothed(F.col("item_clicks_7d"), F.col("item_impressions_7d")))
        .withColumn("feature_ts", (F.col("snap_day") * F.lit(DAY_MS)).cast("long"))
        .select("item_id", "feature_ts", *ITEM_STORE_COLUMNS)
    )


def co_items(ev: Any, last_snap: int) -> Any:
    """item_id, snap_day, co_items_30d: the item's top co-clicked items (sessions that clicked both) in the
    30 days before the snapshot, as a JSON map. A pair counts from the day its later click happened."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    clicks = (ev.where(F.col("event_type").isin(*ENGAGED) & F.col("item_id").isNotNull())
              .select("session_id", "item_id", "day").dropDuplicates(["session_id", "item_id"]))
    a, b = clicks.alias("a"), clicks.alias("b")
    pairs = (a.join(b, (F.col("a.session_id") == F.col("b.session_id")) & (F.col("a.item_id") != F.col("b.item_id")))
             .select(F.col("a.item_id").alias("item_id"), F.col("b.item_id").alias("other"),
                     F.greatest(F.col("a.day"), F.col("b.day")).alias("day"))
             .groupBy("item_id", "other", "day").agg(F.count("*").alias("n")))
    windowed = (_fan_out(pairs, USER_WINDOW_DAYS, last_snap)
                .groupBy("item_id", "snap_day", "other").agg(F.sum("n").cast("double").alias("n")))
    rank = Window.partitionBy("item_id", "snap_day").orderBy(F.col("n").desc(), F.col("other"))
    return (windowed.withColumn("_rk", F.row_number().over(rank)).where(F.col("_rk") <= CO_ITEMS_TOP_K)
            .groupBy("item_id", "snap_day")
            .agg(F.to_json(F.map_from_entries(F.sort_array(F.collect_list(F.struct("other", "n"))))).alias("co_items_30d")))


def final_snapshot(snapshots: Any) -> Any:
    """The newest snapshot day (covers every event so far): what the online store serves.

    Entities absent from it had no activity inside their windows, so the server
    falls back to the registry defaults for them, exactly as training did.
    """
    from pyspark.sql import functions as F

    newest = snapshots.agg(F.max("feature_ts")).collect()[0][0]
    return snapshots.where(F.col("feature_ts") == F.lit(newest))
