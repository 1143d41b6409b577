"""The one-pass snapshots (features/batch.py) equal snapshots recomputed day by day from their definition.

The reference below builds each snapshot day D on its own, from the events with day < D inside the feature's
window, with no fan-out, no cumulative sums and no sweep: the slow, obvious definition. The Spark one-pass
job must give the same rows (which (entity, day) exist) and the same values, on a small world with bursts,
a gap longer than every window, ties and more co-clicked items than the top-K keeps.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from features.batch import (CO_ITEMS_WINDOW_DAYS, ITEM_WINDOW_DAYS, USER_SHORT_WINDOW_DAYS, USER_WINDOW_DAYS,
                            co_items_sweep, item_snapshots, user_snapshots)
from features.functions import CTR_PRIOR_CLICKS, CTR_PRIOR_IMPRESSIONS
from features.registry import (CATEGORY_HALF_LIFE_DAYS, CO_ITEMS_TOP_K, ENGAGED_CLICK_MIN_DWELL_MS, ENGAGED_EVENT_TYPES,
                               ITEM_ENGAGED_HALF_LIFE_DAYS, ITEM_ENGAGED_WINDOW_DAYS)
from data_contracts.schema import DAY_MS, HOUR_MS
from lake.spark import spark_session

T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC
D0 = T0 // DAY_MS


def _world(seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """40 items in 4 categories, 12 users, sessions inside one day, active days 0..24 and 70..79 (a 45-day gap)."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [f"i{k:02d}" for k in range(40)], "title": "", "tags": "",
                          "category": [f"c{k % 4}" for k in range(40)], "publish_ts": T0 - DAY_MS})
    users = pd.DataFrame({"user_id": [f"u{k}" for k in range(12)], "signup_ts": [T0 - k * DAY_MS for k in range(12)],
                          "geo_region": "other", "segment": "x", "device_type": "mobile"})
    rows, eid = [], 0
    for day in [*range(0, 25), *range(70, 80)]:
        for s in range(int(rng.integers(1, 5))):
            user = f"u{int(rng.integers(0, 12))}"
            # a burst of up to 30 distinct items: some items get more than CO_ITEMS_TOP_K co-clicked items
            picked = rng.choice(40, size=int(rng.integers(1, 31)), replace=False)
            ts = T0 + day * DAY_MS + int(rng.integers(0, 20)) * HOUR_MS
            for pos, k in enumerate(picked):
                for etype in ["impression", "click" if rng.random() < 0.6 else "skip"]:
                    eid += 1
                    rows.append({"event_id": f"e{eid}", "user_id": user, "item_id": f"i{int(k):02d}",
                                 "event_type": etype, "timestamp": ts + pos * 10_000 + (etype != "impression") * 1000,
                                 "session_id": f"s{day}_{s}", "position": pos, "page_context": "home_feed",
                                 "device_type": "mobile", "schema_version": 1, "source": "test",
                                 # short, long and no dwell: item_engaged_decayed_30d counts the long clicks
                                 "dwell_time_ms": 0 if etype != "click" else int(rng.choice([0, 3_000, 45_000]))})
    return pd.DataFrame(rows), items, users


def _in_window(ev: pd.DataFrame, snap: int, days: int) -> pd.DataFrame:
    return ev[(ev["day"] < snap) & (ev["day"] >= snap - days)]


