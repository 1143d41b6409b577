"""Writing a Spark frame as one Delta commit: the executors write parquet files through delta-rs' object store,
the driver commits them."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator

from ground.settings import SparkSettings
from lake.delta import DeltaLake, TableVersion
from lake.spark_read import _hadoop_uri, check_reachable, executor_storage_options
from lake.spark_conf import is_object_store, lake_reader

log = logging.getLogger("kairos.spark")
# ---------------------------------------------------------------------------------------------- writing a table
WRITE_ROWS_PER_FILE = 1_000_000


def _write_partition_files(root: str, storage_options: dict[str, str], token: str, batches: Iterator[Any],
                           rows_per_file: int = WRITE_ROWS_PER_FILE,
                           partition_by: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """One Spark partition's Arrow batches as parquet files under the table root, through delta-rs' object store
    (the same one `read_file_batches` reads with); yields what the driver commits for each file. Memory stays
    bounded by one batch: the parquet writer streams row groups out. With `partition_by` (string columns) each
    distinct value tuple gets its own files under `col=value/` (Hive layout, the column left out of the file)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from deltalake.fs import DeltaStorageHandler
    from pyspark import TaskContext

    context = TaskContext.get()
    index = context.partitionId() if context is not None else 0
    if not is_object_store(root):  # a new table's folder (delta-rs opens a local root only if it exists)
        os.makedirs(root.removeprefix("file://"), exist_ok=True)
    fs = pa.fs.PyFileSystem(DeltaStorageHandler(root, storage_options or None))
    open_files: dict[tuple, dict[str, Any]] = {}  # partition values -> writer, stream, name, rows, part

    def close(key: tuple) -> dict[str, Any]:
        f = open_files[key]
        f["writer"].close()
        f["stream"].close()
        return {"path": f["name"], "size": int(fs.get_file_info(f["name"]).size), "rows": f["rows"],
                "schema": f["writer"].schema.serialize().to_pybytes().hex(),
                "partition": json.dumps(dict(zip(partition_by, key)))}

    def pieces(batch: Any) -> Iterator[tuple[tuple, Any]]:
        if not partition_by:
            yield (), batch
            return
        table = pa.Table.from_batches([batch])
        keys = table.select(list(partition_by)).group_by(list(partition_by)).aggregate([]).to_pylist()
        data = table.drop_columns(list(partition_by))
        for key in keys:
            mask = None
            for col in partition_by:
                value = key[col]
                hit = pc.is_null(table.column(col)) if value is None else pc.equal(table.column(col), value)
                mask = hit if mask is None else pc.and_(mask, hit)
            yield tuple(key[c] for c in partition_by), data.filter(mask)

    for batch in batches:
        if batch.num_rows == 0:
            continue
        for key, piece in pieces(batch):
            f = open_files.get(key)
            if f is not None and f["rows"] >= rows_per_file:
                yield close(key)
                f = {"part": f["part"] + 1}
                open_files[key] = f
            if f is None or "writer" not in f:
                part = 0 if f is None else f["part"]
                folder = "".join(f"{c}={'__HIVE_DEFAULT_PARTITION__' if v is None else v}/"
                                 for c, v in zip(partition_by, key))
                name = f"{folder}part-{index:05d}-{part:03d}-{token}.parquet"
                stream = fs.open_output_stream(name)
                f = {"writer": pq.ParquetWriter(stream, piece.schema, compression="snappy"), "stream": stream,
                     "name": name, "rows": 0, "part": part}
                open_files[key] = f
            f["writer"].write(piece)  # a RecordBatch (no partitions) or a Table (a partition's rows)
            f["rows"] += piece.num_rows
    for key in list(open_files):
        if "writer" in open_files[key]:
            yield close(key)


def spark_write(spark: Any, lake: DeltaLake, table: str, frame: Any,
                commit_properties: dict[str, Any] | None = None, partition_by: list[str] | None = None,
                replace_partitions: list[str] | None = None, settings: SparkSettings | None = None) -> TableVersion:
    """Overwrite `table` with a Spark DataFrame, written by the executors: each task writes its partition's
    parquet files straight into the table's folder (local path or object store, no JVM connector), and the
    driver commits the files in one Delta transaction. Nothing but the file list reaches the driver, so a
    table of any size is written in memory bounded per partition; a failed job commits nothing (its files
    are unreferenced and go with the next vacuum). With the delta-spark connector (`delta` reader) Spark's
    own Delta writer is used instead.

    `partition_by` (string columns) writes Hive-style partition folders; `replace_partitions` (values of the
    single partition column) replaces only those partitions of an existing table, the rest is kept (an ingest
    run rewrites its days)."""
    import time
    import uuid

    import pyarrow as pa
    from deltalake import CommitProperties, DeltaTable, Schema
    from deltalake.transaction import AddAction, create_table_with_add_actions

    settings = settings or SparkSettings.from_env()
    check_reachable(spark.sparkContext.master, lake.root, settings=settings)
    if lake_reader(lake.root, settings=settings) == "delta":
        frame.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(_hadoop_uri(lake.uri(table)))
        return lake.pin(table)
    root, options, token = lake.uri(table), executor_storage_options(lake), uuid.uuid4().hex
    parts = tuple(partition_by or ())

    def write(batches: Iterator[Any]) -> Iterator[Any]:
        for entry in _write_partition_files(root, options, token, batches, partition_by=parts):
            yield pa.RecordBatch.from_pylist([entry])

    written = frame.mapInArrow(write, "path string, size long, rows long, schema string, partition string").collect()
    props = CommitProperties(custom_metadata={k: str(v) for k, v in (commit_properties or {}).items()}) \
        if commit_properties else None
    from pyspark.sql.pandas.types import to_arrow_schema

    full_schema = to_arrow_schema(frame.schema)
    if parts:  # the table's column order: data columns, then the partition columns (as delta-rs lays them out)
        full_schema = pa.schema([f for f in full_schema if f.name not in parts] + [full_schema.field(c) for c in parts])
    exists = lake.exists(table)
    if not written and not (exists and replace_partitions is not None):  # no rows at all: an empty table
        return lake.write(table, pa.Table.from_batches([], schema=full_schema), commit_properties=commit_properties)
    now = int(time.time() * 1000)
    actions: list[Any] = [AddAction(r["path"], int(r["size"]), json.loads(r["partition"] or "{}"), now, True,
                                    json.dumps({"numRecords": int(r["rows"])}))
                          for r in sorted(written, key=lambda r: r["path"])]
    if exists:
        dt = DeltaTable(root, storage_options=lake.storage_options)
        filters = None
        if replace_partitions is not None:
            if len(parts) != 1:
                raise ValueError("replace_partitions needs exactly one partition_by column")
            filters = [(parts[0], "in", list(replace_partitions))]
        schema = pa.schema(dt.schema().to_arrow()) if filters is not None else full_schema
        dt.create_write_transaction(list(actions), mode="overwrite", schema=schema, partition_by=list(parts) or None,
                                    partition_filters=filters, commit_properties=props)
    else:
        create_table_with_add_actions(root, Schema.from_arrow(full_schema), actions, mode="error",
                                      partition_by=list(parts) or None, storage_options=lake.storage_options,
                                      commit_properties=props)
    rows = sum(int(r["rows"]) for r in written)
    version = lake.version(table)
    log.info("executors wrote %s rows in %s files to %s -> version %s", rows, len(actions), table, version)
    return TableVersion(table, version, rows)
