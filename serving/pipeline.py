"""The ranking request, end to end, as one pure-ish function (no HTTP): `personalize`.

    validate -> features + session (one Redis round trip) -> session-aware user vector
    -> candidates (FAISS ANN + popular, deduplicated, engaged items removed, capped)
    -> rows (user, item, session, context, embedding affinity) -> features.functions.feature_matrix (the ranker's
    column order) -> LightGBM / lleaves (bundle.rank_matrix) -> top num_results

Every request answers (DESIGN invariant 5); `served_by` says which path served it:
    two_stage                                   the normal path
    two_stage:missing_features                  the online store holds no snapshot: registry defaults, named
                                                in `missing_features` (the store is being rebuilt)
    two_stage:stale_features                    Redis unavailable: the user's features as this server last
                                                read them (at most KAIROS_STALE_FEATURES_MAX_AGE_S old, 1 h)
    popularity_fallback:redis_unavailable       the online store errored or timed out (bundle popularity)
    popularity_fallback:no_model                no champion loaded (the store's popular list)
    popularity_fallback:model_error             retrieval or ranking raised (bundle popularity)
Only invalid input raises (ValueError), which the HTTP layer maps to 400.
"""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from features.functions import SESSION_HISTORY_FOR_TOWER, feature_matrix, session_features, tower_history
from features.history import USER_RECENT_ITEMS
from features.registry import ITEM_STORE_COLUMNS, USER_JSON_COLUMNS, USER_STORE_COLUMNS
from serving.candidates import DEFAULT_CHANNELS, Channel, channels_for_budget, co_visitation, fresh_items, run_channels
from serving.request import validate_request
from serving.rerank import RerankConfig, explore, limit_category_runs, mmr, request_rng, thompson

log = logging.getLogger("kairos.serving")

POPULAR_CHANNEL_SHARE = 0.25  # share of the pool offered to the popularity channel
# Re-rank business rule "session intent": when the session shows a clear category intent
# (>= INTENT_MIN_ENGAGEMENTS engaged items, dominant category >= INTENT_MIN_SHARE of the decayed
# weights), at least ceil(num_results * slot share * share) results come from that category: the
# ranker's best-scored ones. The slot share is RerankConfig.intent_slot_share (KAIROS_SESSION_INTENT_SLOT_SHARE,
# default 0.3); 0 disables the rule (the learned ranking alone).
INTENT_SLOT_SHARE = RerankConfig.intent_slot_share
INTENT_MIN_SHARE = 0.5
INTENT_MIN_ENGAGEMENTS = 2


SERVED_TWO_STAGE = "two_stage"
SERVED_STALE = "two_stage:stale_features"
SERVED_NO_FEATURES = "two_stage:missing_features"  # the online store is reachable but empty: defaults served
# how old the in-process copy of a user's features may be when Redis is unavailable (then popularity); the
# service passes its KAIROS_STALE_FEATURES_MAX_AGE_S (serving/settings.py) as personalize(stale_max_age_s=...)
STALE_MAX_AGE_S = 3600.0
FALLBACK_REDIS = "popularity_fallback:redis_unavailable"
FALLBACK_NO_MODEL = "popularity_fallback:no_model"
FALLBACK_MODEL_ERROR = "popularity_fallback:model_error"


class ItemRows(Protocol):
    """One version's item rows as a request reads them: features.online.ItemTable (Redis), or
    serving.offline.FrameItemTable (a snapshot, the offline replay)."""

    @property
    def category(self) -> Mapping[str, Any]: ...

    def columns_for(self, item_ids: list[str]) -> dict[str, np.ndarray]: ...

    def co_items_for(self, item_ids: Sequence[str]) -> dict[str, Mapping[str, float]]: ...

    def fresh_window(self) -> tuple[list[str], np.ndarray]: ...


