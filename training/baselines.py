"""The baselines a user would try first, on the same split as the served pipeline (training/catalog_eval.py).

    popularity           positives before T, all time
    recent_popularity    positives before T, each decayed with a half-life (time-decayed popularity)
    co_occurrence        SAR-style item-to-item: Jaccard co-occurrence of users' positives, scored by the
                         user's time-decayed history (users without history get popularity)
    als                  implicit's AlternatingLeastSquares (pinned), users without history get popularity
    session_knn          sessions: the k past sessions most similar to the prefix vote for their items
    last_item_cooc       sessions: items most co-engaged in past sessions with the prefix's last item

Each is fitted once on the split's train frame and answers (user, k) -> top-k over the whole catalog,
consumed items excluded, exactly like the served pipeline is asked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from models.item_similarity import jaccard
from training.catalog_eval import CatalogSplit, Recommender, SessionCase, top_k_excluding

log = logging.getLogger("kairos.baselines")

DAY_MS = 86_400_000


def _positives(split: CatalogSplit) -> pd.DataFrame:
    train = split.train
    return train[train["positive"].astype(bool)]


def decayed_counts(positives: pd.DataFrame, catalog: Sequence[str], now_ms: int, half_life_days: float | None) -> np.ndarray:
    """Per catalog item: sum over its positives of 0.5 ** (age / half-life); None = plain counts."""
    index = {item: i for i, item in enumerate(catalog)}
    idx = positives["item_id"].map(index)
    ok = idx.notna().to_numpy()
    if half_life_days is None:
        w = np.ones(int(ok.sum()))
    else:
        age = (now_ms - positives["timestamp"].to_numpy(dtype=np.float64)[ok]) / DAY_MS
        w = np.power(0.5, np.clip(age, 0, None) / half_life_days)
    return np.bincount(idx[ok].to_numpy(dtype=np.int64), weights=w, minlength=len(catalog)).astype(np.float64)


class ScoreRecommender:
    """One score vector for every user (popularity-like), consumed items excluded."""

    def __init__(self, split: CatalogSplit, scores: np.ndarray) -> None:
        self.split, self.scores = split, scores

    def __call__(self, user: str, k: int) -> tuple[list[str], bool]:
        return top_k_excluding(self.scores, self.split.catalog, self.split.consumed.get(user, ()), k,
                               self.split.catalog_index), False


def popularity(split: CatalogSplit) -> ScoreRecommender:
    return ScoreRecommender(split, decayed_counts(_positives(split), split.catalog, split.split_ms, None))


def recent_popularity(split: CatalogSplit, half_life_days: float = 7.0) -> ScoreRecommender:
    pop = decayed_counts(_positives(split), split.catalog, split.split_ms, None)
    recent = decayed_counts(_positives(split), split.catalog, split.split_ms, half_life_days)
    return ScoreRecommender(split, recent + 1e-9 * pop)


def window_popularity(split: CatalogSplit, days: float = 14.0) -> ScoreRecommender:
    """Positives in the last `days` before T (all-time popularity breaks ties)."""
    pos = _positives(split)
    recent = pos[pos["timestamp"] >= split.split_ms - days * DAY_MS]
    scores = decayed_counts(recent, split.catalog, split.split_ms, None) + 1e-9 * decayed_counts(pos, split.catalog, split.split_ms, None)
    return ScoreRecommender(split, scores)


def _user_item_matrix(positives: pd.DataFrame, catalog: Sequence[str], weights: np.ndarray | None = None
                      ) -> tuple[sp.csr_matrix, dict[str, int]]:
    index = {item: i for i, item in enumerate(catalog)}
    pos = positives[positives["item_id"].isin(index)]
    users = {u: j for j, u in enumerate(pd.unique(pos["user_id"]))}
    rows = pos["user_id"].map(users).to_numpy(dtype=np.int64)
    cols = pos["item_id"].map(index).to_numpy(dtype=np.int64)
    w = np.ones(len(pos)) if weights is None else np.asarray(weights, dtype=np.float64)[positives["item_id"].isin(index).to_numpy()]
    m = sp.csr_matrix((w, (rows, cols)), shape=(len(users), len(catalog)))
    m.sum_duplicates()
    return m, users


class CoOccurrence:
    """SAR: item-item Jaccard similarity of co-occurrence, user affinity decayed with a half-life."""

    def __init__(self, split: CatalogSplit, half_life_days: float = 30.0) -> None:
        pos = _positives(split)
        self.split = split
        binary, _ = _user_item_matrix(pos, split.catalog)
        self.similarity = jaccard(binary)  # the product's implementation (models/item_similarity.py)
        age = (split.split_ms - pos["timestamp"].to_numpy(dtype=np.float64)) / DAY_MS
        affinity, self.users = _user_item_matrix(pos, split.catalog, np.power(0.5, np.clip(age, 0, None) / half_life_days))
        self.affinity = affinity
        self.fallback = popularity(split).scores

    def __call__(self, user: str, k: int) -> tuple[list[str], bool]:
        j = self.users.get(user)
        if j is None:
            return top_k_excluding(self.fallback, self.split.catalog, self.split.consumed.get(user, ()), k,
                               self.split.catalog_index), False
        scores = np.asarray((self.affinity[j] @ self.similarity).todense()).ravel() + 1e-9 * self.fallback
        return top_k_excluding(scores, self.split.catalog, self.split.consumed.get(user, ()), k,
                               self.split.catalog_index), True


class ALS:
    """implicit's ALS on the positives (confidence 1 + alpha * count); users without history get popularity."""

    def __init__(self, split: CatalogSplit, factors: int = 16, iterations: int = 15, regularization: float = 0.05,
                 alpha: float = 10.0, seed: int = 7) -> None:
        from threadpoolctl import threadpool_limits
        from implicit.cpu.als import AlternatingLeastSquares

        self.split = split
        matrix, self.users = _user_item_matrix(_positives(split), split.catalog)
        self.matrix = matrix.tocsr()
        self.model = AlternatingLeastSquares(factors=factors, iterations=iterations, regularization=regularization,
                                             alpha=alpha, random_state=seed, num_threads=1,
                                             calculate_training_loss=False)
        with threadpool_limits(1, "blas"):
            self.model.fit(self.matrix, show_progress=False)
        self.fallback = popularity(split).scores

    def __call__(self, user: str, k: int) -> tuple[list[str], bool]:
        j = self.users.get(user)
        if j is None:
            return top_k_excluding(self.fallback, self.split.catalog, self.split.consumed.get(user, ()), k,
                               self.split.catalog_index), False
        scores = self.model.item_factors @ self.model.user_factors[j]
        return top_k_excluding(np.asarray(scores), self.split.catalog, self.split.consumed.get(user, ()), k,
                               self.split.catalog_index), True


