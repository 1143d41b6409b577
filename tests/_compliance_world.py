"""One small world built through the real asset graph, shared by tests/test_forget.py and tests/test_lineage.py.

Built once per pytest process (the whole graph is the expensive part: ~1.5 min on 2 cores): its own
embedded redis-server, KAIROS_HOME and Dagster instance; the ingest and build runs of
`materialize_all`; session state from the real streaming job; two served requests in the impression
stream, the first landed in Delta by the `log_impressions` job, the second still only in Redis.
`world_env` points the process at it (env vars) for the duration of a test module.
"""
from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

SOURCE = {"source": "simulator", "n_users": 60, "n_items": 80, "days": 8, "seed": 3}
_WORLD: dict[str, Any] = {}


@contextlib.contextmanager
def world_env(world: dict[str, Any]) -> Iterator[None]:
    from tests._env import kairos_env

    with kairos_env(world["home"], world["redis"].url, DAGSTER_HOME=str(world["home"] / "dagster"),
                    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        yield


def _serve(settings: Any, client: Any, user_id: str, request_id: str, bundle: Any) -> None:
    """Log one answer of the registered bundle for a user through the real impression logger."""
    from serving.impressions import ImpressionLogger, impression_record

    items = bundle.popular(5)
    response = {"request_id": request_id, "model_version": bundle.model_version, "served_by": "two_stage",
                "feature_version": "test", "ranked_items": [{"item_id": i, "rank": k + 1, "score": 1.0 / (k + 1)}
                                                            for k, i in enumerate(items)]}
    logger = ImpressionLogger(client)
    logger(impression_record(response, {"user_id": user_id, "session_id": f"req-{request_id}", "device_type": "mobile"},
                             int(time.time() * 1000), features=None))
    logger.close()


def compliance_world() -> dict[str, Any]:
    """The shared world (built on first use)."""
    if _WORLD:
        return _WORLD
    from ground.settings import Settings, redis_client
    from lake.delta import DeltaLake
    from models.registry import load_alias, mlflow_client
    from orchestration.cli import log_impressions, materialize_all, prepare_home
    from orchestration.services import start_redis
    from streaming.job import SessionStreamProcessor, publish

    home = Path(tempfile.mkdtemp(prefix="kairos-compliance-"))
    redis = start_redis(home / "redis")
    atexit.register(shutil.rmtree, home, ignore_errors=True)  # registered after redis' stop: runs before it
    world: dict[str, Any] = {"home": home / "kairos", "redis": redis}
    with world_env(world):
        settings = Settings.from_env()
        prepare_home(settings)
        run = materialize_all(settings, SOURCE)
        lake = DeltaLake(settings.lake_uri)
        silver = lake.read("silver_events", columns=["user_id", "item_id"])
        ranked = silver["user_id"].value_counts()
        forgotten, other = str(ranked.index[0]), str(ranked.index[1])
        client = redis_client(redis.url)
        # session state, user-level keys and applied markers from the real streaming job, for both users
        now = int(silver.shape[0])  # any increasing clock works for the fold
        items = silver["item_id"].dropna().astype(str).unique()[:3].tolist()
        events = [{"event_id": f"live-{u}-{k}", "user_id": u, "item_id": it, "event_type": "click",
                   "timestamp": 1_767_000_000_000 + now + k, "session_id": f"live-session-{u}", "position": k,
                   "page_context": "home_feed", "device_type": "mobile", "dwell_time_ms": 20_000, "schema_version": 1}
                  for u in (forgotten, other) for k, it in enumerate(items)]
        publish(client, events)
        processor = SessionStreamProcessor(client, consumer_name="compliance-test")
        processor.ensure_group()
        applied, deadline = 0, time.time() + 20
        while applied < len(events) and time.time() < deadline:
            applied += processor.process_once(count=100, block_ms=100)
        mv = mlflow_client(settings).search_model_versions(f"name='{settings.model_name}'")
        version = str(max(int(v.version) for v in mv))
        bundle = load_alias(settings, "challenger")
        _serve(settings, client, forgotten, "req-landed-forgotten", bundle)
        _serve(settings, client, other, "req-landed-other", bundle)
        landed = log_impressions(settings)
        _serve(settings, client, other, "req-in-redis-only", bundle)
        _serve(settings, client, forgotten, "req-in-redis-forgotten", bundle)
    world.update({"settings": settings, "run": run, "forgotten": forgotten, "other": other, "version": version,
                  "applied": applied, "landed_run": landed["run_id"]})
    _WORLD.update(world)
    return _WORLD