class FeatureReader(Protocol):
    """The online store's read interface `personalize` uses: features.online.OnlineStore, or
    serving.offline.SnapshotStore."""

    def fetch(self, user_id: str, session_id: str | None) -> tuple[dict | None, dict | None, str | None]: ...

    def stale(self, user_id: str, max_age_s: float) -> tuple[dict | None, str, float] | None: ...

    def item_table(self, version: str | None) -> ItemRows: ...

    def popular(self, version: str | None) -> list[str]: ...

    def last_popular(self) -> list[str]: ...


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


REDIS_ERRORS = _redis_errors()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _popularity_items(ranked: list[str], n: int, exclude: set[str] | None = None) -> list[dict]:
    exclude = exclude or set()
    out = []
    for item in ranked:
        if item in exclude:
            continue
        out.append(item)
        if len(out) == n:
            break
    # a score that is monotone in popularity rank, so clients can still sort/merge
    return [{"item_id": i, "score": round(1.0 / (k + 1), 6), "rank": k + 1} for k, i in enumerate(out)]


def consumed_history(user_row: Mapping[str, Any] | None) -> list[str]:
    """The user's consumed items, most recent first (features/history.py), from the online store's row."""
    raw = (user_row or {}).get("consumed_items")
    if not isinstance(raw, str) or not raw:
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        return []
    return [str(i) for i in items] if isinstance(items, list) else []


def build_rows(user_row: Mapping[str, Any] | None, session: Mapping[str, Any] | None, candidates: list[str],
               item_cols: Mapping[str, np.ndarray], affinity: np.ndarray, now_ms: int, device_type: str,
               recent: list[str] | None = None) -> dict[str, Any]:
    """The raw per-candidate columns the feature functions read (store columns, not features), as arrays and lists
    aligned with `candidates` (no frame: features.functions.feature_matrix reads them by name; pd.DataFrame(...) of
    them is what assemble_features takes); `recent` = the user's latest consumed items
    (features.history.USER_RECENT_ITEMS of them, most recent first)."""
    n = len(candidates)
    data: dict[str, Any] = {"item_id": candidates}
    user_row = user_row or {}
    for col in USER_STORE_COLUMNS:
        value = user_row.get(col)
        if col in USER_JSON_COLUMNS:
            data[col] = [value if isinstance(value, str) else None] * n
        else:
            data[col] = np.full(n, np.nan if value is None else float(value))
    for col in ITEM_STORE_COLUMNS:
        data[col] = item_cols[col]
    data.update(session_features(session, candidates, item_cols["category"].tolist(), now_ms))
    history = list((session or {}).get("last_items", []))[:SESSION_HISTORY_FOR_TOWER]
    data["session_last_items"] = [history] * n
    data["user_recent_items"] = [list(recent or [])[:USER_RECENT_ITEMS]] * n
    data["request_ts"] = np.full(n, int(now_ms), dtype=np.int64)
    data["device_type"] = [device_type] * n
    data["embedding_affinity"] = affinity.astype(np.float64)
    return data


@dataclass
class Trace:
    """One request's state as it moves through the stages: what each stage read, decided and how long it took.
    The answer (`response`) and the stage latencies (`lat`) are filled in place; `finish` closes it."""

    req: dict[str, Any]
    now_ms: int
    t_start: float
    response: dict[str, Any]
    cfg: RerankConfig
    lat: dict[str, float] = field(default_factory=lambda: {"feature_fetch": 0.0, "candidate_retrieval": 0.0,
                                                             "ranking_inference": 0.0, "post_processing": 0.0})
    shown_features: dict[str, dict[str, float]] = field(default_factory=dict)
    served_path: str = SERVED_TWO_STAGE
    user_row: dict | None = None
    session: dict | None = None
    version: str | None = None
    table: ItemRows | None = None  # the item rows of `version` (set by stage 1)
    seen: list[str] = field(default_factory=list)
    consumed: list[str] = field(default_factory=list)
    seen_set: set[str] = field(default_factory=set)
    repeats: bool = False
    query: Any = None  # the session-aware user vector
    candidates: list[str] = field(default_factory=list)
    vectors: Any = None
    feats: Any = None  # float64 [candidates, features] in the ranker's column order (`feature_names`)
    feature_names: tuple[str, ...] = ()
    categories: list = field(default_factory=list)  # each candidate's category, as its item row decoded it
    scores: Any = None


