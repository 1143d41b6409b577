"""Spark over the lake, wherever delta-rs writes it: the session builder and the snapshot readers.

delta-rs writes every table without a JVM, to a local path or an object store (s3://, gs://, az://,
abfss://). Spark then reads one pinned table version in one of three ways (KAIROS_SPARK_LAKE_READER):

- `python`: a Spark 4 Python data source (`kairos_delta`, below). The driver lists the version's data
  files with delta-rs; each executor opens its files through delta-rs' own object store (the same
  credentials delta-rs writes with) and streams their row groups to Spark as Arrow batches. No JVM
  connector, no Hadoop file system: an object-store lake works on a stock pyspark.
- `hadoop`: Spark's parquet reader over the same file list (s3:// becomes s3a://). Fast and JVM-native,
  for local lakes and for clusters that ship the Hadoop connector (`spark.hadoop.*` settings go
  through KAIROS_SPARK_CONF).
- `delta`: the delta-spark connector (`KAIROS_SPARK_DELTA_NATIVE=1` is the same), for clusters that have
  its jars; the session is configured for it (extensions, catalog, package).
`auto` (default) picks `hadoop` for a local lake and `python` for an object store.

A non-local master gets the product code as a zip through `spark.submit.pyFiles`, so a worker needs only
the pinned dependencies; a local-path lake on a non-local master is refused with what to do instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote

from ground.jvm import use_jvm_env
from ground.settings import PROJECT_ROOT, SPARK_LAKE_READERS, Settings, SparkSettings
from lake.delta import DeltaLake, TableMissing, TableVersion

log = logging.getLogger("kairos.spark")

READERS = SPARK_LAKE_READERS
SOURCE_NAME = "kairos_delta"
STORAGE_PREFIX = "storage."       # data source options carrying delta-rs storage options (Spark redacts secrets)
PLAN_OPTION = "plan"
DEFAULT_PARTITION_BYTES = 64 << 20
DEFAULT_BATCH_ROWS = 65_536
# the packages a worker needs, the same list as pyproject's [tool.setuptools] packages
PRODUCT_PACKAGES = ("orchestration", "assets", "models", "training", "serving", "data_contracts", "monitoring",
                    "features", "ingestion", "lake", "streaming", "compliance", "ground")
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


class LakeNotReachable(RuntimeError):
    """The configured Spark master's executors cannot read the configured lake."""


# ---------------------------------------------------------------------------------------------- configuration
def is_local_master(master: str) -> bool:
    return master.strip().startswith("local")


