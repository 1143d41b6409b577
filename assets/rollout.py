"""Rollout assets: shadow report -> canary evaluation -> rollout decision (job `rollout`, sensor `rollout_sensor`).

A version that passed the gate with `auto_promote: false` is in stage `shadow` (training/rollout.py):
servers score it beside the champion and log it flagged `shadow`. `shadow_report` compares the two on
those identical requests; `rollout_decision` then starts the canary (alias `canary`, a share of users
by hash bucket). `canary_evaluation` measures each arm from the impression log (error rate, p99
latency, CTR with clicks from the event stream) and `rollout_decision` promotes (alias flip, the old
champion kept as `previous_champion`) or rolls the canary back. The decisions are pure functions in
training/rollout.py; these assets only read, call them and flip aliases.
"""

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import pandas as pd
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, AssetKey, Config,
                     MetadataValue, Output, asset)

from compliance.versions import source_version
from training.rollout import Guardrails, ShadowGuardrails
from assets.config import Knob, dataclass_config, to_dataclass
from assets.resources import LakeResource, MlflowResource, RedisResource

GROUP = "rollout"
IMPRESSION_LOG = "impression_log"


def _read_log(lake: LakeResource) -> pd.DataFrame | None:
    store = lake.lake()
    return store.read(IMPRESSION_LOG) if store.exists(IMPRESSION_LOG) else None


def read_click_events(client: Any, since_ms: int = 0, count: int = 500_000) -> pd.DataFrame:
    """Click events (user, item, timestamp) from the event stream the server's /v1/events intake and the
    clients publish to, added since `since_ms` (stream ids are arrival times)."""
    from streaming.job import STREAM

    rows = []
    for _, fields in client.xrange(STREAM, min=f"{int(since_ms)}-0" if since_ms else "-", max="+", count=count):
        raw = fields.get("event") or fields.get(b"event")
        try:
            event = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if isinstance(event, dict) and event.get("event_type") == "click":
            rows.append((event.get("user_id"), event.get("item_id"), event.get("timestamp")))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


# ShadowGuardrails' verdict knobs (training/rollout.py says what each means); a psi / overlap@10 below 0 = None:
# report only (a retrained model is expected to score differently)
if TYPE_CHECKING:
    ShadowSettings = Any
else:
    ShadowSettings = dataclass_config("ShadowSettings", ShadowGuardrails, (
        "min_requests", "max_error_rate", Knob("max_score_psi", type=float, none_below=0),
        Knob("min_overlap_at_10", "min_overlap_at_k", type=float, none_below=0)), __name__)


@asset(deps=[AssetKey(IMPRESSION_LOG)], group_name=GROUP,
       code_version=source_version(__file__, "training/rollout.py", "models/rollout.py"),
       check_specs=[AssetCheckSpec("shadow_healthy", asset="shadow_report",
                                   description="The shadowed challenger answered without errors and within the latency guardrail.")],
       description="Challenger vs champion on identical requests (shadow rows of the impression log): score PSI/KS, "
                   "overlap@10 and rank correlation of the lists; proceed / hold / refuse.")
def shadow_report(context: AssetExecutionContext, config: ShadowSettings, lake: LakeResource, mlflow: MlflowResource):
    from models.rollout import SHADOW, rollout_state
    from training.rollout import compare_shadow, shadow_inputs, shadow_verdict

    state = rollout_state(mlflow.settings())
    if state.stage != SHADOW or not state.version:
        yield Output({"status": "idle", "stage": state.stage}, metadata={"status": "idle", "stage": state.stage})
        yield AssetCheckResult(check_name="shadow_healthy", passed=True, metadata={"status": "idle"})
        return
    inputs = shadow_inputs(_read_log(lake), state.version)
    comparison = compare_shadow(inputs["champion_scores"], inputs["challenger_scores"], inputs["champion_lists"],
                                inputs["challenger_lists"])
    verdict = shadow_verdict(comparison, inputs["shadow_errors"], to_dataclass(config, ShadowGuardrails))
    for reason in verdict.reasons:
        context.log.info(f"shadow v{state.version}: {reason}")
    report = {"status": "evaluated", "version": state.version, "champion": state.champion, **verdict.as_dict()}
    yield Output(report, metadata={"status": "evaluated", "decision": verdict.decision, "version": state.version,
                                   "reasons": MetadataValue.json(verdict.reasons),
                                   "comparison": MetadataValue.json(comparison.as_dict())})
    yield AssetCheckResult(check_name="shadow_healthy", passed=verdict.decision != "refuse",
                           metadata={"decision": verdict.decision, "reasons": MetadataValue.json(verdict.reasons)})


# every canary Guardrails threshold (training/rollout.py), plus click_window_minutes: a click credits an impression
# of the same user and item this recent
if TYPE_CHECKING:
    CanarySettings = Any
else:
    CanarySettings = dataclass_config("CanarySettings", Guardrails, tuple(f.name for f in dataclasses.fields(Guardrails)),
                                      __name__, click_window_minutes=(float, 30.0))


