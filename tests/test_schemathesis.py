"""schemathesis (pinned in requirements.lock) against the published OpenAPI schema of a real BentoML server
process with a real redis-server: no 5xx, and every answer conforms to the schema (status code, content type,
body). A bounded, seeded number of examples per operation keeps it under two minutes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from orchestration.services import free_port
from tests._env import SERVER_ENV

MAX_EXAMPLES = int(os.environ.get("KAIROS_SCHEMATHESIS_EXAMPLES", "30"))
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_openapi_schema_fuzzing_finds_no_5xx_and_no_mismatch(redis_server, settings, tmp_path: Path) -> None:
    from serving.server import start_server, stop_server, wait_ready

    redis.Redis.from_url(redis_server.url).flushdb()
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "KAIROS_HOME": str(settings.home), "REDIS_URL": redis_server.url, "KAIROS_IMPRESSION_LOG": "0",
           "KAIROS_ACCESS_LOG": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = start_server(port, env=env, log_path=tmp_path / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout_s=120, proc=proc)
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/docs.json", "--url", base, "-c", CHECKS,
             "--phases", "examples,coverage,fuzzing", "-n", str(MAX_EXAMPLES), "--seed", "16",
             "--request-timeout", "20", "--suppress-health-check", "all", "--no-color"],
            capture_output=True, text=True, timeout=300, cwd=str(tmp_path),  # its cache stays out of the repo
            env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"})
        out = run.stdout + run.stderr
        print(out[-3000:])
        assert run.returncode == 0, out[-6000:]
        assert " passed" in out and "failed" not in out.split("Test cases:")[-1], out[-3000:]
    finally:
        stop_server(proc)
    assert "Traceback" not in (tmp_path / "server.log").read_text(errors="replace")