def _users_on(ev: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, snap: int) -> list[dict]:
    """Every user's snapshot stamped `snap` (a day number), from the events before it alone."""
    cat = items.set_index("item_id")["category"]
    signup = users.set_index("user_id")["signup_ts"]
    out = []
    for user, month in _in_window(ev, snap, USER_WINDOW_DAYS).groupby("user_id"):
        week = month[month["day"] >= snap - USER_SHORT_WINDOW_DAYS]
        clicks, imps = (month["event_type"] == "click").sum(), (month["event_type"] == "impression").sum()
        # sessions are counted per active day (a session over midnight counts on both days)
        sessions = week.groupby("day")["session_id"].nunique().sum()
        clicked = month[month["event_type"] == "click"]
        counts: dict[str, float] = {}
        decayed: dict[str, float] = {}
        for c, grp in clicked.groupby(clicked["item_id"].map(cat)):
            counts[c] = float(len(grp))
            decayed[c] = round(float((0.5 ** ((snap - grp["day"] - 1) / CATEGORY_HALF_LIFE_DAYS)).sum()), 6)
        out.append({"user_id": user, "feature_ts": snap * DAY_MS,
                    "user_clicks_7d": float((week["event_type"] == "click").sum()),
                    "user_impressions_30d": float(imps),
                    "user_ctr_30d": (clicks + CTR_PRIOR_CLICKS) / (imps + CTR_PRIOR_IMPRESSIONS),
                    "user_avg_session_length_7d": len(week) / sessions if sessions else 0.0,
                    "user_category_clicks_30d": counts or None, "user_category_decayed_30d": decayed or None,
                    "signup_ts": int(signup[user])})
    return out


def _items_on(ev: pd.DataFrame, items: pd.DataFrame, snap: int) -> list[dict]:
    """Every item's snapshot stamped `snap`: 7-day counts, and its top co-clicked items over 30 days."""
    week = _in_window(ev, snap, ITEM_WINDOW_DAYS)
    clicks = ev[ev["event_type"] == "click"].drop_duplicates(["session_id", "item_id"])
    pairs = clicks.merge(clicks, on="session_id", suffixes=("", "_other"))
    pairs = pairs[pairs["item_id"] != pairs["item_id_other"]]
    pairs = pairs.assign(day=np.maximum(pairs["day"], pairs["day_other"]))
    month_pairs = _in_window(pairs, snap, CO_ITEMS_WINDOW_DAYS)
    co = {}
    for item, grp in month_pairs.groupby("item_id"):
        n = grp.groupby("item_id_other").size().reset_index(name="n")
        top = n.sort_values(["n", "item_id_other"], ascending=[False, True]).head(CO_ITEMS_TOP_K)
        co[item] = {o: float(c) for o, c in zip(top["item_id_other"], top["n"])}
    meta = items.set_index("item_id")
    month = _in_window(ev, snap, ITEM_ENGAGED_WINDOW_DAYS)
    month = month[month["event_type"].isin(ENGAGED_EVENT_TYPES)
                  | ((month["event_type"] == "click") & (month["dwell_time_ms"] >= ENGAGED_CLICK_MIN_DWELL_MS))]
    trend = (0.5 ** ((snap - month["day"] - 1) / ITEM_ENGAGED_HALF_LIFE_DAYS)).groupby(month["item_id"]).sum()
    out = []
    for item in sorted(set(week["item_id"]) | set(co) | set(trend.index)):
        mine = week[week["item_id"] == item]
        c, i = float((mine["event_type"] == "click").sum()), float((mine["event_type"] == "impression").sum())
        out.append({"item_id": item, "feature_ts": snap * DAY_MS, "item_clicks_7d": c, "item_impressions_7d": i,
                    "item_engaged_decayed_30d": round(float(trend.get(item, 0.0)), 6),
                    "item_ctr_7d": (c + CTR_PRIOR_CLICKS) / (i + CTR_PRIOR_IMPRESSIONS),
                    "category": meta.loc[item, "category"], "publish_ts": int(meta.loc[item, "publish_ts"]),
                    "co_items_30d": co.get(item)})
    return out


