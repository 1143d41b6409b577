"""The whole-catalog evaluation of the served pipeline, and the popularity-prior fit on its validation window.

Both replay `serving.offline` (the served pipeline over an offline snapshot) against the protocol of
training/catalog_eval.py and the baselines of training/baselines.py. They are training code, used by the
model_evaluation asset and bench/quality.py: training may import serving, serving never imports training
(tests/test_layering.py), so this lives here rather than in serving/offline.py.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from features.history import CONSUMED_TYPES, consumed_items, serving_snapshot
from models.bundle import POPULARITY_PRIOR, SIMILARITY_PRIOR
from serving.offline import (SnapshotStore, memoized_model, one_thread_per_request, request_profiles,
                             served_recommender, served_session_predictor)
from serving.rerank import RerankConfig
from training.baselines import SessionIndex, baseline_recommenders, last_item_cooccurrence, session_knn
from training.catalog_eval import evaluate_recommender, score_sessions, session_prefixes, temporal_split


def _store_at(user_snaps: pd.DataFrame, item_snaps: pd.DataFrame, catalog: pd.DataFrame, engagements: pd.DataFrame,
              at_ms: int, name: str) -> tuple[SnapshotStore, int]:
    """(the online store's read interface over the snapshot the store held at `at_ms`, that snapshot's time):
    one rule for the prior fit and the evaluation."""
    users, items, popular, snap_ts = serving_snapshot(user_snaps, item_snaps, catalog, as_of_ms=at_ms,
                                                      consumed=consumed_items(engagements, at_ms))
    return SnapshotStore(users, items, popular, version=f"{name}-{snap_ts}"), int(snap_ts)


def interactions_frame(labels: pd.DataFrame, engagements: pd.DataFrame) -> pd.DataFrame:
    """The protocol's interactions: positive labels (relevant when after T) and every consumed-type engagement
    (the consumption before T that is excluded). Sampled catalog negatives are not interactions."""
    lab = labels[labels.get("negative_kind", pd.Series("hard", index=labels.index)) != "easy"]
    pos = lab[lab["label_binary"] == 1][["user_id", "item_id", "timestamp"]].assign(positive=True)
    eng = engagements[engagements["event_type"].isin(CONSUMED_TYPES)][["user_id", "item_id", "timestamp"]].assign(positive=False)
    out = pd.concat([pos, eng], ignore_index=True)
    out = out[out["user_id"].notna() & out["item_id"].notna()]
    return out.astype({"user_id": str, "item_id": str, "timestamp": "int64"})


def catalog_split(labels: pd.DataFrame, engagements: pd.DataFrame, catalog_ids: Sequence[str], split_ms: int,
                  end_ms: int | None = None):
    """The protocol's split at `split_ms` from the lake's labels and engagements (training/catalog_eval.py)."""
    return temporal_split(interactions_frame(labels, engagements), list(catalog_ids), split_ms=split_ms, end_ms=end_ms)


# item popularity features the prior may use (the fit picks one): decayed engagement (what is popular now, no
# window cliff; zero on logs without dwell, purchases or shares) and the 7-day click count
PRIOR_FEATURES: tuple[str, ...] = ("item_engaged_decayed_30d", "item_clicks_7d")
PRIOR_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
# weights of the user-history item similarity (models/bundle.py fuse_similarity: its logit term is at most the weight)
SIMILARITY_WEIGHTS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
MIN_FIT_USERS = 30
# seeded sample of the validation window's test users: each weight tried replays the served pipeline for every one
# of them (~5 ms a user), so a long log's window (818 users on a 20-year log) is bounded like the session cases
MAX_FIT_USERS = 300
MAX_FIT_SESSION_CASES = 300  # seeded sample of the validation window's session prefixes


@one_thread_per_request()
def fit_popularity_prior(bundle: Any, labels: pd.DataFrame, engagements: pd.DataFrame, user_snaps: pd.DataFrame,
                         item_snaps: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame, start_ms: int, end_ms: int,
                         weights: Sequence[float] = PRIOR_WEIGHTS, features: Sequence[str] = PRIOR_FEATURES, k: int = 10,
                         rerank: RerankConfig | None = None,
                         similarity_weights: Sequence[float] = SIMILARITY_WEIGHTS) -> dict[str, Any]:
    """The popularity-prior feature and weight (models/bundle.py fuse_popularity_prior) that maximize the served
    catalog NDCG@k on the validation window [start_ms, end_ms): the served pipeline without exploration,
    replayed at `start_ms` like the test evaluation, so the test window is never looked at.

    Then, with that weight, the weight inside a live session (`session_weight`) that maximizes P@20 of the
    session protocol on the window's sessions (every prefix -> its next click, through the session path).

    The window's test users are a seeded sample of at most MAX_FIT_USERS; a feature that is zero or missing for
    every item (e.g. engagement on a log without dwell, purchases or shares) is not tried.

    With the popularity weights fixed, the same two fits for the weight of the user-history item similarity
    (models/bundle.py fuse_similarity; bundles without the artifact keep 0): `similarity` = {"weight",
    "session_weight", "ndcg_by_weight", "p20_by_session_weight"}, what the bundle's SIMILARITY_PRIOR holds.

    Returns {"feature", "weight", "session_weight", "validation_users", "ndcg_by_weight" (of the chosen feature),
    "ndcg_by_feature", "session_cases", "p20_by_session_weight", "similarity"}; a weight stays 0 (the ranker alone)
    when its evidence is below MIN_FIT_USERS users / cases or no weight beats the ranker alone (ties: the smaller
    weight, the earlier feature).
    """
    whole = catalog_split(labels, engagements, catalog["item_id"].astype(str).tolist(), start_ms, end_ms=end_ms)
    split = whole.sample_users(MAX_FIT_USERS)
    fused: dict[str, Any] = {"weight": 0.0, "session_weight": 0.0, "ndcg_by_weight": {}, "p20_by_session_weight": {}}
    out: dict[str, Any] = {"feature": features[0], "weight": 0.0, "session_weight": 0.0, "validation_users": len(split.test_users),
                           "validation_users_in_window": len(whole.test_users),
                           "window_ms": [int(start_ms), int(end_ms)], "ndcg_by_weight": {}, "p20_by_session_weight": {},
                           "similarity": fused}
    if len(split.test_users) < MIN_FIT_USERS:
        out["reason"] = f"{len(split.test_users)} validation users < {MIN_FIT_USERS}: the ranker alone"
        return out
    store, _ = _store_at(user_snaps, item_snaps, catalog, engagements, start_ms, "fit")
    # each trial sets its own manifest (the candidate's stays untouched) and reuses the model's answers of the
    # trials before it: only the fused priors and the re-ranking after them are computed again
    trial = memoized_model(bundle)
    rerank = replace(rerank or RerankConfig(), epsilon=0.0)  # the server's re-ranking, without exploration noise

    def prior(feature: str, w: float, session_w: float, sim_w: float = 0.0, sim_session_w: float = 0.0) -> None:
        trial.manifest = {**bundle.manifest, POPULARITY_PRIOR: {"feature": feature, "weight": float(w),
                                                                "session_weight": float(session_w)},
                          SIMILARITY_PRIOR: {"weight": float(sim_w), "session_weight": float(sim_session_w)}}

    def best(scores: dict[str, float]) -> float:  # ties go to the smaller weight (the ranker alone first)
        return float(max(scores, key=lambda w: (scores[w], -float(w))))

    clicks = engagements[(engagements["event_type"] == "click") & (engagements["timestamp"] < end_ms)]
    cases = session_prefixes(clicks, start_ms, max_cases=MAX_FIT_SESSION_CASES)
    out["session_cases"] = len(cases)
    category = dict(zip(catalog["item_id"].astype(str), catalog["category"])) if "category" in catalog else {}

    profiles = request_profiles(users)

    def ndcg(feature: str, w: float, sim_w: float = 0.0) -> float:
        prior(feature, w, 0.0, sim_w)
        result = evaluate_recommender(split, served_recommender(trial, store, start_ms, profiles, rerank=rerank), k)
        return round(result.summary[f"ndcg_at_{k}"], 5)

    alone = ndcg(features[0], 0.0)  # weight 0: the ranker alone, whatever the feature
    informative = [f for f in features if f in item_snaps
                   and bool((pd.to_numeric(item_snaps[f], errors="coerce").fillna(0.0) != 0).any())]
    out["features_skipped"] = [f for f in features if f not in informative]
    for feature in informative:
        scores = {str(float(w)): alone if w == 0 else ndcg(feature, w) for w in weights}
        out.setdefault("ndcg_by_feature", {})[feature] = scores
        w = best(scores)
        if scores[str(w)] > out["ndcg_by_weight"].get(str(out["weight"]), -1.0):
            out.update(feature=feature, weight=w, ndcg_by_weight=scores)
    if getattr(bundle, "similarity", None) is not None:
        chosen = out["ndcg_by_weight"].get(str(out["weight"]), alone)
        fused["ndcg_by_weight"] = {str(float(w)): chosen if w == 0 else ndcg(out["feature"], out["weight"], w)
                                   for w in similarity_weights}
        fused["weight"] = best(fused["ndcg_by_weight"])
    if len(cases) < MIN_FIT_USERS:
        out["session_reason"] = f"{len(cases)} validation session prefixes < {MIN_FIT_USERS}: the ranker alone in sessions"
        return out

    def p20(session_w: float, sim_session_w: float) -> float:
        prior(out["feature"], out["weight"], session_w, fused["weight"], sim_session_w)
        return round(score_sessions(cases, served_session_predictor(trial, store, category, rerank=rerank))["p_at_20"], 3)

    out["p20_by_session_weight"] = {str(float(w)): p20(w, 0.0) for w in weights}
    out["session_weight"] = best(out["p20_by_session_weight"])
    if getattr(bundle, "similarity", None) is not None:
        chosen = out["p20_by_session_weight"][str(out["session_weight"])]
        fused["p20_by_session_weight"] = {str(float(w)): chosen if w == 0 else p20(out["session_weight"], w)
                                          for w in similarity_weights}
        fused["session_weight"] = best(fused["p20_by_session_weight"])
    return out


def similarity_prior(fit: Mapping[str, Any]) -> dict[str, float]:
    """What a bundle's SIMILARITY_PRIOR holds, from fit_popularity_prior's answer (0 weights when it fitted none)."""
    fused = fit.get("similarity") or {}
    return {"weight": float(fused.get("weight", 0.0)), "session_weight": float(fused.get("session_weight", 0.0))}


@one_thread_per_request()
def evaluate_catalog(bundles: Mapping[str, Any], labels: pd.DataFrame, engagements: pd.DataFrame,
                     user_snaps: pd.DataFrame, item_snaps: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame,
                     split_ms: int, k: int = 10, ablations: bool = True, sessions: bool = True,
                     max_session_cases: int = 2000, seed: int = 7, rerank: RerankConfig | None = None,
                     max_users: int | None = None) -> dict[str, Any]:
    """Catalog metrics at `split_ms` of each served bundle (e.g. {"served": candidate, "champion": ...}) beside
    every baseline, on one split; plus the session protocol and, for "served", the cost of MMR and exploration.

    `max_users`: every system is scored on the same seeded sample of at most that many test users (each replays
    the served pipeline per user, ~5 ms a user and system): a long log's test window (tens of thousands of users)
    is bounded like the prior fit's. "split" reports the users evaluated (`users`, what the gate's minimum-users
    rule reads) and the window's (`users_in_window`); the bootstrap CIs are over the evaluated users.

    Returns {"split": {...}, "systems": {name: summary}, "per_user": {name: ndcg list}, "sessions": {...}}.
    """

    item_ids = catalog["item_id"].astype(str).tolist()
    whole = catalog_split(labels, engagements, item_ids, split_ms)
    split = whole.sample_users(max_users, seed=seed) if max_users else whole
    store, snap_ts = _store_at(user_snaps, item_snaps, catalog, engagements, split_ms, "eval")
    systems: dict[str, Any] = {}
    per_user: dict[str, list[float]] = {}

    def run(name: str, recommend: Callable[[str, int], tuple[list[str], bool]]) -> None:
        result = evaluate_recommender(split, recommend, k)
        systems[name] = result.summary
        per_user[name] = [float(x) for x in result.per_user[f"ndcg_at_{k}"]]

    base = rerank or RerankConfig()  # the server's re-ranking (the asset passes RerankConfig.from_env())
    profiles = request_profiles(users)
    # every variant of a system (exploration, MMR, the session protocol) asks its model the same questions
    bundles = {name: None if bundle is None else memoized_model(bundle) for name, bundle in bundles.items()}
    for name, bundle in bundles.items():
        if bundle is not None:
            run(name, served_recommender(bundle, store, split_ms, profiles, rerank=base))
            # what the gate compares (training/gates.py JUDGED): the same pipeline without exploration's draws
            run(f"{name}:no_exploration", served_recommender(bundle, store, split_ms, profiles,
                                                             rerank=replace(base, epsilon=0.0)))
    if ablations and bundles.get("served") is not None:
        run("served:no_exploration_no_mmr", served_recommender(bundles["served"], store, split_ms, profiles,
                                                               rerank=replace(base, epsilon=0.0, mmr_lambda=1.0,
                                                                              max_category_run=0)))
    for name, recommend in baseline_recommenders(split, seed=seed).items():
        run(name, recommend)
    out: dict[str, Any] = {"split": {"split_ms": int(split_ms), "snapshot_ts": int(snap_ts), "users": len(split.test_users),
                                     "users_in_window": len(whole.test_users), "max_users": int(max_users or 0),
                                     "warm_users": len(split.warm_users), "catalog_items": len(item_ids)},
                           "systems": systems, "per_user": per_user}
    if sessions and bundles.get("served") is not None:
        clicks = engagements[engagements["event_type"] == "click"]
        cases = session_prefixes(clicks, split_ms, max_cases=max_session_cases, seed=seed)
        index = SessionIndex.build(clicks, split_ms)
        category = dict(zip(catalog["item_id"].astype(str), catalog["category"]))
        repeat = replace(base, epsilon=0.0, repeat_surfaces=("session_eval",))
        out["sessions"] = {
            "served": score_sessions(cases, served_session_predictor(bundles["served"], store, category,
                                                                     rerank=replace(base, epsilon=0.0))),
            "served:repeats_allowed": score_sessions(cases, served_session_predictor(bundles["served"], store, category,
                                                                                     surface="session_eval", rerank=repeat)),
            "session_knn": score_sessions(cases, session_knn(index)),
            "last_item_cooccurrence": score_sessions(cases, last_item_cooccurrence(index)),
        }
    return out