Early = tuple[str, list[dict]]  # a stage that answers on its own: (served_by, ranked items)


def _begin(request: Any, bundle: Any | None, now_ms: int | None, rerank: RerankConfig | None,
           request_id: str | None) -> Trace:
    """Validate the request, fix its clock and open the answer."""
    t_start = time.perf_counter()
    req = validate_request(request)
    clock = int(req["timestamp_ms"] if req["timestamp_ms"] is not None else (now_ms if now_ms is not None else time.time() * 1000))
    response: dict[str, Any] = {
        "request_id": request_id or uuid.uuid4().hex,
        "user_id": req["user_id"],
        "surface": req["surface"],
        "ranked_items": [],
        "model_version": getattr(bundle, "model_version", None) if bundle is not None else None,
        "feature_version": None,
        "served_by": SERVED_TWO_STAGE,
        "latency_breakdown_ms": {},
    }
    return Trace(req=req, now_ms=clock, t_start=t_start, response=response, cfg=rerank or RerankConfig())


def _finish(tr: Trace, served_by: str, items: list[dict], log_impression: Callable[[dict], None] | None) -> dict:
    """Close the answer: latencies, the over-budget flag, and the impression record (never failing the request)."""
    t = time.perf_counter()
    req, response, lat = tr.req, tr.response, tr.lat
    response["served_by"] = served_by
    response["ranked_items"] = items
    lat["post_processing"] += _ms(time.perf_counter() - t)
    lat["total"] = _ms(time.perf_counter() - tr.t_start)
    response["latency_breakdown_ms"] = lat
    if req["max_latency_ms"] is not None and lat["total"] > req["max_latency_ms"]:
        response["over_budget"] = True  # answered anyway (never a 5xx), but the caller should know
    if served_by not in (SERVED_TWO_STAGE, SERVED_STALE, SERVED_NO_FEATURES):
        log.info("request %s for %s served by %s", response["request_id"], req["user_id"], served_by)
    if log_impression is not None:
        try:
            from serving.impressions import impression_record

            log_impression(impression_record(response, req, tr.now_ms, tr.shown_features))
        except Exception as exc:  # noqa: BLE001 - logging must never fail a request
            log.warning("impression not logged: %s", exc)
    return response


def _fetch_features(tr: Trace, bundle: Any | None, store: FeatureReader | None, stale_max_age_s: float) -> Early | None:
    """Stage 1: user features + session state in one round trip; the in-process stale copy or popularity when
    the store is down. Also settles what the user already consumed (excluded unless the surface allows repeats)."""
    req, response, n = tr.req, tr.response, tr.req["num_results"]
    t = time.perf_counter()
    try:
        if store is None:
            raise ConnectionError("no online store configured")
        tr.user_row, tr.session, tr.version = store.fetch(req["user_id"], req["session_id"])
        tr.table = store.item_table(tr.version)
    except REDIS_ERRORS as exc:
        tr.lat["feature_fetch"] = _ms(time.perf_counter() - t)
        stale = store.stale(req["user_id"], stale_max_age_s) if store is not None and bundle is not None else None
        if store is None or stale is None:
            log.warning("online store unavailable (%s: %s); serving popularity", type(exc).__name__, exc)
            if bundle is not None:
                ranked = bundle.popular(n, segment=req["device_type"], region=req["geo_region"])
            else:
                ranked = store.last_popular() if store is not None else []
            return FALLBACK_REDIS, _popularity_items(ranked, n)
        # the in-process copy of this user's features (no session state: that lives only in Redis)
        tr.user_row, tr.version, age = stale
        tr.session = None
        tr.table = store.item_table(tr.version)
        tr.served_path = SERVED_STALE
        response["stale_feature_age_s"] = round(age, 1)
        log.info("online store unavailable (%s); serving %s from features %.0fs old", type(exc).__name__,
                 req["user_id"], age)
    tr.lat["feature_fetch"] = _ms(time.perf_counter() - t)
    response["feature_version"] = tr.version
    if tr.version is None and tr.served_path == SERVED_TWO_STAGE:
        # the store answered but holds no snapshot (e.g. Redis restarted empty; orchestration's
        # online_store_empty_sensor rebuilds it): every user and item feature is its registry default
        tr.served_path = SERVED_NO_FEATURES
        response["missing_features"] = ["user", "item"]
    tr.seen = list((tr.session or {}).get("last_items", []))
    tr.consumed = consumed_history(tr.user_row)
    tr.repeats = req["surface"] in tr.cfg.repeat_surfaces
    # what the user already consumed (session + history) is not recommended again, unless the surface
    # allows repeats (then the "recently_engaged" channel offers it to the ranker like any candidate)
    tr.seen_set = set() if tr.repeats else set(tr.seen) | set(tr.consumed)
    return None


