"""Sensors and schedules: drift requests a retrain; freshness refreshes the online store; daily ingestion and
retrain; hourly monitoring; weekly lake maintenance."""

import math
import os
import time
from dataclasses import dataclass, field
from typing import Mapping

from dagster import (AssetKey, DagsterRunStatus, EventLogEntry, RunRequest, RunsFilter, ScheduleDefinition,
                     ScheduleEvaluationContext, SensorEvaluationContext, SkipReason, asset_sensor, schedule, sensor)

from assets.ingestion import daily_partitions
from assets.monitoring import FEATURE_DRIFT
from assets.streaming import drain_stream
from streaming.retention import lag_decision
from assets.resources import MlflowResource, RedisResource
from ground.settings import env_number
from orchestration.launch import GRAPH_RUN_DEFAULTS, QUIET_LOGS
from streaming.options import LagThresholds
from orchestration.jobs import (impressions_job, ingest_job, maintenance_job, monitor_job, refresh_online_job,
                                retrain_job, rollout_job)

MIN_RETRAIN_INTERVAL_S = 24 * 3600
# a retrain that is queued or running counts as the latest one: drift must not stack a second behind it
IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]


FRESHNESS_MIN_INTERVAL_S = 3600


@dataclass(frozen=True)
class SensorSettings:
    """The sensors' limits. Built per tick (`from_env`), so a changed variable applies at the daemon's next tick;
    a bad value fails the tick with the variable's name."""

    retrain_min_interval_s: float = MIN_RETRAIN_INTERVAL_S  # least time between drift-triggered retrains
    freshness_min_interval_s: float = FRESHNESS_MIN_INTERVAL_S  # least time between refreshes the sensor requests
    stream_lag: LagThresholds = field(default_factory=LagThresholds)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "SensorSettings":
        d = cls()
        return cls(
            retrain_min_interval_s=env_number(env, "KAIROS_RETRAIN_MIN_INTERVAL_S", float, d.retrain_min_interval_s, 0.0),
            freshness_min_interval_s=env_number(env, "KAIROS_FRESHNESS_MIN_INTERVAL_S", float,
                                                d.freshness_min_interval_s, 0.0),
            stream_lag=LagThresholds.from_env(env),
        )


def drift_decision(status: str, max_psi: float, last_retrain_ts: float | None, now: float,
                   min_interval_s: float = MIN_RETRAIN_INTERVAL_S) -> tuple[bool, str]:
    """Whether drift should start a retrain, and why (pure, so it is tested without Dagster)."""
    if status != "act":
        return False, f"drift status is '{status}' (max PSI {max_psi:.3f}): no retrain needed"
    if last_retrain_ts is not None and now - last_retrain_ts < min_interval_s:
        return False, f"PSI {max_psi:.3f} passed the act threshold but the last retrain was {now - last_retrain_ts:.0f}s ago"
    return True, f"PSI {max_psi:.3f} passed the act threshold"


@asset_sensor(asset_key=AssetKey(FEATURE_DRIFT), job=retrain_job, minimum_interval_seconds=30,
              description="Requests the retrain job when PSI drift passes the act threshold.")
def drift_sensor(context: SensorEvaluationContext, asset_event: EventLogEntry):
    mat = asset_event.asset_materialization
    meta = mat.metadata if mat else {}
    status = str(meta["status"].value) if "status" in meta else "ok"
    psi = meta["max_psi"].value if "max_psi" in meta else 0.0
    if not isinstance(psi, (int, float)):  # the drift asset writes a float; anything else is a bug to report
        raise TypeError(f"feature_drift metadata max_psi must be a number, got {psi!r}")
    max_psi = float(psi)
    records = context.instance.get_run_records(
        RunsFilter(job_name=retrain_job.name, statuses=[DagsterRunStatus.SUCCESS, *IN_FLIGHT]), limit=1)
    last_ts = None
    if records:  # newest first: a finished retrain counts from its end, one in flight from its creation
        record = records[0]
        last_ts = record.end_time or record.create_timestamp.timestamp()
    min_interval = SensorSettings.from_env().retrain_min_interval_s
    fire, reason = drift_decision(status, max_psi, last_ts, time.time(), min_interval)
    if not fire:
        return SkipReason(reason)
    return RunRequest(run_config=GRAPH_RUN_DEFAULTS, run_key=f"drift-{asset_event.run_id or 'runless'}-{asset_event.timestamp:.0f}",
                      tags={"kairos/trigger": "drift", "kairos/reason": reason, "kairos/max_psi": f"{max_psi:.4f}",
                            "kairos/min_interval_s": f"{min_interval:.0f}"})


daily_retrain = ScheduleDefinition(name="daily_retrain", run_config=GRAPH_RUN_DEFAULTS, job=retrain_job, cron_schedule="0 3 * * *",
                                   execution_timezone="UTC")

