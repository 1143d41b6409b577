"""MovieLens importers: the real 100K set (skipped without ../shared), the "latest" CSVs, and bad input."""
from __future__ import annotations

import pytest

from data_contracts.schema import EVENT_COLUMNS, ITEM_SCHEMA
from ingestion.movielens import ImportError_, load_movielens_100k, load_movielens_latest
from tests.conftest import movielens_or_skip


def test_movielens_100k_maps_every_rating() -> None:
    events, items, users = load_movielens_100k(movielens_or_skip())
    assert list(events.columns) == EVENT_COLUMNS
    counts = events["event_type"].value_counts()
    assert counts["impression"] == 100_000
    assert counts["click"] + counts["skip"] == 100_000
    assert users["user_id"].nunique() == 943 and items["item_id"].nunique() == 1682
    assert set(events["item_id"]) <= set(items["item_id"])
    assert events["event_id"].is_unique
    assert events["timestamp"].dtype == "int64" and list(items.columns) == ITEM_SCHEMA.names
    assert counts["skip"] == 6110 + 11370  # ratings 1 and 2 in the 100K distribution
    clicks = events[events["event_type"] == "click"]
    assert (clicks["dwell_time_ms"] == 45_000).sum() == 21201 + 34174  # ratings 4 and 5


def test_latest_format_and_sessions(tmp_path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.5,1000\n1,20,2.0,1100\n1,10,3.0,9000\n")
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n10,A (1999),Comedy|Drama\n20,B (2001),Horror\n")
    events, items, users = load_movielens_latest(tmp_path)
    outcomes = events[events["event_type"] != "impression"].sort_values("timestamp")["event_type"].tolist()
    assert outcomes == ["click", "skip", "click"]
    assert events["session_id"].nunique() == 2  # 9000 s is more than 30 minutes after 1100 s
    assert dict(zip(items["item_id"], items["category"])) == {"ml_i10": "Comedy", "ml_i20": "Horror"}
    assert users["user_id"].tolist() == ["ml_u1"]


def test_bad_file_names_line_and_column(tmp_path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.5,1000\n1,20,great,1100\n")
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n10,A,Comedy\n")
    with pytest.raises(ImportError_, match=r"ratings.csv: line 3, column 'rating'"):
        load_movielens_latest(tmp_path)