def _no_model(tr: Trace, store: FeatureReader) -> Early:
    """No model: the store's popular list, minus what the session already engaged."""
    try:
        ranked = store.popular(tr.version) or store.last_popular()
    except REDIS_ERRORS:
        ranked = store.last_popular()
    return FALLBACK_NO_MODEL, _popularity_items(ranked, tr.req["num_results"], tr.seen_set)


def _segment_popular(tr: Trace, bundle: Any) -> Early:
    """The model failed or found nothing: the user's segment's popular list, minus what was consumed."""
    req, n = tr.req, tr.req["num_results"]
    ranked = bundle.popular(n + len(tr.seen_set), segment=req["device_type"], region=req["geo_region"])
    return FALLBACK_MODEL_ERROR, _popularity_items(ranked, n, tr.seen_set)


def _retrieve(tr: Trace, bundle: Any, store: FeatureReader, channels: tuple[Channel, ...] | None) -> Early | None:
    """Stage 2: candidates from ANN on the session-aware user vector, co-visitation, trending and fresh."""
    req, table, seen, consumed, version = tr.req, tr.table, tr.seen, tr.consumed, tr.version
    assert table is not None  # stage 1 answered early otherwise
    t = time.perf_counter()
    query = tr.query = np.asarray(bundle.user_vector(req["user_id"], tower_history(seen, consumed)), dtype=np.float32)

    def trending(k: int) -> list[str]:
        # what is popular now (the online snapshot's recent clicks) interleaved with what the user's segment
        # clicked over the training window: recency carries cold users, the segment their context
        try:
            recent = (store.popular(version) if version else [])[:k]
        except REDIS_ERRORS:
            recent = []
        segment = bundle.popular(k, segment=req["device_type"], region=req["geo_region"])
        merged = [i for pair in zip(recent, segment) for i in pair] + recent[len(segment):] + segment[len(recent):]
        return list(dict.fromkeys(merged))[:k]

    producers = {
        "ann": lambda k: bundle.retrieve(query, min(k, len(bundle.item_ids)))[0],
        "co_visitation": lambda k: co_visitation(table.co_items_for(seen[:10]), seen, k),
        "trending": trending,
        "fresh": lambda k: fresh_items(*table.fresh_window(), bundle.item_row, tr.now_ms, k),
    }
    if not seen and consumed:  # no live session: co-visitation starts from the user's latest consumption
        producers["co_visitation"] = lambda k: co_visitation(table.co_items_for(consumed[:10]), consumed, k)
    producers["item_similarity"] = lambda k: bundle.similar_items(_history(tr), k)
    if tr.repeats:
        producers["recently_engaged"] = lambda k: list(dict.fromkeys(seen + consumed))[:k]
    tr.candidates, contributed, channel_errors = run_channels(
        producers, req["candidate_pool_size"], tr.seen_set,
        channels_for_budget(req["max_latency_ms"], channels or DEFAULT_CHANNELS))
    tr.response["candidate_channels"] = contributed
    if channel_errors:
        tr.response["channel_errors"] = channel_errors
    tr.lat["candidate_retrieval"] = _ms(time.perf_counter() - t)
    return _segment_popular(tr, bundle) if not tr.candidates else None