def ingest_day_due(tick_day: str, partition_keys: list[str] | tuple[str, ...] | set[str]) -> tuple[str | None, str]:
    """The ingest day the 00:30 tick of `tick_day` requests: the day that just ended, when it is a partition;
    else None and why (a historical world's partitions end on its data's last day; pure, tested without Dagster)."""
    import datetime as dt

    day = (dt.date.fromisoformat(tick_day) - dt.timedelta(days=1)).isoformat()
    if day in partition_keys:
        return day, f"ingest {day}, the day that just ended"
    keys = sorted(partition_keys)
    if keys and day > keys[-1]:
        return None, (f"{day} is after the last daily partition {keys[-1]}: a historical world (its data ends there; "
                      "KAIROS_PARTITION_END or KAIROS_HOME/partition_end); set KAIROS_PARTITION_END=live to ingest new days")
    return None, f"{day} is before the first daily partition {keys[0] if keys else '(none)'}"


# each day at 00:30 UTC, ingest the day that just ended. Not build_schedule_from_partitioned_job: with end_offset=1
# (today's partition exists) that requests the day that began 30 minutes ago, and past a historical world's end it
# re-requests the last day every night
@schedule(job=ingest_job, cron_schedule="30 0 * * *", execution_timezone="UTC", name="daily_ingest",
          description="Each day at 00:30 UTC, ingests the day that just ended; skips (saying why) when that day is "
                      "outside the daily partitions (a historical world ends on its data's last day).")
def daily_ingest(context: ScheduleEvaluationContext):
    tick = context.scheduled_execution_time
    day, reason = ingest_day_due(tick.strftime("%Y-%m-%d"), set(daily_partitions.get_partition_keys(tick)))
    if day is None:
        return SkipReason(reason)
    return RunRequest(run_key=f"ingest-{day}", partition_key=day, run_config=QUIET_LOGS,
                      tags={"kairos/trigger": "daily_ingest"})

weekly_maintenance = ScheduleDefinition(name="weekly_lake_maintenance", run_config=QUIET_LOGS, job=maintenance_job, cron_schedule="0 4 * * 0",
                                        execution_timezone="UTC")

impressions_every_15_min = ScheduleDefinition(name="impressions_every_15_min", run_config=QUIET_LOGS, job=impressions_job,
                                              cron_schedule="*/15 * * * *", execution_timezone="UTC")

ROLLOUT_INTERVAL_S = 300


def rollout_tick(stage: str, version: str | None, now: float, interval_s: float = ROLLOUT_INTERVAL_S) -> str | None:
    """The run key of a rollout evaluation due now (one per stage, version and interval), or None when no
    rollout is in progress (pure, so it is tested without Dagster or MLflow)."""
    if stage not in ("shadow", "canary") or not version:
        return None
    return f"rollout-{stage}-v{version}-{int(now // interval_s)}"


@sensor(job=rollout_job, minimum_interval_seconds=ROLLOUT_INTERVAL_S,
        description="While a version is in shadow or canary (registry rollout stage), evaluates it every 5 minutes: "
                    "the rollout job promotes it, holds, or rolls it back.")
def rollout_sensor(context: SensorEvaluationContext, mlflow: MlflowResource):
    from models.rollout import rollout_state

    state = rollout_state(mlflow.settings())
    key = rollout_tick(state.stage, state.version, time.time())
    if key is None:
        return SkipReason(f"no rollout in progress (stage {state.stage}, champion {state.champion})")
    return RunRequest(run_config=QUIET_LOGS, run_key=key, tags={"kairos/trigger": "rollout", "kairos/stage": state.stage,
                                         "kairos/version": str(state.version)})


# --------------------------------------------------------------------------- freshness of the online store


def freshness_decision(stale: dict[str, float], last_request_ts: float | None, now: float,
                       min_interval_s: float = FRESHNESS_MIN_INTERVAL_S) -> tuple[bool, str]:
    """Whether stale tiers should request a refresh, and why (pure, so it is tested without Dagster or Redis)."""
    if not stale:
        return False, "online features are fresh (batch snapshot and streaming session keys within their limits)"
    what = ", ".join(f"{t} {'never written' if math.isinf(a) else f'{a:.0f}s old'}" for t, a in sorted(stale.items()))
    if last_request_ts is not None and now - last_request_ts < min_interval_s:
        return False, f"stale: {what}; a refresh was requested {now - last_request_ts:.0f}s ago (min {min_interval_s:.0f}s)"
    return True, f"stale: {what}"


@sensor(job=refresh_online_job, minimum_interval_seconds=60,
        description="Alerts when the online store goes stale: the batch snapshot in Redis older than "
                    "KAIROS_FRESHNESS_BATCH_MAX_AGE_S or a streamed event unapplied for longer than "
                    "KAIROS_FRESHNESS_STREAMING_MAX_AGE_S. Requests a refresh of online_features (batch) and "
                    "feature_health (whose online_features_fresh check records the alert), tagged with the tier and age.")
