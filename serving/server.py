"""Run the BentoML ranking service as a real process (`kairos serve`, the demo and the tests).

`start_server` launches `python -m bentoml serve serving.service:KairosRanker` from the
project root in its own process group, with its output in a log file (never an
unread pipe, which would block the server once full); `wait_ready` polls /readyz
and raises with the log tail if the process died; `stop_server` terminates the
process group it started.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ground.settings import PROJECT_ROOT

SERVICE = "serving.service:KairosRanker"


def command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]


def _env(env: dict | None, port: int | None = None) -> dict:
    """The server's environment. Each server gets its own BENTOML_HOME (unless one is set), hence its own
    Prometheus multiprocess directory: BentoML wipes and fills <BENTOML_HOME>/prometheus_multiproc_dir at start,
    so two servers sharing the default home would show (and delete) each other's counters."""
    out = dict(os.environ if env is None else env)
    if "BENTOML_HOME" not in out:
        out["BENTOML_HOME"] = tempfile.mkdtemp(prefix=f"kairos-bentoml-{port or 'serve'}-")
    root = str(PROJECT_ROOT)
    out["PYTHONPATH"] = root + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    out.setdefault("BENTOML_DO_NOT_TRACK", "True")
    out.setdefault("OMP_NUM_THREADS", "1")
    out.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return out


# servers started by this process, so wait_ready(base_url) can notice one that died
_STARTED: dict[subprocess.Popen, str] = {}


def start_server(port: int, env: dict | None = None, host: str = "127.0.0.1",
                 log_path: str | Path | None = None) -> subprocess.Popen:
    """Start `bentoml serve serving.service:KairosRanker` on host:port (cwd = project root).

    Output goes to a log file (`proc.log_path`), never an unread pipe; the process
    leads its own process group so stop_server can end its workers too.
    """
    from serving.settings import ServeSettings

    ServeSettings.from_env(os.environ if env is None else env)  # a bad KAIROS_* value fails here, naming it
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"kairos-serve-{port}-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    with open(log_path, "wb") as log_file:
        server_env = _env(env, port)
        proc = subprocess.Popen(command(port, host), cwd=str(PROJECT_ROOT), env=server_env, stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    proc.log_path = log_path  # type: ignore[attr-defined]
    # the per-server BENTOML_HOME made by _env (None when the caller chose one): removed by stop_server
    proc.bentoml_home = None if "BENTOML_HOME" in (os.environ if env is None else env) else server_env["BENTOML_HOME"]  # type: ignore[attr-defined]
    _STARTED[proc] = f"http://{host}:{port}"
    return proc


def log_tail(proc: subprocess.Popen, n_chars: int = 4000) -> str:
    path = getattr(proc, "log_path", None)
    if not path or not Path(path).exists():
        return ""
    data = Path(path).read_bytes()
    return data[-n_chars:].decode(errors="replace")


def wait_ready(base_url: str, timeout_s: float = 90, proc: subprocess.Popen | None = None) -> None:
    """Poll GET {base_url}/readyz until 200; raise with the server's log tail if it died or timed out."""
    import httpx

    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"ranking server exited with code {proc.returncode}:\n{log_tail(proc)}")
        for p in list(_STARTED):
            if p.poll() is not None and _STARTED[p] == base_url:
                raise RuntimeError(f"ranking server exited with code {p.returncode}:\n{log_tail(p)}")
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    tail = "".join(log_tail(p) for p, url in _STARTED.items() if url == base_url)
    raise TimeoutError(f"ranking server at {base_url} not ready after {timeout_s}s (last: {last})\n{tail}")


def stop_server(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM the server's process group (only the group this module started), then SIGKILL if needed."""
    _STARTED.pop(proc, None)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
    # reap any worker left in the group after the leader exited
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    home = getattr(proc, "bentoml_home", None)
    if home:
        import shutil

        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`kairos serve [--port 3000] [--host 127.0.0.1]`: the server in the foreground.

    SIGTERM or SIGINT to this process stops the whole BentoML server (its own process group, workers included)
    before this process exits: nothing is orphaned."""
    parser = argparse.ArgumentParser(prog="kairos serve")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    own_home = "BENTOML_HOME" not in os.environ
    server_env = _env(None, args.port)
    proc = subprocess.Popen(command(args.port, args.host), cwd=str(PROJECT_ROOT), env=server_env,
                            start_new_session=True)
    stopping: list[int] = []

    def forward(signum: int, _frame) -> None:
        stopping.append(signum)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait(timeout=15 if stopping else None)
                break
            except subprocess.TimeoutExpired:  # the server ignored SIGTERM for 15 s
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any worker left behind
        except (ProcessLookupError, PermissionError):
            pass
        if own_home:
            import shutil

            shutil.rmtree(server_env["BENTOML_HOME"], ignore_errors=True)
    return 0 if stopping else code


if __name__ == "__main__":
    raise SystemExit(main())
