"""Runtime settings for every Kairos process, read from the environment.

One place decides where the lake, the registry and the online store live, so the
same code runs on embedded defaults (local disk, SQLite, embedded Redis, Spark
local mode) or on a cluster by configuration alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    """Where everything lives. Construct with `Settings.from_env()`."""

    home: Path
    lake_uri: str
    mlflow_tracking_uri: str
    spark_master: str
    redis_url: str | None
    model_name: str = "kairos-ranker"
    partition_start: str = "2026-01-01"  # first daily partition of the event assets (UTC day)
    shared_dir: Path = field(default_factory=lambda: PROJECT_ROOT.parent / "shared")

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(_env("KAIROS_HOME", str(PROJECT_ROOT / ".kairos"))).resolve()
        return cls(
            home=home,
            lake_uri=_env("KAIROS_LAKE_URI", str(home / "lake")),
            mlflow_tracking_uri=_env("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"),
            spark_master=_env("KAIROS_SPARK_MASTER", "local[2]"),
            redis_url=os.environ.get("REDIS_URL") or None,
            model_name=_env("KAIROS_MODEL_NAME", "kairos-ranker"),
            partition_start=_env("KAIROS_PARTITION_START", "2026-01-01"),
            shared_dir=Path(_env("KAIROS_SHARED_DIR", str(PROJECT_ROOT.parent / "shared"))),
        )

    @property
    def movielens_100k_dir(self) -> Path:
        return self.shared_dir / "data" / "movielens-100k"

    @property
    def mlflow_artifact_root(self) -> str:
        return _env("KAIROS_MLFLOW_ARTIFACTS", str(self.home / "mlartifacts"))