def freshness_sensor(context: SensorEvaluationContext, redis: RedisResource):
    from monitoring.health import FreshnessThresholds, online_freshness, stale_tiers

    now = time.time()
    thresholds = FreshnessThresholds.from_env()
    try:
        fresh = online_freshness(redis.client(), now)
    except Exception as exc:  # noqa: BLE001 - the tick fails visibly: the online store itself is unreachable
        raise RuntimeError(f"freshness sensor cannot read the online store ({type(exc).__name__}: {exc}): check that "
                           f"Redis is up and REDIS_URL points at it") from exc
    stale = stale_tiers(fresh, thresholds)
    last = float(context.cursor) if context.cursor else None
    fire, reason = freshness_decision(stale, last, now, SensorSettings.from_env().freshness_min_interval_s)
    if not fire:
        return SkipReason(reason)
    context.update_cursor(str(now))
    # a stale batch tier is fixed by rewriting the snapshot; a stuck streaming job is a process to restart, so for
    # it the run only re-measures feature health (its failed check is the alert in the UI)
    selection = [AssetKey("online_features"), AssetKey("feature_health")] if "batch" in stale else [AssetKey("feature_health")]
    tags = {"kairos/trigger": "freshness", "kairos/stale_tiers": ",".join(sorted(stale)), "kairos/reason": reason}
    for tier, age in stale.items():
        tags[f"kairos/stale_{tier}_age_s"] = "inf" if math.isinf(age) else f"{age:.0f}"
        tags[f"kairos/{tier}_max_age_s"] = f"{thresholds.limit(tier):.0f}"
    return RunRequest(run_config=QUIET_LOGS, run_key=f"freshness-{'+'.join(sorted(stale))}-{int(now)}", asset_selection=selection, tags=tags)


def empty_store_decision(current_version: str | None, last_built: str | None, now: float,
                         last_request_ts: float | None, min_interval_s: float = 300.0) -> tuple[bool, str]:
    """Whether the online store needs a rebuild now: it was built (Dagster recorded an online_features
    materialization) but Redis has no current snapshot (a Redis that lost its data or was flushed). Pure."""
    if current_version is not None:
        return False, f"online store serves snapshot {current_version}"
    if last_built is None:
        return False, "online store empty and never built: materialize online_features (kairos demo / build job)"
    if last_request_ts is not None and now - last_request_ts < min_interval_s:
        return False, f"online store empty; a rebuild was requested {now - last_request_ts:.0f}s ago"
    return True, f"online store empty (Redis lost snapshot {last_built}): rebuilding it from the offline store"


@sensor(job=refresh_online_job, minimum_interval_seconds=30,
        description="Rebuilds the online store when it comes back empty (Redis restarted without its data or "
                    "flushed) although online_features was materialized before: requests refresh_online_store at "
                    "once (at most every 5 minutes), tagged with the snapshot Redis lost.")
def online_store_empty_sensor(context: SensorEvaluationContext, redis: RedisResource):
    from features.online import OnlineStore

    try:
        current = OnlineStore(redis.client()).current_version()
    except Exception as exc:  # noqa: BLE001 - unreachable Redis is the freshness sensor's and the server's alert
        return SkipReason(f"online store unreachable ({type(exc).__name__}); retrying next tick")
    event = context.instance.get_latest_materialization_event(AssetKey("online_features"))
    last_built = None
    if event is not None and event.asset_materialization is not None:
        meta = event.asset_materialization.metadata
        last_built = str(meta["version"].value) if "version" in meta else (event.run_id or "unknown")
    now = time.time()
    fire, reason = empty_store_decision(current, last_built, now, float(context.cursor) if context.cursor else None)
    if not fire:
        return SkipReason(reason)
    context.update_cursor(str(now))
    context.log.warning(f"ALERT {reason}")
    return RunRequest(run_config=QUIET_LOGS, run_key=f"online-empty-{int(now)}", tags={"kairos/trigger": "online_store_empty",
                                                               "kairos/lost_version": str(last_built)})


hourly_monitoring = ScheduleDefinition(name="hourly_monitoring", run_config=QUIET_LOGS, job=monitor_job, cron_schedule="5 * * * *",
                                       execution_timezone="UTC")


@sensor(job=drain_stream, minimum_interval_seconds=30,
        description="Alerts when the streaming consumer lags (oldest unfinished event older than "
                    "KAIROS_STREAM_LAG_ALERT_MS, default 60 s, or KAIROS_STREAM_LAG_ALERT_PENDING, default 10,000, "
                    "pending) and launches a bounded draining consumer run; at most one per 5 minutes.")
def stream_lag_sensor(context: SensorEvaluationContext, redis: RedisResource):
    from streaming.job import GROUP, STREAM
    from streaming.retention import stream_lag

    lag = stream_lag(redis.client(), STREAM)
    limits = SensorSettings.from_env()
    fire, reason = lag_decision(lag, GROUP, max_lag_ms=limits.stream_lag.max_lag_ms,
                                max_pending=limits.stream_lag.max_pending)
    if not fire:
        return SkipReason(reason)
    context.log.warning(f"ALERT stream lag: {reason}")
    return RunRequest(run_config=QUIET_LOGS, run_key=f"stream-lag-{int(time.time() // 300)}",
                      tags={"kairos/trigger": "stream_lag", "kairos/alert": reason[:250],
                            "kairos/lag_ms": str(lag["groups"].get(GROUP, {}).get("lag_ms", -1))})
