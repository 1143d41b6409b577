"""The event contract: GX decides, every row is accounted for, reasons name the failed expectations."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_contracts.event_rules import MAX_ID_LENGTH, MIN_TIMESTAMP_MS, build_suite, check_event, event_rules, event_violations
from data_contracts.events import QUARANTINE_COLUMNS, ContractResult, build_data_docs, validate_events
from data_contracts.schema import DAY_MS, EVENT_COLUMNS, EVENT_SCHEMA, SCHEMA_VERSION
from ingestion.simulator import START_MS
from lake.delta import DeltaLake
from ingestion.labels import build_labels

NOW = START_MS + 30 * DAY_MS  # fixed clock: the simulated days are all in its past

# what ingestion.simulator._inject_faults does to a row -> the expectation that must catch it
INJECTED = {
    "null_user_id": "user_id_not_null",
    "teleport": "event_type_known",
    "negative_timestamp": "timestamp_in_range",
    "negative_dwell": "dwell_time_ms_in_range",
    "null_item_id": "item_id_not_null_for_item_events",
}


def injected_kind(row: pd.Series) -> str:
    if row["user_id"] is None or pd.isna(row["user_id"]):
        return "null_user_id"
    if row["event_type"] == "teleport":
        return "teleport"
    if row["timestamp"] == -5:
        return "negative_timestamp"
    if row["dwell_time_ms"] == -1_000:
        return "negative_dwell"
    if row["item_id"] is None or pd.isna(row["item_id"]):
        return "null_item_id"
    raise AssertionError(f"row {row['event_id']} has no known injected fault")


@pytest.fixture(scope="module")
def sim_result(small_world) -> tuple[pd.DataFrame, ContractResult]:
    events = small_world.events
    return events, validate_events(events, run_id="run-sim", now_ms=NOW)


@pytest.fixture()
def clean(sim_result) -> pd.DataFrame:
    return sim_result[1].accepted.head(50).copy()


def reasons_of(result: ContractResult) -> dict[str, list[str]]:
    return {eid: r.split("; ") for eid, r in zip(result.quarantined["event_id"], result.quarantined["reasons"])}


def test_simulator_events_reconcile(sim_result) -> None:
    events, result = sim_result
    assert result.n_in == len(events)
    assert result.reconciles()
    assert result.n_in == len(result.accepted) + len(result.quarantined) + result.duplicates
    assert list(result.accepted.columns) == EVENT_COLUMNS
    assert list(result.quarantined.columns) == QUARANTINE_COLUMNS
    assert result.accepted["event_id"].is_unique
    assert not result.success  # the simulator injects faults, so the suite as a whole fails
    summary = result.summary()
    assert summary["n_in"] == result.n_in and summary["reconciles"] is True
    assert summary["quarantined"] == len(result.quarantined) and summary["duplicates"] == result.duplicates


def test_every_injected_fault_is_quarantined_with_its_reason(sim_result) -> None:
    events, result = sim_result
    bad = events[events["event_id"].str.startswith("bad-")]
    kinds = {row["event_id"]: injected_kind(row) for _, row in bad.iterrows()}
    assert set(kinds.values()) == set(INJECTED), "the fixture world should contain every fault kind"
    reasons = reasons_of(result)
    # exactly the injected rows are quarantined, each with exactly the expectation for its fault
    assert set(reasons) == set(kinds)
    for eid, kind in kinds.items():
        assert reasons[eid] == [INJECTED[kind]], (eid, kind, reasons[eid])
    assert not result.accepted["event_id"].str.startswith("bad-").any()
    expected_counts = pd.Series(list(kinds.values())).map(INJECTED).value_counts().to_dict()
    assert {k: v for k, v in result.expectation_failures.items() if v} == expected_counts


def test_duplicates_are_counted_and_first_kept(sim_result) -> None:
    events, result = sim_result
    n_dups = int(events["event_id"].duplicated().sum())
    assert n_dups > 0
    assert result.duplicates == n_dups
    # accepted keeps the original order of first occurrences
    expected = events[~events["event_id"].str.startswith("bad-")].drop_duplicates("event_id")["event_id"]
    assert result.accepted["event_id"].tolist() == expected.tolist()


def test_quarantine_keeps_the_raw_payload_and_run(sim_result) -> None:
    events, result = sim_result
    q = result.quarantined
    assert (q["run_id"] == "run-sim").all()
    assert q["quarantined_at"].dtype == np.int64 and (q["quarantined_at"] > NOW - 10 * 365 * DAY_MS).all()
    row = q[q["reasons"] == "user_id_not_null"].iloc[0]
    payload = json.loads(row["raw_payload"])
    assert payload["user_id"] is None  # nulls kept
    original = events[events["event_id"] == row["event_id"]].iloc[0]
    assert payload == {c: (None if pd.isna(original[c]) else original[c].item() if hasattr(original[c], "item")
                           else original[c]) for c in events.columns}


def test_clean_data_passes(clean) -> None:
    result = validate_events(clean, run_id="run-clean", now_ms=NOW)
    assert result.success
    assert result.reconciles()
    assert len(result.quarantined) == 0 and result.duplicates == 0
    assert list(result.quarantined.columns) == QUARANTINE_COLUMNS
    pd.testing.assert_frame_equal(result.accepted, clean.reset_index(drop=True))
    assert all(n == 0 for n in result.expectation_failures.values())


def test_a_row_failing_two_rules_lists_both(clean) -> None:
    events = clean.copy()
    events.loc[3, "user_id"] = None
    events.loc[3, "timestamp"] = -5
    events.loc[7, "event_type"] = None  # null type: not-null fails; in-set and item rule do not apply to nulls
    result = validate_events(events, run_id="r", now_ms=NOW)
    reasons = reasons_of(result)
    assert reasons[events.loc[3, "event_id"]] == ["user_id_not_null", "timestamp_in_range"]
    assert reasons[events.loc[7, "event_id"]] == ["event_type_not_null"]
    assert result.reconciles() and len(result.accepted) == len(events) - 2
    assert not result.success


def test_far_future_timestamp_is_quarantined(clean) -> None:
    events = clean.copy()
    skew = 300_000
    events.loc[0, "timestamp"] = NOW + skew + 1
    events.loc[1, "timestamp"] = NOW + skew  # at the edge: allowed
    events.loc[2, "timestamp"] = NOW + 365 * DAY_MS
    result = validate_events(events, run_id="r", now_ms=NOW, max_future_skew_ms=skew)
    reasons = reasons_of(result)
    assert reasons == {events.loc[0, "event_id"]: ["timestamp_in_range"],
                       events.loc[2, "event_id"]: ["timestamp_in_range"]}
    assert events.loc[1, "event_id"] in set(result.accepted["event_id"])


def test_wall_clock_is_the_default_now(clean) -> None:
    events = clean.copy()
    events.loc[0, "timestamp"] = int(pd.Timestamp.now(tz="UTC").value // 1_000_000) + DAY_MS
    result = validate_events(events, run_id="r")
    assert reasons_of(result) == {events.loc[0, "event_id"]: ["timestamp_in_range"]}


def test_missing_required_column_raises_a_clear_error(clean) -> None:
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['user_id', 'timestamp'\]"):
        validate_events(clean.drop(columns=["user_id", "timestamp"]), run_id="r", now_ms=NOW)


def test_missing_optional_columns_are_filled_with_nulls(clean) -> None:
    result = validate_events(clean.drop(columns=["source", "dwell_time_ms", "position"]), run_id="r", now_ms=NOW)
    assert result.success and len(result.accepted) == len(clean)
    assert result.accepted["source"].isna().all() and result.accepted["position"].isna().all()


def test_wrong_dtypes_are_coerced_or_quarantined(clean) -> None:
    events = clean.copy().astype({"timestamp": object, "position": object, "user_id": object})
    events["timestamp"] = [str(t) for t in clean["timestamp"]]  # numeric strings: coerced
    events.loc[0, "timestamp"] = "not a time"
    events.loc[1, "timestamp"] = pd.Timestamp(int(clean.loc[1, "timestamp"]), unit="ms", tz="UTC").isoformat()
    events.loc[2, "position"] = 1.5
    events.loc[3, "user_id"] = 42
    events.loc[4, "dwell_time_ms"] = np.nan  # a nullable column: null is fine
    before = events.copy()
    result = validate_events(events, run_id="r", now_ms=NOW)
    pd.testing.assert_frame_equal(events, before)  # the caller's frame is never modified
    reasons = reasons_of(result)
    assert reasons == {events.loc[0, "event_id"]: ["timestamp_not_null", "timestamp_is_integer"],
                       events.loc[2, "event_id"]: ["position_is_integer"]}
    assert result.reconciles()
    acc = result.accepted.set_index("event_id")
    assert acc["timestamp"].dtype == np.int64
    assert acc.loc[events.loc[1, "event_id"], "timestamp"] == clean.loc[1, "timestamp"]
    assert acc.loc[events.loc[3, "event_id"], "user_id"] == "42"
    assert pd.isna(acc.loc[events.loc[4, "event_id"], "dwell_time_ms"])
    raw = json.loads(result.quarantined.set_index("event_id").loc[events.loc[0, "event_id"], "raw_payload"])
    assert raw["timestamp"] == "not a time"


def test_datetime_timestamps_become_epoch_ms(clean) -> None:
    events = clean.assign(timestamp=pd.to_datetime(clean["timestamp"], unit="ms"))  # naive datetimes read as UTC
    result = validate_events(events, run_id="r", now_ms=NOW)
    assert result.success
    assert result.accepted["timestamp"].tolist() == clean["timestamp"].tolist()


def test_garbage_never_raises() -> None:
    events = pd.DataFrame({
        "event_id": ["a", "b", "", None], "user_id": [1, None, "u", "u"], "item_id": [b"i", "i", None, "i"],
        "event_type": ["click", "skip", "impression", 3.5], "timestamp": [True, "x", None, 1.0e30],
        "session_id": ["s", "s", "s", "s"], "schema_version": ["1", 2, None, SCHEMA_VERSION],
        "position": [-1, None, "3", {"a": 1}], "extra": [[1], None, {"k": "v"}, 1],
    })
    result = validate_events(events, run_id="r", now_ms=NOW)
    assert result.reconciles()
    assert len(result.accepted) == 0 and len(result.quarantined) == 4
    for payload in result.quarantined["raw_payload"]:
        assert "extra" in json.loads(payload)  # extra source columns survive in the payload


def test_invalid_twin_does_not_shadow_a_valid_event(clean) -> None:
    bad = clean.head(1).assign(timestamp=-5)
    events = pd.concat([bad, clean], ignore_index=True)
    result = validate_events(events, run_id="r", now_ms=NOW)
    assert result.duplicates == 0 and len(result.quarantined) == 1
    assert clean["event_id"].iloc[0] in set(result.accepted["event_id"])


def test_empty_input() -> None:
    events = pd.DataFrame({c: pd.Series([], dtype=object) for c in EVENT_COLUMNS})
    result = validate_events(events, run_id="r", now_ms=NOW)
    assert result.n_in == 0 and result.reconciles()
    assert list(result.quarantined.columns) == QUARANTINE_COLUMNS and list(result.accepted.columns) == EVENT_COLUMNS


def test_suite_is_built_from_the_declared_rules() -> None:
    rules = event_rules(NOW)
    suite = build_suite(rules)
    assert [e.meta["kairos_rule"] for e in suite.expectations] == [r.name for r in rules]
    assert len({r.name for r in rules}) == len(rules)
    between = next(e for e in suite.expectations if e.meta["kairos_rule"] == "timestamp_in_range")
    assert between.max_value == NOW + 300_000 and between.min_value == MIN_TIMESTAMP_MS


def test_accepted_writes_as_silver_and_feeds_labels(sim_result, tmp_path) -> None:
    lake = DeltaLake(str(tmp_path / "lake"))
    accepted = sim_result[1].accepted
    version = lake.write("silver_events", accepted, schema=EVENT_SCHEMA)
    assert version.rows == len(accepted)
    silver = lake.read("silver_events")
    assert silver["event_id"].tolist() == accepted["event_id"].tolist()
    labels = build_labels(silver, as_of_ms=int(silver["timestamp"].max()) + 1)
    assert len(labels) > 0 and labels["event_id"].isin(set(accepted["event_id"])).all()


def test_quarantine_appends_to_delta_across_runs(sim_result, clean, tmp_path) -> None:
    lake = DeltaLake(str(tmp_path / "lake"))
    first = sim_result[1].quarantined
    lake.write("quarantine_events", first, mode="append")
    # a second run whose rejects have all-null descriptive columns must append to the same schema
    odd = clean.head(3).assign(timestamp=-5, page_context=None, device_type=None, source=None, dwell_time_ms=None)
    second = validate_events(odd, run_id="run-2", now_ms=NOW).quarantined
    assert len(second) == 3
    lake.write("quarantine_events", second, mode="append")
    back = lake.read("quarantine_events")
    assert len(back) == len(first) + 3
    assert set(back["run_id"]) == {"run-sim", "run-2"}
    assert set(back.columns) == set(QUARANTINE_COLUMNS)


def test_data_docs_render_the_run(sim_result, tmp_path) -> None:
    index = build_data_docs(sim_result[1], tmp_path / "docs")
    assert index.name == "index.html" and index.exists()
    pages = list((tmp_path / "docs" / "validations").rglob("*.html"))
    assert len(pages) == 1
    html = pages[0].read_text()
    assert "dwell_time_ms" in html and "Unexpected" in html


def test_split_of_one_gx_run_matches_validating_each_group(small_world) -> None:
    raw = small_world.events.reset_index(drop=True)
    groups = np.where(np.arange(len(raw)) % 3 == 0, "a", "b").astype(object)
    whole = validate_events(raw, run_id="split", now_ms=2_000_000_000_000)
    parts = whole.split(groups)
    assert set(parts) == {"a", "b"}
    for g, part in parts.items():
        alone = validate_events(raw[groups == g].reset_index(drop=True), run_id="alone", now_ms=2_000_000_000_000)
        assert part.n_in == alone.n_in and part.reconciles()
        assert len(part.quarantined) == len(alone.quarantined)
        assert part.expectation_failures == alone.expectation_failures
        assert sorted(part.accepted["event_id"]) == sorted(alone.accepted["event_id"]) or part.duplicates != alone.duplicates
    assert sum(p.n_in for p in parts.values()) == whole.n_in
    assert sum(len(p.accepted) for p in parts.values()) == len(whole.accepted)
    empty = whole.empty_share()
    assert empty.n_in == 0 and empty.reconciles() and not any(empty.expectation_failures.values())


def test_stream_and_batch_judge_an_event_by_the_same_rules() -> None:
    """One rule list: the per-event reading (intake, streaming job) names exactly the rules GX fails for the row."""
    good = {"event_id": "g", "user_id": "u", "item_id": "i", "event_type": "click", "timestamp": NOW - 1000,
            "session_id": "s", "position": 1, "page_context": "home_feed", "device_type": "mobile",
            "dwell_time_ms": 100, "schema_version": SCHEMA_VERSION, "source": "app"}
    poison = [
        {"timestamp": float("nan")}, {"timestamp": float("inf")}, {"timestamp": 1_000}, {"timestamp": NOW + DAY_MS},
        {"dwell_time_ms": -1}, {"position": -3}, {"schema_version": 2}, {"device_type": "toaster"},
        {"event_type": "teleport"}, {"user_id": ""}, {"item_id": None}, {"session_id": "x" * (MAX_ID_LENGTH + 1)},
        {"event_id": "e" * 1_000_000}, {"timestamp": 1.5}, {"dwell_time_ms": float("-inf")},
    ]
    events = [{**good, "event_id": f"p{k}", **bad} if "event_id" not in bad else {**good, **bad}
              for k, bad in enumerate(poison)]
    rules = event_rules(NOW)
    assert check_event(good, rules=rules) is None
    result = validate_events(pd.DataFrame([good, *events]), run_id="agree", now_ms=NOW)
    batch = dict(zip(result.quarantined["event_id"], result.quarantined["reasons"].str.split("; ")))
    assert result.accepted["event_id"].tolist() == ["g"] and len(batch) == len(events)
    for event in events:
        stream = [reason.split(":")[0] for _, reason in event_violations(event, rules)]
        assert stream == batch[str(event["event_id"])], event
        field, reason = check_event(event, rules=rules)
        assert field in event and field in reason  # the answer names the field


def test_spark_expressions_judge_a_row_as_gx_does() -> None:
    """The Spark engine's verdict (event_rules compiled to Spark columns) names exactly the rules GX fails for each
    row, on the same poison rows, with int columns as the lake holds them (longs) and as floats (NaN, inf, 1.5)."""
    from pyspark.sql import functions as F

    from data_contracts.event_rules_spark import contract_columns
    from lake.spark import spark_session

    good = {"event_id": "g", "user_id": "u", "item_id": "i", "event_type": "click", "timestamp": NOW - 1000,
            "session_id": "s", "position": 1, "page_context": "home_feed", "device_type": "mobile",
            "dwell_time_ms": 100, "schema_version": SCHEMA_VERSION, "source": "app"}
    as_longs = [{"timestamp": 1_000}, {"timestamp": NOW + DAY_MS}, {"timestamp": None}, {"dwell_time_ms": -1},
                {"dwell_time_ms": 3_600_001}, {"position": -3}, {"position": None}, {"schema_version": 2},
                {"device_type": "toaster"}, {"device_type": None}, {"event_type": "teleport"}, {"event_type": ""},
                {"user_id": ""}, {"item_id": None}, {"item_id": ""}, {"session_id": "x" * (MAX_ID_LENGTH + 1)},
                {"source": ""}, {"user_id": None, "dwell_time_ms": -5, "device_type": "fridge"}]
    as_floats = [{"timestamp": float("nan")}, {"timestamp": float("inf")}, {"timestamp": 1.5},
                 {"dwell_time_ms": float("-inf")}, {"position": 2.0}, {"timestamp": float(NOW - 5)}]
    rules = event_rules(NOW)
    spark = spark_session("local[1]")
    for poison, floats in ((as_longs, False), (as_floats, True)):
        rows = pd.DataFrame([good] + [{**good, "event_id": f"p{k}", **bad} for k, bad in enumerate(poison)])
        for col in ("timestamp", "position", "dwell_time_ms", "schema_version"):
            rows[col] = rows[col].astype("float64") if floats else rows[col].astype("Int64")
        gx = validate_events(rows, run_id="spark-agrees", now_ms=NOW)
        expected = dict(zip(gx.quarantined["event_id"], gx.quarantined["reasons"]))
        assert len(expected) >= len(poison) - 3  # (nulls in nullable columns, a blank `source`, whole floats pass)
        frame = spark.createDataFrame(rows)
        values, reasons = contract_columns(frame, rules)
        got = {r["event_id"]: r["reasons"] for r in frame.select("event_id", reasons.alias("reasons"))
               .where(F.col("reasons").isNotNull()).collect()}
        assert got == expected, poison
        typed = frame.select(*[values[c].alias(c) for c in EVENT_COLUMNS]).where(F.col("event_id").isin(
            gx.accepted["event_id"].tolist())).toPandas()
        assert sorted(typed["event_id"]) == sorted(gx.accepted["event_id"])  # the accepted values as GX's frame
