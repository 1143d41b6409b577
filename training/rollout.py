"""Staged rollout of a model version: gate -> shadow -> canary -> promote, with automatic rollback.

The registry's aliases say what serves; the registered model's tags say where a rollout stands:

    champion            what every user gets (unless a canary or experiment says otherwise)
    challenger          the newest registered version (set by training.registry.register_bundle)
    canary              the version a configured share of users gets, by hash bucket (canary stage only)
    previous_champion   the champion before the last promotion: `rollback` restores it in one alias flip
    tag rollout.state   JSON: stage (none | shadow | canary | promoted | rolled_back | refused), version (the one
                        under rollout), canary_share, reason, stage_started_ms: one tag, so a stage change is one write

The decisions are pure functions (`compare_shadow`, `shadow_verdict`, `canary_verdict`, `next_action`)
over numbers read from the impression log, so they are tested without MLflow; the alias flips
(`start_rollout`, `start_canary`, `promote`, `abort_canary`, `rollback`) are thin MLflow adapters.
Every version stays in the registry, so a demoted version is always loadable again.
The read side the server needs (RolloutState, the stage names, `rollout_state`) is models/rollout.py.
The promotion record (`promotion_tags`, `record_promotion`) lives here too: training/registry.py imports this
module at its top, and this module never imports it back (no registry <-> rollout cycle).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from models.registry import CHAMPION, mlflow_client
from models.rollout import (CANARY, CANARY_STAGE, PREVIOUS_CHAMPION, PROMOTED, ROLLED_BACK, SHADOW, STATE_TAG,
                            RolloutState, canary_experiment_name, rollout_state)

PROMOTE, HOLD, ROLLBACK, PROCEED, REFUSE = "promote", "hold", "rollback", "proceed", "refuse"


# ---------------------------------------------------------------------------------------------- shadow
@dataclass
class ShadowComparison:
    """Champion vs challenger on identical requests: score distributions and ranked lists."""

    requests: int
    champion_rows: int
    challenger_rows: int
    score_psi: float
    score_ks: float
    champion_mean: float
    challenger_mean: float
    champion_std: float
    challenger_std: float
    overlap_at_k: float
    rank_correlation: float
    k: int = 10

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max CDF distance)."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _spearman(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Spearman correlation of the positions of the items both lists share (None below 2 shared items)."""
    pos_b = {item: r for r, item in enumerate(b)}
    common = [i for i in a if i in pos_b]
    if len(common) < 2:
        return None
    pos_a = {item: r for r, item in enumerate(a)}
    ra = np.argsort(np.argsort([pos_a[i] for i in common]))
    rb = np.argsort(np.argsort([pos_b[i] for i in common]))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def compare_shadow(champion_scores: Sequence[float], challenger_scores: Sequence[float],
                   champion_lists: Sequence[Sequence[str]] | None = None,
                   challenger_lists: Sequence[Sequence[str]] | None = None, k: int = 10) -> ShadowComparison:
    """PSI and KS of the two score distributions; mean overlap@k and rank correlation of paired lists.

    `champion_lists[i]` and `challenger_lists[i]` are the ranked item ids both models returned for the
    same request (the shadow pairs), so overlap and correlation measure how differently they rank.
    """
    from monitoring.drift import psi

    a = np.asarray(champion_scores, dtype=float)
    b = np.asarray(challenger_scores, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    score_psi = psi(a, b) if len(a) and len(b) else float("nan")
    overlaps: list[float] = []
    corrs: list[float] = []
    for la, lb in zip(champion_lists or [], challenger_lists or []):
        la, lb = list(la)[:k], list(lb)[:k]
        if not la or not lb:
            continue
        overlaps.append(len(set(la) & set(lb)) / float(min(k, max(len(la), len(lb)))))
        c = _spearman(la, lb)
        if c is not None:
            corrs.append(c)
    return ShadowComparison(
        requests=len(overlaps), champion_rows=int(len(a)), challenger_rows=int(len(b)),
        score_psi=float(score_psi), score_ks=_ks(a, b),
        champion_mean=float(a.mean()) if len(a) else float("nan"), challenger_mean=float(b.mean()) if len(b) else float("nan"),
        champion_std=float(a.std()) if len(a) else float("nan"), challenger_std=float(b.std()) if len(b) else float("nan"),
        overlap_at_k=float(np.mean(overlaps)) if overlaps else float("nan"),
        rank_correlation=float(np.mean(corrs)) if corrs else float("nan"), k=k)


@dataclass(frozen=True)
class ShadowGuardrails:
    min_requests: int = 30             # shadow-scored requests needed before judging
    max_error_rate: float = 0.01       # share of shadow answers that fell back (model error)
    min_score_std: float = 1e-6        # constant scores = a broken ranker
    max_score_psi: float | None = None  # None: report the PSI only (a retrained model is expected to differ)
    min_overlap_at_k: float | None = None


@dataclass
class Verdict:
    decision: str
    reasons: list[str]
    checks: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shadow_verdict(comparison: ShadowComparison, shadow_errors: int, guardrails: ShadowGuardrails = ShadowGuardrails()) -> Verdict:
    """proceed (to canary) / hold (not enough shadow traffic) / refuse (the challenger is broken).

    Hard failures refuse: shadow answers that fell back to popularity, or constant scores. Distribution
    shift (PSI, KS, overlap) is reported; it refuses only if thresholds are configured, because a model
    retrained after drift is supposed to rank differently; the canary judges whether that is better.
    """
    g = guardrails
    reasons: list[str] = []
    shadow_total = comparison.requests + shadow_errors
    error_rate = shadow_errors / shadow_total if shadow_total else 0.0
    checks = {"comparison": comparison.as_dict(), "shadow_errors": shadow_errors, "error_rate": error_rate}
    refuse = False
    if shadow_total and error_rate > g.max_error_rate:
        refuse = True
        reasons.append(f"FAIL errors: {shadow_errors}/{shadow_total} shadow answers fell back ({error_rate:.1%} > "
                       f"{g.max_error_rate:.1%}): the challenger fails at serving time.")
    if comparison.challenger_rows and comparison.challenger_std < g.min_score_std:
        refuse = True
        reasons.append(f"FAIL degenerate_scores: challenger score std {comparison.challenger_std:.2e} < "
                       f"{g.min_score_std:.0e} (constant scores rank nothing).")
    psi_txt = f"score PSI {comparison.score_psi:.3f}, KS {comparison.score_ks:.3f}, overlap@{comparison.k} " \
              f"{comparison.overlap_at_k:.2f}, rank corr {comparison.rank_correlation:.2f}"
    if g.max_score_psi is not None and math.isfinite(comparison.score_psi) and comparison.score_psi > g.max_score_psi:
        refuse = True
        reasons.append(f"FAIL score_shift: {psi_txt} (PSI above {g.max_score_psi}).")
    elif g.min_overlap_at_k is not None and math.isfinite(comparison.overlap_at_k) and comparison.overlap_at_k < g.min_overlap_at_k:
        refuse = True
        reasons.append(f"FAIL list_overlap: {psi_txt} (overlap below {g.min_overlap_at_k}).")
    else:
        reasons.append(f"INFO distributions: {psi_txt}.")
    if refuse:
        return Verdict(REFUSE, reasons, checks)
    if comparison.requests < g.min_requests:
        reasons.append(f"HOLD sample: {comparison.requests} shadow-scored requests, need {g.min_requests}.")
        return Verdict(HOLD, reasons, checks)
    reasons.append(f"PASS shadow: {comparison.requests} requests scored in shadow without errors.")
    return Verdict(PROCEED, reasons, checks)


# ---------------------------------------------------------------------------------------------- canary
@dataclass(frozen=True)
class ArmMetrics:
    """What one arm served: requests, errors (fallback answers), latency, impressions and clicks."""

    requests: int = 0
    errors: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    impressions: int = 0
    clicks: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(error_rate=self.error_rate, ctr=self.ctr)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass(frozen=True)
class Guardrails:
    max_error_rate_increase: float = 0.01  # canary error rate may exceed the champion's by at most this (absolute)
    max_p99_latency_ms: float = 50.0       # the canary's p99 budget (server-side, ms) ...
    max_p99_latency_ratio: float = 1.5     # ... a breach only if it is also this much slower than the champion
    max_ctr_relative_drop: float = 0.10    # canary CTR may be at most 10% below the champion's ...
    ctr_alpha: float = 0.05                # ... and the drop must be significant (one-sided two-proportion z-test)
    min_requests: int = 50                 # per arm, before errors and latency are judged
    min_impressions: int = 300             # per arm, before CTR is judged


def _one_sided_p(clicks_a: int, n_a: int, clicks_b: int, n_b: int) -> float:
    """p-value that arm b's CTR is below arm a's (two-proportion z-test, pooled)."""
    if n_a == 0 or n_b == 0:
        return 1.0
    pooled = (clicks_a + clicks_b) / (n_a + n_b)
    se = math.sqrt(max(pooled * (1 - pooled) * (1 / n_a + 1 / n_b), 1e-18))
    z = (clicks_a / n_a - clicks_b / n_b) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


def canary_verdict(metrics_by_arm: Mapping[str, ArmMetrics], guardrails: Guardrails = Guardrails(),
                   champion_arm: str = "champion", canary_arm: str = "canary") -> Verdict:
    """promote / hold / rollback, with one reason per guardrail.

    Any breach rolls back (error rate, p99 latency, a significant CTR drop); promotion needs every
    guardrail judged on enough traffic (min requests and impressions per arm); otherwise hold.
    """
    g = guardrails
    champ = metrics_by_arm.get(champion_arm, ArmMetrics())
    canary = metrics_by_arm.get(canary_arm, ArmMetrics())
    reasons: list[str] = []
    checks: dict[str, Any] = {"champion": champ.as_dict(), "canary": canary.as_dict(), "guardrails": asdict(g)}
    breach = False
    enough_requests = champ.requests >= g.min_requests and canary.requests >= g.min_requests
    if not enough_requests:
        reasons.append(f"HOLD sample: {canary.requests} canary / {champ.requests} champion requests, need "
                       f"{g.min_requests} each.")
    else:
        diff = canary.error_rate - champ.error_rate
        ok = diff <= g.max_error_rate_increase
        breach |= not ok
        reasons.append(f"{'PASS' if ok else 'FAIL'} error_rate: canary {canary.error_rate:.2%} vs champion "
                       f"{champ.error_rate:.2%} (may exceed by {g.max_error_rate_increase:.2%}).")
        slow = (math.isfinite(canary.p99_ms) and canary.p99_ms > g.max_p99_latency_ms
                and (not math.isfinite(champ.p99_ms) or canary.p99_ms > champ.p99_ms * g.max_p99_latency_ratio))
        breach |= slow
        reasons.append(f"{'FAIL' if slow else 'PASS'} p99_latency: canary {canary.p99_ms:.1f} ms vs champion "
                       f"{champ.p99_ms:.1f} ms (budget {g.max_p99_latency_ms} ms, or {g.max_p99_latency_ratio}x the champion).")
    enough_impressions = champ.impressions >= g.min_impressions and canary.impressions >= g.min_impressions
    if not enough_impressions:
        reasons.append(f"HOLD ctr sample: {canary.impressions} canary / {champ.impressions} champion impressions, "
                       f"need {g.min_impressions} each.")
    else:
        drop = 1.0 - canary.ctr / champ.ctr if champ.ctr > 0 else 0.0
        p = _one_sided_p(champ.clicks, champ.impressions, canary.clicks, canary.impressions)
        bad = drop > g.max_ctr_relative_drop and p < g.ctr_alpha
        breach |= bad
        checks["ctr_relative_drop"], checks["ctr_p_value"] = drop, p
        reasons.append(f"{'FAIL' if bad else 'PASS'} ctr: canary {canary.ctr:.4f} vs champion {champ.ctr:.4f} "
                       f"(relative drop {drop:+.1%}, one-sided p {p:.3g}; breach above {g.max_ctr_relative_drop:.0%} "
                       f"at p < {g.ctr_alpha}).")
    if breach:
        return Verdict(ROLLBACK, reasons, checks)
    if enough_requests and enough_impressions:
        return Verdict(PROMOTE, reasons, checks)
    return Verdict(HOLD, reasons, checks)


def next_action(state: RolloutState, shadow: Verdict | None, canary: Verdict | None,
                force_rollback: bool = False) -> tuple[str, str]:
    """What the rollout does now, and why: one of none, start_canary, refuse, promote, abort_canary,
    rollback_champion (force_rollback with a previous champion)."""
    if force_rollback:
        if state.previous_champion is None:
            return "none", "rollback requested but there is no previous_champion to restore"
        return "rollback_champion", f"rollback requested: champion {state.champion} -> {state.previous_champion}"
    if state.stage == SHADOW and shadow is not None:
        if shadow.decision == PROCEED:
            return "start_canary", "shadow passed: " + " ".join(shadow.reasons)
        if shadow.decision == REFUSE:
            return "refuse", "shadow refused: " + " ".join(r for r in shadow.reasons if r.startswith("FAIL"))
        return "none", "shadow: " + " ".join(shadow.reasons)
    if state.stage == CANARY_STAGE and canary is not None:
        if canary.decision == PROMOTE:
            return "promote", "canary passed every guardrail: " + " ".join(canary.reasons)
        if canary.decision == ROLLBACK:
            return "abort_canary", "canary breached: " + " ".join(r for r in canary.reasons if r.startswith("FAIL"))
        return "none", "canary: " + " ".join(canary.reasons)
    return "none", f"no rollout in progress (stage {state.stage})"


# ---------------------------------------------------------------------------------------------- impression-log readers
ERROR_PREFIX = "popularity_fallback"  # an answer that fell back: the model (or its inputs) failed


def shadow_inputs(log: Any, version: str, k: int = 10) -> dict[str, Any]:
    """From the impression log: the challenger's shadow rows for `version` and the champion rows of the
    same requests: scores, ranked lists per request pair, and how many shadow answers fell back."""
    import pandas as pd

    if log is None or len(log) == 0:
        return {"champion_scores": [], "challenger_scores": [], "champion_lists": [], "challenger_lists": [],
                "shadow_errors": 0, "shadow_requests": 0}
    shadow_col = log["shadow"].fillna(False).astype(bool)
    sh = log[shadow_col & (log["model_version"].astype(str) == str(version))]
    sh_ok = sh[~sh["served_by"].fillna("").str.startswith(ERROR_PREFIX)]
    errors = int(sh.loc[sh["served_by"].fillna("").str.startswith(ERROR_PREFIX), "request_id"].nunique())
    base_ids = sh_ok["request_id"].str.removesuffix(":shadow")
    champ = log[~shadow_col & log["request_id"].isin(set(base_ids))]
    champ = champ[~champ["served_by"].fillna("").str.startswith(ERROR_PREFIX)]

    def lists(frame: pd.DataFrame) -> dict[str, list[str]]:
        ordered = frame.sort_values(["request_id", "position"], kind="mergesort")
        return {rid: g["item_id"].tolist()[:k] for rid, g in ordered.groupby("request_id", sort=False)}

    champ_lists = lists(champ)
    chall_lists = {rid.removesuffix(":shadow"): v for rid, v in lists(sh_ok).items()}
    paired = sorted(set(champ_lists) & set(chall_lists))
    return {"champion_scores": champ.loc[champ["request_id"].isin(paired), "score"].to_numpy(float),
            "challenger_scores": sh_ok.loc[base_ids.isin(paired), "score"].to_numpy(float),
            "champion_lists": [champ_lists[r] for r in paired], "challenger_lists": [chall_lists[r] for r in paired],
            "shadow_errors": errors, "shadow_requests": int(sh["request_id"].nunique())}


def arm_metrics(log: Any, clicks: Any, window_ms: int, experiment: str | None = None) -> dict[str, ArmMetrics]:
    """Per arm (shown answers only, optionally one experiment): requests, fallback answers (errors),
    p50/p99 of the logged per-request latency, impressions and attributed clicks."""
    from serving.interleaving import attribute_clicks

    if log is None or len(log) == 0:
        return {}
    frame = log[~log["shadow"].fillna(False).astype(bool)]
    if experiment is not None:
        frame = frame[frame["experiment"] == experiment]
    if frame.empty:
        return {}
    frame = attribute_clicks(frame.reset_index(drop=True), clicks, window_ms)
    out: dict[str, ArmMetrics] = {}
    for arm, g in frame.groupby("arm"):
        per = g.groupby("request_id").agg(served_by=("served_by", "first"), latency=("latency_ms", "first"))
        lat = per["latency"].dropna().to_numpy(float)
        out[str(arm)] = ArmMetrics(
            requests=int(len(per)), errors=int(per["served_by"].fillna("").str.startswith(ERROR_PREFIX).sum()),
            p50_ms=float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            p99_ms=float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            impressions=int(len(g)), clicks=int(g["clicked"].sum()))
    return out


# ---------------------------------------------------------------------------------------------- MLflow adapters
def _set_stage(client: Any, settings: Any, stage: str, version: str | None, reason: str,
               share: float | None = None) -> None:
    import json

    state = {"stage": stage, "version": str(version or ""), "canary_share": float(share or 0.0),
             "reason": reason[:4000], "stage_started_ms": int(time.time() * 1000)}
    client.set_registered_model_tag(settings.model_name, STATE_TAG, json.dumps(state))


def _delete_alias(client: Any, settings: Any, alias: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model_alias(settings.model_name, alias)
    except MlflowException:
        pass


def promotion_tags(alias: str, by: str, reason: str, at_ms: int | None = None) -> dict[str, str]:
    """Model-version tags recording who/what moved an alias to the version, when and why (read by lineage)."""
    at = int(time.time() * 1000) if at_ms is None else int(at_ms)
    return {f"promoted.{alias}.at": str(at), f"promoted.{alias}.by": by[:500], f"promoted.{alias}.reason": reason[:4900]}


def record_promotion(settings: Any, version: str, alias: str, by: str, reason: str) -> None:
    """Stamp a promotion on the model version (aliases themselves keep no history)."""
    client = mlflow_client(settings)
    for k, v in promotion_tags(alias, by, reason).items():
        client.set_model_version_tag(settings.model_name, str(version), k, v)


def promote(settings: Any, version: str, reason: str = "promoted", by: str = "training.rollout.promote") -> dict[str, Any]:
    """champion -> `version`; the old champion stays loadable as `previous_champion`; the canary ends.
    `by` (who/what promoted) and `reason` are stamped on the version (promoted.champion.*) for its lineage."""
    t = time.perf_counter()
    client = mlflow_client(settings)
    state = rollout_state(settings)
    old = state.champion
    if old is not None and old != str(version):
        client.set_registered_model_alias(settings.model_name, PREVIOUS_CHAMPION, old)
    client.set_registered_model_alias(settings.model_name, CHAMPION, str(version))
    flipped = time.perf_counter() - t
    if state.aliases.get(CANARY):
        _delete_alias(client, settings, CANARY)
    _set_stage(client, settings, PROMOTED, str(version), reason, share=0.0)
    record_promotion(settings, str(version), CHAMPION, by, reason)
    return {"champion": str(version), "previous_champion": old if old != str(version) else state.previous_champion,
            "seconds": flipped, "total_seconds": time.perf_counter() - t}


def start_rollout(settings: Any, version: str, reason: str = "gate passed") -> str:
    """A version that passed the gate enters shadow; with no champion yet it is promoted directly
    (there is nothing to compare against). Returns the stage it entered."""
    if rollout_state(settings).champion is None:
        promote(settings, version, reason=f"{reason}; first champion (nothing to shadow against)")
        return PROMOTED
    _set_stage(mlflow_client(settings), settings, SHADOW, str(version), reason, share=0.0)
    return SHADOW


def start_canary(settings: Any, version: str, share: float, reason: str = "shadow passed") -> None:
    """Alias `canary` -> version and a `share` of users (by hash bucket) served by it."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"canary share must be in (0, 1], got {share}: set rollout_decision's canary_share")
    client = mlflow_client(settings)
    client.set_registered_model_alias(settings.model_name, CANARY, str(version))
    _set_stage(client, settings, CANARY_STAGE, str(version), reason, share=share)


def abort_canary(settings: Any, reason: str, stage: str = ROLLED_BACK) -> dict[str, Any]:
    """End a canary (or refuse a shadowed version): the canary alias goes, the champion never moved."""
    t = time.perf_counter()
    client = mlflow_client(settings)
    state = rollout_state(settings)
    if state.aliases.get(CANARY):
        _delete_alias(client, settings, CANARY)
    _set_stage(client, settings, stage, state.version, reason, share=0.0)
    return {"champion": state.champion, "refused_version": state.version, "seconds": time.perf_counter() - t}


def rollback(settings: Any, reason: str = "manual rollback") -> dict[str, Any]:
    """champion -> previous_champion in one alias flip (the servers pick it up on their next poll).

    `seconds` is the time until the champion alias points at the previous version (what serving
    sees); `total_seconds` includes the bookkeeping after it (aliases, stage tag)."""
    t = time.perf_counter()
    client = mlflow_client(settings)
    state = rollout_state(settings)
    previous = state.previous_champion
    if previous is None:
        raise RuntimeError(f"no '{PREVIOUS_CHAMPION}' alias on {settings.model_name}: nothing to roll back to; "
                           f"set a champion explicitly with promote(settings, '<version>')")
    demoted = state.champion
    client.set_registered_model_alias(settings.model_name, CHAMPION, previous)
    flipped = time.perf_counter() - t
    _delete_alias(client, settings, PREVIOUS_CHAMPION)
    if state.aliases.get(CANARY):
        _delete_alias(client, settings, CANARY)
    _set_stage(client, settings, ROLLED_BACK, demoted, f"{reason}: champion {demoted} -> {previous}", share=0.0)
    return {"champion": previous, "demoted": demoted, "seconds": flipped, "total_seconds": time.perf_counter() - t}


__all__ = ["ArmMetrics", "arm_metrics", "shadow_inputs", "Guardrails", "RolloutState", "ShadowComparison", "ShadowGuardrails", "Verdict",
           "abort_canary", "canary_experiment_name", "canary_verdict", "compare_shadow", "next_action", "promote",
           "rollback", "rollout_state", "shadow_verdict", "start_canary", "start_rollout"]
