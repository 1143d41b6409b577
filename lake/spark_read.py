"""Reading one pinned table version into Spark: the snapshot plan from delta-rs, the `kairos_delta` Python data
source the executors read it with, or Spark's parquet reader / delta-spark over the same files."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator
from urllib.parse import unquote

from ground.settings import SparkSettings
from lake.delta import DeltaLake, TableMissing
from lake.spark_conf import (DEFAULT_BATCH_ROWS, DEFAULT_PARTITION_BYTES, LakeNotReachable, PLAN_OPTION, SOURCE_NAME,
                             STORAGE_PREFIX, is_local_master, is_object_store, lake_reader)

log = logging.getLogger("kairos.spark")


# ---------------------------------------------------------------------------------------------- reading a snapshot
def check_reachable(master: str, lake_uri: str, settings: SparkSettings | None = None) -> None:
    """A local-path lake is readable only by executors on this machine: refuse it on a non-local master
    (unless SparkSettings.allow_local_lake, KAIROS_SPARK_ALLOW_LOCAL_LAKE=1, says every worker mounts it)."""
    if is_local_master(master) or is_object_store(lake_uri):
        return
    if (settings or SparkSettings.from_env()).allow_local_lake:
        return
    raise LakeNotReachable(
        f"the lake is a local path ({lake_uri}) but Spark runs on {master}: its executors cannot read this "
        f"machine's disk. Put the lake on shared storage (KAIROS_LAKE_URI=s3://bucket/prefix, gs://, abfss://), "
        f"or set KAIROS_SPARK_ALLOW_LOCAL_LAKE=1 if every worker mounts {lake_uri} at the same path.")


def _relative(table_uri: str, file_uri: str) -> str:
    base = table_uri.rstrip("/")
    for prefix in (base, "file://" + base, "file:" + base):
        if file_uri.startswith(prefix + "/"):
            return unquote(file_uri[len(prefix) + 1:])
    raise ValueError(f"data file {file_uri} is not under its table {table_uri}")


def snapshot_plan(lake: DeltaLake, table: str, version: int,
                  partition_bytes: int = DEFAULT_PARTITION_BYTES, min_partitions: int = 1) -> dict[str, Any]:
    """What executors read for `table@version`: the table root, its data files grouped into Spark partitions
    of about `partition_bytes` (smaller when that would give fewer than `min_partitions`, so a small table still
    uses every core), each file's partition values, and the Arrow schema (column order of the table)."""
    import pyarrow as pa

    dt = lake._table(table, version)
    schema = pa.schema(dt.schema().to_arrow())
    actions = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    part_cols = list(dt.metadata().partition_columns)
    root = lake.uri(table)
    files: list[dict[str, Any]] = []
    for act in actions:
        path = act["path"]
        rel = _relative(root, path) if "://" in path or path.startswith("/") else unquote(path)
        values = {c: act.get(f"partition.{c}") for c in part_cols}
        files.append({"path": rel, "size": int(act.get("size_bytes") or 0),
                      "partition": {c: (None if v is None else str(v)) for c, v in values.items()}})
    total = sum(f["size"] for f in files)
    partition_bytes = max(1, min(partition_bytes, total // max(min_partitions, 1)))
    groups: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for f in sorted(files, key=lambda f: f["path"]):
        if current and size + f["size"] > partition_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(f)
        size += f["size"]
    if current:
        groups.append(current)
    return {"root": root, "groups": groups, "schema": schema.serialize().to_pybytes().hex(),
            "partition_columns": part_cols}


def _spark_schema(arrow_schema: Any) -> Any:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(arrow_schema)


def _arrow_schema(hex_schema: str) -> Any:
    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(hex_schema)))


