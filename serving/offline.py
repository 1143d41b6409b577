"""The served pipeline replayed offline: what `POST /v1/personalize` would have answered at a past moment.

The catalog evaluation (training/catalog_eval.py) must score exactly what users get: the same
`serving.pipeline.personalize` (channels, ranker, re-ranking, exclusions, cold-start path) over
the whole catalog. Only the feature source differs: `SnapshotStore` answers the online store's
read interface from the offline snapshot the online store held at that moment
(features.history.serving_snapshot), and the session state is folded from the session's events
with the streaming job's own `update_session`. Nothing here re-implements a serving rule.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from features.functions import new_session_state, update_session
from features.online import FRESH_WINDOW, ITEM_STORE_COLUMNS, ItemCodec, ItemTable, OnlineStore
from features.registry import USER_HISTORY_COLUMNS, USER_STORE_COLUMNS
from serving.candidates import DEFAULT_CHANNELS, Channel
from serving.pipeline import SERVED_STALE, SERVED_TWO_STAGE, personalize
from serving.rerank import RerankConfig


# the server's channels with their shares but no time budget: a busy machine must not change measured quality
REPLAY_CHANNELS: tuple[Channel, ...] = tuple(Channel(c.name, c.share, float("inf")) for c in DEFAULT_CHANNELS)


def _user_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot row as the online store decodes it: floats, JSON strings, missing values omitted."""
    out: dict[str, Any] = {}
    for col in (*USER_STORE_COLUMNS, *USER_HISTORY_COLUMNS):
        v = row.get(col)
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        out[col] = v if isinstance(v, str) else float(v)
    return out


