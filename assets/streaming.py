"""Streaming in Dagster: a launchable, bounded run of the streaming job and the decision behind the lag sensor.

`drain_stream` (job) runs the real consumer (session keys + bronze dual write, streaming/job.py) inside
a Dagster run until the stream is drained or `max_seconds` pass: what the `stream_lag_sensor` launches
when the consumer lag grows past its threshold (an alert plus extra capacity), and what an operator
launches by hand to catch up after an outage. The long-running process stays `kairos stream`.
"""

import threading
import time
from typing import Any

from dagster import Config, MetadataValue, OpExecutionContext, Output, job, op

from assets.resources import LakeResource, RedisResource
from ground.settings import redis_url_from_env

# the alert decision is pure and shared with the server's /readyz and /v1/status (streaming/retention.py)
from streaming.retention import lag_decision  # noqa: F401


class DrainConfig(Config):
    """How long one Dagster-launched consumer runs, and how it behaves."""

    max_seconds: float = 300.0
    until_drained: bool = True        # stop early once every group (sessions and bronze) has caught up
    consumer: str = ""                # default: dagster-<run id prefix>
    batch: int = 200
    reclaim_idle_ms: int = 60_000
    bronze: bool = True
    bronze_window_ms: int = 10_000


def drained(lag: dict[str, Any]) -> bool:
    """Every consumer group finished every entry (pure: decided from `stream_lag`'s answer)."""
    return all(g["pending"] == 0 and g["lag_ms"] == 0 for g in lag["groups"].values())


@op(description="Run the streaming consumer (session keys + bronze dual write) until drained or max_seconds.")
def consume_stream(context: OpExecutionContext, config: DrainConfig, redis: RedisResource, lake: LakeResource):
    from streaming.job import STREAM, StreamJobOptions, run_job
    from streaming.retention import stream_lag

    client = redis.client()
    opts = StreamJobOptions(consumer=config.consumer or f"dagster-{context.run_id[:8]}", batch=config.batch,
                            reclaim_idle_ms=config.reclaim_idle_ms, reclaim_every_s=5.0, bronze=config.bronze,
                            bronze_window_ms=config.bronze_window_ms)
    stop = threading.Event()
    started = time.monotonic()
    before = stream_lag(client, STREAM)

    def watch() -> None:
        while not stop.wait(0.5):
            if time.monotonic() - started >= config.max_seconds:
                stop.set()
            elif config.until_drained and time.monotonic() - started > 1.0 and drained(stream_lag(client, STREAM)):
                stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    stats = run_job(client, lake.lake() if config.bronze else None, stop, opts,
                    redis_url=redis.url or redis_url_from_env())
    after = stream_lag(client, STREAM)
    secs = time.monotonic() - started
    context.log.info(f"stream consumer {opts.consumer}: {stats} in {secs:.1f}s; lag before {before['groups']}, "
                     f"after {after['groups']}")
    sessions = stats["sessions"]
    return Output(stats, metadata={
        "applied": sessions["applied"], "duplicates": sessions["duplicates"], "quarantined": sessions["quarantined"],
        "bronze_rows": (stats["bronze"] or {}).get("rows", 0), "seconds": round(secs, 2),
        "drained": drained(after), "stream_length": after["length"],
        "lag_before": MetadataValue.json(before["groups"]), "lag_after": MetadataValue.json(after["groups"])})


@job(description="A bounded run of the streaming consumer: drains the event stream into session keys and bronze.")
def drain_stream():
    consume_stream()
