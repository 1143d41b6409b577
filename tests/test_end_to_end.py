"""End to end: a small simulated world through every Dagster asset, a real BentoML server over HTTP,
three clicks through the Redis Stream, and a next response that reflects them."""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
from dagster import AssetKey, DagsterInstance

from lake.delta import DeltaLake
from orchestration.cli import data_clock_ms, log_impressions, materialize_all
from orchestration.services import EmbeddedRedis, free_port
from tests._env import SERVER_ENV, fresh_home

pytestmark = pytest.mark.e2e

SOURCE = {"source": "simulator", "n_users": 150, "n_items": 200, "days": 10, "seed": 3}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis):
    home = tmp_path_factory.mktemp("kairos-e2e")
    with fresh_home(home, redis_server.url) as settings:
        yield settings, materialize_all(settings, SOURCE)


def test_every_asset_materialized_with_checks(pipeline) -> None:
    settings, run = pipeline
    assert run["success"]
    instance = DagsterInstance.get()
    for run_id, job in ((run["ingest_run_id"], "ingest_events"), (run["run_id"], "build")):
        stored = instance.get_run_by_id(run_id)  # launched through the run launcher: listed under its job
        assert stored.job_name == job and stored.remote_job_origin is not None, (job, stored)
    for key in ("bronze_events", "silver_events", "labels", "user_features", "item_features", "training_set",
                "two_tower_model", "faiss_index", "ranker_model", "model_evaluation", "validation_gate",
                "registered_model", "online_features", "feature_drift"):
        assert instance.get_latest_materialization_event(AssetKey(key)) is not None, key
    meta = instance.get_latest_materialization_event(AssetKey("silver_events")).asset_materialization.metadata
    n_in = meta["n_in"].value
    rejected = meta["quarantined"].value + meta["duplicates"].value + meta["bot_filtered"].value
    assert n_in == meta["accepted"].value + rejected
    # the simulator injects malformed events, duplicates and bots: each filter had work
    assert meta["quarantined"].value > 0 and meta["duplicates"].value > 0 and meta["bot_filtered"].value > 0
    lake = DeltaLake(settings.lake_uri)
    assert lake.pin("quarantine_events").rows == rejected
    assert lake.pin("bronze_events").rows == n_in
    checks = instance.get_latest_materialization_event(AssetKey("training_set")).asset_materialization.metadata
    assert checks["rows"].value > 1000
    # the evaluation page a reviewer opens from the asset: every model side by side, no champion yet
    ev = instance.get_latest_materialization_event(AssetKey("model_evaluation")).asset_materialization.metadata
    page = Path(ev["report"].value).read_text(encoding="utf-8")
    for model in ("two_stage", "two_tower", "popularity", "popularity_segment", "co_occurrence", "logistic_regression"):
        assert f"<td>{model}</td>" in page, model
    assert "retrieval_recall_at_100" in page and ev["champion_source"].value.startswith("none")


def test_champion_registered_with_lineage(pipeline) -> None:
    settings, _ = pipeline
    from models.registry import mlflow_client

    client = mlflow_client(settings)
    mv = client.get_model_version_by_alias(settings.model_name, "champion")
    lake = DeltaLake(settings.lake_uri)
    assert mv.tags["delta.training_set.version"] == str(lake.version("training_set"))
    assert mv.tags["delta.silver_events.version"] == str(lake.version("silver_events"))
    assert mv.tags["gate.passed"] == "True"
    assert mv.tags["dagster.run_id"] == pipeline[1]["run_id"]
    # the served bundle carries the popularity prior model_evaluation fitted on validation and judged with
    from models.registry import CHAMPION, load_alias

    evaluation = DagsterInstance.get().get_latest_materialization_event(AssetKey("model_evaluation"))
    fitted = evaluation.asset_materialization.metadata["table"].value["catalog"]["popularity_prior"]
    assert fitted["validation_users"] >= 30 and set(fitted["ndcg_by_weight"]) >= {"0.0"}
    assert fitted["ndcg_by_weight"][str(float(fitted["weight"]))] == max(fitted["ndcg_by_weight"].values())
    served = load_alias(settings, CHAMPION)
    assert served.manifest["popularity_prior"] == {k: fitted[k] for k in ("feature", "weight", "session_weight")}