def baseline_recommenders(split: CatalogSplit, seed: int = 7) -> dict[str, Recommender]:
    """Every catalog baseline, fitted on `split` (ALS is skipped, with a warning, if implicit is missing)."""
    out: dict[str, Recommender] = {
        "popularity": popularity(split),
        "recent_popularity_14d": window_popularity(split, 14.0),
        "recent_popularity_decayed": recent_popularity(split, 7.0),
        "co_occurrence": CoOccurrence(split),
    }
    try:
        out["als"] = ALS(split, seed=seed)
    except ImportError as exc:  # pragma: no cover - implicit is pinned in requirements.lock
        log.warning("ALS baseline skipped: %s (pip install implicit==0.7.2)", exc)
    return out


# --------------------------------------------------------------------------- session baselines
@dataclass
class SessionIndex:
    """Past sessions (before T) as item sets, with an inverted index item -> sessions."""

    sessions: list[list[str]]
    by_item: dict[str, list[int]]
    popular: list[str]

    @classmethod
    def build(cls, engagements: pd.DataFrame, split_ms: int) -> "SessionIndex":
        past = engagements[engagements["timestamp"] < split_ms].sort_values(["session_id", "timestamp"], kind="mergesort")
        sessions = [list(dict.fromkeys(g.astype(str))) for _, g in past.groupby("session_id", sort=False)["item_id"]]
        by_item: dict[str, list[int]] = {}
        for s, items in enumerate(sessions):
            for item in items:
                by_item.setdefault(item, []).append(s)
        popular = past["item_id"].astype(str).value_counts().index.tolist()
        return cls(sessions, by_item, popular)


def _fill(scores: Mapping[str, float], popular: list[str], k: int) -> list[str]:
    ranked = [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))][:k]
    seen = set(ranked)
    return ranked + [i for i in popular if i not in seen][: k - len(ranked)]


def session_knn(index: SessionIndex, neighbours: int = 100):
    """Session-kNN (Jannach & Ludewig): cosine over item sets, the prefix's recent items weigh more."""

    def predict(case: SessionCase, k: int) -> list[str]:
        prefix = list(dict.fromkeys(reversed(case.prefix)))  # most recent first
        weight = {item: 1.0 / (1.0 + r) for r, item in enumerate(prefix)}
        sims: dict[int, float] = {}
        for item, w in weight.items():
            for s in index.by_item.get(item, ()):
                sims[s] = sims.get(s, 0.0) + w
        if not sims:
            return index.popular[:k]
        top = sorted(sims.items(), key=lambda kv: -kv[1])[:neighbours]
        scores: dict[str, float] = {}
        for s, w in top:
            items = index.sessions[s]
            sim = w / np.sqrt(len(items) * len(prefix))
            for item in items:
                scores[item] = scores.get(item, 0.0) + sim
        return _fill(scores, index.popular, k)

    return predict


def last_item_cooccurrence(index: SessionIndex):
    """Items most often in the same past session as the prefix's last item."""

    def predict(case: SessionCase, k: int) -> list[str]:
        last = case.prefix[-1]
        scores: dict[str, float] = {}
        for s in index.by_item.get(last, ()):
            for item in index.sessions[s]:
                if item != last:
                    scores[item] = scores.get(item, 0.0) + 1.0
        return _fill(scores, index.popular, k)

    return predict


__all__ = ["ALS", "CoOccurrence", "ScoreRecommender", "SessionIndex", "baseline_recommenders", "decayed_counts",
           "last_item_cooccurrence", "popularity", "recent_popularity", "session_knn", "window_popularity"]