class FrameItemTable:
    """features.online.ItemTable's read interface over a frame, through the online store's own codec (the same
    packed rows, float32 rounding and dictionary codes a server decodes), so the replay ranks on the very
    values a server would read from Redis."""

    def __init__(self, items: pd.DataFrame, version: str) -> None:
        self.version = version
        self.codec = ItemCodec.from_registry()
        texts = {col: sorted({str(v) for v in items[col].dropna().tolist()}) if col in items else []
                 for col in self.codec.text}
        codes = {col: {v: k + 1 for k, v in enumerate(values)} for col, values in texts.items()}
        self._values = {col: np.array([None, *values], dtype=object) for col, values in texts.items()}
        self._rows, published = OnlineStore._pack(items, self.codec, codes)
        newest = sorted(published.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:FRESH_WINDOW]
        self._fresh = ([i for i, _ in newest], np.array([t for _, t in newest], dtype=np.float64))
        self.category: dict[str, Any] = {}
        if "category" in self.codec.text:
            decoded = self.columns_for(list(self._rows))
            self.category = dict(zip(self._rows, decoded["category"].tolist()))

    def columns_for(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        blank = self.codec.blank
        return self.codec.decode([self._rows.get(i, blank) for i in item_ids], ITEM_STORE_COLUMNS,
                                 lambda col, top: self._values[col])

    co_items_for = ItemTable.co_items_for  # the online table's own rule, over this table's columns_for

    def fresh_window(self) -> tuple[list[str], np.ndarray]:
        return self._fresh


class SnapshotStore:
    """The online store's read interface (fetch, item_table, popular, ...) over one offline snapshot."""

    def __init__(self, users: pd.DataFrame, items: pd.DataFrame, popular: Sequence[str], version: str,
                 sessions: Mapping[str, dict] | None = None) -> None:
        self.version = version
        self._users = {str(r["user_id"]): _user_row(r) for r in users.to_dict("records")}
        self._table = FrameItemTable(items, version)
        self._popular = [str(i) for i in popular]
        self.sessions: dict[str, dict] = dict(sessions or {})

    def fetch(self, user_id: str, session_id: str | None) -> tuple[dict | None, dict | None, str | None]:
        user = self._users.get(user_id)
        return (dict(user) if user is not None else None), self.sessions.get(session_id) if session_id else None, self.version

    def item_table(self, version: str | None) -> FrameItemTable:
        return self._table

    def popular(self, version: str | None) -> list[str]:
        return list(self._popular)

    def last_popular(self) -> list[str]:
        return list(self._popular)

    def stale(self, user_id: str, max_age_s: float) -> None:
        return None


def session_state(items: Sequence[str], timestamps: Sequence[int], category: Mapping[str, Any]) -> dict:
    """The session state the streaming job would hold after these clicks (its own fold)."""
    state = new_session_state()
    for item, ts in zip(items, timestamps):
        state = update_session(state, "click", item, category.get(item), int(ts))
    return state


def replay_request(user_id: str, at_ms: int, k: int, surface: str, session_id: str | None = None,
             device: str | None = None, region: str | None = None) -> dict:
    context: dict[str, Any] = {"timestamp_ms": int(at_ms)}
    if session_id:
        context["session_id"] = session_id
    if device:
        context["device_type"] = device
    if region:
        context["geo_region"] = region
    return {"user_id": user_id, "surface": surface, "context": context, "request_config": {"num_results": k}}


def served_recommender(bundle: Any, store: SnapshotStore, at_ms: int, users: pd.DataFrame | None = None,
                       surface: str = "home_feed", rerank: RerankConfig | None = None
                       ) -> Callable[[str, int], tuple[list[str], bool]]:
    """(user, k) -> the served top k at `at_ms` and whether the two-stage path served it (personalized).

    Each request carries the user's device and region from the catalog (as a client would send them)."""
    profile = {} if users is None else {str(r["user_id"]): r for r in users.to_dict("records")}

    def recommend(user_id: str, k: int) -> tuple[list[str], bool]:
        p = profile.get(user_id, {})
        answer = personalize(replay_request(user_id, at_ms, k, surface, device=p.get("device_type"), region=p.get("geo_region")),
                             bundle, store, now_ms=at_ms, rerank=rerank, request_id=f"eval-{user_id}-{at_ms}",
                             channels=REPLAY_CHANNELS)
        return [r["item_id"] for r in answer["ranked_items"]], answer["served_by"] in (SERVED_TWO_STAGE, SERVED_STALE)

    return recommend


def served_session_predictor(bundle: Any, store: SnapshotStore, category: Mapping[str, Any],
                             surface: str = "home_feed", rerank: RerankConfig | None = None
                             ) -> Callable[[Any, int], list[str]]:
    """(session prefix, k) -> the served top k right after the prefix's last click, through the session path."""

    def predict(case: Any, k: int) -> list[str]:  # a training.catalog_eval.SessionCase
        sid = f"eval:{case.session_id}:{len(case.prefix)}"
        store.sessions[sid] = session_state(case.prefix, case.prefix_ts, category)
        at = int(case.prefix_ts[-1]) + 1
        try:
            answer = personalize(replay_request(case.user_id or f"anon:{case.session_id}", at, k, surface, session_id=sid),
                                 bundle, store, now_ms=at, rerank=rerank, request_id=f"eval-{sid}",
                                 channels=REPLAY_CHANNELS)
        finally:
            store.sessions.pop(sid, None)
        return [r["item_id"] for r in answer["ranked_items"]]

    return predict


def describe_store(store: SnapshotStore) -> str:
    return json.dumps({"version": store.version, "users": len(store._users), "items": len(store._table._rows)})


__all__ = ["PRIOR_FEATURE", "PRIOR_WEIGHTS", "REPLAY_CHANNELS", "SnapshotStore", "fit_popularity_prior", "replay_request", "catalog_split", "describe_store", "evaluate_catalog", "interactions_frame", "served_recommender", "served_session_predictor", "session_state"]


# --------------------------------------------------------------------------- the whole catalog evaluation
def interactions_frame(labels: pd.DataFrame, engagements: pd.DataFrame) -> pd.DataFrame:
    """The protocol's interactions: positive labels (relevant when after T) and every consumed-type engagement
    (the consumption before T that is excluded). Sampled catalog negatives are not interactions."""
    from features.history import CONSUMED_TYPES

    lab = labels[labels.get("negative_kind", pd.Series("hard", index=labels.index)) != "easy"]
    pos = lab[lab["label_binary"] == 1][["user_id", "item_id", "timestamp"]].assign(positive=True)
    eng = engagements[engagements["event_type"].isin(CONSUMED_TYPES)][["user_id", "item_id", "timestamp"]].assign(positive=False)
    out = pd.concat([pos, eng], ignore_index=True)
    out = out[out["user_id"].notna() & out["item_id"].notna()]
    return out.astype({"user_id": str, "item_id": str, "timestamp": "int64"})


def catalog_split(labels: pd.DataFrame, engagements: pd.DataFrame, catalog_ids: Sequence[str], split_ms: int,
                  end_ms: int | None = None):
    """The protocol's split at `split_ms` from the lake's labels and engagements (training/catalog_eval.py)."""
    from training.catalog_eval import temporal_split

    return temporal_split(interactions_frame(labels, engagements), list(catalog_ids), split_ms=split_ms, end_ms=end_ms)


PRIOR_FEATURE = "item_clicks_7d"
PRIOR_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
MIN_FIT_USERS = 30
MAX_FIT_SESSION_CASES = 300  # seeded sample of the validation window's session prefixes


def fit_popularity_prior(bundle: Any, labels: pd.DataFrame, engagements: pd.DataFrame, user_snaps: pd.DataFrame,
                         item_snaps: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame, start_ms: int, end_ms: int,
                         weights: Sequence[float] = PRIOR_WEIGHTS, feature: str = PRIOR_FEATURE, k: int = 10,
                         rerank: RerankConfig | None = None) -> dict[str, Any]:
    """The popularity-prior weight (models/bundle.py fuse_popularity_prior) that maximizes the served
    catalog NDCG@k on the validation window [start_ms, end_ms): the served pipeline without exploration,
    replayed at `start_ms` like the test evaluation, so the test window is never looked at.

    Then, with that weight, the weight inside a live session (`session_weight`) that maximizes P@20 of the
    session protocol on the window's sessions (every prefix -> its next click, through the session path).

    Returns {"feature", "weight", "session_weight", "validation_users", "ndcg_by_weight", "session_cases",
    "p20_by_session_weight"}; a weight stays 0 (the ranker alone) when its evidence is below MIN_FIT_USERS
    users / cases or no weight beats the ranker alone.
    """
    from dataclasses import replace

    from features.history import consumed_items, serving_snapshot
    from models.bundle import POPULARITY_PRIOR
    from training.catalog_eval import evaluate_recommender, score_sessions, session_prefixes

    split = catalog_split(labels, engagements, catalog["item_id"].astype(str).tolist(), start_ms, end_ms=end_ms)
    out: dict[str, Any] = {"feature": feature, "weight": 0.0, "session_weight": 0.0, "validation_users": len(split.test_users),
                           "window_ms": [int(start_ms), int(end_ms)], "ndcg_by_weight": {}, "p20_by_session_weight": {}}
    if len(split.test_users) < MIN_FIT_USERS:
        out["reason"] = f"{len(split.test_users)} validation users < {MIN_FIT_USERS}: the ranker alone"
        return out
    snap_users, snap_items, popular, snap_ts = serving_snapshot(
        user_snaps, item_snaps, catalog, as_of_ms=start_ms, consumed=consumed_items(engagements, start_ms))
    store = SnapshotStore(snap_users, snap_items, popular, version=f"fit-{snap_ts}")
    manifest = dict(bundle.manifest)
    rerank = replace(rerank or RerankConfig(), epsilon=0.0)  # the server's re-ranking, without exploration noise
    def best(scores: dict[str, float]) -> float:  # ties go to the smaller weight (the ranker alone first)
        return float(max(scores, key=lambda w: (scores[w], -float(w))))

    clicks = engagements[(engagements["event_type"] == "click") & (engagements["timestamp"] < end_ms)]
    cases = session_prefixes(clicks, start_ms, max_cases=MAX_FIT_SESSION_CASES)
    out["session_cases"] = len(cases)
    category = dict(zip(catalog["item_id"].astype(str), catalog["category"])) if "category" in catalog else {}
    try:
        for w in weights:
            bundle.manifest = {**manifest, POPULARITY_PRIOR: {"feature": feature, "weight": float(w), "session_weight": 0.0}}
            result = evaluate_recommender(split, served_recommender(bundle, store, start_ms, users, rerank=rerank), k)
            out["ndcg_by_weight"][str(float(w))] = round(result.summary[f"ndcg_at_{k}"], 5)
        out["weight"] = best(out["ndcg_by_weight"])
        if len(cases) >= MIN_FIT_USERS:
            for w in weights:
                bundle.manifest = {**manifest, POPULARITY_PRIOR: {"feature": feature, "weight": out["weight"],
                                                                  "session_weight": float(w)}}
                scored = score_sessions(cases, served_session_predictor(bundle, store, category, rerank=rerank))
                out["p20_by_session_weight"][str(float(w))] = round(scored["p_at_20"], 3)
            out["session_weight"] = best(out["p20_by_session_weight"])
        else:
            out["session_reason"] = f"{len(cases)} validation session prefixes < {MIN_FIT_USERS}: the ranker alone in sessions"
    finally:
        bundle.manifest = manifest
    return out


def evaluate_catalog(bundles: Mapping[str, Any], labels: pd.DataFrame, engagements: pd.DataFrame,
                     user_snaps: pd.DataFrame, item_snaps: pd.DataFrame, catalog: pd.DataFrame, users: pd.DataFrame,
                     split_ms: int, k: int = 10, ablations: bool = True, sessions: bool = True,
                     max_session_cases: int = 2000, seed: int = 7, rerank: RerankConfig | None = None) -> dict[str, Any]:
    """Catalog metrics at `split_ms` of each served bundle (e.g. {"served": candidate, "champion": ...}) beside
    every baseline, on one split; plus the session protocol and, for "served", the cost of MMR and exploration.

    Returns {"split": {...}, "systems": {name: summary}, "per_user": {name: ndcg list}, "sessions": {...}}.
    """
    from dataclasses import replace

    from features.history import consumed_items, serving_snapshot
    from training.baselines import SessionIndex, baseline_recommenders, last_item_cooccurrence, session_knn
    from training.catalog_eval import evaluate_recommender, score_sessions, session_prefixes

    item_ids = catalog["item_id"].astype(str).tolist()
    split = catalog_split(labels, engagements, item_ids, split_ms)
    snap_users, snap_items, popular, snap_ts = serving_snapshot(
        user_snaps, item_snaps, catalog, as_of_ms=split_ms, consumed=consumed_items(engagements, split_ms))
    store = SnapshotStore(snap_users, snap_items, popular, version=f"eval-{snap_ts}")
    systems: dict[str, Any] = {}
    per_user: dict[str, list[float]] = {}

    def run(name: str, recommend: Callable[[str, int], tuple[list[str], bool]]) -> None:
        result = evaluate_recommender(split, recommend, k)
        systems[name] = result.summary
        per_user[name] = [float(x) for x in result.per_user[f"ndcg_at_{k}"]]

    base = rerank or RerankConfig()  # the server's re-ranking (the asset passes RerankConfig.from_env())
    for name, bundle in bundles.items():
        if bundle is not None:
            run(name, served_recommender(bundle, store, split_ms, users, rerank=base))
            # what the gate compares (training/gates.py JUDGED): the same pipeline without exploration's draws
            run(f"{name}:no_exploration", served_recommender(bundle, store, split_ms, users,
                                                             rerank=replace(base, epsilon=0.0)))
    if ablations and bundles.get("served") is not None:
        run("served:no_exploration_no_mmr", served_recommender(bundles["served"], store, split_ms, users,
                                                               rerank=replace(base, epsilon=0.0, mmr_lambda=1.0,
                                                                              max_category_run=0)))
    for name, recommend in baseline_recommenders(split, seed=seed).items():
        run(name, recommend)
    out: dict[str, Any] = {"split": {"split_ms": int(split_ms), "snapshot_ts": int(snap_ts), "users": len(split.test_users),
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
