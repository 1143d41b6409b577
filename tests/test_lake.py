"""The Delta adapter: versions, time travel, pins, and Spark reading an exact snapshot."""
from __future__ import annotations

import pandas as pd
import pytest

from lake.delta import DeltaLake, TableMissing, spark_read
from orchestration.services import spark_session


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
