"""The streaming job in Dagster: the lag sensor against a real DagsterInstance and a real redis-server, and the
launchable `drain_stream` job run in process (real consumer, real Delta bronze table)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from assets.streaming import drained, lag_decision
from streaming.job import COUNTS_KEY, GROUP, STREAM, publish

T0 = 1_767_225_600_000


def _events(n: int) -> list[dict]:
    return [{"event_id": f"d{k}", "user_id": f"u{k % 7}", "item_id": f"i{k % 9}", "event_type": "click",
             "timestamp": T0 + k, "session_id": f"s{k % 7}-{k % 11}", "schema_version": 1} for k in range(n)]  # a session is one user's


def test_lag_decision_thresholds() -> None:
    empty = {"stream": STREAM, "length": 0, "groups": {}}
    assert lag_decision(empty, GROUP) == (False, f"{STREAM} is empty and has no consumer group yet")
    fire, why = lag_decision({**empty, "length": 5}, GROUP)
    assert fire and "kairos stream" in why
    ok = {"stream": STREAM, "length": 3, "groups": {GROUP: {"pending": 2, "lag_ms": 900}}}
    assert not lag_decision(ok, GROUP, max_lag_ms=1000)[0] and lag_decision(ok, GROUP, max_lag_ms=500)[0]
    assert lag_decision(ok, GROUP, max_pending=1)[0]
    bronze_behind = {**ok, "groups": {**ok["groups"], "kairos-bronze": {"pending": 0, "lag_ms": 90_000}}}
    fire, why = lag_decision(bronze_behind, GROUP)
    assert fire and "kairos-bronze" in why
    assert drained({"groups": {GROUP: {"pending": 0, "lag_ms": 0}}}) and not drained(ok)


def test_lag_sensor_alerts_and_the_drain_job_catches_up(redis_server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context

    from orchestration.definitions import defs
    from assets.resources import LakeResource, RedisResource
    from lake.delta import DeltaLake
    from streaming.bronze import BRONZE_TABLE

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    monkeypatch.setenv("KAIROS_STREAM_LAG_ALERT_MS", "300")
    sensor = defs.resolve_sensor_def("stream_lag_sensor")
    job = defs.resolve_job_def("drain_stream")
    resources = {"redis": RedisResource(url=redis_server.url), "lake": LakeResource(root=str(tmp_path / "lake"))}
    with DagsterInstance.ephemeral() as instance:
        quiet = sensor(build_sensor_context(instance=instance, resources=resources))
        assert isinstance(quiet, SkipReason) and "empty" in quiet.skip_message
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        publish(client, _events(500))
        assert isinstance(sensor(build_sensor_context(instance=instance, resources=resources)), SkipReason)
        time.sleep(0.4)  # nobody consumes: the oldest event passes the 300 ms threshold
        alert = sensor(build_sensor_context(instance=instance, resources=resources))
        assert isinstance(alert, RunRequest) and alert.job_name in (None, "drain_stream")
        assert alert.tags["kairos/trigger"] == "stream_lag" and int(alert.tags["kairos/lag_ms"]) >= 300
        assert alert.run_config["loggers"]["console"]["config"]["log_level"] == "INFO"  # Dagster DEBUG off

        result = job.execute_in_process(
            instance=instance, resources=resources, tags=alert.tags,
            run_config={"ops": {"consume_stream": {"config": {"max_seconds": 60, "bronze_window_ms": 200,
                                                              "reclaim_idle_ms": 1000}}}})
        assert result.success
        stats = result.output_for_node("consume_stream")  # the op's output carries the run's counters
        assert stats["sessions"]["applied"] == 500 and stats["bronze"]["rows"] == 500, stats
        assert client.hgetall(COUNTS_KEY) == {"applied": "500"} and client.xlen(STREAM) == 0  # trimmed once done
        assert len(DeltaLake(str(tmp_path / "lake")).read(BRONZE_TABLE)) == 500
        calm = sensor(build_sensor_context(instance=instance, resources=resources))
        assert isinstance(calm, SkipReason) and "within thresholds" in calm.skip_message
