"""The validation gate: a candidate model is promoted only if it earns it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GateConfig:
    min_ndcg_lift_over_popularity: float = 0.0  # relative: 0.05 = must beat popularity's NDCG@10 by 5%
    max_auc_drop_vs_champion: float = 0.005  # absolute AUC points the candidate may lose to the champion


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


def evaluate_gate(candidate: dict, popularity: dict, champion: dict | None, config: GateConfig) -> GateResult:
    """Refuse a candidate that does not beat popularity on NDCG@10 by the relative margin, or whose
    AUC falls more than the allowed drop below the current champion's (no champion: that check passes)."""
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
    return GateResult(passed=bool(ok and ok2), reasons=reasons, checks=checks)