def read_file_batches(root: str, storage_options: dict[str, str], entry: dict[str, Any], schema: Any,
                      batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[Any]:
    """One data file of a snapshot as Arrow record batches in the table's schema: read row group by row group
    through delta-rs' object store (memory stays bounded by one batch), partition values added as columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake.fs import DeltaStorageHandler

    fs = pa.fs.PyFileSystem(DeltaStorageHandler(root, storage_options or None))
    with fs.open_input_file(entry["path"]) as handle:
        parquet = pq.ParquetFile(handle)
        present = set(parquet.schema_arrow.names)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[f.name for f in schema if f.name in present]):
            columns = []
            for field in schema:
                if field.name in present:
                    col = batch.column(batch.schema.get_field_index(field.name))
                    columns.append(col if col.type == field.type else col.cast(field.type))
                else:  # a partition column, or a column added to the table after this file was written
                    value = entry["partition"].get(field.name)
                    columns.append(pa.array([value] * batch.num_rows, type=pa.string()).cast(field.type))
            yield pa.RecordBatch.from_arrays(columns, schema=schema)


try:  # the Python data source API exists from Spark 4.0
    from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
except ImportError:  # pragma: no cover - pyspark is pinned to 4.x
    DataSource = DataSourceReader = InputPartition = object  # type: ignore[assignment,misc]


class SnapshotPartition(InputPartition):
    """One Spark partition: a group of data files of the snapshot."""

    def __init__(self, files: list[dict[str, Any]]) -> None:
        self.files = files


class SnapshotReader(DataSourceReader):
    """Reads the planned files on the executors (see `read_file_batches`)."""

    def __init__(self, options: dict[str, str]) -> None:
        self.plan = json.loads(options[PLAN_OPTION])
        self.storage_options = {k[len(STORAGE_PREFIX):]: v for k, v in options.items() if k.startswith(STORAGE_PREFIX)}
        self.batch_rows = int(options.get("batch_rows", DEFAULT_BATCH_ROWS))

    def partitions(self) -> list[SnapshotPartition]:
        return [SnapshotPartition(group) for group in self.plan["groups"]]

    def read(self, partition: SnapshotPartition) -> Iterator[Any]:  # type: ignore[override]  # gets back its own partitions
        schema = _arrow_schema(self.plan["schema"])
        for entry in partition.files:
            yield from read_file_batches(self.plan["root"], self.storage_options, entry, schema, self.batch_rows)


class DeltaSnapshotSource(DataSource):
    """`spark.read.format("kairos_delta")`: one pinned Delta table version read with delta-rs on the executors.

    The plan (files, partition values, schema) is made on the driver by `snapshot_plan`; options whose keys
    start with `storage.` are delta-rs storage options for the executors (endpoint, region, credentials).
    """

    @classmethod
    def name(cls) -> str:
        return SOURCE_NAME

    def schema(self) -> Any:
        return _spark_schema(_arrow_schema(json.loads(self.options[PLAN_OPTION])["schema"]))

    def reader(self, schema: Any) -> SnapshotReader:
        return SnapshotReader(dict(self.options))


_REGISTERED: set[int] = set()


def _register(spark: Any) -> None:
    key = id(spark.sparkContext._jsc) if spark.sparkContext._jsc is not None else id(spark)
    if key not in _REGISTERED:
        spark.dataSource.register(DeltaSnapshotSource)
        _REGISTERED.add(key)


def executor_storage_options(lake: DeltaLake) -> dict[str, str]:
    """The storage options executors open files with: the lake's own, plus the object-store settings of the
    driver's environment (AWS_*, AZURE_*, GOOGLE_*), which executors on other machines do not have."""
    env = {k.lower(): v for k, v in os.environ.items()
           if k.startswith(("AWS_", "AZURE_", "GOOGLE_")) and v}
    return {**env, **{str(k): str(v) for k, v in (lake.storage_options or {}).items()}}


def _hadoop_uri(uri: str) -> str:
    return "s3a://" + uri[len("s3://"):] if uri.startswith("s3://") else uri


def spark_read(spark: Any, lake: DeltaLake, table: str, version: int, reader: str | None = None,
               settings: SparkSettings | None = None) -> Any:
    """A Spark DataFrame of exactly `table@version`, read the configured way (module doc)."""
    master = spark.sparkContext.master
    settings = settings or SparkSettings.from_env()
    check_reachable(master, lake.root, settings=settings)
    how = lake_reader(lake.root, reader, settings=settings)
    if how == "delta":
        return spark.read.format("delta").option("versionAsOf", version).load(_hadoop_uri(lake.uri(table)))
    plan = snapshot_plan(lake, table, version, min_partitions=2 * spark.sparkContext.defaultParallelism)
    if not plan["groups"]:
        raise TableMissing(f"Delta table '{table}' version {version} has no data files")
    expected = [f.name for f in _arrow_schema(plan["schema"])]
    if how == "python":
        _register(spark)
        options = {PLAN_OPTION: json.dumps(plan),
                   **{STORAGE_PREFIX + k: v for k, v in executor_storage_options(lake).items()}}
        return spark.read.format(SOURCE_NAME).options(**options).load().select(*expected)
    files = [_hadoop_uri(f) for f in lake.files(table, version)]
    frame = spark.read.option("basePath", _hadoop_uri(lake.uri(table))).parquet(*files)
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise TableMissing(f"snapshot of '{table}' v{version} lacks columns {missing}")
    return frame.select(*expected)
