"""Staged rollout: pure shadow/canary decisions, alias flips in a real MLflow registry (with the
rollback time printed), and the rollout assets run by Dagster over a real Delta impression log and
clicks in a real Redis stream."""
from __future__ import annotations

import json
import tempfile
import time

import numpy as np
import pandas as pd
import pytest

from models.rollout import (CANARY_STAGE, PROMOTED, REFUSED, ROLLED_BACK, SHADOW, RolloutState, canary_experiment_name,
                            rollout_state)
from serving.experiments import CANARY_ARM, CHALLENGER_ARM, Experiment, assign, serving_plan
from training.rollout import (HOLD, PROCEED, PROMOTE, REFUSE, ROLLBACK, ArmMetrics, Guardrails, ShadowGuardrails,
                              Verdict, arm_metrics, canary_verdict, compare_shadow, next_action, promote, rollback,
                              shadow_inputs, shadow_verdict, start_canary, start_rollout)


# ------------------------------------------------------------------------------------------- shadow
def _lists(n: int, rng: np.random.Generator, shuffle: bool) -> tuple[list[list[str]], list[list[str]]]:
    a, b = [], []
    for _ in range(n):
        items = [f"i{k}" for k in rng.permutation(50)[:10]]
        a.append(items)
        b.append(list(rng.permutation(items)) if shuffle else list(items))
    return a, b


def test_compare_shadow_measures_distribution_and_list_agreement() -> None:
    rng = np.random.default_rng(0)
    champ = rng.beta(2, 5, 2000)
    a, b = _lists(100, rng, shuffle=False)
    same = compare_shadow(champ, rng.beta(2, 5, 2000), a, b)
    assert same.score_psi < 0.05 and same.score_ks < 0.06
    assert same.overlap_at_k == 1.0 and same.rank_correlation == pytest.approx(1.0) and same.requests == 100
    a, b = _lists(100, rng, shuffle=True)
    moved = compare_shadow(champ, rng.beta(5, 2, 2000), a, b)
    assert moved.score_psi > 1.0 and moved.score_ks > 0.5
    assert moved.overlap_at_k == 1.0 and abs(moved.rank_correlation) < 0.2  # same items, unrelated order
    disjoint = compare_shadow(champ, champ, [["a", "b"]], [["c", "d"]])
    assert disjoint.overlap_at_k == 0.0 and np.isnan(disjoint.rank_correlation)


def test_shadow_verdict_refuses_broken_challengers_and_waits_for_traffic() -> None:
    rng = np.random.default_rng(1)
    champ = rng.random(500)
    a, b = _lists(40, rng, shuffle=True)
    ok = shadow_verdict(compare_shadow(champ, rng.random(500), a, b), shadow_errors=0)
    assert ok.decision == PROCEED and any(r.startswith("PASS") for r in ok.reasons)
    few = shadow_verdict(compare_shadow(champ, rng.random(500), a[:5], b[:5]), shadow_errors=0)
    assert few.decision == HOLD and "need 30" in few.reasons[-1]
    constant = shadow_verdict(compare_shadow(champ, np.full(500, 0.3), a, b), shadow_errors=0)
    assert constant.decision == REFUSE and "degenerate_scores" in " ".join(constant.reasons)
    failing = shadow_verdict(compare_shadow(champ, rng.random(500), a, b), shadow_errors=10)
    assert failing.decision == REFUSE and "fell back" in failing.reasons[0]
    strict = shadow_verdict(compare_shadow(champ, rng.beta(8, 1, 500), a, b), 0, ShadowGuardrails(max_score_psi=0.5))
    assert strict.decision == REFUSE and "score_shift" in strict.reasons[0]


# ------------------------------------------------------------------------------------------- canary
def _arms(canary: ArmMetrics, champion: ArmMetrics | None = None) -> dict[str, ArmMetrics]:
    return {"champion": champion or ArmMetrics(900, 2, 4.0, 12.0, 9000, 1800), "canary": canary}


