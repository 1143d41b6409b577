"""Off-policy evaluation: a new policy's reward estimated from logged propensities, before it serves.

Every served item is logged with the probability the serving policy had of showing it there
(`propensity`, serving/rerank.py's epsilon-greedy slots). For a target policy that would show the
logged item with probability `pi`, the importance weight is w = pi / propensity and

    IPS          mean(w * r)                        unbiased when the logger covers the target's actions
    clipped IPS  mean(min(w, M) * r)                lower variance; biased toward 0 (down for r >= 0)
    SNIPS        sum(w * r) / sum(w)                self-normalized: bounded by the rewards, lower variance,
                                                    a small O(1/n) bias

`evaluate_policy` takes an impression-log frame plus the target's probability for each logged row and
returns all three with bootstrap confidence intervals (resampling whole requests, seeded) and the
effective sample size (sum w)^2 / sum w^2: how many on-policy samples the estimate is worth.

Function names here are a stable contract: the rollout pipeline (shadow -> canary -> promotion) and the
`off_policy_evaluation` asset both call them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_MAX_WEIGHT = 10.0
DEFAULT_BOOTSTRAP = 500


def _arrays(rewards: Any, propensities: Any, target_probabilities: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(rewards, dtype=float)
    p = np.asarray(propensities, dtype=float)
    pi = np.asarray(target_probabilities, dtype=float)
    if not (r.shape == p.shape == pi.shape):
        raise ValueError(f"rewards, propensities and target probabilities must align: shapes {r.shape}, {p.shape}, "
                         f"{pi.shape}")
    if len(r) == 0:
        raise ValueError("off-policy evaluation needs logged rows: the impression log window is empty")
    if not np.all(np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
        raise ValueError("logged propensities must lie in (0, 1]: rows with 0 or missing propensity cannot be "
                         "reweighted; drop them or log the serving policy's probabilities (serving/rerank.py)")
    if not np.all(np.isfinite(pi)) or np.any(pi < 0) or np.any(pi > 1):
        raise ValueError("target probabilities must lie in [0, 1]")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards must be finite: fill unattributed impressions with 0")
    return r, p, pi


def importance_weights(propensities: Any, target_probabilities: Any) -> np.ndarray:
    """w = pi / p per logged row."""
    p = np.asarray(propensities, dtype=float)
    return np.asarray(target_probabilities, dtype=float) / p


def ips(rewards: Any, propensities: Any, target_probabilities: Any) -> float:
    """Inverse propensity scoring: mean of w * r (unbiased under full support of the logger)."""
    r, p, pi = _arrays(rewards, propensities, target_probabilities)
    return float(np.mean(pi / p * r))


def clipped_ips(rewards: Any, propensities: Any, target_probabilities: Any,
                max_weight: float = DEFAULT_MAX_WEIGHT) -> float:
    """IPS with weights capped at `max_weight`: trades a bias toward 0 for bounded variance."""
    if max_weight <= 0:
        raise ValueError(f"max_weight must be positive, got {max_weight}")
    r, p, pi = _arrays(rewards, propensities, target_probabilities)
    return float(np.mean(np.minimum(pi / p, max_weight) * r))


def snips(rewards: Any, propensities: Any, target_probabilities: Any) -> float:
    """Self-normalized IPS: sum(w r) / sum(w); NaN when the target gives every logged row probability 0."""
    r, p, pi = _arrays(rewards, propensities, target_probabilities)
    w = pi / p
    total = float(w.sum())
    return float(np.dot(w, r) / total) if total > 0 else float("nan")


def effective_sample_size(weights: Any) -> float:
    """(sum w)^2 / sum w^2: equals n for uniform weights, shrinks as a few rows dominate."""
    w = np.asarray(weights, dtype=float)
    denom = float(np.dot(w, w))
    return float(w.sum() ** 2 / denom) if denom > 0 else 0.0


@dataclass
class OPEResult:
    """The three estimates with (lo, hi) bootstrap intervals, the on-policy logged value and the ESS."""

    n: int
    n_requests: int
    logged_value: float
    ips: float
    clipped_ips: float
    snips: float
    ci: dict[str, tuple[float, float]]
    ess: float
    max_weight: float
    clipped_share: float
    identifiable: bool  # False when no logged row was explored (every propensity 1): only the overlap is seen
    notes: list[str] = field(default_factory=list)

    def as_metadata(self) -> dict[str, Any]:
        """Flat scalars for Dagster metadata (ci as *_lo / *_hi)."""
        out: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("ci", "notes")}
        for name, (lo, hi) in self.ci.items():
            out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
        out["notes"] = " | ".join(self.notes) or "none"
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def _estimates(r: np.ndarray, w: np.ndarray, max_weight: float) -> np.ndarray:
    total = w.sum()
    return np.array([np.mean(w * r), np.mean(np.minimum(w, max_weight) * r),
                     np.dot(w, r) / total if total > 0 else np.nan])


def evaluate_policy(log: pd.DataFrame, target_probability: Any, reward_col: str = "reward",
                    propensity_col: str = "propensity", cluster_col: str | None = "request_id",
                    max_weight: float = DEFAULT_MAX_WEIGHT, n_bootstrap: int = DEFAULT_BOOTSTRAP,
                    alpha: float = 0.05, seed: int = 0) -> OPEResult:
    """IPS, clipped IPS and SNIPS of a target policy over logged rows, with percentile bootstrap CIs.

    `target_probability` is a column name of `log` or an array aligned with it: the probability that
    the target policy shows each logged row's item in its logged position. The bootstrap resamples whole
    clusters (`cluster_col`, a request: its slots share a user and a moment) so the interval is honest about
    within-request correlation; seeded, so the same log gives the same interval.
    """
    if reward_col not in log or propensity_col not in log:
        raise ValueError(f"the log needs columns {reward_col!r} and {propensity_col!r}; has {list(log.columns)}")
    pi = log[target_probability] if isinstance(target_probability, str) else target_probability
    r, p, pi = _arrays(log[reward_col].to_numpy(), log[propensity_col].to_numpy(), np.asarray(pi))
    w = pi / p
    point = _estimates(r, w, max_weight)
    if cluster_col and cluster_col in log:
        codes, uniques = pd.factorize(log[cluster_col], sort=False)
    else:
        codes, uniques = np.arange(len(r)), np.arange(len(r))
    n_clusters = len(uniques)
    rng = np.random.default_rng(seed)
    # per-cluster sums make every bootstrap replicate O(clusters), not O(rows)
    sums = np.stack([np.bincount(codes, weights=x, minlength=n_clusters)
                     for x in (w * r, np.minimum(w, max_weight) * r, w, np.ones_like(r))])
    boot = np.empty((n_bootstrap, 4))  # per replicate: sum wr, sum clipped wr, sum w, rows
    chunk = max(1, min(n_bootstrap, 20_000_000 // max(n_clusters, 1)))  # bounds memory to ~160 MB of counts
    for start in range(0, n_bootstrap, chunk):
        stop = min(start + chunk, n_bootstrap)
        draws = rng.integers(0, n_clusters, size=(stop - start, n_clusters))
        counts = np.stack([np.bincount(d, minlength=n_clusters) for d in draws])  # [chunk, clusters]
        boot[start:stop] = counts @ sums.T
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = np.column_stack([boot[:, 0] / boot[:, 3], boot[:, 1] / boot[:, 3], boot[:, 0] / boot[:, 2]])
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    ci = {}
    for k, name in enumerate(("ips", "clipped_ips", "snips")):
        col = reps[:, k][np.isfinite(reps[:, k])]
        lo, hi = (np.percentile(col, q) if len(col) else (np.nan, np.nan))
        ci[name] = (float(lo), float(hi))
    explored = bool(np.any(p < 1.0))
    notes = []
    if not explored:
        notes.append("every logged propensity is 1 (no exploration): only actions the logger took are seen, so the "
                     "estimate covers the overlap with the logging policy; set KAIROS_EXPLORATION_EPSILON > 0")
    ess = effective_sample_size(w)
    if ess < 0.01 * len(r):
        notes.append(f"effective sample size {ess:.1f} of {len(r)} rows: the target is far from the logger, trust "
                     f"clipped IPS / SNIPS or log more exploration")
    return OPEResult(n=len(r), n_requests=n_clusters, logged_value=float(r.mean()), ips=float(point[0]),
                     clipped_ips=float(point[1]), snips=float(point[2]), ci=ci, ess=ess,
                     max_weight=float(max_weight), clipped_share=float(np.mean(w > max_weight)),
                     identifiable=explored, notes=notes)


# --------------------------------------------------------------------------- target policies over logged slates
def slate_target_probabilities(log: pd.DataFrame, scores: Any, epsilon: float = 0.05, temperature: float = 0.0,
                               request_col: str = "request_id", position_col: str = "position",
                               first: int = 1) -> np.ndarray:
    """The probability that a scoring policy shows each logged item at its logged position.

    Assumption (documented in the README): the candidate set of a slot is the request's logged slate from that
    position down (the full candidate pool is not logged), slots are filled top-down as in
    serving/rerank.explore: slot 0 is always exploited; each later slot shows the policy's best remaining
    item with probability 1 - epsilon, else a uniformly drawn other remaining item (epsilon / (m - 1) each).
    With `temperature` > 0 the exploited choice is a softmax over scores / temperature instead of the argmax
    (a Plackett-Luce policy), so ties and near-ties share probability. `first`: the first slot (0-based) that
    explores, as serving's KAIROS_EXPLORATION_FROM; `epsilon` is then each such slot's rate
    (serving.rerank.exploration_rate).
    """
    s = np.asarray(scores, dtype=float)
    if len(s) != len(log):
        raise ValueError(f"scores ({len(s)}) must align with the log ({len(log)} rows)")
    if len(s) == 0:
        return np.zeros(0)
    # vectorized over all requests: walk each request bottom-up (position descending), so "what remains at slot k"
    # is a running (suffix) aggregate: how many items, the best score, how many tie with it, the softmax mass
    req = pd.factorize(log[request_col])[0]
    pos = log[position_col].to_numpy()
    order = np.lexsort((-pos, req))
    frame = pd.DataFrame({"req": req[order], "score": s[order]})
    by_req = frame.groupby("req", sort=False)
    remaining = by_req.cumcount().to_numpy() + 1                     # m: items at this slot or below
    first_slot = remaining == by_req["score"].transform("size").to_numpy()
    if temperature > 0:
        z = np.exp((frame["score"] - by_req["score"].transform("max")).to_numpy() / temperature)
        greedy = z / frame.assign(z=z).groupby("req", sort=False)["z"].cumsum().to_numpy()
    else:
        best = by_req["score"].cummax().to_numpy()
        ties = frame.groupby(["req", "score"], sort=False).cumcount().to_numpy() + 1  # same score, at or below
        greedy = np.where(frame["score"].to_numpy() == best, 1.0 / ties, 0.0)
    slot = by_req["score"].transform("size").to_numpy() - remaining   # 0-based slot from the top
    eps = np.where(first_slot | (remaining == 1) | (slot < first), 0.0, epsilon)
    uniform = np.where(remaining > 1, eps / np.maximum(remaining - 1, 1), 0.0)
    # P(logged item) = exploit it, or explore onto it (exploring never picks the greedy choice itself)
    prob = (1.0 - eps) * greedy + uniform * (1.0 - greedy)
    out = np.empty(len(s))
    out[order] = prob
    return out


# --------------------------------------------------------------------------- a logged bandit with a known answer
@dataclass(frozen=True)
class SyntheticBandit:
    """Reward means mu(x, a), a logging policy and a target policy (softmax over seeded logits, full support);
    contexts are uniform, so the target's true value is mean_x sum_a pi(a|x) mu(x, a) exactly."""

    mu: np.ndarray
    logging: np.ndarray
    target: np.ndarray

    @classmethod
    def make(cls, seed: int = 0, n_contexts: int = 5, n_actions: int = 6) -> "SyntheticBandit":
        rng = np.random.default_rng(seed)
        mu = rng.uniform(0.02, 0.4, size=(n_contexts, n_actions))
        logging = _softmax(rng.normal(0, 1.0, size=(n_contexts, n_actions)))
        target = _softmax(3.0 * mu / mu.max() + rng.normal(0, 0.5, size=(n_contexts, n_actions)))  # favours good arms
        return cls(mu, logging, target)

    @property
    def true_value(self) -> float:
        return float(np.mean(np.sum(self.target * self.mu, axis=1)))

    @property
    def logging_value(self) -> float:
        return float(np.mean(np.sum(self.logging * self.mu, axis=1)))

    def log(self, n: int, seed: int) -> pd.DataFrame:
        """n logged rounds: request_id, reward (Bernoulli), propensity (logger's), pi (target's), seeded."""
        rng = np.random.default_rng(seed)
        x = rng.integers(0, self.mu.shape[0], size=n)
        a = (rng.random(n)[:, None] > self.logging[x].cumsum(axis=1)).sum(axis=1)
        a = np.minimum(a, self.mu.shape[1] - 1)
        r = (rng.random(n) < self.mu[x, a]).astype(float)
        return pd.DataFrame({"request_id": np.arange(n), "reward": r, "propensity": self.logging[x, a],
                             "pi": self.target[x, a]})


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


__all__ = ["DEFAULT_BOOTSTRAP", "SyntheticBandit", "DEFAULT_MAX_WEIGHT", "OPEResult", "clipped_ips", "effective_sample_size",
           "evaluate_policy", "importance_weights", "ips", "slate_target_probabilities", "snips"]
