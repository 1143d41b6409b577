"""Dagster resources: every piece of I/O (lake, Spark, Redis, MLflow) lives here.

Assets receive these and call pure functions; switching from the embedded
defaults to a cluster is a matter of resource configuration (env vars).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource

from lake.delta import DeltaLake
from lake.spark import spark_read
from orchestration.settings import Settings


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

    def session(self) -> Any:
        from orchestration.services import spark_session

        settings = _settings()
        return spark_session(self.master or settings.spark_master, conf=dict(self.conf), lake_uri=settings.lake_uri)

    def read_table(self, lake: DeltaLake, table: str, version: int) -> Any:
        return spark_read(self.session(), lake, table, version)


def redis_url_from_env(settings: Settings | None = None) -> str:
    """REDIS_URL, else the URL the embedded server wrote under KAIROS_HOME."""
    settings = settings or _settings()
    if settings.redis_url:
        return settings.redis_url
    marker = settings.home / "redis.url"
    if marker.exists():
        return marker.read_text().strip()
    raise RuntimeError(
        "No Redis configured: set REDIS_URL, or start the embedded server with `kairos redis` "
        "(the demo `kairos demo` starts one for you)."
    )


class RedisResource(ConfigurableResource):
    """The online store's Redis (embedded redis-server by default, REDIS_URL otherwise)."""

    url: str = ""

    def client(self):
        from orchestration.settings import redis_client

        # password / TLS from the environment (REDIS_PASSWORD, rediss://, KAIROS_REDIS_TLS_*)
        return redis_client(self.url or redis_url_from_env(), decode_responses=True,
                            socket_timeout=5, socket_connect_timeout=5)


class MlflowResource(ConfigurableResource):
    """The MLflow tracking store and model registry."""

    tracking_uri: str = ""

    def settings(self) -> Settings:
        s = _settings()
        if self.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
            s = Settings.from_env()
        return s


class ArtifactsResource(ConfigurableResource):
    """A scratch folder for files an asset builds before registering them (bundles, reports)."""

    root: str = ""

    def path(self, *parts: str) -> Path:
        base = Path(self.root or (_settings().home / "artifacts"))
        p = base.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p
