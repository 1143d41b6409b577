"""Consumption history (features/history.py) and catalog negatives replayed with session state."""
from __future__ import annotations

import json

import pandas as pd

from features.functions import CANDIDATE_EVENT, replay_session_features, tower_history
from features.history import consumed_items, recent_items_before


def _events() -> pd.DataFrame:
    return pd.DataFrame({
        "event_id": [f"e{i}" for i in range(6)],
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u1"],
        "item_id": ["a", "b", "a", "c", "a", "d"],
        "event_type": ["click", "skip", "click", "impression", "click", "purchase"],
        "timestamp": [10, 20, 30, 40, 50, 60],
        "session_id": ["s1"] * 6,
    })


def test_consumed_items_distinct_newest_first_with_skips_and_no_impressions() -> None:
    got = dict(zip(*consumed_items(_events()).T.values))
    assert json.loads(got["u1"]) == ["d", "a", "b"]     # impression of c is not consumption; a once
    assert json.loads(got["u2"]) == ["a"]
    early = dict(zip(*consumed_items(_events(), as_of_ms=30).T.values))
    assert json.loads(early["u1"]) == ["b", "a"]       # strictly before as_of


def test_recent_items_before_is_point_in_time() -> None:
    rows = pd.DataFrame({"user_id": ["u1", "u1", "u1", "u9"], "timestamp": [10, 31, 61, 99]})
    got = [json.loads(x) for x in recent_items_before(_events(), rows, n=2)]
    assert got == [[], ["a", "b"], ["d", "a"], []]


def test_tower_history_session_first_then_user() -> None:
    assert tower_history(["x", "y"], ["y", "z", "w"], limit=3) == ["x", "y", "z"]
    assert tower_history([], ["z"]) == ["z"]


def test_candidate_rows_get_session_features_without_changing_state() -> None:
    base = pd.DataFrame({"event_id": ["i1", "c1", "i2"], "session_id": ["s"] * 3,
                         "event_type": ["impression", "click", "impression"], "item_id": ["a", "a", "b"],
                         "timestamp": [1, 2, 5]})
    cand = pd.DataFrame({"event_id": ["easy:i1:0"], "session_id": ["s"], "event_type": [CANDIDATE_EVENT],
                         "item_id": ["z"], "timestamp": [3]})
    cats = {"a": "x", "b": "x", "z": "y"}
    plain = replay_session_features(base, cats).set_index("event_id")
    both = replay_session_features(pd.concat([base, cand]), cats).set_index("event_id")
    assert "easy:i1:0" in both.index
    assert both.loc["easy:i1:0", "session_clicks"] == 1.0          # sees the click before it
    assert both.loc["easy:i1:0", "session_item_seen"] == 0.0
    pd.testing.assert_series_equal(both.loc["i2"], plain.loc["i2"])  # and changes nothing after it
