"""Spark over the lake: the delta-rs data source, reader choice, settings pass-through, code shipping,
the session builder, and an object-store lake (moto's S3 server) read by Spark and listed, maintained
and vacuumed by delta-rs."""
from __future__ import annotations

import zipfile

import pandas as pd
import pytest

from ground.settings import SparkSettings
from lake.delta import DeltaLake
from lake.spark import spark_session
from lake.spark_conf import LakeNotReachable, conf_from_env, lake_reader, product_zip, session_conf
from lake.spark_read import check_reachable, snapshot_plan, spark_read


def _rows(frame) -> list[tuple]:
    return sorted(tuple(r) for r in frame.collect())


def test_reader_choice_and_settings_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KAIROS_SPARK_LAKE_READER", "KAIROS_SPARK_DELTA_NATIVE", "KAIROS_SPARK_CONF"):
        monkeypatch.delenv(var, raising=False)
    assert lake_reader("/data/lake") == "hadoop" and lake_reader("s3://b/lake") == "python"
    monkeypatch.setenv("KAIROS_SPARK_DELTA_NATIVE", "1")
    assert lake_reader("s3://b/lake") == "delta"
    conf = session_conf("local[2]", lake_uri="s3://b/lake")  # the connector is configured, not left to chance
    assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert conf["spark.jars.packages"].startswith("io.delta:delta-spark_2.13:")
    monkeypatch.setenv("KAIROS_SPARK_LAKE_READER", "python")
    assert lake_reader("/data/lake") == "python"
    monkeypatch.setenv("KAIROS_SPARK_LAKE_READER", "jdbc")
    with pytest.raises(ValueError, match="KAIROS_SPARK_LAKE_READER must be one of"):
        lake_reader("/data/lake")
    monkeypatch.delenv("KAIROS_SPARK_LAKE_READER")  # one settings object: a bad reader fails every Spark setting
    monkeypatch.setenv("KAIROS_SPARK_CONF", '{"spark.executor.memory": "2g", "spark.sql.shuffle.partitions": 8}')
    assert conf_from_env() == {"spark.executor.memory": "2g", "spark.sql.shuffle.partitions": "8"}
    assert session_conf("local[2]", conf_from_env())["spark.sql.shuffle.partitions"] == "8"  # pass-through wins
    monkeypatch.setenv("KAIROS_SPARK_CONF", '{"executor.memory": "2g"}')
    with pytest.raises(ValueError, match="must start with 'spark.'"):
        conf_from_env()
    monkeypatch.setenv("KAIROS_SPARK_CONF", "spark.executor.memory=2g")
    with pytest.raises(ValueError, match="JSON object"):
        conf_from_env()


def test_code_is_shipped_to_non_local_masters_and_local_lakes_refused(tmp_path) -> None:
    conf = session_conf("spark://10.0.0.1:7077", code_dir=tmp_path)
    shipped = conf["spark.submit.pyFiles"]
    names = zipfile.ZipFile(shipped).namelist()
    for module in ("lake/spark.py", "features/functions.py", "training/dataset.py", "ground/settings.py"):
        assert module in names, module
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
    assert product_zip(tmp_path) == type(product_zip(tmp_path))(shipped)  # same code, same file
    assert "spark.submit.pyFiles" not in session_conf("local[2]")
    with pytest.raises(LakeNotReachable, match="KAIROS_LAKE_URI=s3://"):
        check_reachable("spark://10.0.0.1:7077", str(tmp_path / "lake"))
    check_reachable("spark://10.0.0.1:7077", "s3://bucket/lake")
    check_reachable("local[2]", str(tmp_path / "lake"))
    check_reachable("spark://10.0.0.1:7077", str(tmp_path / "lake"), settings=SparkSettings(allow_local_lake=True))


def test_python_reader_reads_the_pinned_snapshot_like_delta_rs(tmp_path) -> None:
    lake = DeltaLake(str(tmp_path / "lake"))
    first = pd.DataFrame({"a": [1, 2, 3], "d": ["x", "y", "x"], "ts": pd.to_datetime([1, 2, 3], unit="s", utc=True)})
    lake.write("t", first, partition_by=["d"])
    lake.write("t", pd.DataFrame({"a": [4], "d": ["z"], "ts": pd.to_datetime([4], unit="s", utc=True)}), mode="append")
    spark = spark_session()
    for version in (0, 1):
        expected = lake.read("t", version=version)
        got = spark_read(spark, lake, "t", version, reader="python")
        assert got.columns == ["a", "d", "ts"]  # the table's column order, partition column included
        assert _rows(got.select("a", "d")) == sorted(zip(expected["a"], expected["d"]))
        assert _rows(got.select("a", "d")) == _rows(spark_read(spark, lake, "t", version, reader="hadoop").select("a", "d"))
    plan = snapshot_plan(lake, "t", 1, partition_bytes=1)  # one file per Spark partition
    assert len(plan["groups"]) == 3 and {f["partition"]["d"] for g in plan["groups"] for f in g} == {"x", "y", "z"}


def test_session_is_rebuilt_when_the_master_changes() -> None:
    first = spark_session("local[1]")
    assert spark_session("local[1]") is first
    second = spark_session("local[2]")
    assert second.sparkContext.master == "local[2]" and first.sparkContext._jsc is None  # old one stopped
    assert second.range(10).count() == 10


def test_object_store_lake_read_listed_and_maintained(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests._engines import s3_lake

    with s3_lake(tmp_path, monkeypatch) as root:
        lake = DeltaLake(root)
        lake.write("events", pd.DataFrame({"user_id": ["u1", "u2"], "day": ["d1", "d2"]}), partition_by=["day"])
        lake.write("events", pd.DataFrame({"user_id": ["u3"], "day": ["d1"]}), mode="append")
        lake.write("other", pd.DataFrame({"x": [1]}))
        assert lake.tables() == ["events", "other"]
        frame = spark_read(spark_session(), lake, "events", 1)  # auto: the python reader for s3://
        assert _rows(frame) == [("u1", "d1"), ("u2", "d2"), ("u3", "d1")]
        assert _rows(spark_read(spark_session(), lake, "events", 0)) == [("u1", "d1"), ("u2", "d2")]
        from dagster import materialize

        from assets.maintenance import lake_maintenance
        from assets.resources import LakeResource

        result = materialize([lake_maintenance], resources={"lake": LakeResource(root=root)},
                             run_config={"ops": {"lake_maintenance": {"config": {"retention_hours": 0}}}})
        report = result.asset_materializations_for_node("lake_maintenance")[0].metadata["report"].value
        assert set(report) == {"events", "other"}
        assert report["events"]["files_after"] < report["events"]["files_before"]  # compacted on S3
        assert report["events"]["files_vacuumed"] >= 1
        assert sorted(lake.read("events")["user_id"]) == ["u1", "u2", "u3"]
