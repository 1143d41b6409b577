"""Re-ranking after the ranker: diversity (MMR), a category-run business rule, then exploration.

    mmr            pick greedily by  lambda * relevance - (1 - lambda) * max cosine to what is already picked
    max_run        no more than N items of one category in a row (the next best other item moves up)
    exploration    epsilon-greedy: each slot after the first keeps its item with probability 1 - epsilon,
                   or shows a uniformly drawn item from the rest of the pool; every shown item carries the
                   probability with which this policy would show it there (its propensity), for
                   off-policy evaluation of tomorrow's models

All pure functions over indices into the candidate list, seeded per request so a replay
of the same request id gives the same list.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class RerankConfig:
    mmr_lambda: float = float(os.environ.get("KAIROS_MMR_LAMBDA", "0.85"))  # 1.0 = pure relevance
    max_category_run: int = int(os.environ.get("KAIROS_MAX_CATEGORY_RUN", "3"))  # 0 = off
    epsilon: float = float(os.environ.get("KAIROS_EXPLORATION_EPSILON", "0.05"))  # 0 = no exploration


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


def explore(picked: list[int], pool: list[int], epsilon: float, rng: np.random.Generator) -> tuple[list[int], list[float]]:
    """Epsilon-greedy slots (slot 0 is always exploited); returns the list and each item's propensity."""
    if epsilon <= 0 or len(pool) <= len(picked):
        return picked, [1.0] * len(picked)
    out = list(picked)
    props = [1.0] * len(out)
    others = [p for p in pool if p not in set(picked)]
    n_alt = len(others)
    for slot in range(1, len(out)):
        if rng.random() < epsilon and others:
            j = int(rng.integers(len(others)))
            out[slot] = others.pop(j)
            props[slot] = epsilon / n_alt
        else:
            props[slot] = 1.0 - epsilon
    return out, props


__all__ = ["RerankConfig", "explore", "limit_category_runs", "mmr", "request_rng"]
