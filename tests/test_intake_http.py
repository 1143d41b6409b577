"""Hostile input at `POST /v1/events` through a real BentoML server process and a real redis-server: poison
values refused with the field named, a retried batch never duplicated, stream health in /readyz, a body limit, ids
bounded, /metrics labelled by route (random paths cannot grow it), one WARNING line per client error, and the published 400
schema matching what the server sends."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import redis

from orchestration.services import free_port
from streaming.intake import intake_key
from streaming.job import QUARANTINE_STREAM, STREAM
from tests._env import SERVER_ENV


def _event(k: int, now: int, **over) -> dict:
    return {"event_id": f"x{k}", "user_id": "u1", "item_id": f"i{k}", "event_type": "click", "timestamp": now - k,
            "session_id": "s-x", "device_type": "mobile", "schema_version": 1, **over}


def test_intake_refuses_poison_dedupes_retries_and_bounds_everything(redis_server, settings, tmp_path: Path) -> None:
    from serving.server import start_server, stop_server, wait_ready

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "KAIROS_HOME": str(settings.home), "REDIS_URL": redis_server.url,
           "KAIROS_IMPRESSION_LOG": "0", "KAIROS_MAX_BODY_BYTES": "200000"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = tmp_path / "server.log"
    proc = start_server(port, env=env, log_path=log_path)
    base = f"http://127.0.0.1:{port}"
    now = int(time.time() * 1000)
    try:
        wait_ready(base, timeout_s=120, proc=proc)
        with httpx.Client(base_url=base, timeout=30) as http:
            # NaN / Infinity (Python's JSON parser lets them through): refused, the field named, nothing written
            for poison in ('{"events": [%s]}' % json.dumps(_event(1, now))[:-1] + ', "timestamp": NaN}]}',
                           '{"events": [%s]}' % json.dumps(_event(1, now))[:-1] + ', "dwell_time_ms": Infinity}]}'):
                r = http.post("/v1/events", content=poison, headers={"content-type": "application/json"})
                assert r.status_code == 400, r.text  # refused by the JSON parser (or the contract, naming the field)
                detail = r.json()["detail"]
                assert detail[0]["loc"][2:] in ([], ["timestamp"], ["dwell_time_ms"]) and detail[0]["msg"], detail
            assert client.xlen(STREAM) == 0 if client.exists(STREAM) else True
            mixed = http.post("/v1/events", json={"events": [_event(2, now), _event(3, now, device_type="toaster"),
                                                             _event(4, now, user_id="u" * 5000)]})
            assert mixed.status_code == 200, mixed.text
            assert mixed.json()["accepted"] == ["x2"]
            assert [(e["index"], e["field"]) for e in mixed.json()["errors"]] == [(1, "device_type"), (2, "user_id")]
            assert client.xlen(QUARANTINE_STREAM) >= 2  # the two refused, each with its reason
            assert not client.exists(intake_key("x4")) and max(len(k) for k in client.keys("*")) < 400

            # the idempotency key: a retried batch answers the same stream ids and adds no entry
            batch = {"events": [_event(k, now) for k in range(10, 20)]}
            first = http.post("/v1/events", json=batch).json()
            again = http.post("/v1/events", json=batch).json()
            assert again["stream_ids"] == first["stream_ids"] and again["counts"]["duplicates"] == 10
            assert first["counts"]["duplicates"] == 0 and client.xlen(STREAM) == 11

            # stream health in /readyz: still ready (the ranker serves without the stream), and the body says
            # the stream holds 11 entries no sessionizer reads, as the stream_lag_sensor would
            ready = http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
            stream = ready.json()["stream"]
            assert stream["length"] == 11 and stream["missing_groups"] == [] and stream["alert"] is True
            assert "kairos stream" in stream["reason"]
            assert http.post("/v1/status").json()["stream"]["reason"] == stream["reason"]

            # limits: a body over KAIROS_MAX_BODY_BYTES is a 413 that echoes nothing; a huge user_id is a 400
            big = http.post("/v1/events", content=b'{"events": [' + b'"x",' * 100_000 + b'"x"]}',
                            headers={"content-type": "application/json"})
            assert big.status_code == 413 and len(big.content) < 500 and "KAIROS_MAX_BODY_BYTES" in big.text
            long_user = http.post("/v1/personalize", json={"user_id": "u" * 300})
            assert long_user.status_code == 400 and long_user.json()["detail"][0]["loc"] == ["user_id"]

            # /metrics by route template: 300 random paths add one series, not 300
            before = len(http.get("/metrics").text)
            for k in range(300):
                assert http.get(f"/nope/{k}-{os.urandom(4).hex()}").status_code == 404
            metrics = http.get("/metrics").text
            assert "/nope/" not in metrics and 'endpoint="/{unmatched}"' in metrics
            assert len(metrics) - before < 20_000, len(metrics) - before

            # the published 400 is what a 400 is: detail may be a list of {loc, msg, type}
            spec = http.get("/docs.json").json()
            detail_schema = spec["components"]["schemas"]["InvalidArgument"]["properties"]["detail"]
            assert {s.get("type") for s in detail_schema["anyOf"]} == {"string", "array"}
    finally:
        stop_server(proc)
    text = log_path.read_text(errors="replace")
    client_errors = [line for line in text.splitlines() if "client error on /v1/personalize" in line]
    assert client_errors and all("WARNING" in line for line in client_errors), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