def test_canary_verdict_promotes_holds_and_rolls_back_with_reasons() -> None:
    g = Guardrails()
    good = canary_verdict(_arms(ArmMetrics(100, 0, 4.1, 13.0, 1000, 205)), g)
    assert good.decision == PROMOTE and all(r.startswith("PASS") for r in good.reasons), good.reasons
    early = canary_verdict(_arms(ArmMetrics(20, 0, 4.0, 12.0, 200, 40)), g)
    assert early.decision == HOLD and early.reasons[0].startswith("HOLD sample")
    errors = canary_verdict(_arms(ArmMetrics(100, 9, 4.0, 12.0, 1000, 200)), g)
    assert errors.decision == ROLLBACK and any(r.startswith("FAIL error_rate") for r in errors.reasons)
    slow = canary_verdict(_arms(ArmMetrics(100, 0, 30.0, 80.0, 1000, 200)), g)
    assert slow.decision == ROLLBACK and any(r.startswith("FAIL p99_latency") for r in slow.reasons)
    # an overloaded machine slows both arms alike: not the canary's fault
    both_slow = canary_verdict(_arms(ArmMetrics(100, 0, 30.0, 80.0, 1000, 200), ArmMetrics(900, 2, 30, 70.0, 9000, 1800)), g)
    assert both_slow.decision == PROMOTE
    worse_ctr = canary_verdict(_arms(ArmMetrics(100, 0, 4.0, 12.0, 1000, 120)), g)
    assert worse_ctr.decision == ROLLBACK and any(r.startswith("FAIL ctr") for r in worse_ctr.reasons)
    assert worse_ctr.checks["ctr_p_value"] < 0.05
    # a 12% drop on a small sample is not significant: no rollback on noise
    noisy = canary_verdict(_arms(ArmMetrics(60, 0, 4.0, 12.0, 310, 55)), g)
    assert noisy.decision == PROMOTE and noisy.checks["ctr_relative_drop"] > 0.10
    no_canary = canary_verdict({"champion": ArmMetrics(900, 0, 4, 12, 9000, 1800)}, g)
    assert no_canary.decision == HOLD


def test_next_action_walks_the_stages() -> None:
    shadow = RolloutState(SHADOW, "2", aliases={"champion": "1", "challenger": "2"})
    canary = RolloutState(CANARY_STAGE, "2", 0.1, aliases={"champion": "1", "canary": "2"})
    assert next_action(shadow, Verdict(PROCEED, ["PASS shadow"]), None)[0] == "start_canary"
    assert next_action(shadow, Verdict(REFUSE, ["FAIL errors: x"]), None) == ("refuse", "shadow refused: FAIL errors: x")
    assert next_action(shadow, Verdict(HOLD, ["HOLD sample"]), None)[0] == "none"
    assert next_action(canary, None, Verdict(PROMOTE, ["PASS"]))[0] == "promote"
    assert next_action(canary, None, Verdict(ROLLBACK, ["FAIL ctr: y", "PASS z"])) == ("abort_canary", "canary breached: FAIL ctr: y")
    assert next_action(RolloutState(PROMOTED, "2"), None, None)[0] == "none"
    assert next_action(RolloutState(PROMOTED, "2", aliases={"champion": "2"}), None, None, force_rollback=True)[0] == "none"
    assert next_action(RolloutState(PROMOTED, "2", aliases={"champion": "2", "previous_champion": "1"}), None, None,
                       force_rollback=True)[0] == "rollback_champion"


