"""`POST /v1/events` and the stream lag metrics through a real BentoML server process and a real redis-server:
per-event errors, accepted ids, a 429 with Retry-After past the backlog limit, kairos_stream_* on /metrics."""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import redis

from orchestration.services import free_port
from streaming.job import GROUP, QUARANTINE_STREAM, STREAM, SessionStreamProcessor
from streaming.retention import trim_processed
from tests._env import SERVER_ENV

NOW = 1_767_225_600_000


def _event(k: int, **over) -> dict:
    return {"event_id": f"h{k}", "user_id": "u1", "item_id": f"i{k}", "event_type": "click", "timestamp": NOW + k,
            "session_id": "s-http", "position": k, "dwell_time_ms": 2000, "schema_version": 1, **over}


def _gauge(metrics: str, name: str, group: str | None = None) -> float | None:
    """A gauge's value from the Prometheus text (BentoML adds a pid label in multiprocess mode)."""
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels = line[len(name):line.rfind(" ")]
            if group is None or f'group="{group}"' in labels:
                return float(line.rsplit(" ", 1)[1])
    return None


def _settled_gauge(http: httpx.Client, name: str, group: str | None = None, want=lambda value: True,
                   timeout_s: float = 10.0) -> float | None:
    """The gauge once `want` holds, or its last value at the deadline: each worker's metrics thread refreshes
    every KAIROS_STREAM_METRICS_S, and on a busy 2-core machine one fixed sleep before one read is not enough."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = _gauge(http.get("/metrics").text, name, group)
        if (value is not None and want(value)) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_events_endpoint_backpressure_and_lag_metrics(redis_server, settings, tmp_path: Path) -> None:
    from serving.server import start_server, stop_server, wait_ready

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "KAIROS_HOME": str(settings.home), "REDIS_URL": redis_server.url,
           "KAIROS_STREAM_MAX_BACKLOG": "5", "KAIROS_STREAM_METRICS_S": "0.2", "KAIROS_IMPRESSION_LOG": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = start_server(port, env=env, log_path=tmp_path / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout_s=120, proc=proc)
        with httpx.Client(base_url=base, timeout=30) as http:
            ok = http.post("/v1/events", json={"events": [_event(1), _event(2), _event(3, event_type="teleport"),
                                                          _event(4)]})
            assert ok.status_code == 200, ok.text
            body = ok.json()
            assert body["accepted"] == ["h1", "h2", "h4"] and len(body["stream_ids"]) == 3
            assert body["errors"] == [{"index": 2, "event_id": "h3", "field": "event_type", "reason":
                                       "event_type_known: event_type 'teleport' is not one of ['impression', 'click', "
                                       "'add_to_cart', 'purchase', 'skip', 'share']"}]
            assert client.xlen(STREAM) == 3 and client.xlen(QUARANTINE_STREAM) == 1
            assert http.post("/v1/events", json={"events": []}).status_code == 400  # an empty batch is a bad request

            # backlog 3 + 3 > 5: refused as a whole with retry advice, nothing written
            refused = http.post("/v1/events", json={"events": [_event(5), _event(6), _event(7)]})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"] == "backpressure" and refused.json()["backlog"] == 3
            assert "retry in 1 s" in refused.json()["detail"] and client.xlen(STREAM) == 3

            # the lag is visible while the job is behind
            assert _settled_gauge(http, "kairos_stream_length", want=lambda v: v == 3.0) == 3.0

            # the job catches up and trims what it finished: the producer's retry is accepted
            proc_ = SessionStreamProcessor(client, consumer_name="http")
            proc_.ensure_group()
            time.sleep(0.3)
            lagging = http.post("/v1/status", json={}).json()["stream"]["groups"][GROUP]
            assert lagging["lag_ms"] >= 300 and lagging["pending"] == 0
            assert _settled_gauge(http, "kairos_stream_lag_ms", GROUP, want=lambda v: v >= 300) >= 300
            assert proc_.process_once(count=10, block_ms=20) == 3
            assert trim_processed(client, STREAM) == 3
            retried = http.post("/v1/events", json={"events": [_event(5), _event(6), _event(7)]})
            assert retried.status_code == 200 and retried.json()["accepted"] == ["h5", "h6", "h7"]
            assert proc_.process_once(count=10, block_ms=20) == 3
            status = http.post("/v1/status", json={}).json()["stream"]
            assert status["length"] == 3 and status["groups"][GROUP] == {
                "pending": 0, "last_delivered_id": retried.json()["stream_ids"][-1], "lag_ms": 0}
            assert _settled_gauge(http, "kairos_stream_lag_ms", GROUP, want=lambda v: v == 0.0) == 0.0
            assert _settled_gauge(http, "kairos_stream_pending", GROUP, want=lambda v: v == 0.0) == 0.0
            assert _settled_gauge(http, "kairos_stream_length", want=lambda v: v == 3.0) == 3.0
    finally:
        stop_server(proc)
