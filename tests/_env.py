"""Point the test process at one KAIROS_HOME and Redis, and put the environment back afterwards."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


# what a server (or CLI) a test starts gets on top of its environment: exploration off, so answers compare
# (the service reads KAIROS_* once, at its start; in-process callers pass RerankConfig(epsilon=0.0) instead)
SERVER_ENV: dict[str, str] = {"KAIROS_EXPLORATION_EPSILON": "0"}

KAIROS_ENV_KEYS = ("KAIROS_HOME", "REDIS_URL", "DAGSTER_HOME", "MLFLOW_TRACKING_URI", "KAIROS_LAKE_URI")


@contextlib.contextmanager
def kairos_env(home: Path, redis_url: str, **extra: str) -> Iterator[None]:
    """Point this process at one KAIROS_HOME and Redis (DAGSTER_HOME, MLflow and the lake then default
    under KAIROS_HOME, unless `extra` sets them) and restore the environment afterwards."""
    keys = KAIROS_ENV_KEYS + tuple(k for k in extra if k not in KAIROS_ENV_KEYS)
    saved = {k: os.environ.get(k) for k in keys}
    for k in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "KAIROS_LAKE_URI"):
        os.environ.pop(k, None)
    os.environ.update({"KAIROS_HOME": str(home), "REDIS_URL": redis_url, **extra})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fresh_home(home: Path, redis_url: str) -> Iterator[object]:
    """kairos_env on an empty Redis database and a prepared KAIROS_HOME; yields its Settings."""
    import redis

    from orchestration.cli import prepare_home
    from ground.settings import Settings

    with kairos_env(home, redis_url):
        redis.Redis.from_url(redis_url).flushdb()
        settings = Settings.from_env()
        prepare_home(settings)
        yield settings