def is_object_store(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def conf_from_env(settings: SparkSettings | None = None) -> dict[str, str]:
    """KAIROS_SPARK_CONF: a JSON object of `spark.*` settings passed to the session as they are
    (ground.settings.SparkSettings reads and checks it)."""
    return dict((settings or SparkSettings.from_env()).conf)


def lake_reader(lake_uri: str, reader: str | None = None, settings: SparkSettings | None = None) -> str:
    """The reader for a lake: `reader`, else SparkSettings.lake_reader (KAIROS_SPARK_LAKE_READER, else delta if
    KAIROS_SPARK_DELTA_NATIVE=1), and `auto` decided by the URI."""
    choice = (reader or "").strip().lower() or (settings or SparkSettings.from_env()).lake_reader
    if choice not in READERS:
        raise ValueError(f"the lake reader must be one of {READERS}, got {choice!r}")
    if choice == "auto":
        return "python" if is_object_store(lake_uri) else "hadoop"
    return choice


def delta_native_conf() -> dict[str, str]:
    """What the delta-spark connector needs in a session; its jars come from spark.jars / spark.jars.packages."""
    from importlib.metadata import PackageNotFoundError, version

    conf = {"spark.sql.extensions": DELTA_EXTENSION, "spark.sql.catalog.spark_catalog": DELTA_CATALOG}
    try:
        conf["spark.jars.packages"] = f"io.delta:delta-spark_2.13:{version('delta-spark')}"
    except PackageNotFoundError:
        pass
    return conf


_ZIPS: dict[tuple[Path, Path], Path] = {}


def product_zip(dest: Path, root: Path = PROJECT_ROOT) -> Path:
    """The product code (every package a task may import) as one zip, named by its content hash.

    Executors put it on their sys.path, so a worker needs the pinned dependencies and nothing of the
    driver's disk; the same code always gives the same file, so a rebuilt session reuses it.
    """
    cached = _ZIPS.get((root, dest))
    if cached is not None and cached.exists():
        return cached  # once per process: the code it loaded, even if the files on disk change under it
    files = sorted(p for pkg in PRODUCT_PACKAGES for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no product packages under {root}: cannot ship the code to Spark executors")
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"kairos-{digest.hexdigest()[:16]}.zip"
    _ZIPS[(root, dest)] = target
    if target.exists():
        return target
    tmp = dest / f".{target.name}.{os.getpid()}.tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            zf.write(path, str(path.relative_to(root)))
    os.replace(tmp, target)
    return target


def session_conf(master: str, extra: dict[str, str] | None = None, lake_uri: str = "",
                 code_dir: Path | None = None, settings: SparkSettings | None = None) -> dict[str, str]:
    """Every setting of the session for `master`: Kairos' defaults, then the pass-through (which wins)."""
    spark = settings or SparkSettings.from_env()
    conf = {
        "spark.sql.shuffle.partitions": str(spark.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": spark.driver_memory,
        "spark.sql.session.timeZone": "UTC",
        # a pinned Delta snapshot is read as its file list; years of day-partitioned history are thousands of
        # small files: list them in the driver (no listing job of one task per file) and pack them into tasks
        "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000",
        "spark.sql.files.openCostInBytes": str(512 * 1024),
    }
    if lake_uri and lake_reader(lake_uri, settings=spark) == "delta":
        conf.update(delta_native_conf())
    if not is_local_master(master):
        conf["spark.submit.pyFiles"] = str(product_zip(code_dir or Settings.from_env().home / "spark"))
    conf.update(extra or {})
    return conf


# ---------------------------------------------------------------------------------------------- the session
@dataclass(frozen=True)
class SessionSpec:
    master: str
    app_name: str
    conf: tuple[tuple[str, str], ...]


_LOCK = threading.Lock()
_SESSION: Any = None
_SPEC: SessionSpec | None = None


def _alive(session: Any) -> bool:
    try:
        return session is not None and session.sparkContext._jsc is not None
    except Exception:  # noqa: BLE001 - a dead gateway is simply not alive
        return False


def spark_session(master: str = "local[2]", app_name: str = "kairos", conf: dict[str, str] | None = None,
                  lake_uri: str = "", settings: SparkSettings | None = None) -> Any:
    """The process's SparkSession for (master, settings): reused while they match, rebuilt when they change.

    A JVM holds one SparkContext, so asking for another master (or other settings) stops the current session
    and starts the new one, loudly, instead of silently handing back a session on the old master.
    """
    global _SESSION, _SPEC
    spark = settings or SparkSettings.from_env()  # one read of the environment for the whole session
    full = session_conf(master, {**conf_from_env(spark), **(conf or {})}, lake_uri=lake_uri, settings=spark)
    spec = SessionSpec(master, app_name, tuple(sorted(full.items())))
    with _LOCK:
        if _alive(_SESSION) and _SPEC == spec:
            return _SESSION
        if _alive(_SESSION):
            log.warning("Spark session on %s is replaced by one on %s (settings changed): stopping the old one",
                        _SPEC.master if _SPEC else "?", master)
            _SESSION.stop()
        use_jvm_env()  # the one writer of the JVM's variables (ground.jvm says why pyspark needs os.environ)
        from pyspark.sql import SparkSession

        builder = SparkSession.builder.master(master).appName(app_name)
        for key, value in full.items():
            builder = builder.config(key, value)
        session = builder.getOrCreate()
        session.sparkContext.setLogLevel("ERROR")
        _ship_code(session, full.get("spark.submit.pyFiles", ""))
        _SESSION, _SPEC = session, spec
        log.info("Spark session on %s (%d settings, lake reader for %s: %s)", master, len(full), lake_uri or "-",
                 lake_reader(lake_uri, settings=spark) if lake_uri else "-")
        return session


def _ship_code(session: Any, py_files: str) -> None:
    """Make sure the product zip is on the executors' path (spark.submit.pyFiles is honoured by spark-submit;
    a session started from plain Python adds it here)."""
    sc = session.sparkContext
    for path in filter(None, py_files.split(",")):
        if os.path.basename(path) not in getattr(sc, "_python_includes", []):
            sc.addPyFile(path)


def stop_session() -> None:
    """Stop this process's session (tests and tools that switch masters)."""
    global _SESSION, _SPEC
    with _LOCK:
        if _alive(_SESSION):
            _SESSION.stop()
        _SESSION, _SPEC = None, None


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


def executor_environment(spark: Any, tasks: int = 2) -> list[dict[str, Any]]:
    """Where the executors run and import Kairos from (a set-up check for a cluster): host, working directory,
    Python, the file `lake.spark` was imported from, deltalake's version."""
    def probe(_: Any) -> Iterator[dict[str, Any]]:
        import socket

        import deltalake

        import lake.spark as module

        yield {"host": socket.gethostname(), "cwd": os.getcwd(), "python": sys.executable,
               "kairos_code": module.__file__, "deltalake": deltalake.__version__}

    rows = spark.sparkContext.parallelize(range(tasks), tasks).mapPartitions(probe).collect()
    return rows
