"""The closed loop, end to end, on real services.

A small simulated world is materialized and served (champion v1). Then the simulator's users shift
their tastes; the shifted days are ingested; `feature_drift` (Evidently PSI) passes the act threshold;
`drift_sensor`, evaluated against the real Dagster instance, requests the retrain job with the reason
in its tags; the retrain run passes the gate with `auto_promote: false`, so v2 enters the staged rollout.
A real BentoML server reads the rollout stage from MLflow on its refresh loop: it scores v2 in shadow,
the `rollout` job compares shadow and champion and starts a canary (half the users, by hash bucket),
simulated users click what they like (the simulator's click model with the shifted tastes) through
POST /v1/events, and the `rollout` job promotes v2 (old champion kept as `previous_champion`).
Then a deliberately broken ranker (trained on inverted labels) is refused by the gate; registered under
a loosened gate it passes shadow, and the canary's CTR guardrail rolls it back: the champion never
moves. Finally `rollback` restores the previous champion and the server serves it within seconds.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, build_sensor_context

from lake.delta import DeltaLake
from orchestration.cli import data_clock_ms, materialize_all
from orchestration.services import EmbeddedRedis, free_port
from ground.settings import Settings
from tests._env import SERVER_ENV, fresh_home

pytestmark = pytest.mark.e2e

WORLD = {"source": "simulator", "n_users": 150, "n_items": 200, "days": 10, "seed": 3}
SHIFTED = {**WORLD, "days": 13, "shift_day": 10}  # three more days, user tastes move toward one category
# Right after a sharp trend, popularity (of the trending items) is hard to beat at NDCG@10 until the trend
# fills the training window: the retrain may trail it by up to 15% here. It must still not lose AUC to the
# champion re-scored on the same shifted window (the default 0.005). The latency budget is loosened for a
# 2-core machine shared with other jobs. auto_promote off: the version goes through shadow and canary.
GATE = {"validation_gate": {"config": {"auto_promote": False, "min_ndcg_lift_over_popularity": -0.15,
                                       "min_lift_over_best_baseline": -0.15, "max_p99_scoring_ms": 100.0}}}
# a 150-user world has ~90 sessions a day: the drift windows' minimum is lowered to what this world can fill
DRIFT = {"feature_drift": {"config": {"min_sessions": 150}}}
ROLLOUT = {"shadow_report": {"config": {"min_requests": 30}},
           # p99 budget for a 2-core machine shared with other jobs; the CTR guardrail is the one under test
           "canary_evaluation": {"config": {"min_requests": 40, "min_impressions": 300, "max_p99_latency_ms": 250.0}},
           "rollout_decision": {"config": {"canary_share": 0.5}}}


@pytest.fixture(scope="module")
def loop_env(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis):
    home = tmp_path_factory.mktemp("kairos-loop")
    with fresh_home(home, redis_server.url) as settings:
        yield settings


def _ingest(instance: DagsterInstance, source: dict) -> None:
    """The shifted source's days through the ingest job, then its catalog and the drift check."""
    from dagster import materialize

    from assets.ingestion import SourceConfig, catalog, source_partitions
    from assets.monitoring import feature_drift
    from orchestration.definitions import defs
    from assets.resources import ArtifactsResource, LakeResource

    days = source_partitions(SourceConfig(**source))
    defs.resolve_job_def("ingest_events").execute_in_process(
        instance=instance, run_config={"ops": {"bronze_events": {"config": source}}}, raise_on_error=True,
        tags={"dagster/asset_partition_range_start": days[0], "dagster/asset_partition_range_end": days[-1]})
    materialize([catalog, feature_drift], instance=instance, raise_on_error=True,
                resources={"lake": LakeResource(), "artifacts": ArtifactsResource()},
                run_config={"ops": {"catalog": {"config": source}, **DRIFT}})


def _rollout(instance: DagsterInstance) -> dict:
    from orchestration.definitions import defs

    result = defs.resolve_job_def("rollout").execute_in_process(instance=instance, run_config={"ops": ROLLOUT},
                                                                raise_on_error=True)
    return result.output_for_node("rollout_decision")


