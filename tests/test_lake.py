"""The Delta adapter: versions, time travel, pins, and Spark reading an exact snapshot."""
from __future__ import annotations

import pandas as pd
import pytest

from lake.delta import DeltaLake, TableMissing, spark_read
from lake.spark import spark_session


def test_versions_time_travel_and_pin(tmp_path) -> None:
    lake = DeltaLake(str(tmp_path / "lake"))
    v0 = lake.write("t", pd.DataFrame({"a": [1, 2]}))
    v1 = lake.write("t", pd.DataFrame({"a": [3]}), mode="append")
    assert (v0.version, v1.version) == (0, 1)
    assert lake.read("t", version=0)["a"].tolist() == [1, 2]
    assert sorted(lake.read("t")["a"].tolist()) == [1, 2, 3]
    pin = lake.pin("t")
    assert pin.version == 1 and pin.rows == 3
    assert pin.as_tag() == {"delta.t.version": "1", "delta.t.rows": "3"}
    with pytest.raises(TableMissing, match="materialize its asset first"):
        lake.read("nope")


def test_spark_reads_the_pinned_snapshot_not_the_latest(tmp_path) -> None:
    lake = DeltaLake(str(tmp_path / "lake"))
    lake.write("t", pd.DataFrame({"a": [1, 2], "d": ["x", "y"]}), partition_by=["d"])
    lake.write("t", pd.DataFrame({"a": [3], "d": ["x"]}), mode="append")
    spark = spark_session()
    assert sorted(r["a"] for r in spark_read(spark, lake, "t", 0).collect()) == [1, 2]
    frame = spark_read(spark, lake, "t", 1)
    assert sorted(r["a"] for r in frame.collect()) == [1, 2, 3]
    assert set(frame.columns) == {"a", "d"}


def test_write_batch_is_idempotent_and_replaces_only_its_batch(tmp_path) -> None:
    import pandas as pd

    from lake.delta import DeltaLake

    lake = DeltaLake(str(tmp_path / "lake"))
    day1 = pd.DataFrame({"v": [1, 2], "ingest_date": ["d1", "d1"]})
    day2 = pd.DataFrame({"v": [3], "ingest_date": ["d2"]})
    w1 = lake.write_batch("t", day1, batch_id="t:d1", replace_where="ingest_date = 'd1'", partition_by=["ingest_date"])
    w2 = lake.write_batch("t", day2, batch_id="t:d2", replace_where="ingest_date = 'd2'", partition_by=["ingest_date"])
    again = lake.write_batch("t", day1, batch_id="t:d1", replace_where="ingest_date = 'd1'", partition_by=["ingest_date"])
    assert not w1.skipped and not w2.skipped and again.skipped and again.version == w2.version  # replay: no new version
    fixed = pd.DataFrame({"v": [10], "ingest_date": ["d1"]})
    w3 = lake.write_batch("t", fixed, batch_id="t:d1", replace_where="ingest_date = 'd1'", partition_by=["ingest_date"])
    assert w3.version == w2.version + 1
    assert sorted(lake.read("t")["v"]) == [3, 10]  # the corrected batch replaced its rows, nothing duplicated
    assert sorted(lake.read("t", version=w2.version)["v"]) == [1, 2, 3]  # time travel to before the correction
    assert lake.history("t", limit=1)[0]["batch_id"] == "t:d1"
    assert lake.tables() == ["t"]


def test_filtered_read_after_a_delete_and_an_append(tmp_path) -> None:
    """delta-rs rewrites deleted-from files with string_view columns; a later append writes plain strings: a filtered
    read of that mix (a second forget does exactly this) still returns the matching rows."""
    lake = DeltaLake(str(tmp_path / "lake"))
    lake.write("t", pd.DataFrame({"user_id": ["u1", "u2", "u3"], "s": ["a", "a", "b"]}))
    lake.delete("t", "user_id = 'u1'")
    lake.write("t", pd.DataFrame({"user_id": ["u2", "u4"], "s": ["c", "d"]}), mode="append")
    got = lake.read("t", columns=["s"], filters=[("user_id", "=", "u2")])
    assert sorted(got["s"]) == ["a", "c"]
    assert sorted(lake.read("t", columns=["user_id"], filters=[("user_id", "in", ["u3", "u4"])])["user_id"]) == ["u3", "u4"]


def test_day_batches_one_commit_per_range_and_per_day_idempotency(tmp_path) -> None:
    from lake.delta import content_hash, day_hashes

    lake = DeltaLake(str(tmp_path / "lake"))
    days = ["2026-01-01", "2026-01-02", "2026-01-03"]
    frame = pd.DataFrame({"k": ["a", "b", "c", "d"], "ingest_date": ["2026-01-01", "2026-01-01", "2026-01-03",
                                                                     "2026-01-03"]})
    import pyarrow as pa

    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    per_day = day_hashes(arrow, "ingest_date")
    assert per_day["2026-01-03"] == content_hash(pa.Table.from_pandas(frame[frame["ingest_date"] == "2026-01-03"],
                                                                      preserve_index=False))
    first = lake.write_day_batches("t", frame, days, "ingest_date", partition_by=["ingest_date"])
    assert not first.skipped and first.version == 0 and len(lake.history("t")) == 1  # three days, one commit
    assert lake.write_day_batches("t", frame, days, "ingest_date").skipped          # replayed range: no-op
    one = frame[frame["ingest_date"] == "2026-01-03"]
    assert lake.write_batch("t", one, batch_id="t:2026-01-03", replace_where="ingest_date = '2026-01-03'").skipped
    changed = pd.concat([frame, pd.DataFrame({"k": ["e"], "ingest_date": ["2026-01-02"]})], ignore_index=True)
    again = lake.write_day_batches("t", changed, days, "ingest_date")
    assert not again.skipped and sorted(lake.read("t")["k"]) == ["a", "b", "c", "d", "e"]  # replaced, not duplicated
    outside = lake.write_day_batches("t", pd.DataFrame({"k": ["z"], "ingest_date": ["2026-01-05"]}), ["2026-01-05"],
                                     "ingest_date")
    assert not outside.skipped and sorted(lake.read("t")["k"]) == ["a", "b", "c", "d", "e", "z"]