def _normalized(frame: pd.DataFrame, key: str, json_cols: tuple[str, ...]) -> pd.DataFrame:
    frame = frame.copy()
    for c in json_cols:
        frame[c] = [json.loads(v) if isinstance(v, str) else (v if isinstance(v, dict) else None) for v in frame[c]]
    return frame.sort_values([key, "feature_ts"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def spark():
    return spark_session("local[2]")


def test_one_pass_snapshots_equal_per_day_snapshots(spark) -> None:
    events, items, users = _world()
    ev = events.assign(day=events["timestamp"] // DAY_MS - D0)
    last = int(ev["day"].max()) + 1
    # shift the reference's day numbers back to calendar days for feature_ts
    ref_users = pd.DataFrame([r for snap in range(1, last + 1) for r in _users_on(ev, items, users, snap)])
    ref_items = pd.DataFrame([r for snap in range(1, last + 1) for r in _items_on(ev, items, snap)])
    for ref in (ref_users, ref_items):
        ref["feature_ts"] = ref["feature_ts"] + T0
    # the world exercises what it should: the gap leaves days without any row, and the top-K cut bites
    assert set(range(25 + USER_WINDOW_DAYS + 1, 71)).isdisjoint(set((ref_users["feature_ts"] - T0) // DAY_MS))
    assert max(len(m) for m in ref_items["co_items_30d"].dropna()) == CO_ITEMS_TOP_K
    # engagement decays: fractional values, and items engaged inside 30 days but not clicked inside 7 keep a row
    engaged = ref_items["item_engaged_decayed_30d"]
    assert (engaged % 1 > 0).any() and ((engaged > 0) & (ref_items["item_clicks_7d"] == 0)).any()

    sev, sit, sus = spark.createDataFrame(events), spark.createDataFrame(items), spark.createDataFrame(users)
    got_users = user_snapshots(spark, sev, sit, sus).toPandas()
    got_items = item_snapshots(spark, sev, sit).toPandas()

    cols_u = list(ref_users.columns)
    pd.testing.assert_frame_equal(
        _normalized(got_users[cols_u], "user_id", ("user_category_clicks_30d", "user_category_decayed_30d")),
        _normalized(ref_users, "user_id", ("user_category_clicks_30d", "user_category_decayed_30d")),
        check_dtype=False, check_exact=False, rtol=1e-9)
    cols_i = list(ref_items.columns)
    pd.testing.assert_frame_equal(_normalized(got_items[cols_i], "item_id", ("co_items_30d",)),
                                  _normalized(ref_items, "item_id", ("co_items_30d",)),
                                  check_dtype=False, check_exact=False, rtol=1e-9)
    # the JSON maps are written sorted by item id, as the Spark map_from_entries(sort_array(...)) wrote them
    sample = got_items["co_items_30d"].dropna().iloc[0]
    assert list(json.loads(sample)) == sorted(json.loads(sample))


def test_co_items_sweep_chunks_and_ties() -> None:
    """The sweep gives the same answer whatever its chunk size; ties go to the smaller item id; values as to_json."""
    pairs = pd.DataFrame({"item_id": "a", "other": ["b", "c", "d", "b", "e"], "day": [0, 0, 0, 5, 40],
                          "n": [1.0, 2.0, 2.0, 1.0, 12_345_678.0]})
    whole = co_items_sweep(pairs, window_days=30, last_snap=50, top_k=2)
    tiny = co_items_sweep(pairs, window_days=30, last_snap=50, top_k=2, max_cells=1)
    pd.testing.assert_frame_equal(whole, tiny)
    by_day = whole.set_index("snap_day")["co_items_30d"]
    assert by_day[1] == '{"c":2.0,"d":2.0}'  # b (1 session) is cut; c and d (2 each) are the top 2
    assert by_day[6] == '{"b":2.0,"c":2.0}'  # b reaches 2 on day 6: b < d wins the tie at 2
    assert by_day[31] == '{"b":1.0}'  # the day-0 pairs left the window after day 30, b's day-5 one is left
    assert 36 not in by_day.index  # the day-5 pair left after day 35: no pair in the window, no row
    assert by_day[41] == '{"e":1.2345678E7}' and by_day.index.max() == 50  # Java's Double.toString, up to last_snap
    assert sorted(by_day.index) == [*range(1, 36), *range(41, 51)]