class Users:
    """The simulator's click model with the shifted tastes: half of every user's taste on the trend category."""

    def __init__(self, source: dict, seed: int = 5) -> None:
        from ingestion.simulator import SimulatorConfig, build_world

        cfg = SimulatorConfig(n_users=source["n_users"], n_items=source["n_items"], days=source["days"],
                              seed=source["seed"], shift_day=source["shift_day"])
        world = build_world(cfg)
        trend = np.zeros(cfg.n_categories)
        trend[-1] = 1.0
        self.tastes = 0.5 * world.tastes + 0.5 * trend
        self.quality, self.cat = world.item_quality, world.item_cat
        self.position_decay = cfg.position_decay
        self.rng = np.random.default_rng(seed)

    def clicks(self, answer: dict, ts: int, session_id: str) -> list[dict]:
        u = int(answer["user_id"][1:])
        out = []
        for it in answer["ranked_items"]:
            i = int(it["item_id"][1:])
            rel = self.quality[i] + 3.0 * self.tastes[u, self.cat[i]]
            if self.rng.random() < self.position_decay ** (it["rank"] - 1) / (1.0 + np.exp(-(rel - 2.2))):
                out.append({"event_id": f"loop-{session_id}-{it['item_id']}", "user_id": answer["user_id"],
                            "item_id": it["item_id"], "event_type": "click", "timestamp": ts + 2000,
                            "session_id": session_id, "position": it["rank"] - 1, "page_context": "home_feed",
                            "device_type": "mobile", "dwell_time_ms": 20_000, "schema_version": 1})
        return out


def _traffic(http: httpx.Client, users: list[str], now: int, tag: str, clicker: Users | None = None) -> list[dict]:
    answers, events = [], []
    for k, uid in enumerate(users):
        ts = now + 1000 * k
        session = f"{tag}-{k}"
        r = http.post("/v1/personalize", json={"user_id": uid, "surface": "home_feed",
                                               "context": {"session_id": session, "device_type": "mobile",
                                                           "timestamp_ms": ts},
                                               "request_config": {"num_results": 10}})
        assert r.status_code == 200, r.text
        answers.append(r.json())
        if clicker is not None:
            events += clicker.clicks(answers[-1], ts, session)
    for start in range(0, len(events), 500):  # the clicks come back through the real event intake
        r = http.post("/v1/events", json={"events": events[start:start + 500]})
        assert r.status_code == 200 and not r.json().get("errors"), r.text
    return answers


def _wait(predicate, timeout_s: float = 60, what: str = "") -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < timeout_s:
        if predicate():
            return time.perf_counter() - t
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _status(http: httpx.Client) -> dict:
    return http.post("/v1/status", json={}).json()


def _flush(http: httpx.Client) -> None:
    """Wait until the server's impression logger has written everything (shadow scoring included)."""
    def idle() -> bool:
        stats = http.post("/v1/status", json={}).json()["impressions"]
        return stats["queued"] == 0
    time.sleep(1.0)
    _wait(idle, 30, "the impression log to drain")
    time.sleep(0.5)


def _broken_bundle(settings: Settings, tmp: Path):
    """The champion's bundle with a ranker trained on inverted labels: it ranks what users like last."""
    import lightgbm as lgb

    from features.functions import assemble_features
    from models.registry import load_alias
    from training.evaluation import bundle_two_tower
    from training.ranker import add_embedding_affinity

    champion = load_alias(settings, "champion")
    frame = DeltaLake(settings.lake_uri).read("training_set")
    train = frame[frame["split"] == "train"].drop(columns=["embedding_affinity"], errors="ignore")
    x = assemble_features(add_embedding_affinity(train, bundle_two_tower(champion)))
    cols = champion.manifest["ranker_features"]
    booster = lgb.train({"objective": "binary", "verbose": -1, "seed": 7, "num_threads": 1, "learning_rate": 0.1},
                        lgb.Dataset(x[cols].to_numpy(float), label=1 - train["label_binary"].to_numpy(), feature_name=cols),
                        num_boost_round=60)
    broken = dataclasses.replace(champion, ranker=booster, model_version="unregistered")
    return champion, broken, broken.save(tmp / "broken_bundle"), frame


