"""Dagster resources: every piece of I/O (lake, Spark, Redis, MLflow) lives here.

Assets receive these and call pure functions; switching from the embedded defaults to a cluster is a matter of
resource configuration: orchestration/definitions.py sets each field with `EnvVar` when its variable is set, and
an empty field falls back to `ground.settings.Settings` (the embedded defaults under KAIROS_HOME).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource

from ground.settings import Settings, SparkSettings, redis_client, redis_url_from_env
from lake.delta import DeltaLake, TableVersion
from lake.spark import spark_session
from lake.spark_read import spark_read
from lake.spark_write import spark_write


def _settings() -> Settings:
    return Settings.from_env()


class LakeResource(ConfigurableResource):
    """The offline store: Delta tables under one root (local path or s3://…)."""

    root: str = ""

    def lake(self) -> DeltaLake:
        return DeltaLake(self.root or _settings().lake_uri)


class SparkResource(ConfigurableResource):
    """A SparkSession: local mode by default, any master by config (KAIROS_SPARK_MASTER); `conf` holds extra
    `spark.*` settings on top of KAIROS_SPARK_CONF (lake/spark.py: readers, code shipping, pass-through)."""

    master: str = ""
    conf: dict[str, str] = {}

    def session(self, spark: SparkSettings | None = None) -> Any:
        settings = _settings()
        return spark_session(self.master or settings.spark_master, conf=dict(self.conf), lake_uri=settings.lake_uri,
                             settings=spark or SparkSettings.from_env())

    def read_table(self, lake: DeltaLake, table: str, version: int) -> Any:
        spark = SparkSettings.from_env()  # one read of the KAIROS_SPARK_* environment per call
        return spark_read(self.session(spark), lake, table, version, settings=spark)

    def write_table(self, lake: DeltaLake, table: str, frame: Any) -> TableVersion:
        """Overwrite `table` with a Spark DataFrame, written by the executors (lake/spark.py `spark_write`)."""
        spark = SparkSettings.from_env()
        return spark_write(self.session(spark), lake, table, frame, settings=spark)


class RedisResource(ConfigurableResource):
    """The online store's Redis (embedded redis-server by default, REDIS_URL otherwise)."""

    url: str = ""

    def client(self):
        # password / TLS from the environment (REDIS_PASSWORD, rediss://, KAIROS_REDIS_TLS_*)
        return redis_client(self.url or redis_url_from_env(), decode_responses=True,
                            socket_timeout=5, socket_connect_timeout=5)


class MlflowResource(ConfigurableResource):
    """The MLflow tracking store and model registry."""

    tracking_uri: str = ""

    def settings(self) -> Settings:
        """The process's Settings with this resource's tracking URI, when configured (the environment is not
        written: the settings are passed down)."""
        s = _settings()
        return dataclasses.replace(s, mlflow_tracking_uri=self.tracking_uri) if self.tracking_uri else s


REPORTS_EXPERIMENT = "kairos-reports"
# MLflow 3.17's UI picks its view (GenAI or "Model training") from the URL's `workflowType` query parameter, else
# from the browser's localStorage (`mlflow.workflowType_v1`, written by the top-left toggle), else GenAI; with the
# toggle on it ignores the experiment's `mlflow.experimentKind` tag, and no server setting changes the default.
# Every MLflow link Kairos publishes carries the parameter, so it opens on runs, artifacts and the model registry.
MLFLOW_MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def mlflow_ui_link(base: str, route: str) -> str:
    """The MLflow UI URL of `route` (e.g. `/experiments/3/runs/abc`) under `base`, in the model-training view."""
    return f"{base.rstrip('/')}/#/{route.lstrip('/')}?{MLFLOW_MODEL_TRAINING_VIEW}"


class ArtifactsResource(ConfigurableResource):
    """A scratch folder for files an asset builds before registering them (bundles, reports), and the place
    reports are published so they open with one click from the Dagster UI."""

    root: str = ""
    # where people open MLflow (`make mlflow-ui`); report links point there (KAIROS_MLFLOW_UI_URL, definitions.py)
    mlflow_ui_url: str = "http://127.0.0.1:5000"

    def path(self, *parts: str) -> Path:
        base = Path(self.root or (_settings().home / "artifacts"))
        p = base.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def publish_report(self, report: Path, dagster_run_id: str, artifact_dir: str = "reports") -> Any:
        """Log `report` (an HTML file, or a folder such as GX data docs, whose index.html is linked) to MLflow,
        on one run per Dagster run in the `kairos-reports` experiment, and return a `MetadataValue.url` to it in
        the MLflow UI (served over HTTP: a file path in Dagster metadata only copies to the clipboard). If MLflow
        cannot take it, the local path is returned, so a report never fails its asset."""
        from dagster import MetadataValue

        from models.registry import mlflow_client

        report = Path(report)
        try:
            settings = _settings()
            client = mlflow_client(settings)
            experiment = client.get_experiment_by_name(REPORTS_EXPERIMENT)
            if experiment is None:
                from training.registry import artifact_location

                root = artifact_location(settings)  # None with a remote server: its own artifact root
                client.create_experiment(REPORTS_EXPERIMENT, artifact_location=root + "/reports" if root else None,
                                         tags={"mlflow.experimentKind": "custom_model_development",
                                               "mlflow.note.content": "Reports of the Kairos Dagster runs (data docs, "
                                                                      "drift, evaluation, lineage), one run per Dagster run."})
                experiment = client.get_experiment_by_name(REPORTS_EXPERIMENT)
            found = client.search_runs([experiment.experiment_id], f"tags.`dagster.run_id` = '{dagster_run_id}'",
                                       max_results=1)
            run = found[0] if found else client.create_run(
                experiment.experiment_id, run_name=f"dagster run {dagster_run_id[:8]}",
                tags={"dagster.run_id": dagster_run_id})
            if report.is_dir():
                client.log_artifacts(run.info.run_id, str(report), f"{artifact_dir}/{report.name}")
                target = f"{artifact_dir}/{report.name}/index.html"
            else:
                client.log_artifact(run.info.run_id, str(report), artifact_dir)
                target = f"{artifact_dir}/{report.name}"
            return MetadataValue.url(mlflow_ui_link(self.mlflow_ui_url, f"experiments/{experiment.experiment_id}"
                                                                        f"/runs/{run.info.run_id}/artifacts/{target}"))
        except Exception as exc:  # noqa: BLE001 - a report link must not fail the asset that computed the data
            import logging

            logging.getLogger("kairos.reports").warning("report %s not published to MLflow (%s): local path only",
                                                        report, exc)
            return MetadataValue.path(str(report))