def test_served_over_http_and_three_clicks_move_the_ranking(pipeline) -> None:
    settings, _ = pipeline
    from serving.server import start_server, stop_server, wait_ready
    from streaming.job import SessionStreamProcessor, publish

    port = free_port()
    env = {**os.environ, **SERVER_ENV, "KAIROS_HOME": str(settings.home), "REDIS_URL": settings.redis_url or "",
           "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri}
    proc = start_server(port, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout_s=180)
        lake = DeltaLake(settings.lake_uri)
        items = lake.read("catalog_items", columns=["item_id", "category"])
        category = dict(zip(items["item_id"], items["category"]))
        user = "u00010"
        now = data_clock_ms(settings)
        body = {"user_id": user, "surface": "home_feed",
                "context": {"session_id": "e2e-s1", "device_type": "mobile", "timestamp_ms": now, "geo_region": "eu"},
                "request_config": {"num_results": 10, "candidate_pool_size": 200, "max_latency_ms": 200}}
        with httpx.Client(base_url=base, timeout=30) as http:
            before = http.post("/v1/personalize", json=body)
            assert before.status_code == 200, before.text
            b = before.json()
            assert b["served_by"] == "two_stage" and len(b["ranked_items"]) == 10
            assert b["model_version"] not in ("", None, "unregistered")
            assert set(b["latency_breakdown_ms"]) >= {"feature_fetch", "candidate_retrieval", "ranking_inference", "post_processing"}
            shown = Counter(category[i["item_id"]] for i in b["ranked_items"])
            target = min(sorted(set(category.values())), key=lambda c: shown.get(c, 0))
            clicked = [i for i, c in category.items() if c == target][:3]
            client = redis_lib.Redis.from_url(settings.redis_url, decode_responses=True)
            publish(client, [{"event_id": f"e2e-{k}", "user_id": user, "item_id": it, "event_type": "click",
                              "timestamp": now + 1000 * (k + 1), "session_id": "e2e-s1", "position": k,
                              "page_context": "home_feed", "device_type": "mobile", "dwell_time_ms": 40_000,
                              "schema_version": 1} for k, it in enumerate(clicked)])
            processor = SessionStreamProcessor(client, consumer_name="e2e")
            processor.ensure_group()
            applied = 0
            deadline = time.time() + 10
            while applied < 3 and time.time() < deadline:
                applied += processor.process_once(count=10, block_ms=100)
            assert applied == 3
            body["context"]["timestamp_ms"] = now + 5000
            after = http.post("/v1/personalize", json=body).json()
            share_before = shown.get(target, 0)
            share_after = sum(1 for i in after["ranked_items"] if category[i["item_id"]] == target)
            assert share_after > share_before, (target, share_before, share_after)
            assert not set(clicked) & {i["item_id"] for i in after["ranked_items"]}  # consumed items filtered
            bad = http.post("/v1/personalize", json={**body, "request_config": {"num_results": 0}})
            assert bad.status_code == 400
            users = lake.read("catalog_users", columns=["user_id"])["user_id"].head(40)
            for uid in users:  # traffic for the impression log
                ok = http.post("/v1/personalize", json={**body, "user_id": uid,
                                                        "context": {**body["context"], "session_id": f"e2e-{uid}"}})
                assert ok.status_code == 200
            stats = http.post("/v1/status", json={}).json()["impressions"]
            assert stats["dropped"] == 0
    finally:
        stop_server(proc)
    time.sleep(0.3)
    # every answer was logged with its features; recomputed offline as of the request time, they match
    run = log_impressions(settings)
    assert run["skew_passed"], run["skew"]
    assert run["skew"]["rows"] >= 400 and run["skew"]["worst_mismatch_rate"] == 0.0
    logged = DeltaLake(settings.lake_uri).read("impression_log")
    assert logged["request_id"].nunique() >= 42 and set(logged["served_by"]) == {"two_stage"}
    assert (logged.groupby("request_id")["position"].min() == 0).all() and (logged["propensity"] == 1.0).all()
    again = log_impressions(settings)  # nothing new in the stream: the table does not grow
    assert len(DeltaLake(settings.lake_uri).read("impression_log")) == len(logged) and again["skew_passed"]