def _history(tr: Trace) -> list[str]:
    """What the user engaged with, session first then consumption (most recent first): the item-similarity input."""
    return list(dict.fromkeys(tr.seen + tr.consumed))


def _rank(tr: Trace, bundle: Any) -> None:
    """Stage 3: the candidates' features over the shared feature functions, then the ranker."""
    assert tr.table is not None
    t = time.perf_counter()
    tr.vectors = bundle.item_vectors(tr.candidates)
    affinity = tr.vectors @ tr.query
    item_cols = tr.table.columns_for(tr.candidates)
    tr.categories = item_cols["category"].tolist()
    rows = build_rows(tr.user_row, tr.session, tr.candidates, item_cols, affinity, tr.now_ms, tr.req["device_type"],
                      tr.consumed)
    # the features straight into the ranker's column order (the shared feature functions, no frame, no reorder)
    tr.feature_names = bundle.ranker_columns
    tr.feats = feature_matrix(rows, len(tr.candidates), tr.feature_names)
    tr.scores = np.asarray(bundle.rank_matrix(tr.feats, similarity=bundle.history_similarity(_history(tr), tr.candidates)),
                           dtype=np.float64)
    if tr.scores.shape[0] != len(tr.candidates) or not np.all(np.isfinite(tr.scores)):
        raise RuntimeError("ranker returned malformed scores")
    tr.lat["ranking_inference"] = _ms(time.perf_counter() - t)


def _post_process(tr: Trace, keep_features: bool) -> list[dict]:
    """Stage 4: MMR diversity, session-intent slots, category runs, exploration (with each slot's propensity)."""
    assert tr.table is not None
    t = time.perf_counter()
    cfg, candidates, scores, n, pool = tr.cfg, tr.candidates, tr.scores, tr.req["num_results"], tr.req["candidate_pool_size"]
    order = np.argsort(-scores, kind="stable")
    picked = mmr(order, scores, tr.vectors, n, cfg.mmr_lambda)
    picked_set = set(picked)
    diversified = np.array(picked + [int(i) for i in order if int(i) not in picked_set])
    top, intent = apply_session_intent(diversified, n, candidates, tr.table.category, tr.session,
                                       slot_share=cfg.intent_slot_share)
    if intent:
        tr.response["rerank"] = intent
    category = dict(enumerate(tr.categories))  # = table.category.get(candidate), read in stage 3
    top = limit_category_runs(top, [int(i) for i in diversified], category, cfg.max_category_run)
    rng = request_rng(tr.response["request_id"])
    if cfg.exploration == "thompson":
        top, propensity = thompson(top, [int(i) for i in order[:pool]], scores, cfg.thompson_strength, rng,
                                   cfg.thompson_draws)
    else:
        top, propensity = explore(top, [int(i) for i in order[:pool]], cfg.epsilon, rng, cfg.explore_from)
    items = [{"item_id": candidates[i], "score": round(float(scores[i]), 6), "rank": r + 1,
              "propensity": round(float(propensity[r]), 6)} for r, i in enumerate(top)]
    if keep_features:  # the exact values the ranker scored, for the log and the skew check
        names = tr.feature_names
        for i, values in zip(top, tr.feats[top].tolist()):
            tr.shown_features[candidates[i]] = dict(zip(names, values))
    tr.lat["post_processing"] = _ms(time.perf_counter() - t)
    return items


