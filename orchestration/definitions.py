"""The one Dagster `Definitions` of Kairos (`dagster dev -w workspace.yaml`)."""
from __future__ import annotations

import os
from typing import Any, Mapping

from dagster import (AssetsDefinition, AssetSpec, ConfigurableResource, Definitions, EnvVar, FilesystemIOManager,
                     load_asset_checks_from_modules, load_assets_from_modules, map_asset_specs)

from assets import features, ingestion, maintenance, monitoring, rollout, serving, training
from assets.resources import ArtifactsResource, LakeResource, MlflowResource, RedisResource, SparkResource
from assets.streaming import drain_stream
from orchestration.jobs import (build_job, impressions_job, ingest_job, maintenance_job, monitor_job,
                                refresh_online_job, retrain_job, rollout_job, tune_job)
from orchestration.sensors import online_store_empty_sensor, stream_lag_sensor
from orchestration.sensors import (daily_ingest, daily_retrain, drift_sensor, freshness_sensor, hourly_monitoring,
                                   impressions_every_15_min, rollout_sensor, weekly_maintenance)

_modules = [ingestion, features, training, serving, monitoring, maintenance, rollout]

# Who to page and what runs it, per asset group (the catalog's Owner and Kind columns, and its filters).
# Dagster shows at most three kinds per asset: the storage first, then the engine.
GROUP_METADATA: dict[str, tuple[str, set[str]]] = {
    "ingestion": ("team:data-platform", {"delta", "great_expectations", "pandas"}),
    "features": ("team:feature-store", {"delta", "spark"}),
    "training": ("team:ranking", {"pytorch", "lightgbm", "mlflow"}),
    "serving": ("team:serving", {"redis"}),
    "monitoring": ("team:ml-platform", {"delta", "evidently"}),
    "maintenance": ("team:data-platform", {"delta"}),
    "tuning": ("team:ranking", {"lightgbm"}),
    "rollout": ("team:ml-platform", {"mlflow"}),
}
# medallion layer of the lake tables (the others are models, reports or online state)
LAYERS = {"bronze_events": "bronze", "silver_events": "silver", "quarantine_events": "silver",
          "catalog_items": "silver", "catalog_users": "silver", "labels": "gold", "user_features": "gold",
          "item_features": "gold", "training_set": "gold", "impression_log": "bronze"}


def with_ownership(spec: AssetSpec) -> AssetSpec:
    """Owners, kinds and tags from the asset's group (one table, so a new asset cannot be left unowned)."""
    owner, kinds = GROUP_METADATA.get(spec.group_name or "", ("team:ml-platform", set()))
    tags = {"kairos/domain": spec.group_name or "default"}
    if spec.key.to_user_string() in LAYERS:
        tags["kairos/layer"] = LAYERS[spec.key.to_user_string()]
    return spec.merge_attributes(owners=[owner], kinds=kinds, tags=tags)


# resource -> (field, the variable that configures it); a field left empty falls back to ground.settings.Settings
RESOURCE_ENV: dict[str, tuple[str, str]] = {
    "lake": ("root", "KAIROS_LAKE_URI"),
    "spark": ("master", "KAIROS_SPARK_MASTER"),
    "redis": ("url", "REDIS_URL"),
    "mlflow": ("tracking_uri", "MLFLOW_TRACKING_URI"),
    "artifacts": ("mlflow_ui_url", "KAIROS_MLFLOW_UI_URL"),
}


def resources(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The resources, each field in RESOURCE_ENV set to `EnvVar(variable)` when the code location's environment
    sets the variable: Dagster resolves it in every run (the UI lists it on the resource's page) and the value is
    never written into the definitions. An unset variable leaves the field empty, so the resource falls back to
    the embedded defaults (`kairos demo` needs no environment)."""
    classes: dict[str, type[ConfigurableResource]] = {"lake": LakeResource, "spark": SparkResource,
                                                      "redis": RedisResource, "mlflow": MlflowResource,
                                                      "artifacts": ArtifactsResource}
    out: dict[str, Any] = {}
    for key, cls in classes.items():
        field, var = RESOURCE_ENV[key]
        out[key] = cls(**({field: EnvVar(var)} if env.get(var) else {}))
    # pickled model objects go under $DAGSTER_HOME/storage (set by `kairos` to KAIROS_HOME/dagster)
    out["io_manager"] = FilesystemIOManager()
    return out


def _asset_definitions() -> list[AssetsDefinition | AssetSpec]:
    """The assets of `_modules`: all @asset / @multi_asset definitions (map_asset_specs cannot map a SourceAsset)."""
    loaded = load_assets_from_modules(_modules)
    other = [a for a in loaded if not isinstance(a, (AssetsDefinition, AssetSpec))]
    if other:
        raise TypeError(f"asset modules define {len(other)} non-asset definition(s) (source or cacheable assets): "
                        f"{other}; declare them as AssetSpec")
    return [a for a in loaded if isinstance(a, (AssetsDefinition, AssetSpec))]


defs = Definitions(
    assets=map_asset_specs(with_ownership, _asset_definitions()),
    asset_checks=load_asset_checks_from_modules(_modules),
    jobs=[ingest_job, build_job, retrain_job, maintenance_job, impressions_job, tune_job, rollout_job, monitor_job,
          refresh_online_job, drain_stream],
    sensors=[drift_sensor, rollout_sensor, freshness_sensor, stream_lag_sensor, online_store_empty_sensor],
    schedules=[daily_ingest, daily_retrain, weekly_maintenance, impressions_every_15_min, hourly_monitoring],
    resources=resources(),
)
