"""Sensors and schedules: drift requests a retrain; daily ingestion and retrain; weekly lake maintenance."""

import time

from dagster import (AssetKey, DagsterRunStatus, EventLogEntry, RunRequest, RunsFilter, ScheduleDefinition,
                     SensorEvaluationContext, SkipReason, asset_sensor, build_schedule_from_partitioned_job)

from assets.monitoring import FEATURE_DRIFT
from orchestration.jobs import impressions_job, ingest_job, maintenance_job, retrain_job

MIN_RETRAIN_INTERVAL_S = 24 * 3600


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
    max_psi = float(meta["max_psi"].value) if "max_psi" in meta else 0.0
    runs = context.instance.get_runs(RunsFilter(job_name=retrain_job.name, statuses=[DagsterRunStatus.SUCCESS]), limit=1)
    last = runs[0] if runs else None
    last_ts = None
    if last is not None:
        record = context.instance.get_run_record_by_id(last.run_id)
        last_ts = record.end_time if record else None
    fire, reason = drift_decision(status, max_psi, last_ts, time.time())
    if not fire:
        return SkipReason(reason)
    return RunRequest(run_key=f"drift-{asset_event.run_id or 'runless'}-{asset_event.timestamp:.0f}",
                      tags={"kairos/trigger": "drift", "kairos/reason": reason, "kairos/max_psi": f"{max_psi:.4f}"})


daily_retrain = ScheduleDefinition(name="daily_retrain", job=retrain_job, cron_schedule="0 3 * * *",
                                   execution_timezone="UTC")

# each day at 00:30 UTC, ingest the day that just ended (its partition key)
daily_ingest = build_schedule_from_partitioned_job(ingest_job, hour_of_day=0, minute_of_hour=30, name="daily_ingest")

weekly_maintenance = ScheduleDefinition(name="weekly_lake_maintenance", job=maintenance_job, cron_schedule="0 4 * * 0",
                                        execution_timezone="UTC")

impressions_every_15_min = ScheduleDefinition(name="impressions_every_15_min", job=impressions_job,
                                              cron_schedule="*/15 * * * *", execution_timezone="UTC")
