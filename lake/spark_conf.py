"""The Spark session's configuration: which lake reader a table gets, the delta-spark settings, the product zip a
non-local master ships to its workers, and the refusal of a local lake on a cluster."""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

from ground.settings import PROJECT_ROOT, SPARK_LAKE_READERS, Settings, SparkSettings


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
