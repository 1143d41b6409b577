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
from features.registry import (CATEGORY_HALF_LIFE_DAYS, CO_ITEMS_TOP_K, ENGAGED_CLICK_MIN_DWELL_MS, ENGAGED_EVENT_TYPES,
                               ITEM_ENGAGED_HALF_LIFE_DAYS, ITEM_ENGAGED_WINDOW_DAYS, ITEM_STORE_COLUMNS, USER_STORE_COLUMNS)
from data_contracts.schema import DAY_MS

USER_WINDOW_DAYS = 30
USER_SHORT_WINDOW_DAYS = 7
ITEM_WINDOW_DAYS = 7
CO_ITEMS_WINDOW_DAYS = USER_WINDOW_DAYS
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
    """item_id, feature_ts and ITEM_STORE_COLUMNS: 7d clicks/impressions/CTR, 30d decayed engagement, catalog
    fields, co-clicked items."""
    from pyspark.sql import functions as F

    ev = _with_day(events).where(F.col("item_id").isNotNull())
    dwell = F.coalesce(F.col("dwell_time_ms"), F.lit(0)) if "dwell_time_ms" in events.columns else F.lit(0)
    engaged = (F.col("event_type").isin(*ENGAGED_EVENT_TYPES)
               | ((F.col("event_type") == "click") & (dwell >= F.lit(ENGAGED_CLICK_MIN_DWELL_MS))))
    daily = ev.groupBy("item_id", "day").agg(
        F.sum(F.when(F.col("event_type").isin(*ENGAGED), 1).otherwise(0)).alias("clicks"),
        F.sum(F.when(F.col("event_type") == "impression", 1).otherwise(0)).alias("impressions"),
        F.sum(F.when(engaged, 1).otherwise(0)).alias("engaged"),
    )
    last_snap = _last_snapshot_day(ev)
    agg = (
        _fan_out(daily, ITEM_WINDOW_DAYS, last_snap)
        .groupBy("item_id", "snap_day")
        .agg(F.sum("clicks").cast("double").alias("item_clicks_7d"), F.sum("impressions").cast("double").alias("item_impressions_7d"))
    )
    # each engaged event d days before the snapshot weighs 0.5 ** ((d - 1) / half-life): yesterday counts fully
    decay = F.pow(F.lit(0.5), (F.col("snap_day") - F.col("day") - 1) / F.lit(ITEM_ENGAGED_HALF_LIFE_DAYS))
    trend = (
        _fan_out(daily.where(F.col("engaged") > 0), ITEM_ENGAGED_WINDOW_DAYS, last_snap)
        .groupBy("item_id", "snap_day")
        .agg(F.round(F.sum(F.col("engaged") * decay), 6).alias("item_engaged_decayed_30d"))
    )
    # outer: an item co-clicked (or engaged) inside the 30-day window keeps that even without clicks in the last 7 days
    return (
        agg.join(co_items(ev, last_snap), ["item_id", "snap_day"], "outer")
        .join(trend, ["item_id", "snap_day"], "outer")
        # such an item had no clicks, impressions or engagement in its window: 0, not missing
        .withColumn("item_clicks_7d", F.coalesce(F.col("item_clicks_7d"), F.lit(0.0)))
        .withColumn("item_impressions_7d", F.coalesce(F.col("item_impressions_7d"), F.lit(0.0)))
        .withColumn("item_engaged_decayed_30d", F.coalesce(F.col("item_engaged_decayed_30d"), F.lit(0.0)))
        .join(items.select("item_id", "category", "publish_ts"), "item_id", "left")
        .withColumn("item_ctr_7d", _smoothed(F.col("item_clicks_7d"), F.col("item_impressions_7d")))
        .withColumn("feature_ts", (F.col("snap_day") * F.lit(DAY_MS)).cast("long"))
        .select("item_id", "feature_ts", *ITEM_STORE_COLUMNS)
    )


def co_item_pairs(ev: Any) -> Any:
    """item_id, other, day, n: sessions that clicked both items, counted on the day the later click happened."""
    from pyspark.sql import functions as F

    clicks = (ev.where(F.col("event_type").isin(*ENGAGED) & F.col("item_id").isNotNull())
              .select("session_id", "item_id", "day").dropDuplicates(["session_id", "item_id"]))
    a, b = clicks.alias("a"), clicks.alias("b")
    return (a.join(b, (F.col("a.session_id") == F.col("b.session_id")) & (F.col("a.item_id") != F.col("b.item_id")))
            .select(F.col("a.item_id").alias("item_id"), F.col("b.item_id").alias("other"),
                    F.greatest(F.col("a.day"), F.col("b.day")).alias("day"))
            .groupBy("item_id", "other", "day").agg(F.count("*").cast("double").alias("n")))


def co_items(ev: Any, last_snap: int) -> Any:
    """item_id, snap_day, co_items_30d: the item's top co-clicked items (sessions that clicked both) in the
    30 days before the snapshot, as a JSON map. A pair counts from the day its later click happened.

    One sweep per item over its pair-days (`co_items_sweep`), not a fan-out of every pair-day to the 30
    snapshot days it reaches: MovieLens-100K has 7.8M pair-days, which the fan-out made 233M rows."""
    from pyspark.sql import types as T

    schema = T.StructType([T.StructField("item_id", T.StringType()), T.StructField("snap_day", T.LongType()),
                           T.StructField("co_items_30d", T.StringType())])
    window, top_k = CO_ITEMS_WINDOW_DAYS, CO_ITEMS_TOP_K

    def sweep(pdf):
        return co_items_sweep(pdf, window, last_snap, top_k)

    return co_item_pairs(ev).groupBy("item_id").applyInPandas(sweep, schema=schema)