def personalize(request: dict, bundle: Any | None, store: FeatureReader | None, now_ms: int | None = None,
                log_impression: Callable[[dict], None] | None = None, rerank: RerankConfig | None = None,
                request_id: str | None = None, channels: tuple[Channel, ...] | None = None,
                stale_max_age_s: float = STALE_MAX_AGE_S) -> dict:
    """Answer one ranking request (see the module docstring). Raises ValueError only on bad input.

    The stages run over one `Trace`: features (1), candidates (2), ranking (3), post-processing (4); any stage
    may answer early with a fallback, and every answer is closed by `_finish`.
    `log_impression` receives serving.impressions.impression_record(...) for every answer, with the
    ranker's feature values for each shown item (DESIGN invariant 6); it must not block. `channels`
    replaces the candidate channels (the offline replay keeps their shares and lifts their time budgets).
    Settings come in as arguments (`rerank`, `stale_max_age_s`), never from the environment: the entry point
    (serving/service.py) builds them once from it.
    """
    tr = _begin(request, bundle, now_ms, rerank, request_id)
    early = _fetch_features(tr, bundle, store, stale_max_age_s)
    if early is None and bundle is None:
        assert store is not None  # no store and no model already answered from the popularity fallback
        early = _no_model(tr, store)
    if early is not None:
        return _finish(tr, *early, log_impression)
    assert store is not None  # a missing store answered in stage 1
    try:
        early = _retrieve(tr, bundle, store, channels)
        if early is not None:
            return _finish(tr, *early, log_impression)
        _rank(tr, bundle)
    except Exception as exc:  # noqa: BLE001 - any model failure must still answer
        log.exception("ranking failed for %s; serving popularity: %s", tr.req["user_id"], exc)
        return _finish(tr, *_segment_popular(tr, bundle), log_impression)
    return _finish(tr, tr.served_path, _post_process(tr, log_impression is not None), log_impression)


def session_intent(session: Mapping[str, Any] | None) -> tuple[str | None, float]:
    """The session's dominant category and its share of the decayed category weights, if the intent is clear."""
    if not session or len(session.get("last_items", [])) < INTENT_MIN_ENGAGEMENTS:
        return None, 0.0
    weights: Mapping[str, float] = session.get("cat_weights") or {}
    total = float(sum(weights.values()))
    if total <= 0:
        return None, 0.0
    category, weight = max(weights.items(), key=lambda kv: (kv[1], kv[0]))
    share = weight / total
    return (category, share) if share >= INTENT_MIN_SHARE else (None, 0.0)


def apply_session_intent(order: np.ndarray, n: int, candidates: list[str], category_of: Mapping[str, Any],
                         session: Mapping[str, Any] | None, slot_share: float = INTENT_SLOT_SHARE
                         ) -> tuple[list[int], dict | None]:
    """Top-n candidate positions (by score) with the session-intent slots filled; and what the rule did."""
    top = [int(i) for i in order[:n]]
    target, share = session_intent(session)
    if target is None or slot_share <= 0:
        return top, None
    slots = min(n, math.ceil(n * slot_share * share - 1e-9))
    have = sum(1 for i in top if category_of.get(candidates[i]) == target)
    if have >= slots:
        return top, {"session_intent": target, "slots": slots, "promoted": 0}
    promote = [int(i) for i in order[n:] if category_of.get(candidates[int(i)]) == target][:slots - have]
    if not promote:
        return top, {"session_intent": target, "slots": slots, "promoted": 0}
    # make room by dropping the lowest-scored results outside the intent category
    rank_of = {int(i): r for r, i in enumerate(order)}
    others = [i for i in top if category_of.get(candidates[i]) != target]
    intent = [i for i in top if category_of.get(candidates[i]) == target]
    n_others = n - len(intent) - len(promote)
    chosen = intent + promote + others[:max(n_others, 0)]
    chosen.sort(key=lambda i: rank_of[i])
    return chosen, {"session_intent": target, "slots": slots, "promoted": len(promote)}


__all__ = ["SERVED_NO_FEATURES", "personalize", "validate_request", "build_rows", "consumed_history", "session_intent", "apply_session_intent", "SERVED_TWO_STAGE", "FALLBACK_REDIS",
           "FALLBACK_NO_MODEL", "FALLBACK_MODEL_ERROR"]
