"""`kairos serve` as an operator runs it: SIGTERM to the CLI process stops the BentoML server it started (its
whole process group) and exits 0, leaving nothing orphaned on the port."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ground.settings import PROJECT_ROOT
from orchestration.services import free_port
from tests._env import SERVER_ENV


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigterm_to_kairos_serve_stops_the_bentoml_server(redis_server, settings, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "KAIROS_HOME": str(settings.home), "REDIS_URL": redis_server.url,
           "KAIROS_IMPRESSION_LOG": "0", "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(tmp_path / "serve.log", "wb") as log:
        cli = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", "--port", str(port)],
                               cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    server_pgid = None
    try:
        deadline = time.time() + 150
        while True:
            assert cli.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        (server_pid,) = _children(cli.pid)
        server_pgid = os.getpgid(server_pid)
        assert server_pgid == server_pid != os.getpgid(cli.pid)  # the server leads its own group

        cli.send_signal(signal.SIGTERM)  # what systemd / docker stop / kill send
        assert cli.wait(timeout=40) == 0
        deadline = time.time() + 10
        while _group_alive(server_pgid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _group_alive(server_pgid), "BentoML server orphaned by SIGTERM to kairos serve"
        try:
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            raise AssertionError("the port still answers")
        except httpx.HTTPError:
            pass
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
        if server_pgid is not None and _group_alive(server_pgid):
            os.killpg(server_pgid, signal.SIGKILL)


def test_each_server_gets_its_own_prometheus_directory(tmp_path: Path) -> None:
    """BentoML wipes and fills <BENTOML_HOME>/prometheus_multiproc_dir at start: two servers must not share it."""
    from serving.server import _env

    base = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    one, two = _env(base, 3001)["BENTOML_HOME"], _env(base, 3002)["BENTOML_HOME"]
    assert one != two and Path(one).is_dir() and Path(two).is_dir() and "3001" in one
    assert _env({**base, "BENTOML_HOME": str(tmp_path)}, 3003)["BENTOML_HOME"] == str(tmp_path)  # a chosen home wins
    for home in (one, two):
        Path(home).rmdir()
