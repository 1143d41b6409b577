"""Monitoring: drift of the ranker's features, feature health, served-model health, off-policy evaluation of a real
registered challenger, and the freshness / drift sensors against a real DagsterInstance and a real Redis.

One module fixture builds a small world: the suite's pandas training set in Delta, the suite's trained bundle serving
as champion (in process), a different challenger registered in a SQLite MLflow, the newest snapshot in Redis, real
in-process answers of the champion with epsilon-greedy exploration logged through the impression stream, and seeded
clicks on what was shown landing in silver. The four monitoring assets then run in one real Dagster materialization.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis as redis_lib
from dagster import AssetKey, DagsterInstance, DagsterRun, DagsterRunStatus, build_sensor_context, materialize

from features.registry import BY_NAME, ITEM_STORE_COLUMNS, USER_STORE_COLUMNS, ranker_feature_names
from lake.delta import DeltaLake
from monitoring.health import (FreshnessThresholds, attribute_engagement, feature_quality, group_staleness,
                               prediction_entropy, stale_tiers)
from ground.settings import Settings
from tests._env import kairos_env
from tests._trainset import clean_events

EPSILON = 0.2
N_REQUESTS = 80
CLICK_P = {0: 0.5, 1: 0.3, 2: 0.3}  # by position; 0.1 below


def _click_probability(position: int) -> float:
    return CLICK_P.get(position, 0.1)


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_server, small_world, trainset, outcome):
    from assets.monitoring import feature_drift, feature_health, off_policy_evaluation, served_model_health
    from features.online import OnlineStore
    from assets.resources import ArtifactsResource, LakeResource, MlflowResource, RedisResource
    from serving.impressions import IMPRESSION_SCHEMA, ImpressionLogger, read_impressions
    from serving.pipeline import personalize
    from serving.rerank import RerankConfig
    from training.gates import GateResult
    from training.ranker import RankerConfig
    from training.registry import register_bundle
    from training.trainer import train_bundle
    from training.two_tower_config import TwoTowerConfig

    home = tmp_path_factory.mktemp("kairos-monitoring")
    env = contextlib.ExitStack()
    env.enter_context(kairos_env(home, redis_server.url))
    settings = Settings.from_env()
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushdb()
    lake = DeltaLake(settings.lake_uri)

    ts = trainset
    lake.write("training_set", ts)
    lake.write("catalog_items", small_world.items)
    # the serving model (the suite's shared bundle, in process: an MLflow registration costs seconds) and a genuinely
    # different challenger (other seeds, a smaller ranker) registered behind a failed gate: alias challenger only
    champion = outcome.bundle
    chall = train_bundle(ts, small_world.items, small_world.users, tt_config=TwoTowerConfig(epochs=1, seed=3),
                         ranker_config=RankerConfig(num_leaves=7, seed=3, num_boost_round=60))
    failed = GateResult(False, ["FAIL test: held back as challenger"], {})
    v2 = register_bundle(settings, chall.bundle.save(home / "b2"), chall.metrics, chall.params, {}, failed)
    v1 = champion.model_version

    # the newest feature values per user and item into Redis (as online_features would)
    latest = ts.sort_values("timestamp")
    users = latest.drop_duplicates("user_id", keep="last")[["user_id", *USER_STORE_COLUMNS]]
    item_cols = [c for c in ITEM_STORE_COLUMNS if c not in ("category", "publish_ts")]
    items = small_world.items[["item_id", "category", "publish_ts"]].merge(
        latest.drop_duplicates("item_id", keep="last")[["item_id", *item_cols]], on="item_id", how="left")
    OnlineStore(client).materialize(users, items, version=f"u0-i0-{int(ts['timestamp'].max())}")

    # real answers of the champion, with exploration, through the impression stream
    now_ms = int(ts["timestamp"].max()) + 3_600_000
    store = OnlineStore(client)
    logger = ImpressionLogger(client)
    user_ids = users["user_id"].tolist()
    for k in range(N_REQUESTS):
        body = {"user_id": user_ids[k % len(user_ids)], "surface": "home_feed",
                "context": {"session_id": f"mon-{k}", "device_type": "mobile", "timestamp_ms": now_ms + 1000 * k},
                "request_config": {"num_results": 10, "candidate_pool_size": 100}}
        personalize(body, champion, store, log_impression=logger, rerank=RerankConfig(epsilon=EPSILON),
                    request_id=f"req-{k:03d}")
    logger.flush()
    logger.close()
    served, _ = read_impressions(client)
    lake.write("impression_log", served.assign(batch_id="test"), schema=IMPRESSION_SCHEMA)

    # seeded clicks on what was shown, 30 s after the answer; plus one click by a stranger and one too late
    rng = np.random.default_rng(5)
    clicked = rng.random(len(served)) < served["position"].map(_click_probability).to_numpy()
    shown = served.assign(clicked=clicked.astype(int))
    cols = small_world.events.columns
    clicks = pd.DataFrame({"event_id": [f"click-{i}" for i in range(int(clicked.sum()))],
                           "user_id": shown.loc[clicked, "user_id"].to_numpy(),
                           "item_id": shown.loc[clicked, "item_id"].to_numpy(), "event_type": "click",
                           "timestamp": shown.loc[clicked, "request_ts"].to_numpy() + 30_000,
                           "session_id": shown.loc[clicked, "session_id"].to_numpy(),
                           "position": shown.loc[clicked, "position"].to_numpy(), "page_context": "home_feed",
                           "device_type": "mobile", "dwell_time_ms": 40_000, "schema_version": 1, "source": "test",
                           "received_at": shown.loc[clicked, "request_ts"].to_numpy() + 30_000})
    unclicked = shown[~clicked].iloc[0]
    noise = pd.DataFrame([
        {**clicks.iloc[0].to_dict(), "event_id": "stranger", "user_id": "not-the-viewer",
         "item_id": unclicked["item_id"], "timestamp": int(unclicked["request_ts"]) + 1000},
        {**clicks.iloc[0].to_dict(), "event_id": "too-late", "user_id": unclicked["user_id"],
         "item_id": unclicked["item_id"], "timestamp": int(unclicked["request_ts"]) + 73 * 3_600_000}])
    silver = pd.concat([clean_events(small_world.events)[cols], clicks[cols], noise[cols]], ignore_index=True)
    lake.write("silver_events", silver)

    resources = {"lake": LakeResource(root=settings.lake_uri), "redis": RedisResource(url=redis_server.url),
                 "mlflow": MlflowResource(), "artifacts": ArtifactsResource(root=str(home / "artifacts"))}
    instance = DagsterInstance.ephemeral()
    t0 = time.perf_counter()
    result = materialize([feature_drift, feature_health, served_model_health, off_policy_evaluation],
                         resources=resources, instance=instance,
                         run_config={"ops": {"off_policy_evaluation": {"config": {"epsilon": EPSILON}}}})
    seconds = time.perf_counter() - t0
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    yield {"settings": settings, "lake": lake, "client": client, "served": shown, "training_set": ts, "meta": meta,
           "checks": checks, "success": result.success, "resources": resources, "versions": (v1, v2),
           "seconds": seconds, "home": home}
    env.close()


def _v(meta, key):
    return meta[key].value


def test_assets_materialize_in_one_dagster_run(world) -> None:
    assert world["success"]
    assert set(world["meta"]) == {"feature_drift", "feature_health", "served_model_health", "off_policy_evaluation"}
    assert world["seconds"] < 60, world["seconds"]


def test_ranker_feature_drift_reports_every_feature_with_clickable_html(world) -> None:
    meta = world["meta"]["feature_drift"]
    # the drift sensor's contract is unchanged
    assert _v(meta, "status") in ("ok", "warn", "act", "insufficient_data") and isinstance(_v(meta, "max_psi"), float)
    assert _v(meta, "status") == _v(meta, "behaviour_status")  # ranker PSI reports, it does not act by default
    assert _v(meta, "ranker_current_source") == "impression_log"
    assert _v(meta, "ranker_n_current") == len(world["served"])
    ranker_psi = _v(meta, "ranker_psi")
    assert set(ranker_psi) == set(ranker_feature_names())
    statuses = _v(meta, "ranker_feature_status")
    assert statuses["day_of_week"] == "info" and statuses["embedding_affinity"] == "info"
    assert {s for f, s in statuses.items() if f not in ("day_of_week", "hour_of_day", "user_account_age_days",
                                                          "item_age_hours", "embedding_affinity")} <= {"ok", "warn", "act"}
    for f, s in statuses.items():
        if s in ("ok", "warn", "act"):
            assert s == ("act" if ranker_psi[f] >= 0.25 else "warn" if ranker_psi[f] >= 0.2 else "ok"), f
    for key in ("report", "ranker_report"):
        path = Path(meta[key].value)
        assert path.suffix == ".html" and path.stat().st_size > 10_000
    assert "user_ctr_30d" in path.read_text(errors="ignore")


def test_feature_health_groups_and_checks(world) -> None:
    meta = world["meta"]["feature_health"]
    groups = _v(meta, "groups")
    assert set(groups) == {"user", "item", "user_item", "session", "context"}
    ts = world["training_set"]
    recent = ts[ts["timestamp"] > ts["timestamp"].max() - 2 * 86_400_000]
    recent = recent[ts.loc[recent.index, "negative_kind"] != "easy"] if "negative_kind" in ts else \
        recent[~recent["event_id"].str.startswith("easy:")]  # health is measured on real rows, not sampled negatives
    # independent counts: a user with no snapshot row has every user store column missing
    assert _v(meta, "rows") == len(recent)
    assert groups["user"]["null_rate"] == pytest.approx(recent["user_clicks_7d"].isna().mean(), abs=1e-6)
    assert groups["item"]["null_rate"] == pytest.approx(recent["item_clicks_7d"].isna().mean(), abs=1e-6)
    assert groups["session"]["null_rate"] == 0.0 and groups["context"]["null_rate"] == 0.0
    assert all(g["out_of_range_rate"] == 0.0 for g in groups.values())
    assert all(g.get("served_out_of_range_rate", 0.0) == 0.0 for g in groups.values())
    # the snapshot was written seconds ago; nothing waits in the event stream
    assert 0 <= groups["user"]["staleness_s"] < 600 and groups["context"]["staleness_s"] == 0.0
    assert _v(meta, "stale_tiers") == "none"
    online = _v(meta, "online_null_rate")
    assert online["user.user_clicks_7d"] >= 0.0 and "item.co_items_30d" in online
    checks = world["checks"]
    assert checks["feature_nulls_within_threshold"].passed and checks["features_in_valid_range"].passed
    assert checks["online_features_fresh"].passed


def test_monitor_job_from_the_definitions_fails_checks_past_their_thresholds(world) -> None:
    from orchestration.definitions import defs

    # the real `monitor` job with the Definitions' own resources (lake, Redis, MLflow from the environment)
    result = defs.resolve_job_def("monitor").execute_in_process(
        instance=DagsterInstance.ephemeral(),
        run_config={"ops": {"feature_health": {"config": {"batch_max_age_s": 0.0, "max_null_rate": 0.01}},
                            "off_policy_evaluation": {"config": {"epsilon": EPSILON, "n_bootstrap": 100}}}})
    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["online_features_fresh"].passed
    assert checks["online_features_fresh"].metadata["stale_tiers"].value == "batch"
    assert not checks["feature_nulls_within_threshold"].passed  # users without a snapshot row exceed 1%
    assert checks["feature_nulls_within_threshold"].metadata["worst_group"].value in ("user", "user_item")
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert meta["off_policy_evaluation"]["status"].value == "estimated"
    assert meta["served_model_health"]["rows"].value == len(world["served"])


def test_served_model_health_ctr_scores_and_entropy(world) -> None:
    meta = world["meta"]["served_model_health"]
    v1, _ = world["versions"]
    served = world["served"]
    models = _v(meta, "models")
    assert set(models) == {v1}
    entry = models[v1]
    assert entry["requests"] == N_REQUESTS and entry["rows"] == len(served) and entry["two_stage_share"] == 1.0
    for k in (1, 3, 10):  # the seeded clicks, credited back by the labels' attribution rule
        expected = served.loc[served["position"] < k, "clicked"].mean()
        assert entry[f"ctr_at_{k}"] == pytest.approx(expected, abs=1e-6), k
        assert _v(meta, f"ctr_at_{k}.{v1}") == pytest.approx(expected, abs=1e-6)
    assert entry["ctr_at_1"] > entry["ctr_at_10"]
    assert _v(meta, "clicks") == int(served["clicked"].sum())  # the stranger's and the late click are not credited
    scores = entry["scores"]
    assert scores["n"] == len(served)
    assert scores["quantiles"]["p50"] == pytest.approx(np.quantile(served["score"], 0.5), abs=1e-6)
    assert sum(scores["histogram"]["counts"]) == len(served) and len(scores["histogram"]["edges"]) == 11
    assert 0 < entry["mean_binary_entropy_bits"] <= 1 and 0 < entry["mean_slate_entropy"] <= 1


def test_off_policy_evaluation_of_the_registered_challenger(world) -> None:
    meta = world["meta"]["off_policy_evaluation"]
    v1, v2 = world["versions"]
    served = world["served"]
    assert _v(meta, "status") == "estimated"
    assert _v(meta, "champion_version") == "none" and _v(meta, "challenger_version") == v2
    assert _v(meta, "logged_model_versions") == {v1: len(served)}
    assert _v(meta, "n") == len(served) and _v(meta, "n_requests") == N_REQUESTS
    assert _v(meta, "logged_value") == pytest.approx(served["clicked"].mean())
    assert _v(meta, "identifiable") is True and _v(meta, "epsilon") == EPSILON
    for name in ("ips", "clipped_ips", "snips"):
        assert _v(meta, f"{name}_lo") <= _v(meta, name) <= _v(meta, f"{name}_hi"), name
    assert 0 <= _v(meta, "snips") <= 1
    assert 1 <= _v(meta, "ess") <= len(served)
    assert _v(meta, "clipped_ips") <= _v(meta, "ips") + 1e-9


def test_freshness_sensor_against_real_redis_and_instance(world, monkeypatch) -> None:
    from orchestration.definitions import defs
    from assets.resources import RedisResource
    from streaming.job import STREAM, SessionStreamProcessor

    client = world["client"]
    sensor = defs.resolve_sensor_def("freshness_sensor")
    resources = {"redis": RedisResource(url=world["resources"]["redis"].url)}
    monkeypatch.delenv("KAIROS_FRESHNESS_BATCH_MAX_AGE_S", raising=False)
    monkeypatch.delenv("KAIROS_FRESHNESS_STREAMING_MAX_AGE_S", raising=False)
    with DagsterInstance.ephemeral() as instance:
        quiet = sensor.evaluate_tick(build_sensor_context(instance=instance, resources=resources))
        assert not quiet.run_requests and "fresh" in quiet.skip_message
        # batch: the snapshot is older than a 0-second limit -> refresh online_features, tagged with tier and age
        monkeypatch.setenv("KAIROS_FRESHNESS_BATCH_MAX_AGE_S", "0")
        loud = sensor.evaluate_tick(build_sensor_context(instance=instance, resources=resources))
        assert len(loud.run_requests) == 1
        req = loud.run_requests[0]
        assert req.tags["kairos/trigger"] == "freshness" and req.tags["kairos/stale_tiers"] == "batch"
        assert float(req.tags["kairos/stale_batch_age_s"]) >= 0 and req.tags["kairos/batch_max_age_s"] == "0"
        assert set(req.asset_selection) == {AssetKey("online_features"), AssetKey("feature_health")}
        # the next tick inside the minimum interval says so instead of stacking another refresh
        again = sensor.evaluate_tick(build_sensor_context(instance=instance, resources=resources, cursor=loud.cursor))
        assert not again.run_requests and "requested" in again.skip_message
        monkeypatch.delenv("KAIROS_FRESHNESS_BATCH_MAX_AGE_S")
        # streaming: an event has waited 10 minutes in the stream and the sessionizer has not applied it
        ten_min_ago = int(time.time() * 1000) - 600_000
        event = {"event_id": "fresh-1", "user_id": "u00001", "item_id": world["served"]["item_id"].iloc[0],
                 "event_type": "click", "timestamp": ten_min_ago, "session_id": "fresh-s", "position": 0,
                 "page_context": "home_feed", "device_type": "mobile", "dwell_time_ms": 1000, "schema_version": 1}
        client.xadd(STREAM, {"event": json.dumps(event)}, id=f"{ten_min_ago}-0")
        processor = SessionStreamProcessor(client, consumer_name="freshness-test")
        processor.ensure_group()
        stuck = sensor.evaluate_tick(build_sensor_context(instance=instance, resources=resources))
        req = stuck.run_requests[0]
        assert req.tags["kairos/stale_tiers"] == "streaming" and float(req.tags["kairos/stale_streaming_age_s"]) >= 599
        assert set(req.asset_selection) == {AssetKey("feature_health")}  # a stuck stream is a process to restart
        assert processor.process_once(count=10, block_ms=100) == 1
        caught_up = sensor.evaluate_tick(build_sensor_context(instance=instance, resources=resources))
        assert not caught_up.run_requests
    client.delete(STREAM)


def test_drift_sensor_min_interval_is_configurable(monkeypatch) -> None:
    from dagster import AssetMaterialization

    from orchestration.definitions import defs

    sensor = defs.resolve_sensor_def("drift_sensor")
    with DagsterInstance.ephemeral() as instance:
        instance.add_run(DagsterRun(job_name="retrain", run_id="retrain-just-now", status=DagsterRunStatus.SUCCESS))
        instance.report_runless_asset_event(AssetMaterialization("feature_drift", metadata={"status": "act",
                                                                                            "max_psi": 0.4}))
        monkeypatch.setenv("KAIROS_RETRAIN_MIN_INTERVAL_S", "3600")
        held = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
        assert not held.run_requests and "last retrain" in held.skip_message
        monkeypatch.setenv("KAIROS_RETRAIN_MIN_INTERVAL_S", "0")
        fired = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
        assert len(fired.run_requests) == 1
        assert fired.run_requests[0].tags["kairos/min_interval_s"] == "0"
        monkeypatch.setenv("KAIROS_RETRAIN_MIN_INTERVAL_S", "a day")
        with pytest.raises(Exception, match="KAIROS_RETRAIN_MIN_INTERVAL_S"):
            sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))


# --------------------------------------------------------------------------- pure functions
def test_feature_quality_counts_nulls_and_declared_ranges() -> None:
    rows = pd.DataFrame({"user_ctr_30d": [0.1, np.nan, 1.5, 0.2], "hour_of_day": [1.0, 2.0, 3.0, 30.0],
                         "session_clicks": [0.0, 1.0, -1.0, 2.0]})
    q = feature_quality(rows, ["user_ctr_30d", "session_clicks", "day_of_week"]).set_index("feature")
    assert q.loc["user_ctr_30d", "null_rate"] == 0.25 and q.loc["user_ctr_30d", "out_of_range_rate"] == pytest.approx(1 / 3)
    assert q.loc["session_clicks", "out_of_range_rate"] == 0.25  # a negative count
    assert q.loc["day_of_week", "null_rate"] == 1.0  # its input (request_ts) is absent: every row gets the default
    assert BY_NAME["hour_of_day"].valid_range == (0.0, 23.0)


def test_staleness_rules(monkeypatch) -> None:
    monkeypatch.setenv("KAIROS_FRESHNESS_BATCH_MAX_AGE_S", "7200")
    monkeypatch.delenv("KAIROS_FRESHNESS_STREAMING_MAX_AGE_S", raising=False)
    assert FreshnessThresholds.from_env() == FreshnessThresholds(7200.0, 120.0)
    assert FreshnessThresholds.from_env(batch_max_age_s=60).batch_max_age_s == 60.0  # asset config wins
    monkeypatch.setenv("KAIROS_FRESHNESS_STREAMING_MAX_AGE_S", "2 minutes")
    with pytest.raises(ValueError, match="KAIROS_FRESHNESS_STREAMING_MAX_AGE_S must be a number"):
        FreshnessThresholds.from_env()
    limits = FreshnessThresholds(batch_max_age_s=100, streaming_max_age_s=10)
    fresh = {"batch": {"age_s": 50.0}, "streaming": {"age_s": 0.0}}
    assert stale_tiers(fresh, limits) == {}
    assert stale_tiers({"batch": {"age_s": 150.0}, "streaming": {"age_s": 11.0}}, limits) == {"batch": 150.0,
                                                                                                "streaming": 11.0}
    assert stale_tiers({"batch": {"age_s": None}, "streaming": {"age_s": None}}, limits) == {"batch": math.inf}
    ages = group_staleness({"batch": 500.0, "streaming": 3.0})
    assert ages["user"] == 500.0 and ages["session"] == 3.0 and ages["context"] == 0.0 and ages["user_item"] == 500.0
    from orchestration.sensors import freshness_decision

    assert freshness_decision({}, None, 1000.0)[0] is False
    fire, reason = freshness_decision({"batch": 7200.0}, None, 1000.0)
    assert fire and "batch 7200s old" in reason
    assert freshness_decision({"batch": 7200.0}, 900.0, 1000.0, min_interval_s=3600)[0] is False
    assert "never written" in freshness_decision({"batch": math.inf}, None, 1.0)[1]


def test_attribution_follows_the_labels_rule() -> None:
    imp = pd.DataFrame({"request_id": ["r1", "r1", "r2"], "user_id": ["u1", "u1", "u1"], "item_id": ["a", "b", "a"],
                        "position": [0, 1, 0], "request_ts": [1_000, 1_000, 50_000]})
    events = pd.DataFrame({"event_id": ["e1", "e2", "e3"], "user_id": ["u1", "u2", "u1"], "item_id": ["a", "b", "b"],
                           "event_type": ["click", "click", "click"], "timestamp": [60_000, 2_000, 1_000 + 10_000],
                           "dwell_time_ms": [40_000, 40_000, 1_000]})
    short = attribute_engagement(imp, events, window_ms=5_000)
    assert short["clicked"].tolist() == [0, 0, 0]  # both clicks came 10 s after their impression: past a 5 s window
    out = attribute_engagement(imp, events, window_ms=15_000)
    # e1 goes to the latest impression of (u1, a) before it (r2, not r1); e2 is another user's click; e3 credits
    # (u1, b) as a click, but a 1 s dwell scores 0.1: below the positive label's 0.3
    assert out["clicked"].tolist() == [0, 1, 1]
    assert out["label_binary"].tolist() == [0, 0, 1] and out["label"].tolist() == [0.0, 0.1, 0.6]
    assert not out["window_closed"].iloc[2]  # no event after r2's window end has arrived yet


def test_prediction_entropy() -> None:
    flat = prediction_entropy(np.full(4, 0.5), np.array(["r"] * 4))
    assert flat["mean_binary_entropy_bits"] == pytest.approx(1.0) and flat["mean_slate_entropy"] == pytest.approx(1.0)
    sure = prediction_entropy(np.array([0.999, 0.001, 0.001, 0.001]), np.array(["r"] * 4))
    assert sure["mean_binary_entropy_bits"] < 0.05 and sure["mean_slate_entropy"] < 0.1
