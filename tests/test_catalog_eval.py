"""The catalog metrics against scikit-learn, the split protocol, the baselines and the gate's catalog checks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import ndcg_score

from training.baselines import ALS, CoOccurrence, SessionIndex, popularity, session_knn, window_popularity
from training.catalog_eval import (SessionCase, bootstrap_ci, evaluate_recommender, hit_at_k, mrr_at_k, ndcg_at_k,
                                   paired_lift_ci, recall_at_k, score_sessions, session_prefixes, temporal_split,
                                   top_k_excluding)
from training.gates import GateConfig, catalog_checks


@pytest.mark.parametrize("seed", range(6))
def test_ndcg_matches_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    catalog = [f"i{j}" for j in range(n)]
    scores = rng.normal(size=n)
    relevant = set(rng.choice(catalog, size=int(rng.integers(1, 25)), replace=False))
    ranked = [catalog[j] for j in np.argsort(-scores, kind="stable")]
    truth = np.array([[1.0 if c in relevant else 0.0 for c in catalog]])
    for k in (1, 5, 10, 20):
        assert ndcg_at_k(ranked, relevant, k) == pytest.approx(ndcg_score(truth, scores[None, :], k=k), abs=1e-12)


def test_recall_hit_mrr_by_hand() -> None:
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, {"b", "x"}, 2) == 0.5          # one hit over min(2, 2)
    assert recall_at_k(ranked, {"b"}, 10) == 1.0              # min(k, |relevant|) = 1
    assert hit_at_k(ranked, {"d"}, 3) == 0.0 and hit_at_k(ranked, {"d"}, 4) == 1.0
    assert mrr_at_k(ranked, {"c", "d"}, 10) == pytest.approx(1 / 3)
    assert np.isnan(ndcg_at_k(ranked, set(), 10))


def _log() -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(3)
    for u in range(40):
        for t in range(12):
            item = f"i{int(rng.zipf(1.6)) % 30}"
            rows.append((f"u{u}", item, 1_000 * (t * 40 + u), bool(rng.random() < 0.7)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "positive"])


def test_temporal_split_excludes_consumed_and_keeps_time_order() -> None:
    log = _log()
    catalog = [f"i{j}" for j in range(30)]
    split = temporal_split(log, catalog, quantile=0.8)
    assert (split.train["timestamp"] < split.split_ms).all()
    for user, rel in split.relevant.items():
        assert not set(rel) & split.consumed.get(user, set())
        after = log[(log.user_id == user) & (log.timestamp >= split.split_ms) & log.positive]
        assert set(rel) <= set(after.item_id)
    assert split.warm_users <= set(split.relevant)


def test_temporal_split_end_bound_keeps_a_validation_window_off_the_test_window() -> None:
    log = _log()
    catalog = [f"i{j}" for j in range(30)]
    ts = np.sort(log["timestamp"].to_numpy())
    start, end = int(ts[len(ts) // 2]), int(ts[int(len(ts) * 0.8)])
    bounded = temporal_split(log, catalog, split_ms=start, end_ms=end)
    for user, rel in bounded.relevant.items():
        window = log[(log.user_id == user) & (log.timestamp >= start) & (log.timestamp < end) & log.positive]
        assert set(rel) <= set(window.item_id)
    later = log[(log.timestamp >= end) & log.positive]
    only_later = {(u, i) for u, i in zip(later.user_id, later.item_id)} - {
        (u, i) for u, i in zip(log[(log.timestamp < end) & log.positive].user_id, log[(log.timestamp < end) & log.positive].item_id)}
    assert only_later and not {(u, i) for u, rel in bounded.relevant.items() for i in rel} & only_later
    assert set(bounded.relevant) <= set(temporal_split(log, catalog, split_ms=start).relevant)


def test_sample_users_is_seeded_and_keeps_each_users_relevant_items() -> None:
    log = _log()
    split = temporal_split(log, [f"i{j}" for j in range(30)], quantile=0.5)
    n = len(split.test_users) // 2
    a, b = split.sample_users(n), split.sample_users(n)
    assert len(a.test_users) == n and a.test_users == b.test_users  # same seed, same users
    assert all(a.relevant[u] == split.relevant[u] for u in a.test_users)
    assert a.warm_users == split.warm_users & set(a.test_users)
    assert split.sample_users(len(split.test_users) + 5) is split


def test_baselines_exclude_consumed_and_popularity_orders_by_count() -> None:
    split = temporal_split(_log(), [f"i{j}" for j in range(30)], quantile=0.8)
    pos = split.train[split.train.positive]
    pop = popularity(split)
    for user in split.test_users[:10]:
        for rec in (pop, window_popularity(split, 1.0), CoOccurrence(split), ALS(split, iterations=3)):
            items, _ = rec(user, 10)
            assert len(items) == len(set(items)) and not set(items) & split.consumed.get(user, set())
    counts = pos.item_id.value_counts()
    top, _ = pop("nobody", 5)
    assert [counts.get(i, 0) for i in top] == sorted([counts.get(i, 0) for i in top], reverse=True)
    assert counts.get(top[0], 0) == counts.max()


def test_evaluate_recommender_perfect_and_bootstrap() -> None:
    split = temporal_split(_log(), [f"i{j}" for j in range(30)], quantile=0.7)
    perfect = evaluate_recommender(split, lambda u, k: (split.relevant[u][:k], True))
    assert perfect.summary["ndcg_at_10"] == pytest.approx(1.0)
    assert perfect.summary["personalized_share"] == 1.0
    lo, hi = bootstrap_ci([0.0, 1.0] * 50)
    assert lo < 0.5 < hi
    lift, lo, hi = paired_lift_ci([0.6] * 50, [0.5] * 50)
    assert lift == pytest.approx(0.2) and lo == pytest.approx(0.2) and hi == pytest.approx(0.2)


def test_top_k_excluding() -> None:
    assert top_k_excluding(np.array([3.0, 2.0, 5.0, 1.0]), ["a", "b", "c", "d"], {"c"}, 2) == ["a", "b"]


def test_session_protocol_and_knn() -> None:
    ev = pd.DataFrame({"session_id": ["s1"] * 3 + ["s2"] * 3 + ["s3"] * 3,
                       "user_id": ["u1"] * 3 + ["u2"] * 3 + [None] * 3,
                       "item_id": ["a", "b", "c", "a", "b", "c", "a", "b", "c"],
                       "timestamp": [1, 2, 3, 4, 5, 6, 100, 101, 102]})
    cases = session_prefixes(ev, split_ms=50)
    assert [(c.prefix, c.target) for c in cases] == [(("a",), "b"), (("a", "b"), "c")]
    assert cases[0].user_id is None
    knn = session_knn(SessionIndex.build(ev, 50))
    assert "c" in knn(SessionCase("x", None, ("a", "b"), (1, 2), "c"), 3)  # s1 and s2 both went a -> b -> c
    scored = score_sessions(cases, knn, k=20)
    assert scored["p_at_20"] == 100.0


def _catalog(users: int, served: float, best: float, champion: float | None = None) -> dict:
    systems = {"served": {"ndcg_at_10": served}, "popularity": {"ndcg_at_10": best}, "als": {"ndcg_at_10": best / 2}}
    per_user = {"served": [served] * users, "popularity": [best] * users, "als": [best / 2] * users}
    if champion is not None:
        systems["champion"] = {"ndcg_at_10": champion}
        per_user["champion"] = [champion] * users
    return {"split": {"users": users}, "systems": systems, "per_user": per_user}


def test_gate_decides_on_catalog_evidence() -> None:
    cfg = GateConfig(min_lift_over_best_baseline=0.1, min_test_users=30)
    ok, reasons, _ = catalog_checks(_catalog(100, 0.33, 0.30), cfg)
    assert ok, reasons
    ok, reasons, checks = catalog_checks(_catalog(100, 0.31, 0.30), cfg)
    assert not ok and checks["beats_best_baseline"]["best_baseline"] == "popularity"
    ok, reasons, checks = catalog_checks(_catalog(10, 0.9, 0.30), cfg)
    assert not ok and "insufficient evidence" in reasons[0]
    ok, reasons, _ = catalog_checks(_catalog(100, 0.33, 0.30, champion=0.40), cfg)
    assert not ok and any("no_regression_vs_champion" in r and r.startswith("FAIL") for r in reasons)


def test_gate_compares_models_without_exploration_when_evaluated() -> None:
    cfg = GateConfig(min_lift_over_best_baseline=0.0, min_test_users=30)
    catalog = _catalog(100, 0.28, 0.30, champion=0.29)  # with exploration's draws both lose to popularity
    for name, value in (("served:no_exploration", 0.32), ("champion:no_exploration", 0.31)):
        catalog["systems"][name] = {"ndcg_at_10": value}
        catalog["per_user"][name] = [value] * 100
    ok, reasons, checks = catalog_checks(catalog, cfg)
    assert ok, reasons
    assert checks["beats_best_baseline"]["served"] == 0.32 and checks["beats_best_baseline"]["best_baseline"] == "popularity"
    assert "champion:no_exploration" not in checks["beats_best_baseline"]["baselines"]
    assert checks["no_regression_vs_champion"]["champion"] == 0.31  # like for like: the champion without exploration too
    assert reasons[0].startswith("PASS beats_best_baseline: served:no_exploration")


def test_mean_pairwise_jaccard() -> None:
    from training.catalog_eval import mean_pairwise_jaccard

    assert mean_pairwise_jaccard([["a", "b"], ["a", "b"], ["a", "b"]]) == 1.0
    assert mean_pairwise_jaccard([["a", "b"], ["c", "d"]]) == 0.0
    assert mean_pairwise_jaccard([["a", "b"], ["b", "c"]]) == pytest.approx(1 / 3)
