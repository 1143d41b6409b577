"""Re-ranking after the ranker: diversity (MMR), a category-run business rule, then exploration.

    mmr            pick greedily by  lambda * relevance - (1 - lambda) * max cosine to what is already picked
    max_run        no more than N items of one category in a row (the next best other item moves up)
    exploration    epsilon-greedy (default): epsilon is the share of a 10-slot screen's slots after the first
                   that show a uniformly drawn item from the rest of the pool instead of the ranker's; only
                   slots from `explore_from` on explore (KAIROS_EXPLORATION_FROM, default 7 = positions 8-10
                   of a screen), each at epsilon * 9 / (10 - explore_from): the same number of explored items
                   on a screen, where a miss costs the least NDCG (1 = any slot after the first, at epsilon);
                   Thompson sampling (KAIROS_EXPLORATION=thompson): each candidate's click probability is
                   drawn from a Beta posterior centred on the ranker's score (KAIROS_THOMPSON_STRENGTH
                   pseudo-observations: more = less exploration) and the slots are filled in order of the
                   draws. Either way every shown item carries the probability with which this policy
                   would show it in that slot (its propensity), for off-policy evaluation of tomorrow's models

All pure functions over indices into the candidate list, seeded per request so a replay
of the same request id gives the same list.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ground.settings import env_number

EXPLORATIONS = ("epsilon_greedy", "thompson")
EXPLORATION_SCREEN = 10  # slots a user sees at once: the unit the exploration budget is counted in


ENV_VARS: dict[str, str] = {  # field -> the environment variable that sets it (README "Serving")
    "mmr_lambda": "KAIROS_MMR_LAMBDA",
    "max_category_run": "KAIROS_MAX_CATEGORY_RUN",
    "epsilon": "KAIROS_EXPLORATION_EPSILON",
    "explore_from": "KAIROS_EXPLORATION_FROM",
    "exploration": "KAIROS_EXPLORATION",
    "thompson_strength": "KAIROS_THOMPSON_STRENGTH",
    "repeat_surfaces": "KAIROS_REPEAT_SURFACES",
    "intent_slot_share": "KAIROS_SESSION_INTENT_SLOT_SHARE",
}


@dataclass(frozen=True)
class RerankConfig:
    """How the ranked list is re-ranked. Defaults are constants: the environment is read only by `from_env`,
    once at the entry point (the service's start, a CLI), so importing this module never depends on it."""

    # defaults chosen on the catalog metric (bench/quality.py): MMR 0.85 and runs <= 3 cost the simulator
    # 6% NDCG@10 against 0.95 and no run rule, for +0.07 coverage; both stay one setting away
    mmr_lambda: float = 0.95  # 1.0 = pure relevance
    max_category_run: int = 0  # 0 = off
    epsilon: float = 0.05  # share of a screen's slots after the first that explore, on average; 0 = no exploration
    # epsilon-greedy explores only from this slot (0-based) on, as many items per screen as epsilon anywhere:
    # a slot's NDCG discount falls with its rank, so the budget costs least at the bottom; 1 = any slot after the first
    explore_from: int = 7
    exploration: str = "epsilon_greedy"  # or "thompson"
    thompson_strength: float = 50.0  # Beta pseudo-counts
    thompson_draws: int = 200  # Monte Carlo draws that estimate each shown item's propensity
    # surfaces that may show what the user already consumed ("watch again", re-order): comma-separated
    repeat_surfaces: tuple[str, ...] = ()
    # the session-intent rule (serving/pipeline.py apply_session_intent): share of the results reserved for a
    # session's clear category intent, scaled by how clear it is; 0 = the learned ranking alone
    intent_slot_share: float = 0.3

    def __post_init__(self) -> None:
        if self.exploration not in EXPLORATIONS:
            raise ValueError(f"KAIROS_EXPLORATION must be one of {EXPLORATIONS}, got {self.exploration!r}")
        if self.thompson_strength <= 0:
            raise ValueError(f"KAIROS_THOMPSON_STRENGTH must be > 0, got {self.thompson_strength}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RerankConfig":
        """The configuration the KAIROS_* variables in ENV_VARS describe (unset ones keep the defaults)."""
        d = cls()
        exploration = env.get(ENV_VARS["exploration"], "").strip() or d.exploration
        return cls(
            mmr_lambda=env_number(env, ENV_VARS["mmr_lambda"], float, d.mmr_lambda, 0.0, 1.0),
            max_category_run=env_number(env, ENV_VARS["max_category_run"], int, d.max_category_run, 0),
            epsilon=env_number(env, ENV_VARS["epsilon"], float, d.epsilon, 0.0, 1.0),
            explore_from=env_number(env, ENV_VARS["explore_from"], int, d.explore_from, 1, EXPLORATION_SCREEN - 1),
            exploration=exploration,
            thompson_strength=env_number(env, ENV_VARS["thompson_strength"], float, d.thompson_strength),
            repeat_surfaces=tuple(s.strip() for s in env.get(ENV_VARS["repeat_surfaces"], "").split(",") if s.strip()),
            intent_slot_share=env_number(env, ENV_VARS["intent_slot_share"], float, d.intent_slot_share, 0.0, 1.0),
        )


def request_rng(request_id: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(request_id.encode()).hexdigest()[:16], 16))


def mmr(order: np.ndarray, scores: np.ndarray, vectors: np.ndarray, n: int, lam: float) -> list[int]:
    """Maximal marginal relevance over the best `3n` by score (vectors L2-normalized; zero rows = unknown)."""
    head = [int(i) for i in order[: max(3 * n, n)]]
    if lam >= 1.0 or len(head) <= 1:
        return head[:n]
    s = scores[head]
    rel = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.zeros(len(head))
    v = vectors[head]
    sim = v @ v.T
    chosen: list[int] = []
    best_sim = np.full(len(head), -np.inf)
    remaining = np.ones(len(head), dtype=bool)
    for _ in range(min(n, len(head))):
        penalty = np.where(np.isfinite(best_sim), best_sim, 0.0)
        value = np.where(remaining, lam * rel - (1.0 - lam) * penalty, -np.inf)
        j = int(np.argmax(value))
        chosen.append(j)
        remaining[j] = False
        best_sim = np.maximum(best_sim, sim[:, j])
    return [head[j] for j in chosen]


def limit_category_runs(picked: list[int], backlog: list[int], category: Mapping[int, Any], max_run: int) -> list[int]:
    """No more than `max_run` consecutive items of one category: the next item of another category
    (from the picks, then the backlog) moves up; if none exists the run is kept."""
    if max_run <= 0:
        return picked
    queue = list(picked) + [b for b in backlog if b not in picked]
    out: list[int] = []
    while queue and len(out) < len(picked):
        run_cat = category.get(out[-1]) if out else None
        run = 0
        for i in reversed(out):
            if category.get(i) == run_cat:
                run += 1
            else:
                break
        k = 0
        if run >= max_run and category.get(queue[0]) == run_cat:
            k = next((j for j, q in enumerate(queue) if category.get(q) != run_cat), 0)
        out.append(queue.pop(k))
    return out


def exploration_rate(epsilon: float, first: int) -> float:
    """Each explorable slot's probability when only slots from `first` on explore a screen's epsilon budget."""
    first = min(max(1, first), EXPLORATION_SCREEN - 1)
    return min(1.0, epsilon * (EXPLORATION_SCREEN - 1) / (EXPLORATION_SCREEN - first))


def explore(picked: list[int], pool: list[int], epsilon: float, rng: np.random.Generator,
            first: int = 1) -> tuple[list[int], list[float]]:
    """Epsilon-greedy slots (slot 0 is always exploited); returns the list and each item's propensity.

    `epsilon` is the expected share of a screen's (EXPLORATION_SCREEN slots) slots 1.. that explore; with
    `first` > 1 only slots from `first` on may, each at epsilon * (screen - 1) / (screen - first) (at most 1), so a
    screen explores as many items on average, in its lowest slots. Longer lists explore every slot from `first`
    on at that rate, so a list's first screen looks the same whatever length was asked for."""
    if epsilon <= 0 or len(pool) <= len(picked):
        return picked, [1.0] * len(picked)
    out = list(picked)
    props = [1.0] * len(out)
    others = [p for p in pool if p not in set(picked)]
    n_alt = len(others)
    first = min(max(1, first), EXPLORATION_SCREEN - 1)
    rate = exploration_rate(epsilon, first)
    for slot in range(first, len(out)):
        if rng.random() < rate and others:
            j = int(rng.integers(len(others)))
            out[slot] = others.pop(j)
            props[slot] = rate / n_alt
        else:
            props[slot] = 1.0 - rate
    return out, props


def thompson(picked: list[int], pool: list[int], scores: np.ndarray, strength: float, rng: np.random.Generator,
             draws: int = 200) -> tuple[list[int], list[float]]:
    """Thompson sampling over the re-ranked head: the `len(picked)` slots are refilled from picked + the
    best of the rest of the pool (2 x slots in all) by one draw of Beta(strength * p + 1, strength * (1 - p) + 1),
    p = the ranker's score clipped to [0, 1] (a binary ranker's probability; rank scores are min-max scaled).

    Slot 0 stays exploited as with epsilon-greedy (the top answer is never a coin toss). The propensity
    of each shown item is the share of `draws` further posterior draws (same seed stream) that put it in
    the same slot, floored at 1 / (draws + 1) so IPS weights stay finite.
    """
    n = len(picked)
    if n <= 1:
        return list(picked), [1.0] * n
    rest = [i for i in pool if i not in set(picked)]
    head = list(picked[1:]) + rest[: max(0, 2 * n - len(picked))]
    s = np.asarray(scores, dtype=np.float64)[head]
    if s.min() < 0.0 or s.max() > 1.0:  # not probabilities: scale, keep the order
        s = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.full(len(s), 0.5)
    a, b = strength * s + 1.0, strength * (1.0 - s) + 1.0
    sample = rng.beta(a, b)
    chosen = np.argsort(-sample, kind="stable")[: n - 1]
    out = [picked[0]] + [head[j] for j in chosen]
    sims = np.argsort(-rng.beta(a[None, :], b[None, :], size=(draws, len(head))), axis=1, kind="stable")[:, : n - 1]
    props = [1.0] + [max(float((sims[:, slot] == j).mean()), 1.0 / (draws + 1)) for slot, j in enumerate(chosen)]
    return out, props


__all__ = ["ENV_VARS", "EXPLORATIONS", "EXPLORATION_SCREEN", "RerankConfig", "exploration_rate", "explore", "limit_category_runs", "mmr", "request_rng", "thompson"]