def test_serving_plan_follows_the_registry_unless_env_overrides() -> None:
    none = serving_plan(None, False, RolloutState())
    assert none.experiment is None and not none.shadow and not none.needs_candidate
    shadow = serving_plan(None, False, RolloutState(SHADOW, "7"))
    assert shadow.shadow and shadow.candidate_alias == CHALLENGER_ARM and shadow.experiment is None
    canary = serving_plan(None, False, RolloutState(CANARY_STAGE, "7", 0.2))
    assert canary.candidate_alias == CANARY_ARM and canary.experiment.name == canary_experiment_name("7")
    users = [f"u{k:05d}" for k in range(5000)]
    share = sum(assign(canary.experiment, u) == CANARY_ARM for u in users) / len(users)
    assert 0.17 < share < 0.23
    assert serving_plan(None, False, RolloutState(CANARY_STAGE, "7", 0.2), env_canary_share=0.5).experiment.challenger_share == 0.5
    env = serving_plan(Experiment("ranker-v2", 0.1), False, RolloutState(CANARY_STAGE, "7", 0.2))
    assert env.source == "env" and env.experiment.name == "ranker-v2" and env.candidate_alias == CHALLENGER_ARM


# ------------------------------------------------------------------------------------------- registry
def _versions(settings, n: int) -> list[str]:
    from models.registry import mlflow_client

    client = mlflow_client(settings)
    client.create_registered_model(settings.model_name)
    return [str(client.create_model_version(settings.model_name, source=tempfile.mkdtemp()).version) for _ in range(n)]


def test_alias_flips_promote_rollback_in_milliseconds(settings) -> None:
    v1, v2, v3 = _versions(settings, 3)
    assert rollout_state(settings).stage == "none"
    assert start_rollout(settings, v1) == PROMOTED  # no champion yet: nothing to shadow against
    assert rollout_state(settings).champion == v1 and rollout_state(settings).previous_champion is None
    assert start_rollout(settings, v2) == SHADOW
    state = rollout_state(settings)
    assert (state.stage, state.version, state.champion) == (SHADOW, v2, v1)
    start_canary(settings, v2, 0.1, reason="shadow passed")
    state = rollout_state(settings)
    assert (state.stage, state.canary_share, state.aliases["canary"]) == (CANARY_STAGE, 0.1, v2)
    with pytest.raises(ValueError, match="canary share"):
        start_canary(settings, v2, 0.0)
    out = promote(settings, v2, reason="canary passed")
    state = rollout_state(settings)
    assert (state.champion, state.previous_champion, state.stage) == (v2, v1, PROMOTED) and "canary" not in state.aliases
    assert out["previous_champion"] == v1

    timings = []
    for _ in range(5):  # flip back and forth: each rollback restores the previous champion
        promote(settings, v3 if rollout_state(settings).champion != v3 else v2)
        before = rollout_state(settings)
        t = time.perf_counter()
        done = rollback(settings, reason="test")
        timings.append(time.perf_counter() - t)
        after = rollout_state(settings)
        assert after.champion == before.previous_champion == done["champion"] and done["demoted"] == before.champion
        assert after.stage == ROLLED_BACK and after.previous_champion is None
    print(f"\nrollback (champion <- previous_champion, MLflow SQLite): median {np.median(timings) * 1000:.1f} ms, "
          f"max {max(timings) * 1000:.1f} ms over {len(timings)} flips")
    assert max(timings) < 1.0
    with pytest.raises(RuntimeError, match="nothing to roll back to"):
        rollback(settings)


# ------------------------------------------------------------------------------------------- the assets, in Dagster
def _impressions(requests: list[dict]) -> pd.DataFrame:
    rows = []
    for r in requests:
        for pos, (item, score) in enumerate(zip(r["items"], r["scores"])):
            rows.append({"stream_id": f"{r['ts']}-0", "request_id": r["id"], "user_id": r["user"], "session_id": "s",
                         "device_type": "mobile", "request_ts": r["ts"], "model_version": r["version"],
                         "feature_version": "f1", "served_by": r.get("served_by", "two_stage"), "item_id": item,
                         "position": pos, "score": float(score), "propensity": 1.0, "features": None,
                         "experiment": r.get("experiment"), "arm": r.get("arm"), "shadow": r.get("shadow", False),
                         "latency_ms": r.get("latency", 4.0), "team": None, "batch_id": "b"})
    return pd.DataFrame(rows)


