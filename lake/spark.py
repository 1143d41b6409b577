"""Spark over the lake, wherever delta-rs writes it: the session builder (here), its configuration
(lake/spark_conf.py), the snapshot readers (lake/spark_read.py) and the writer (lake/spark_write.py).

delta-rs writes every table without a JVM, to a local path or an object store (s3://, gs://, az://,
abfss://). Spark then reads one pinned table version in one of three ways (KAIROS_SPARK_LAKE_READER):

- `python`: a Spark 4 Python data source (`kairos_delta`, lake/spark_read.py). The driver lists the version's data
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

import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from ground.jvm import use_jvm_env
from ground.settings import SparkSettings
from lake.spark_conf import conf_from_env, lake_reader, session_conf

log = logging.getLogger("kairos.spark")


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