def _java_double(v: float) -> str:
    """A non-negative whole count as Spark's to_json writes a double (Java's Double.toString): 3.0, 1.2345678E7."""
    if v < 1e7:
        return f"{v:.1f}"
    digits = str(int(v))
    frac = digits[1:].rstrip("0") or "0"
    return f"{digits[0]}.{frac}E{len(digits) - 1}"


def co_items_sweep(pairs: Any, window_days: int, last_snap: int, top_k: int,
                   max_cells: int = 4_000_000) -> Any:
    """The per-snapshot-day top co-clicked items of the items in `pairs` (item_id, other, day, n), in one pass.

    A pair-day of day d counts in snapshots d+1 .. min(d+window, last_snap): +n enters at d+1 and leaves at
    d+window+1. Between two such change points every count is constant, so the counts are one cumulative sum
    over the item's change points (a change-points x others matrix, in chunks of at most `max_cells`) and the
    top-K is ranked once per interval, then stamped on each of its days. Ranking as the Spark definition:
    count descending, then item id; the map is sorted by item id; values written as Spark's to_json does.
    Returns item_id, snap_day, co_items_30d (JSON), one row per (item, day) with a pair in its window.
    """
    import json

    import numpy as np
    import pandas as pd

    cols = ["item_id", "snap_day", "co_items_30d"]
    frames = []
    for item, grp in pairs.groupby("item_id", sort=False):
        day = grp["day"].to_numpy(np.int64)
        start = day + 1
        keep = start <= last_snap
        if not keep.any():
            continue
        start = start[keep]
        stop = np.minimum(day[keep] + window_days, last_snap) + 1  # exclusive
        n = np.rint(grp["n"].to_numpy(np.float64)[keep]).astype(np.int64)
        others, o_idx = np.unique(grp["other"].to_numpy(object)[keep].astype(str), return_inverse=True)
        n_o = len(others)
        cps = np.unique(np.concatenate([start, stop]))
        # sparse deltas (change point row, other, +-n), sorted by row for chunking
        rows = np.concatenate([np.searchsorted(cps, start), np.searchsorted(cps, stop)])
        cols_o = np.concatenate([o_idx, o_idx])
        vals = np.concatenate([n, -n])
        order = np.argsort(rows, kind="stable")
        rows, cols_o, vals = rows[order], cols_o[order], vals[order]
        n_rows = len(cps) - 1  # interval i = [cps[i], cps[i+1])
        chunk = max(1, max_cells // max(n_o, 1))
        carry = np.zeros(n_o, dtype=np.int64)
        tie = (n_o - 1 - np.arange(n_o, dtype=np.int64))  # earlier item id wins a tie
        day_parts, json_parts, len_parts = [], [], []
        for r0 in range(0, n_rows, chunk):
            r1 = min(r0 + chunk, n_rows)
            lo, hi = np.searchsorted(rows, r0), np.searchsorted(rows, r1)
            dense = np.zeros((r1 - r0, n_o), dtype=np.int64)
            np.add.at(dense, (rows[lo:hi] - r0, cols_o[lo:hi]), vals[lo:hi])
            counts = np.cumsum(dense, axis=0) + carry
            carry = counts[-1].copy()
            if n_o > top_k:
                comp = counts * n_o + tie
                sel = np.sort(np.argpartition(-comp, top_k - 1, axis=1)[:, :top_k], axis=1)
            else:
                sel = np.broadcast_to(np.arange(n_o), (r1 - r0, n_o))
            top = np.take_along_axis(counts, sel, axis=1)
            live = (top > 0).any(axis=1)
            for i in np.flatnonzero(live):
                entries = [f"{json.dumps(others[j], ensure_ascii=False)}:{_java_double(float(v))}"
                           for j, v in zip(sel[i], top[i]) if v > 0]
                json_parts.append("{" + ",".join(entries) + "}")
                day_parts.append(cps[r0 + i])
                len_parts.append(cps[r0 + i + 1] - cps[r0 + i])
        if not json_parts:
            continue
        lengths = np.asarray(len_parts, dtype=np.int64)
        firsts = np.asarray(day_parts, dtype=np.int64)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        frames.append(pd.DataFrame({"item_id": item, "snap_day": np.repeat(firsts, lengths) + offsets,
                                    "co_items_30d": np.repeat(np.asarray(json_parts, dtype=object), lengths)}))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(cols, ("object", "int64", "object"))})
    return pd.concat(frames, ignore_index=True)[cols]


def final_snapshot(snapshots: Any) -> Any:
    """The newest snapshot day (covers every event so far): what the online store serves.

    Entities absent from it had no activity inside their windows, so the server
    falls back to the registry defaults for them, exactly as training did.
    """
    from pyspark.sql import functions as F

    newest = snapshots.agg(F.max("feature_ts")).collect()[0][0]
    return snapshots.where(F.col("feature_ts") == F.lit(newest))
