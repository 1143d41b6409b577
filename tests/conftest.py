"""Shared fixtures: real services (embedded redis-server, local Spark) and a small simulated world."""
from __future__ import annotations

import os
from pathlib import Path

# Exploration swaps random slots (seeded per request id); tests that compare rankings turn it off explicitly:
# in-process with personalize(rerank=RerankConfig(epsilon=0.0)), for a server with tests._env.SERVER_ENV.

import pytest
import redis

from ingestion.simulator import SimulatorConfig, World, simulate
from orchestration.cli import use_dagster_client_env
from orchestration.services import EmbeddedRedis, start_redis
from ground.settings import Settings

use_dagster_client_env()  # the tests launch Dagster runs as the CLI does: set before anything imports dagster

SHARED = Path(os.environ.get("KAIROS_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
MOVIELENS_100K = SHARED / "data" / "movielens-100k"


def movielens_or_skip() -> Path:
    if not (MOVIELENS_100K / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {MOVIELENS_100K} (needs ../shared/data/movielens-100k)")
    return MOVIELENS_100K


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedRedis:
    """A real redis-server process for the whole test session (REDIS_URL is not used here on purpose)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture()
def redis_client(redis_server: EmbeddedRedis) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    return client


@pytest.fixture(scope="session")
def small_world() -> World:
    return simulate(SimulatorConfig(n_users=120, n_items=150, n_categories=6, days=10, seed=11))


@pytest.fixture()
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("KAIROS_HOME", str(tmp_path / "kairos"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KAIROS_LAKE_URI", raising=False)
    return Settings.from_env()


@pytest.fixture(scope="session")
def trainset(small_world: World):
    """The small world's point-in-time training set (built once: Spark is the slow part)."""
    from tests._trainset import make_training_set

    return make_training_set(small_world)


@pytest.fixture(scope="session")
def outcome(trainset, small_world: World):
    """A bundle trained in-process on `trainset` (two-tower, FAISS, ranker, evaluation); treat as read-only."""
    from training.trainer import train_bundle

    return train_bundle(trainset, small_world.items, small_world.users)