def _materialize(tmp_path, redis_server, run_config: dict | None = None) -> dict:
    from dagster import DagsterInstance, materialize

    from assets.rollout import canary_evaluation, rollout_decision, shadow_report
    from assets.resources import LakeResource, MlflowResource, RedisResource

    with DagsterInstance.ephemeral() as instance:
        result = materialize([shadow_report, canary_evaluation, rollout_decision], instance=instance,
                             resources={"lake": LakeResource(root=str(tmp_path / "lake")), "mlflow": MlflowResource(),
                                        "redis": RedisResource(url=redis_server.url)},
                             run_config={"ops": run_config or {}})
        assert result.success
        return result.output_for_node("rollout_decision")


def _write_log(tmp_path, frame: pd.DataFrame) -> None:
    from lake.delta import DeltaLake
    from serving.impressions import IMPRESSION_SCHEMA

    DeltaLake(str(tmp_path / "lake")).write("impression_log", frame, schema=IMPRESSION_SCHEMA, mode="overwrite")


def test_rollout_assets_take_a_version_from_shadow_to_champion_and_roll_back_a_bad_canary(
        settings, tmp_path, redis_server, redis_client) -> None:
    from streaming.job import publish

    v1, v2, v3 = _versions(settings, 3)
    promote(settings, v1)
    start_rollout(settings, v2)
    rng = np.random.default_rng(3)
    # ---- shadow: the challenger scored beside the champion on 40 requests
    reqs = []
    for k in range(40):
        items = [f"i{j}" for j in rng.permutation(30)[:10]]
        reqs.append({"id": f"r{k}", "user": f"u{k}", "ts": 1000 + k, "version": v1, "items": items,
                     "scores": np.sort(rng.random(10))[::-1]})
        reqs.append({"id": f"r{k}:shadow", "user": f"u{k}", "ts": 1000 + k, "version": v2, "shadow": True,
                     "arm": "challenger", "items": list(rng.permutation(items)), "scores": np.sort(rng.random(10))[::-1]})
    _write_log(tmp_path, _impressions(reqs))
    inputs = shadow_inputs(_impressions(reqs), v2)
    assert len(inputs["champion_lists"]) == 40 and inputs["shadow_errors"] == 0
    out = _materialize(tmp_path, redis_server, {"rollout_decision": {"config": {"canary_share": 0.25}}})
    assert out["action"] == "start_canary" and out["stage"] == CANARY_STAGE, out
    state = rollout_state(settings)
    assert state.aliases["canary"] == v2 and state.canary_share == 0.25

    # ---- canary: both arms serve; users click the canary's items as often as the champion's
    def canary_traffic(version: str, n: int, canary_ctr: float, canary_error: float = 0.0) -> tuple[list[dict], list[dict]]:
        reqs, clicks = [], []
        for k in range(n):
            arm = "canary" if k % 4 == 0 else "champion"
            items = [f"i{j}" for j in rng.permutation(30)[:10]]
            ts = 50_000 + 1000 * k
            failed = arm == "canary" and rng.random() < canary_error
            reqs.append({"id": f"c{version}-{k}", "user": f"u{k}", "ts": ts, "version": version if arm == "canary" else v1,
                         "experiment": canary_experiment_name(version), "arm": arm, "items": items,
                         "scores": np.sort(rng.random(10))[::-1],
                         "served_by": "popularity_fallback:model_error" if failed else "two_stage"})
            ctr = canary_ctr if arm == "canary" else 0.2
            clicks += [{"event_id": f"clk-{version}-{k}-{it}", "user_id": f"u{k}", "item_id": it, "event_type": "click",
                        "timestamp": ts + 500, "session_id": "s", "position": p, "page_context": "home_feed",
                        "device_type": "mobile", "dwell_time_ms": 5000, "schema_version": 1}
                       for p, it in enumerate(items) if rng.random() < ctr]
        return reqs, clicks

    reqs, clicks = canary_traffic(v2, 600, canary_ctr=0.2)
    publish(redis_client, clicks)
    _write_log(tmp_path, _impressions(reqs))
    metrics = arm_metrics(_impressions(reqs), pd.DataFrame(clicks), 60_000, experiment=canary_experiment_name(v2))
    assert metrics["canary"].requests == 150 and metrics["champion"].requests == 450
    assert metrics["canary"].clicks == sum(1 for c in clicks if int(c["event_id"].split("-")[2]) % 4 == 0)
    out = _materialize(tmp_path, redis_server)
    assert out["action"] == "promote", out["reason"]
    state = rollout_state(settings)
    assert (state.champion, state.previous_champion, state.stage) == (v2, v1, PROMOTED)
    assert "canary" not in state.aliases

    # ---- a canary that fails on 20% of its requests and loses clicks is rolled back; the champion stays
    start_rollout(settings, v3)
    start_canary(settings, v3, 0.25)
    redis_client.delete("kairos:events")
    reqs, clicks = canary_traffic(v3, 600, canary_ctr=0.1, canary_error=0.2)
    publish(redis_client, clicks)
    _write_log(tmp_path, _impressions(reqs))
    out = _materialize(tmp_path, redis_server)
    assert out["action"] == "abort_canary" and "FAIL error_rate" in out["reason"] and "FAIL ctr" in out["reason"]
    state = rollout_state(settings)
    assert (state.champion, state.stage, state.version) == (v2, ROLLED_BACK, v3) and "canary" not in state.aliases

    # ---- a shadowed version whose answers all fall back is refused before any user sees it
    start_rollout(settings, v3)
    bad = [{"id": f"r{k}:shadow", "user": f"u{k}", "ts": 1000 + k, "version": v3, "shadow": True, "arm": "challenger",
            "items": ["i1", "i2"], "scores": [1.0, 0.5], "served_by": "popularity_fallback:model_error"} for k in range(40)]
    _write_log(tmp_path, _impressions(bad))
    out = _materialize(tmp_path, redis_server)
    assert out["action"] == "refuse" and rollout_state(settings).stage == REFUSED
    assert rollout_state(settings).champion == v2

    # ---- the operator switch rolls the champion back to the previous one
    out = _materialize(tmp_path, redis_server, {"rollout_decision": {"config": {"force_rollback": True}}})
    assert out["action"] == "rollback_champion" and rollout_state(settings).champion == v1
    assert json.dumps(out, default=str)


