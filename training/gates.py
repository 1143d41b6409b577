"""The validation gate: a candidate model is promoted only if it earns it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GateConfig:
    min_ndcg_lift_over_popularity: float = 0.0  # relative: 0.05 = must beat popularity's NDCG@10 by 5%
    max_auc_drop_vs_champion: float = 0.005  # absolute AUC points the candidate may lose to the champion
    max_p99_scoring_ms: float = 25.0  # ranker scoring of one 200-candidate request, p99 over 1,000 requests (the endpoint's p99 budget)
    max_null_rate: float = 0.0  # NaN share allowed in any assembled feature column
    min_batch_feature_coverage: float = 0.01  # share of rows where a batch feature differs from its default


def scoring_latency(predict: Any, features: Any, requests: int = 1000, rows: int = 200, seed: int = 7) -> dict[str, float]:
    """p50/p95/p99 ms of `predict` on `requests` random batches of `rows` feature rows (one thread)."""
    import time

    import numpy as np

    x = np.asarray(features, dtype=np.float64)
    if len(x) == 0:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "requests": 0}
    rng = np.random.default_rng(seed)
    batches = [x[rng.integers(0, len(x), rows)] for _ in range(requests)]
    predict(batches[0])  # warm-up
    times = []
    for b in batches:
        t = time.perf_counter()
        predict(b)
        times.append((time.perf_counter() - t) * 1000)
    a = np.asarray(times)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "requests": float(requests), "rows_per_request": float(rows)}


def feature_health(features: Any) -> dict[str, dict[str, float]]:
    """Per registry feature: NaN share and coverage (share of rows not equal to the registry default)."""
    import numpy as np

    from features.registry import BY_NAME

    out = {}
    for name in features.columns:
        col = features[name].to_numpy(dtype=np.float64)
        spec = BY_NAME.get(name)
        default = spec.default if spec else 0.0
        out[name] = {"null_rate": float(np.isnan(col).mean()) if len(col) else 0.0,
                     "coverage": float((~np.isclose(col, default) & ~np.isnan(col)).mean()) if len(col) else 0.0,
                     "tier": spec.tier if spec else "unknown"}
    return out


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(d: dict | None, key: str) -> float | None:
    if not d:
        return None
    v = d.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def evaluate_gate(candidate: dict, popularity: dict, champion: dict | None, config: GateConfig,
                  latency: dict | None = None, health: dict | None = None) -> GateResult:
    """Refuse a candidate that does not beat popularity on NDCG@10 by the relative margin, whose
    AUC falls more than the allowed drop below the current champion's (no champion: that check passes),
    whose p99 scoring latency exceeds the budget, or whose features are null or missing (coverage)."""
    reasons: list[str] = []
    checks: dict[str, dict] = {}

    cand_ndcg, pop_ndcg = _num(candidate, "ndcg_at_10"), _num(popularity, "ndcg_at_10")
    if cand_ndcg is None or pop_ndcg is None:
        ok = False
        required = None
        reasons.append(f"FAIL beats_popularity: NDCG@10 missing (candidate {cand_ndcg}, popularity {pop_ndcg}).")
    else:
        required = pop_ndcg * (1.0 + config.min_ndcg_lift_over_popularity)
        ok = cand_ndcg > required
        lift = (cand_ndcg / pop_ndcg - 1.0) if pop_ndcg > 0 else float("inf")
        reasons.append(
            f"{'PASS' if ok else 'FAIL'} beats_popularity: candidate NDCG@10 {cand_ndcg:.4f} vs popularity "
            f"{pop_ndcg:.4f} (lift {lift:+.1%}; must exceed {required:.4f}, a {config.min_ndcg_lift_over_popularity:.1%} lift).")
    checks["beats_popularity"] = {"passed": bool(ok), "candidate_ndcg_at_10": cand_ndcg, "popularity_ndcg_at_10": pop_ndcg,
                                  "required_ndcg_at_10": required,
                                  "min_relative_lift": config.min_ndcg_lift_over_popularity}

    champ_auc = _num(champion, "auc")
    cand_auc = _num(candidate, "auc")
    if champ_auc is None:
        ok2 = True
        reasons.append("PASS no_auc_regression: no champion yet, nothing to compare AUC against.")
        checks["no_auc_regression"] = {"passed": True, "candidate_auc": cand_auc, "champion_auc": None,
                                       "max_drop": config.max_auc_drop_vs_champion, "note": "no champion yet"}
    else:
        floor = champ_auc - config.max_auc_drop_vs_champion
        ok2 = cand_auc is not None and cand_auc >= floor
        cand_txt = "missing" if cand_auc is None else f"{cand_auc:.4f}"
        reasons.append(
            f"{'PASS' if ok2 else 'FAIL'} no_auc_regression: candidate AUC {cand_txt} vs champion {champ_auc:.4f} "
            f"(may drop at most {config.max_auc_drop_vs_champion:.4f}, floor {floor:.4f}).")
        checks["no_auc_regression"] = {"passed": bool(ok2), "candidate_auc": cand_auc, "champion_auc": champ_auc,
                                       "floor": floor, "max_drop": config.max_auc_drop_vs_champion}
    ok3 = True
    if latency is not None:
        p99 = _num(latency, "p99_ms")
        ok3 = p99 is not None and p99 <= config.max_p99_scoring_ms
        reasons.append(f"{'PASS' if ok3 else 'FAIL'} scoring_latency: p99 {p99 if p99 is None else round(p99, 3)} ms "
                       f"over {int(latency.get('requests', 0))} requests of {int(latency.get('rows_per_request', 0))} "
                       f"candidates (budget {config.max_p99_scoring_ms} ms).")
        checks["scoring_latency"] = {"passed": bool(ok3), **latency, "budget_ms": config.max_p99_scoring_ms}
    ok4 = True
    if health is not None:
        nulls = {f: h["null_rate"] for f, h in health.items() if h["null_rate"] > config.max_null_rate}
        thin = {f: h["coverage"] for f, h in health.items()
                if h.get("tier") == "batch" and h["coverage"] < config.min_batch_feature_coverage}
        ok4 = not nulls and not thin
        reasons.append(f"{'PASS' if ok4 else 'FAIL'} feature_health: "
                       + (f"null rate above {config.max_null_rate} in {sorted(nulls)}; " if nulls else "no nulls; ")
                       + (f"batch features almost always at their default (coverage < "
                          f"{config.min_batch_feature_coverage}): {sorted(thin)}." if thin else "every batch feature covered."))
        checks["feature_health"] = {"passed": bool(ok4), "null_features": nulls, "uncovered_batch_features": thin,
                                    "coverage": {f: round(h["coverage"], 4) for f, h in health.items()}}
    return GateResult(passed=bool(ok and ok2 and ok3 and ok4), reasons=reasons, checks=checks)
