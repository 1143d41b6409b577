"""Point-in-time correctness of the Spark feature snapshots and the as-of training-set join."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from features.batch import final_snapshot, item_snapshots, user_snapshots
from data_contracts.schema import DAY_MS, HOUR_MS
from lake.delta import DeltaLake
from lake.spark import spark_session
from lake.spark_write import spark_write
from training.dataset import SplitConfig, assign_split, build_training_set, read_training_set, split_boundaries

T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC


def _event(eid: str, etype: str, ts: int, item: str = "i1", session: str = "s1", user: str = "u1") -> dict:
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype, "timestamp": ts,
            "session_id": session, "position": 0, "page_context": "home_feed", "device_type": "mobile",
            "dwell_time_ms": 40_000 if etype == "click" else 0, "schema_version": 1, "source": "test"}


@pytest.fixture(scope="module")
def spark():
    return spark_session("local[2]")


def test_as_of_join_never_uses_a_later_snapshot(spark, tmp_path) -> None:
    items = pd.DataFrame({"item_id": ["i1", "i2"], "title": ["a", "b"], "category": ["books", "music"],
                          "tags": ["", ""], "publish_ts": [T0 - DAY_MS, T0 - DAY_MS]})
    events = pd.DataFrame([
        _event("e1", "impression", T0 + 1 * HOUR_MS, "i1", "s1"),
        _event("e2", "click", T0 + 1 * HOUR_MS + 5_000, "i1", "s1"),
        # the row we label: day 1, noon; its session saw one earlier click on i2 (music)
        _event("e3", "click", T0 + DAY_MS + 11 * HOUR_MS, "i2", "s2"),
        _event("e4", "impression", T0 + DAY_MS + 12 * HOUR_MS, "i1", "s2"),
        # later activity: five more clicks on day 2 -> a newer snapshot exists with bigger counts
        *[_event(f"l{k}", "click", T0 + 2 * DAY_MS + k * 1000, "i1", "s3") for k in range(5)],
        _event("e9", "impression", T0 + 3 * DAY_MS + HOUR_MS, "i2", "s4"),
    ])
    labels = events[events["event_type"] == "impression"].assign(label=0.0, label_binary=0)
    sev, sit = spark.createDataFrame(events), spark.createDataFrame(items)
    us, its = user_snapshots(spark, sev, sit), item_snapshots(spark, sev, sit)
    built, _ = build_training_set(spark, spark.createDataFrame(labels), sev, us, its, items,
                                  SplitConfig(validation_days=1, test_days=1))
    # the asset's path: the executors write the set, the trainers read it back in its one order
    lake = DeltaLake(str(tmp_path / "lake"))
    written = spark_write(spark, lake, "training_set", built)
    frame = read_training_set(lake, "training_set", written.version)
    assert written.rows == len(frame) == len(labels)
    assert frame["timestamp"].is_monotonic_increasing
    row = frame.set_index("event_id").loc["e4"]
    # snapshot of day 1 midnight: only e2 (one click) is before; the day-2/day-3 snapshots see 7 clicks
    assert row["user_id_feature_ts"] == T0 + DAY_MS
    assert row["user_clicks_7d"] == 2.0 - 1.0  # e2 only; e3 is the same day, after midnight
    assert json.loads(row["user_category_clicks_30d"]) == {"books": 1.0}
    assert row["item_clicks_7d"] == 1.0
    # session features replayed from the same session's earlier events only
    assert row["session_clicks"] == 1.0 and json.loads(row["session_last_items"]) == ["i2"]
    assert row["session_category_share"] == 0.0  # i1 is books, the session clicked music
    later = frame.set_index("event_id").loc["e9"]
    assert later["user_clicks_7d"] == 7.0 and later["user_id_feature_ts"] == T0 + 3 * DAY_MS
    assert (frame["user_id_feature_ts"].dropna() < frame.loc[frame["user_id_feature_ts"].notna(), "timestamp"]).all()
    latest = final_snapshot(us).toPandas()
    assert latest["feature_ts"].nunique() == 1 and latest["user_clicks_7d"].iloc[0] == 7.0


def test_time_split_has_gap_and_order() -> None:
    ts = pd.Series([0, 5 * DAY_MS, 7 * DAY_MS + 1, 8 * DAY_MS - HOUR_MS // 2, 8 * DAY_MS + 2 * HOUR_MS, 10 * DAY_MS - 1])
    b = split_boundaries(int(ts.max()), SplitConfig(validation_days=2, test_days=2, gap_hours=1))
    split = assign_split(ts, b).tolist()
    assert split[0] == "train" and split[-1] == "test"
    assert split[3] == "gap"
    order = {"train": 0, "validation": 1, "test": 2}
    seen = [order[s] for s in split if s != "gap"]
    assert seen == sorted(seen)


def test_user_snapshot_session_length_decayed_categories_and_signup(spark) -> None:
    items = pd.DataFrame({"item_id": ["i1", "i2"], "title": ["a", "b"], "category": ["books", "music"],
                          "tags": ["", ""], "publish_ts": [T0 - DAY_MS, T0 - DAY_MS]})
    users = pd.DataFrame({"user_id": ["u1"], "segment": ["core"], "device_type": ["mobile"], "geo_region": ["eu"],
                          "signup_ts": [T0 - 30 * DAY_MS]})
    events = pd.DataFrame([
        # day 0: two sessions (s1: 3 events, s2: 1 event); a books click
        _event("a1", "impression", T0 + HOUR_MS, "i1", "s1"), _event("a2", "click", T0 + HOUR_MS + 1, "i1", "s1"),
        _event("a3", "impression", T0 + 2 * HOUR_MS, "i2", "s1"), _event("a4", "impression", T0 + 3 * HOUR_MS, "i2", "s2"),
        # day 7: a music click (7 days after the books click)
        _event("b1", "click", T0 + 7 * DAY_MS + HOUR_MS, "i2", "s3"),
    ])
    snaps = user_snapshots(spark, spark.createDataFrame(events), spark.createDataFrame(items),
                           spark.createDataFrame(users)).toPandas().set_index("feature_ts")
    day1 = snaps.loc[T0 + DAY_MS]
    assert day1["user_avg_session_length_7d"] == 2.0  # 4 events / 2 sessions, strictly before day 1
    assert day1["signup_ts"] == T0 - 30 * DAY_MS
    assert json.loads(day1["user_category_decayed_30d"]) == {"books": 1.0}  # yesterday's click counts fully
    day8 = snaps.loc[T0 + 8 * DAY_MS]
    decayed = json.loads(day8["user_category_decayed_30d"])
    assert decayed["music"] == 1.0 and decayed["books"] == pytest.approx(0.5)  # one half-life older
    assert json.loads(day8["user_category_clicks_30d"]) == {"books": 1.0, "music": 1.0}  # undecayed stays equal
    assert day8["user_avg_session_length_7d"] == 1.0  # only s3 (1 event) in the last 7 days


def test_assembled_account_age_and_decayed_preference() -> None:
    from features.functions import assemble_features
    from features.registry import BY_NAME

    rows = pd.DataFrame({"category": ["books", "music", "music"], "request_ts": [T0] * 3, "device_type": ["mobile"] * 3,
                         "signup_ts": [T0 - 10 * DAY_MS, T0 - 10 * DAY_MS, None],
                         "user_category_decayed_30d": ['{"books": 0.5, "music": 1.5}'] * 2 + [None]})
    feats = assemble_features(rows)
    assert feats["user_account_age_days"].tolist() == [10.0, 10.0, BY_NAME["user_account_age_days"].default]
    assert feats["user_category_pref_decayed"].tolist() == [0.25, 0.75, 0.0]


def test_item_co_clicks_and_co_engagement(spark) -> None:
    from features.functions import co_engagement

    items = pd.DataFrame({"item_id": ["i1", "i2", "i3"], "title": ["a", "b", "c"], "category": ["x", "x", "y"],
                          "tags": ["", "", ""], "publish_ts": [T0 - DAY_MS] * 3})
    events = pd.DataFrame([
        # day 0: two sessions click i1 and i2 together; one clicks i1 and i3
        _event("a1", "click", T0 + HOUR_MS, "i1", "s1"), _event("a2", "click", T0 + HOUR_MS + 5, "i2", "s1"),
        _event("b1", "click", T0 + 2 * HOUR_MS, "i1", "s2", user="u2"), _event("b2", "click", T0 + 2 * HOUR_MS + 5, "i2", "s2", user="u2"),
        _event("c1", "click", T0 + 3 * HOUR_MS, "i1", "s3"), _event("c2", "click", T0 + 3 * HOUR_MS + 5, "i3", "s3"),
        # day 1: i1 with i3 again (not visible to the day-1 snapshot)
        _event("d1", "click", T0 + DAY_MS + HOUR_MS, "i1", "s4"), _event("d2", "click", T0 + DAY_MS + HOUR_MS + 5, "i3", "s4"),
    ])
    snaps = item_snapshots(spark, spark.createDataFrame(events), spark.createDataFrame(items)).toPandas()
    day1 = snaps[(snaps["feature_ts"] == T0 + DAY_MS)].set_index("item_id")
    assert json.loads(day1.loc["i1", "co_items_30d"]) == {"i2": 2.0, "i3": 1.0}
    day2 = snaps[(snaps["feature_ts"] == T0 + 2 * DAY_MS)].set_index("item_id")
    assert json.loads(day2.loc["i1", "co_items_30d"]) == {"i2": 2.0, "i3": 2.0}
    # a session that just clicked i2: i1's co-engagement is 2 / (1 + 3); nothing for an empty history
    values = co_engagement([day1.loc["i1", "co_items_30d"]] * 3, ['["i2"]', [], None])
    assert values.tolist() == [0.5, 0.0, 0.0]
    assert co_engagement([{"i2": 2.0, "i3": 1.0}], [["i3", "i2"]]).tolist() == [0.75]  # serving passes dicts/lists


def test_snapshots_cost_follows_events_not_calendar_days(spark) -> None:
    """Two active days twenty years apart: snapshot rows only inside each day's windows, values as defined."""
    items = pd.DataFrame({"item_id": ["i1"], "title": ["a"], "category": ["books"], "tags": [""], "publish_ts": [0]})
    far = T0 + 7300 * DAY_MS
    events = pd.DataFrame([
        _event("a1", "impression", T0 + HOUR_MS), _event("a2", "click", T0 + HOUR_MS + 5_000),
        _event("b1", "impression", far + HOUR_MS, session="s9"), _event("b2", "click", far + HOUR_MS + 5_000, session="s9"),
    ])
    snaps = user_snapshots(spark, spark.createDataFrame(events), spark.createDataFrame(items)).toPandas()
    day0, day_far = T0 // DAY_MS, far // DAY_MS
    got = set(snaps["feature_ts"] // DAY_MS)
    # a user window is 30 days: days 1..30 after each active day, and nothing in the 20 years between
    assert got == set(range(day0 + 1, day0 + 31)) | {day_far + 1}
    row = snaps[snaps["feature_ts"] == (day0 + 7) * DAY_MS].iloc[0]
    assert row["user_clicks_7d"] == 1 and row["user_impressions_30d"] == 1
    row = snaps[snaps["feature_ts"] == (day0 + 8) * DAY_MS].iloc[0]
    assert row["user_clicks_7d"] == 0 and row["user_impressions_30d"] == 1  # the click left the 7-day window
    item = item_snapshots(spark, spark.createDataFrame(events), spark.createDataFrame(items)).toPandas()
    # an item's engaged click (40 s dwell) is remembered 30 days, decayed; its click counts 7 days
    assert set(item["feature_ts"] // DAY_MS) == set(range(day0 + 1, day0 + 31)) | {day_far + 1}
    by_day = item.set_index(item["feature_ts"] // DAY_MS)
    assert by_day.loc[day0 + 7, "item_clicks_7d"] == 1 and by_day.loc[day0 + 8, "item_clicks_7d"] == 0
    assert by_day.loc[day0 + 1, "item_engaged_decayed_30d"] == 1.0
    assert by_day.loc[day0 + 8, "item_engaged_decayed_30d"] == 0.5  # one half-life (7 days) after yesterday
    assert 0 < by_day.loc[day0 + 30, "item_engaged_decayed_30d"] < 0.06


def test_quantile_split_from_spark_matches_numpy(spark) -> None:
    """The asset computes the test start where the rows are (Spark's exact percentile): the same boundary
    as NumPy's quantile over the collected timestamps, which the world planner uses."""
    import numpy as np
    from pyspark.sql import functions as F

    ts = np.random.default_rng(3).integers(0, 90 * DAY_MS, size=5_001)
    frame = spark.createDataFrame(pd.DataFrame({"timestamp": ts}))
    q = frame.agg(F.percentile("timestamp", F.lit(0.8))).first()[0]
    config = SplitConfig(validation_days=3, test_quantile=0.8)
    assert split_boundaries(int(ts.max()), config, quantile_ts=q) == split_boundaries(int(ts.max()), config, timestamps=ts)


def test_spark_write_overwrites_in_one_commit_and_reads_back(spark, tmp_path) -> None:
    """Executors write the files, the driver commits them: rows, schema changes and an empty result."""
    lake = DeltaLake(str(tmp_path / "lake"))
    df = spark.range(0, 50_000, numPartitions=4).selectExpr("id", "cast(id % 7 as string) as s",
                                                           "case when id % 3 = 0 then null else id * 0.5 end as x")
    first = spark_write(spark, lake, "t", df)
    back = lake.read("t", version=first.version).sort_values("id").reset_index(drop=True)
    assert first.rows == 50_000 and lake.pin("t").rows == 50_000
    assert back["id"].tolist() == list(range(50_000)) and back["x"].isna().sum() == 16_667
    second = spark_write(spark, lake, "t", df.limit(10).selectExpr("id", "'new' as z"))  # schema change
    assert second.version == first.version + 1
    assert sorted(lake.read("t").columns) == ["id", "z"] and len(lake.read("t")) == 10
    assert len(lake.read("t", version=first.version)) == 50_000  # the old version is intact (time travel)
    empty = spark_write(spark, lake, "t", df.where("id < 0"))
    assert empty.rows == 0 and lake.read("t").columns.tolist() == ["id", "s", "x"] and lake.read("t").empty
