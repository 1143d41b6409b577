"""The one Dagster `Definitions` of Kairos (`dagster dev -w workspace.yaml`)."""
from __future__ import annotations

from dagster import Definitions, FilesystemIOManager, load_asset_checks_from_modules, load_assets_from_modules

from assets import features, ingestion, maintenance, monitoring, rollout, serving, training
from assets.streaming import drain_stream
from orchestration.jobs import (build_job, impressions_job, ingest_job, maintenance_job, monitor_job,
                                refresh_online_job, retrain_job, rollout_job, tune_job)
from orchestration.resources import ArtifactsResource, LakeResource, MlflowResource, RedisResource, SparkResource
from orchestration.sensors import online_store_empty_sensor, stream_lag_sensor
from orchestration.sensors import (daily_ingest, daily_retrain, drift_sensor, freshness_sensor, hourly_monitoring,
                                   impressions_every_15_min, rollout_sensor, weekly_maintenance)

_modules = [ingestion, features, training, serving, monitoring, maintenance, rollout]

defs = Definitions(
    assets=load_assets_from_modules(_modules),
    asset_checks=load_asset_checks_from_modules(_modules),
    jobs=[ingest_job, build_job, retrain_job, maintenance_job, impressions_job, tune_job, rollout_job, monitor_job,
          refresh_online_job, drain_stream],
    sensors=[drift_sensor, rollout_sensor, freshness_sensor, stream_lag_sensor, online_store_empty_sensor],
    schedules=[daily_ingest, daily_retrain, weekly_maintenance, impressions_every_15_min, hourly_monitoring],
    resources={
        "lake": LakeResource(),
        "spark": SparkResource(),
        "redis": RedisResource(),
        "mlflow": MlflowResource(),
        "artifacts": ArtifactsResource(),
        # pickled model objects go under $DAGSTER_HOME/storage (set by `kairos` to KAIROS_HOME/dagster)
        "io_manager": FilesystemIOManager(),
    },
)