def test_rollout_sensor_runs_the_rollout_job_only_while_a_rollout_is_in_progress(settings) -> None:
    from dagster import DagsterInstance, build_sensor_context

    from orchestration.definitions import defs
    from orchestration.sensors import rollout_tick

    assert rollout_tick("promoted", "3", 1000.0) is None and rollout_tick("shadow", None, 1000.0) is None
    assert rollout_tick("canary", "3", 1000.0, 300) == rollout_tick("canary", "3", 1100.0, 300) != \
        rollout_tick("canary", "3", 1300.0, 300)
    from assets.resources import MlflowResource

    sensor = defs.resolve_sensor_def("rollout_sensor")
    assert sensor.job_name == "rollout"
    resources = {"mlflow": MlflowResource()}
    v1, v2 = _versions(settings, 2)
    promote(settings, v1)
    with DagsterInstance.ephemeral() as instance:
        idle = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs, resources=resources))
        assert not idle.run_requests and "no rollout in progress" in idle.skip_message
        start_rollout(settings, v2)
        busy = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs, resources=resources))
        assert len(busy.run_requests) == 1
        assert {k: v for k, v in busy.run_requests[0].tags.items() if k.startswith("kairos/")} == {
            "kairos/trigger": "rollout", "kairos/stage": "shadow", "kairos/version": v2}
