"""Generic interaction-log importer: CSV/TSV/Parquet + column mapping -> Kairos events, catalogs and clear errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from data_contracts.events import validate_events
from data_contracts.schema import (
    EVENT_COLUMNS,
    ITEM_SCHEMA,
    SCHEMA_VERSION,
    USER_SCHEMA,
)
from ingestion.generic import ColumnMapping, load_interactions
from ingestion.movielens import ImportError_

FAR_FUTURE_MS = 4_102_444_800_000  # 2100-01-01
BASIC = ColumnMapping(user="uid", item="sku", timestamp="ts")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_seconds_sessions_split_at_30_minutes(tmp_path: Path) -> None:
    # u1: 1000 s, 1000+1800 s (exactly 30 min: same session), +1801 s later (new session); u2 alone.
    log = _write(tmp_path / "log.csv", "uid,sku,ts\nu1,a,1000\nu1,b,2800\nu1,a,4601\nu2,007,1500\n")
    logged, items, users = load_interactions(log, BASIC, source="shop-export")

    assert list(logged.columns) == EVENT_COLUMNS
    # a click-only log: every (session, item) gets an implied impression one second before its first click
    implied = logged[logged["event_type"] == "impression"]
    events = logged[logged["event_type"] != "impression"].reset_index(drop=True)
    assert implied["timestamp"].tolist() == [999_000, 1_499_000, 2_799_000, 4_600_000]
    assert events["timestamp"].tolist() == [1_000_000, 1_500_000, 2_800_000, 4_601_000]  # time order, ms
    assert (events["event_type"] == "click").all() and (logged["dwell_time_ms"] == 0).all()
    assert (events["source"] == "shop-export").all() and (events["schema_version"] == SCHEMA_VERSION).all()
    for col in ("timestamp", "position", "dwell_time_ms", "schema_version"):
        assert events[col].dtype == "int64"
    u1 = events[events["user_id"] == "u1"]
    assert u1["session_id"].tolist()[0] == u1["session_id"].tolist()[1] != u1["session_id"].tolist()[2]
    assert u1["position"].tolist() == [0, 1, 0]
    assert events["session_id"].nunique() == 3
    assert events.loc[events["user_id"] == "u2", "item_id"].tolist() == ["007"]  # ids keep leading zeros
    assert logged["event_id"].is_unique
    assert logged["timestamp"].is_monotonic_increasing

    assert list(items.columns) == ITEM_SCHEMA.names and list(users.columns) == USER_SCHEMA.names
    assert dict(zip(items["item_id"], items["publish_ts"])) == {"007": 1_500_000, "a": 1_000_000, "b": 2_800_000}
    assert set(items["category"]) == {"unknown"} and items["publish_ts"].dtype == "int64"
    assert dict(zip(users["user_id"], users["signup_ts"])) == {"u1": 1_000_000, "u2": 1_500_000}
    assert set(users["device_type"]) == {"desktop"} and set(users["segment"]) == {"unknown"}


def test_parquet_ms_with_event_types_sessions_and_device(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pd.DataFrame({
        "user": [1, 1, 2, 1],
        "item": [10, 11, 10, 12],
        "at": [1_700_000_000_123, 1_700_000_000_500, 1_700_000_001_000, 1_700_000_002_000],
        "kind": ["Impression", "CLICK", "purchase", "add_to_cart"],
        "sess": ["x", "x", "y", "x"],
        "dev": ["Mobile", "mobile", None, "tablet"],
    }).to_parquet(path)
    mapping = ColumnMapping(user="user", item="item", timestamp="at", timestamp_unit="ms", event_type="kind",
                            session="sess", device="dev")
    events, items, users = load_interactions(path, mapping, source="pq")
    assert events["timestamp"].tolist() == [1_700_000_000_123, 1_700_000_000_500, 1_700_000_001_000,
                                            1_700_000_002_000]
    assert events["event_type"].tolist() == ["impression", "click", "purchase", "add_to_cart"]
    assert events["user_id"].tolist() == ["1", "1", "2", "1"] and events["item_id"].tolist()[0] == "10"
    assert events["session_id"].tolist() == ["x", "x", "y", "x"]
    assert events["position"].tolist() == [0, 1, 0, 2]
    assert events["device_type"].tolist() == ["mobile", "mobile", "desktop", "tablet"]
    assert dict(zip(users["user_id"], users["device_type"])) == {"1": "mobile", "2": "desktop"}
    assert sorted(items["item_id"]) == ["10", "11", "12"]


def test_parquet_directory_is_one_log(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    pd.DataFrame({"uid": ["a"], "sku": ["i1"], "ts": [100]}).to_parquet(folder / "part-0.parquet")
    pd.DataFrame({"uid": ["a"], "sku": ["i1"], "ts": [100]}).to_parquet(folder / "part-1.pq")
    events, items, _ = load_interactions(folder, BASIC, source="dir")
    clicks = events[events["event_type"] == "click"]
    assert len(clicks) == 2 and events["event_id"].is_unique  # same key in two files: two distinct rows
    assert (events["event_type"] == "impression").sum() == 1  # one implied impression per (session, item)
    assert items["item_id"].tolist() == ["i1"]


def test_iso_timestamps_and_tsv(tmp_path: Path) -> None:
    log = _write(tmp_path / "log.tsv", "uid\tsku\twhen\n"
                                       "u1\ta\t2024-05-01T12:00:00Z\n"
                                       "u1\tb\t2024-05-01 14:00:00+02:00\n"  # same instant as 12:00Z
                                       "u1\tc\t2024-05-01T13:00:00\n")  # naive -> UTC
    mapping = ColumnMapping(user="uid", item="sku", timestamp="when", timestamp_unit="iso")
    events, _, _ = load_interactions(log, mapping)
    events = events[events["event_type"] == "click"]
    base = int(pd.Timestamp("2024-05-01T12:00:00Z").value // 1_000_000)
    assert sorted(events["timestamp"].tolist()) == [base, base, base + 3_600_000]
    assert events["session_id"].nunique() == 2  # an hour later is a new session


def test_value_column_maps_ratings_like_movielens(tmp_path: Path) -> None:
    log = _write(tmp_path / "ratings.csv", "uid,sku,ts,stars\nu1,a,1000,5\nu1,b,1100,3\nu1,c,1200,1.5\n")
    mapping = ColumnMapping(user="uid", item="sku", timestamp="ts", value="stars")
    events, _, _ = load_interactions(log, mapping)
    assert (events["event_type"] == "impression").sum() == 3
    outcomes = events[events["event_type"] != "impression"].sort_values("timestamp")
    assert outcomes["event_type"].tolist() == ["click", "click", "skip"]
    assert outcomes["dwell_time_ms"].tolist() == [45_000, 3_000, 0]
    assert outcomes["timestamp"].tolist() == [1_001_000, 1_101_000, 1_201_000]  # outcome 1 s after impression
    imp = events[events["event_type"] == "impression"].set_index("item_id")
    out = outcomes.set_index("item_id")
    assert (imp["position"] == out["position"]).all() and (imp["session_id"] == out["session_id"]).all()

    strict = ColumnMapping(user="uid", item="sku", timestamp="ts", value="stars", value_thresholds=(5, 4))
    events, _, _ = load_interactions(log, strict)
    assert events[events["event_type"] != "impression"].sort_values("timestamp")["event_type"].tolist() == [
        "click", "skip", "skip"]


def test_unknown_event_type_kept_and_quarantined_by_contract(tmp_path: Path) -> None:
    log = _write(tmp_path / "log.csv", "uid,sku,ts,type\n"
                                       "u1,a,1700000000,click\nu1,a,1700000001,Wishlist\nu2,b,1700000002,PURCHASE\n"
                                       "u2,c,1700000003,view\n")  # epoch s in the contract's plausible range
    mapping = ColumnMapping(user="uid", item="sku", timestamp="ts", event_type="type")
    events, _, _ = load_interactions(log, mapping, source="shop")
    logged = events[events["event_type"] != "impression"]
    assert logged["event_type"].tolist() == ["click", "wishlist", "purchase", "view"]  # nothing dropped
    # no impressions logged: one implied before the first known engagement of each (session, item)
    assert sorted(events.loc[events["event_type"] == "impression", "item_id"]) == ["a", "b"]

    result = validate_events(events, run_id="t", now_ms=FAR_FUTURE_MS)
    assert result.reconciles()
    assert len(result.accepted) == 4 and len(result.quarantined) == 2 and result.duplicates == 0
    assert sorted(result.quarantined["event_type"]) == ["view", "wishlist"]
    assert set(result.quarantined["reasons"]) == {"event_type_known"}
    assert result.expectation_failures["event_type_known"] == 2


def test_reimport_gives_identical_ids(tmp_path: Path) -> None:
    # two identical lines are two rows (row number is part of the id), yet stable across imports
    text = "uid,sku,ts\nu1,a,1000\nu1,a,1000\nu2,b,2000\n"
    first, _, _ = load_interactions(_write(tmp_path / "one.csv", text), BASIC)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    second, _, _ = load_interactions(_write(moved / "two.csv", text), BASIC)
    assert first["event_id"].is_unique
    pd.testing.assert_frame_equal(first, second)


def test_missing_column_names_file_header_and_columns(tmp_path: Path) -> None:
    log = _write(tmp_path / "log.csv", "user,sku,time\nu1,a,1\n")
    with pytest.raises(ImportError_) as err:
        load_interactions(log, BASIC)
    msg = str(err.value)
    assert str(log) in msg and "line 1 (header)" in msg
    assert "['uid', 'ts']" in msg and "['user', 'sku', 'time']" in msg

    pq = tmp_path / "log.parquet"
    pd.DataFrame({"uid": ["u"], "sku": ["a"]}).to_parquet(pq)
    with pytest.raises(ImportError_, match=re.escape(f"{pq}: schema") + r".*\['ts'\]"):
        load_interactions(pq, BASIC)


def test_bad_timestamp_names_file_line_column_value(tmp_path: Path) -> None:
    log = _write(tmp_path / "log.csv", "uid,sku,ts\nu1,a,1000\n\nu1,b,yesterday\n")  # blank line still counts
    with pytest.raises(ImportError_) as err:
        load_interactions(log, BASIC)
    msg = str(err.value)
    assert msg.startswith(f"{log}: line 4, column 'ts': expected a number (epoch seconds), got 'yesterday'")
    assert "timestamp_unit" in msg  # says what to do

    iso = _write(tmp_path / "iso.csv", "uid,sku,ts\nu1,a,2024-01-01T00:00:00Z\nu1,b,\n")
    with pytest.raises(ImportError_, match=re.escape(f"{iso}: line 3, column 'ts'") + ".*an empty cell"):
        load_interactions(iso, ColumnMapping(user="uid", item="sku", timestamp="ts", timestamp_unit="iso"))
    with pytest.raises(ImportError_, match=re.escape(f"{iso}: line 2, column 'ts'") + ".*ISO"):
        load_interactions(iso, BASIC)  # dates under unit "s" fail on the first line


def test_bad_number_in_parquet_names_row(tmp_path: Path) -> None:
    pq = tmp_path / "r.parquet"
    pd.DataFrame({"uid": ["u1", "u2", "u3"], "sku": ["a", "b", "c"], "ts": [1, 2, 3],
                  "stars": ["4", "5", "lots"]}).to_parquet(pq)
    mapping = ColumnMapping(user="uid", item="sku", timestamp="ts", value="stars")
    with pytest.raises(ImportError_, match=re.escape(f"{pq}: row 3, column 'stars': expected a number, got 'lots'")):
        load_interactions(pq, mapping)


def test_empty_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ImportError_, match=re.escape(f"{tmp_path / 'empty.csv'}: the file is empty")):
        load_interactions(_write(tmp_path / "empty.csv", ""), BASIC)
    with pytest.raises(ImportError_, match="no interaction rows"):
        load_interactions(_write(tmp_path / "header.csv", "uid,sku,ts\n"), BASIC)
    with pytest.raises(ImportError_, match="unknown format '.json'"):
        load_interactions(_write(tmp_path / "log.json", "{}"), BASIC)


def test_mapping_json_round_trip_and_unknown_key(tmp_path: Path) -> None:
    mapping = ColumnMapping(user="u", item="i", timestamp="t", session="s", value="r", timestamp_unit="ms",
                            value_thresholds=(4.5, 2))
    assert ColumnMapping.from_json(mapping.to_json()) == mapping
    assert ColumnMapping.from_dict(json.loads(mapping.to_json())).value_thresholds == (4.5, 2.0)
    assert ColumnMapping.from_json('{"user": "u", "item": "i", "timestamp": "t"}') == ColumnMapping("u", "i", "t")

    with pytest.raises(ValueError, match=r"unknown column-mapping key\(s\) \['usr'\]; allowed keys are \[.*'user'"):
        ColumnMapping.from_json('{"usr": "u", "item": "i", "timestamp": "t"}')
    with pytest.raises(ValueError, match="timestamp_unit must be one of"):
        ColumnMapping.from_dict({"user": "u", "item": "i", "timestamp": "t", "timestamp_unit": "ns"})
    with pytest.raises(ValueError, match="not valid JSON"):
        ColumnMapping.from_json("{user: u}")
    with pytest.raises(ValueError, match="either event_type .* or value"):
        ColumnMapping("u", "i", "t", event_type="e", value="r")