@asset(deps=[AssetKey(IMPRESSION_LOG)], group_name=GROUP,
       code_version=source_version(__file__, "training/rollout.py", "models/rollout.py"),
       check_specs=[AssetCheckSpec("canary_within_guardrails", asset="canary_evaluation",
                                   description="The canary arm's CTR, error rate and p99 latency stay within the guardrails against champion.")],
       description="Per arm of the canary (impression log + clicks from the event stream): error rate, p99 latency, "
                   "CTR; promote / hold / rollback against the guardrails.")
def canary_evaluation(context: AssetExecutionContext, config: CanarySettings, lake: LakeResource,
                      redis: RedisResource, mlflow: MlflowResource):
    from models.rollout import CANARY_STAGE, canary_experiment_name, rollout_state
    from training.rollout import arm_metrics, canary_verdict

    state = rollout_state(mlflow.settings())
    if state.stage != CANARY_STAGE or not state.version:
        yield Output({"status": "idle", "stage": state.stage}, metadata={"status": "idle", "stage": state.stage})
        yield AssetCheckResult(check_name="canary_within_guardrails", passed=True, metadata={"status": "idle"})
        return
    clicks = read_click_events(redis.client(), since_ms=state.stage_started_ms)
    metrics = arm_metrics(_read_log(lake), clicks, int(config.click_window_minutes * 60_000),
                          experiment=canary_experiment_name(state.version))
    verdict = canary_verdict(metrics, to_dataclass(config, Guardrails))
    for reason in verdict.reasons:
        context.log.info(f"canary v{state.version}: {reason}")
    result = {"status": "evaluated", "version": state.version, "champion": state.champion,
              "arms": {a: m.as_dict() for a, m in metrics.items()}, **verdict.as_dict()}
    yield Output(result, metadata={"status": "evaluated", "decision": verdict.decision, "version": state.version,
                                   "share": state.canary_share, "clicks_read": len(clicks),
                                   "reasons": MetadataValue.json(verdict.reasons),
                                   "arms": MetadataValue.json(result["arms"])})
    yield AssetCheckResult(check_name="canary_within_guardrails", passed=verdict.decision != "rollback",
                           severity=AssetCheckSeverity.ERROR,
                           metadata={"decision": verdict.decision, "reasons": MetadataValue.json(verdict.reasons)})


class RolloutDecisionSettings(Config):
    canary_share: float = 0.10      # share of users (hash bucket) the canary serves once shadow passed
    force_rollback: bool = False    # operator switch: champion -> previous_champion now


@asset(group_name=GROUP, code_version=source_version(__file__, "training/rollout.py", "models/rollout.py"),
       description="Applies the verdicts: shadow passed -> canary; canary passed -> promote (champion alias flip, old "
                   "champion kept as previous_champion); a breach -> rollback (canary dropped; champion untouched).")
def rollout_decision(context: AssetExecutionContext, config: RolloutDecisionSettings, shadow_report: dict,
                     canary_evaluation: dict, mlflow: MlflowResource) -> Output:
    from models.rollout import REFUSED, ROLLED_BACK, rollout_state
    from training.rollout import Verdict, abort_canary, next_action, promote, rollback, start_canary

    settings = mlflow.settings()
    state = rollout_state(settings)

    def verdict(report: dict) -> Verdict | None:
        if report.get("status") != "evaluated" or report.get("version") != state.version:
            return None  # idle, or evaluated for a version the rollout has moved past
        return Verdict(report["decision"], list(report.get("reasons", [])), {})

    action, reason = next_action(state, verdict(shadow_report), verdict(canary_evaluation), config.force_rollback)

    def rolling() -> str:
        """The version the shadow/canary stage is about: start_canary and promote act on it."""
        if state.version is None:
            raise RuntimeError(f"rollout action {action} in stage {state.stage} has no version to act on")
        return state.version

    effect: dict[str, Any] = {}
    if action == "start_canary":
        start_canary(settings, rolling(), config.canary_share, reason=reason)
        effect = {"canary": state.version, "share": config.canary_share}
    elif action == "promote":
        effect = promote(settings, rolling(), reason=reason, by=f"dagster run {context.run_id} (rollout_decision)")
    elif action == "abort_canary":
        effect = abort_canary(settings, reason, stage=ROLLED_BACK)
    elif action == "refuse":
        effect = abort_canary(settings, reason, stage=REFUSED)
    elif action == "rollback_champion":
        effect = rollback(settings, reason=reason)
    after = rollout_state(settings)
    context.log.info(f"rollout: {action} ({reason}) -> stage {after.stage}, champion {after.champion}")
    return Output({"action": action, "reason": reason, "stage": after.stage, "champion": after.champion, **effect},
                  metadata={"action": action, "reason": reason[:2000], "stage_before": state.stage,
                            "stage": after.stage, "version": str(state.version), "champion": str(after.champion),
                            "previous_champion": str(after.previous_champion),
                            "alias_flip_seconds": float(effect.get("seconds", 0.0))})