@pytest.mark.xfail(strict=False, reason="open defect (issue 14): drift now acts and the sensor requests the retrain, "
                   "but the retrained model fails the catalog gate on the 3-day shifted world (served without exploration "
                   "NDCG@10 0.087 vs popularity 0.121, lift -28%; the test allows -15%); see the closing notes of 2026-12-02")
def test_drift_retrain_shadow_canary_promote_then_refuse_a_broken_model(loop_env: Settings, tmp_path: Path) -> None:
    from models.registry import mlflow_client
    from models.rollout import CANARY_STAGE, PROMOTED, ROLLED_BACK, SHADOW, canary_experiment_name, rollout_state
    from orchestration.definitions import defs
    from serving.experiments import CANARY_ARM, Experiment, assign
    from serving.server import start_server, stop_server, wait_ready
    from training.evaluation import evaluate_bundle
    from training.gates import GateConfig, evaluate_gate
    from training.registry import register_bundle
    from training.rollout import rollback

    settings = loop_env
    t0 = time.perf_counter()
    run = materialize_all(settings, WORLD, build_ops=DRIFT)
    assert run["success"]
    v1 = rollout_state(settings).champion
    assert v1 is not None
    instance = DagsterInstance.get()
    t_world = time.perf_counter() - t0
    before = instance.get_latest_materialization_event(AssetKey("feature_drift")).asset_materialization.metadata

    # ---- 1. tastes shift; the shifted days come in; PSI passes the act threshold
    _ingest(instance, SHIFTED)
    drift = instance.get_latest_materialization_event(AssetKey("feature_drift")).asset_materialization.metadata
    assert drift["status"].value == "act" and drift["max_psi"].value >= 0.25, drift["max_psi"].value
    assert drift["max_psi"].value > 2 * before["max_psi"].value, (before["max_psi"].value, drift["max_psi"].value)
    assert "cat_share_cat_07" in drift["drifted_features"].value  # the trend category moved

    # ---- 2. the drift sensor, evaluated against the real instance, requests the retrain job
    tick = defs.resolve_sensor_def("drift_sensor").evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
    assert len(tick.run_requests) == 1, tick.skip_message
    request = tick.run_requests[0]
    assert request.tags["kairos/trigger"] == "drift" and "passed the act threshold" in request.tags["kairos/reason"]
    assert request.job_name in (None, "retrain")

    # ---- 3. the retrain run passes the gate; with auto_promote off, v2 enters shadow
    retrain = defs.resolve_job_def("retrain").execute_in_process(instance=instance, tags=request.tags,
                                                                 run_config={"ops": GATE}, raise_on_error=True)
    gate = retrain.output_for_node("validation_gate")
    assert gate.passed, gate.reasons
    v2 = retrain.output_for_node("registered_model")
    state = rollout_state(settings)
    assert (state.stage, state.version, state.champion) == (SHADOW, v2, v1)
    t_pipeline = time.perf_counter() - t0

    # ---- 4. a real server follows the registry: shadow, canary, promotion
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "KAIROS_MODEL_POLL_S": "0.5", "KAIROS_ACCESS_LOG": "0"}
    proc = start_server(port, env=env)
    users = DeltaLake(settings.lake_uri).read("catalog_users", columns=["user_id"])["user_id"].tolist()
    clicker = Users(SHIFTED)
    now = data_clock_ms(settings)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout_s=240, proc=proc)
        with httpx.Client(base_url=base, timeout=30) as http:
            _wait(lambda: _status(http)["challenger_version"] == v2, 60, "the server to load v2 in shadow")
            assert _status(http)["rollout"]["shadow"] and _status(http)["rollout"]["source"] == "registry"
            answers = _traffic(http, users[:40], now, "shadow")
            assert {a["model_version"] for a in answers} == {v1} and all(a["served_by"] == "two_stage" for a in answers)
            _flush(http)
            out = _rollout(instance)
            assert out["action"] == "start_canary", out["reason"]
            assert rollout_state(settings).stage == CANARY_STAGE

            canary = Experiment(canary_experiment_name(v2), 0.5, treatment_arm=CANARY_ARM)
            in_canary = next(u for u in users if assign(canary, u) == CANARY_ARM)
            probe = lambda: _traffic(http, [in_canary], now, f"probe-{time.time()}")[0]  # noqa: E731
            _wait(lambda: probe().get("experiment", {}).get("arm") == CANARY_ARM, 30, "the server to start the canary")
            answers = _traffic(http, users * 2, now + 10_000_000, "canary", clicker)
            arms = {a["experiment"]["arm"] for a in answers}
            assert arms == {"champion", CANARY_ARM}
            assert {a["model_version"] for a in answers if a["experiment"]["arm"] == CANARY_ARM} == {v2}
            _flush(http)
            out = _rollout(instance)
            assert out["action"] == "promote", out["reason"]
            state = rollout_state(settings)
            assert (state.stage, state.champion, state.previous_champion) == (PROMOTED, v2, v1)
            _wait(lambda: probe()["model_version"] == v2, 30, "the server to serve the new champion")

            # ---- 5. a broken model: the gate refuses it ...
            champion, broken, broken_dir, frame = _broken_bundle(settings, tmp_path)
            run_metrics = mlflow_client(settings).get_run(
                mlflow_client(settings).get_model_version(settings.model_name, v2).run_id).data.metrics
            popularity = {"ndcg_at_10": run_metrics["test.popularity.ndcg_at_10"]}
            candidate, champ = evaluate_bundle(frame, broken), evaluate_bundle(frame, champion)
            metrics = {"two_stage": candidate, "popularity": popularity, "champion": champ}
            refused = evaluate_gate(candidate, popularity, champ, GateConfig())
            assert not refused.passed and candidate["auc"] < champ["auc"] - 0.05, refused.reasons
            v3 = register_bundle(settings, broken_dir, metrics, {}, {"kairos/test": "broken"}, refused, auto_promote=False)
            state = rollout_state(settings)
            assert state.champion == v2 and state.stage == PROMOTED and state.aliases["challenger"] == v3

            # ... and under a loosened gate it passes shadow but the canary rolls it back
            loose = evaluate_gate(candidate, popularity, champ,
                                  GateConfig(min_ndcg_lift_over_popularity=-1.0, max_auc_drop_vs_champion=1.0))
            assert loose.passed
            v4 = register_bundle(settings, broken_dir, metrics, {}, {"kairos/test": "broken"}, loose, auto_promote=False)
            assert rollout_state(settings).stage == SHADOW
            _wait(lambda: _status(http)["challenger_version"] == v4, 60, "the server to load v4 in shadow")
            _traffic(http, users[:40], now + 20_000_000, "shadow-broken")
            _flush(http)
            out = _rollout(instance)
            assert out["action"] == "start_canary", out["reason"]  # no errors, scores vary: shadow lets it through
            canary = Experiment(canary_experiment_name(v4), 0.5, treatment_arm=CANARY_ARM)
            in_canary = next(u for u in users if assign(canary, u) == CANARY_ARM)
            _wait(lambda: probe().get("experiment", {}).get("arm") == CANARY_ARM, 30, "the broken canary")
            _traffic(http, users * 2, now + 30_000_000, "canary-broken", clicker)
            _flush(http)
            out = _rollout(instance)
            assert out["action"] == "abort_canary" and "FAIL ctr" in out["reason"], out["reason"]
            state = rollout_state(settings)
            assert (state.stage, state.version, state.champion) == (ROLLED_BACK, v4, v2) and "canary" not in state.aliases
            _wait(lambda: "experiment" not in probe(), 30, "the server to drop the canary")
            assert probe()["model_version"] == v2

            # ---- 6. rollback: the previous champion serves again within seconds
            t = time.perf_counter()
            flip = rollback(settings, reason="loop test")
            served = _wait(lambda: probe()["model_version"] == v1, 30, "the server to serve the previous champion")
            print(f"\nloop: world {t_world:.0f}s, drift->retrain->registered {t_pipeline - t_world:.0f}s; "
                  f"rollback alias flip {flip['seconds'] * 1000:.0f} ms, served by the server after "
                  f"{time.perf_counter() - t:.2f}s")
            assert flip["champion"] == v1 and flip["seconds"] < 2.0 and served < 10
    finally:
        stop_server(proc)
