"""Feature functions shared by the batch job, the streaming job, training and serving.

Everything here is pure: plain dicts, numpy and pandas in, values out. The
adapters (Spark, Redis, HTTP) call these functions and never re-implement them.
"""
from __future__ import annotations

import json
from collections.abc import Mapping as AbcMapping
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from features.registry import REGISTRY, FeatureSpec

SESSION_MAX_ITEMS = 50
SESSION_HISTORY_FOR_TOWER = 10
USER_HISTORY_ITEMS = 10  # the user's latest consumed items user_history_co_engagement reads (features/history.py)
SESSION_CATEGORY_DECAY = 0.8
SESSION_GAP_CAP_S = 3600.0
ENGAGEMENT_TYPES = frozenset({"click", "add_to_cart", "purchase", "share"})
# a sampled catalog negative replayed beside the real events: it gets the session features an impression
# at that moment would get, and changes no state (training/dataset.py adds them, ingestion/labels.py samples them)
CANDIDATE_EVENT = "candidate"
FEATURE_QUERY_TYPES = frozenset({"impression", CANDIDATE_EVENT})
DEVICE_CODES = {"mobile": 0.0, "desktop": 1.0, "tablet": 2.0}
CTR_PRIOR_CLICKS = 1.0
CTR_PRIOR_IMPRESSIONS = 20.0


# --------------------------------------------------------------------------- session state
def new_session_state() -> dict[str, Any]:
    return {"last_items": [], "cat_weights": {}, "length": 0, "clicks": 0, "last_ts": 0}


def update_session(state: Mapping[str, Any], event_type: str, item_id: str | None,
                   category: str | None, ts_ms: int) -> dict[str, Any]:
    """Fold one event into a session state (returns a new dict; the input is unchanged).

    The streaming job applies this to each event from the stream; the training-set
    builder replays it over historical events, so both see identical session features.
    """
    out: dict[str, Any] = {
        "last_items": list(state.get("last_items", [])),
        "cat_weights": dict(state.get("cat_weights", {})),
        "length": int(state.get("length", 0)) + 1,
        "clicks": int(state.get("clicks", 0)),
        "last_ts": max(int(state.get("last_ts", 0)), int(ts_ms)),
    }
    if event_type in ENGAGEMENT_TYPES and item_id:
        if event_type == "click":
            out["clicks"] += 1
        items = [i for i in out["last_items"] if i != item_id]
        out["last_items"] = ([item_id] + items)[:SESSION_MAX_ITEMS]
        if category:
            out["cat_weights"] = fold_category(out["cat_weights"], category)
    return out


def fold_category(cat_weights: Mapping[Any, float], category: Any) -> dict[Any, float]:
    """The session's category weights after one engagement in `category`: the others decay, it gains 1."""
    weights = {c: w * SESSION_CATEGORY_DECAY for c, w in cat_weights.items()}
    weights[category] = weights.get(category, 0.0) + 1.0
    return {c: round(w, 6) for c, w in weights.items() if w > 1e-4}


def session_features(state: Mapping[str, Any] | None, item_ids: Iterable[str],
                     categories: Iterable[str | None], now_ms: int) -> dict[str, np.ndarray]:
    """Session features for a list of candidate items, from one session state."""
    item_ids = list(item_ids)
    categories = list(categories)
    n = len(item_ids)
    state = state or new_session_state()
    weights: Mapping[str, float] = state.get("cat_weights", {})
    total = float(sum(weights.values()))
    seen = set(state.get("last_items", []))
    last_ts = int(state.get("last_ts", 0))
    gap = SESSION_GAP_CAP_S if last_ts <= 0 else min(max((now_ms - last_ts) / 1000.0, 0.0), SESSION_GAP_CAP_S)
    share = np.array([weights.get(c, 0.0) / total if total > 0 and c else 0.0 for c in categories], dtype=np.float64)
    return {
        "session_length": np.full(n, float(state.get("length", 0))),
        "session_clicks": np.full(n, float(state.get("clicks", 0))),
        "session_category_share": share,
        "session_item_seen": np.array([1.0 if i in seen else 0.0 for i in item_ids]),
        "seconds_since_last_event": np.full(n, gap),
    }


def replay_session_features(events: pd.DataFrame, item_category: Mapping[str, str]) -> pd.DataFrame:
    """Session features for every impression (and CANDIDATE_EVENT row), from the events strictly before it in its session.

    Also returns `session_last_items` (JSON list, most recent first): the history the
    user tower pools at serving time, so the two-tower affinity is replayed too.

    `events` needs event_id, session_id, event_type, item_id, timestamp. Returns one
    row per impression event: event_id plus the session feature columns.

    The values are those of folding update_session over each session's events (a block of events sharing a
    timestamp sees only what came before it; a CANDIDATE_EVENT changes no state) and asking session_features
    before each block, computed without a per-row fold: counts and the last event time are prefix sums over
    the (session, time) order, "seen" is a search for the item's last engagement in the session, and only the
    category weights (fold_category, rounded at each step) and the JSON history run in Python, once per
    engagement and once per distinct history (tests/test_features_functions.py checks it against the fold)."""
    cols = ["session_length", "session_clicks", "session_category_share", "session_item_seen", "seconds_since_last_event"]
    ev = events.sort_values(["session_id", "timestamp"], kind="mergesort")
    n = len(ev)
    sid = ev["session_id"].to_numpy()
    ts = ev["timestamp"].to_numpy().astype(np.int64)
    kind = ev["event_type"].to_numpy()
    pos = np.arange(n, dtype=np.int64)
    new_session = np.ones(n, dtype=bool)
    new_session[1:] = sid[1:] != sid[:-1]
    new_block = new_session.copy()
    new_block[1:] |= ts[1:] != ts[:-1]
    session = np.cumsum(new_session, dtype=np.int64) - 1
    session_start = np.maximum.accumulate(np.where(new_session, pos, 0)) if n else pos
    block_start = np.maximum.accumulate(np.where(new_block, pos, 0)) if n else pos
    # items: truthy ids, their categories (None / "" = none) as dense codes, via the distinct items only
    item_code, item_uniques = pd.factorize(ev["item_id"].to_numpy(dtype=object))
    item_truthy = np.append(np.array([bool(u) for u in item_uniques], dtype=bool), False)[item_code]
    cat_of_unique = [item_category.get(u) for u in item_uniques]
    cat_code_u, _ = pd.factorize(pd.Series([c if c else None for c in cat_of_unique], dtype=object))
    cat_code = np.append(cat_code_u.astype(np.int64), -1)[item_code]
    update = kind != CANDIDATE_EVENT
    engaged = update & np.isin(kind, list(ENGAGEMENT_TYPES)) & item_truthy
    query = np.flatnonzero(np.isin(kind, list(FEATURE_QUERY_TYPES)))
    qb, qs = block_start[query], session_start[query]

    def before_block(flags: np.ndarray) -> np.ndarray:
        """Per query: the position of the last flagged row of its session before its block (-1: none)."""
        last = np.maximum.accumulate(np.where(flags, pos, -1)) if n else pos
        prior = np.where(qb > 0, last[np.maximum(qb - 1, 0)], -1)
        return np.where(prior >= qs, prior, -1)

    def count_before_block(flags: np.ndarray) -> np.ndarray:
        cum = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
        return (cum[qb] - cum[qs]).astype(np.float64)

    last_update = before_block(update)
    last_ts = np.where(last_update >= 0, np.maximum(ts[np.maximum(last_update, 0)], 0), 0)
    gap = np.where(last_ts <= 0, SESSION_GAP_CAP_S,
                   np.minimum(np.maximum((ts[query] - last_ts) / 1000.0, 0.0), SESSION_GAP_CAP_S))
    frame = pd.DataFrame({
        "event_id": pd.Series(ev["event_id"].to_numpy(dtype=object)[query], dtype=object),
        "session_length": count_before_block(update),
        "session_clicks": count_before_block(engaged & (kind == "click")),
        "session_category_share": _replayed_category_share(engaged & (cat_code >= 0), session, cat_code, query,
                                                           before_block(engaged & (cat_code >= 0))),
        "session_item_seen": _replayed_item_seen(engaged, session, item_code, query, qb),
        "seconds_since_last_event": gap.astype(np.float64),
        "session_last_items": pd.Series(_replayed_histories(engaged, item_uniques, item_code, query,
                                                            before_block(engaged), session_start), dtype=object),
    })
    return frame[["event_id", *cols, "session_last_items"]]


def _replayed_category_share(folds: np.ndarray, session: np.ndarray, cat_code: np.ndarray, query: np.ndarray,
                             state: np.ndarray) -> np.ndarray:
    """Per query: session_features' category share, from the category weights folded (fold_category) over its
    session's engagements with a category up to `state` (the last such row before the query's block; -1: none).

    Sessions repeat the same few weight maps: each distinct map is folded, summed and divided once."""
    rows = np.flatnonzero(folds)
    fresh = np.ones(len(rows), dtype=bool)
    fresh[1:] = session[rows[1:]] != session[rows[:-1]]
    maps: list[dict[Any, float]] = [{}]
    map_id: dict[tuple, int] = {(): 0}
    step: dict[tuple[int, int], int] = {}
    state_of_fold = np.empty(len(rows), dtype=np.int64)
    current = 0
    for k, (cat, first) in enumerate(zip(cat_code[rows].tolist(), fresh.tolist())):
        key = (0 if first else current, cat)
        current = step.get(key, -1)
        if current < 0:
            folded = fold_category(maps[key[0]], cat)
            current = map_id.setdefault(tuple(folded.items()), len(maps))
            if current == len(maps):
                maps.append(folded)
            step[key] = current
        state_of_fold[k] = current
    out = np.zeros(len(query), dtype=np.float64)
    ask = np.flatnonzero((state >= 0) & (cat_code[query] >= 0))
    if not len(ask):
        return out
    width = int(cat_code.max()) + 1
    pairs, inverse = np.unique(state_of_fold[np.searchsorted(rows, state[ask])] * width + cat_code[query[ask]],
                               return_inverse=True)
    totals = [float(sum(w.values())) for w in maps]
    shares = [maps[m].get(c, 0.0) / totals[m] if totals[m] > 0 else 0.0
              for m, c in zip((pairs // width).tolist(), (pairs % width).tolist())]
    out[ask] = np.asarray(shares, dtype=np.float64)[inverse]
    return out


def _replayed_item_seen(engaged: np.ndarray, session: np.ndarray, item_code: np.ndarray, query: np.ndarray,
                        block: np.ndarray) -> np.ndarray:
    """Per query: 1.0 if its item is among the session's SESSION_MAX_ITEMS latest distinct engaged items before
    its block: engaged before in the session, with fewer distinct other items engaged since."""
    n = len(engaged)
    rows = np.flatnonzero(engaged)
    out = np.zeros(len(query), dtype=np.float64)
    if not len(rows) or not len(query):
        return out
    width = int(item_code.max()) + 2
    pair = session[rows] * width + item_code[rows]
    pairs = np.unique(pair)
    # (pair, position) as one sortable key: the item's last engagement before a block is one search
    keyed = np.sort(np.searchsorted(pairs, pair) * n + rows)
    q_pair = session[query] * width + item_code[query]
    j = np.minimum(np.searchsorted(pairs, q_pair), len(pairs) - 1)
    known = (pairs[j] == q_pair) & (item_code[query] >= 0)
    at = np.searchsorted(keyed, j * n + block) - 1
    hit = known & (at >= 0) & (keyed[np.maximum(at, 0)] // n == j)
    last = np.where(hit, keyed[np.maximum(at, 0)] % n, -1)
    cum = np.concatenate([[0], np.cumsum(engaged, dtype=np.int64)])
    since = cum[block] - cum[np.maximum(last + 1, 0)]  # engagements after the item's last one: distinct ones or more
    seen = hit & (since < SESSION_MAX_ITEMS)
    for k in np.flatnonzero(hit & (since >= SESSION_MAX_ITEMS)).tolist():  # long sessions: count the distinct ones
        between = rows[(rows > last[k]) & (rows < block[k])]
        seen[k] = len(set(item_code[between].tolist())) < SESSION_MAX_ITEMS
    out[seen] = 1.0
    return out


def _replayed_histories(engaged: np.ndarray, item_uniques: Any, item_code: np.ndarray, query: np.ndarray,
                        state: np.ndarray, session_start: np.ndarray) -> np.ndarray:
    """Per query: JSON of the session's SESSION_HISTORY_FOR_TOWER latest distinct engaged items up to `state`
    (its last engagement before the query's block; -1: none), most recent first; one walk per distinct state."""
    rows = np.flatnonzero(engaged)
    out = np.full(len(query), json.dumps([]), dtype=object)
    has = np.flatnonzero(state >= 0)
    if not len(has):
        return out
    states, inverse = np.unique(state[has], return_inverse=True)
    texts = latest_distinct_json(item_code[rows].tolist(), [json.dumps(u) for u in item_uniques],
                                 np.searchsorted(rows, states), np.searchsorted(rows, session_start[states]),
                                 min(SESSION_HISTORY_FOR_TOWER, SESSION_MAX_ITEMS))
    out[has] = np.asarray(texts, dtype=object)[inverse]
    return out


def latest_distinct_json(codes: list[int], encoded: list[str], stops: np.ndarray, firsts: np.ndarray,
                         n: int) -> list[str]:
    """Per (stop, first) pair: the JSON list of the `n` latest distinct items of codes[first .. stop], newest
    first, as json.dumps writes it (`encoded[code]`: json.dumps of each distinct item, encoded once)."""
    texts: list[str] = []
    for j, lo in zip(np.asarray(stops).tolist(), np.asarray(firsts).tolist()):
        recent: list[int] = []
        while j >= lo and len(recent) < n:
            if codes[j] not in recent:
                recent.append(codes[j])
            j -= 1
        texts.append("[" + ", ".join([encoded[c] for c in recent]) + "]")
    return texts


# --------------------------------------------------------------------------- batch aggregates
def smoothed_ctr(clicks: np.ndarray | float, impressions: np.ndarray | float) -> np.ndarray | float:
    """CTR with a Beta prior so one lucky click does not read as a 100% CTR."""
    return (np.asarray(clicks, dtype=float) + CTR_PRIOR_CLICKS) / (np.asarray(impressions, dtype=float) + CTR_PRIOR_IMPRESSIONS)


@lru_cache(maxsize=200_000)
def _parse_counts(raw: str) -> dict[str, float]:
    return json.loads(raw) if raw else {}


class WeightMap(dict):
    """A map column (key -> weight) decoded once, holding the sum of its weights (summed in its stored order, as
    `sum(values())` would): the online store keeps one per cached item row of a version, so co_engagement's
    denominator is not summed again for every request."""

    __slots__ = ("total",)

    def __init__(self, pairs: Iterable[tuple[str, float]] = ()) -> None:
        super().__init__(pairs)
        self.total = float(sum(self.values()))


_UNSET = object()


def _as_counts(counts: Any) -> Mapping[str, float] | None:
    """A counts cell (JSON text, a mapping, None / NaN) as a mapping, or None when no counts are known."""
    if isinstance(counts, str):
        return _parse_counts(counts)
    return counts if isinstance(counts, AbcMapping) else None  # collections.abc: a fast check


def category_affinity(user_category_counts: Iterable[str | Mapping[str, float] | None],
                      categories: Iterable[str | None]) -> np.ndarray:
    """Share of a user's recent clicks that fell in each row's item category. A request's rows all carry the same
    user's counts (one object): it is parsed and summed once, not once per row, and each distinct category's
    share is computed once (the same division as the per-row path below, so the same values)."""
    if isinstance(user_category_counts, list) and user_category_counts \
            and user_category_counts.count(user_category_counts[0]) == len(user_category_counts):
        cats = categories if isinstance(categories, list) else list(categories)
        counts_of = _as_counts(user_category_counts[0])
        total_of = float(sum(counts_of.values())) if counts_of else 0.0
        if not counts_of or total_of <= 0:
            return np.zeros(len(cats), dtype=np.float64)
        share_of = {cat: (counts_of.get(cat, 0.0) / total_of if isinstance(cat, str) and cat else 0.0)
                    for cat in set(cats)}
        return np.fromiter(map(share_of.__getitem__, cats), dtype=np.float64, count=len(cats))
    out = []
    last: Any = _UNSET
    shares: dict[Any, float] = {}  # category -> its share, for the current counts
    counts: Mapping[str, float] | None = None
    total = 0.0
    for cell, cat in zip(user_category_counts, categories):
        if cell is not last:
            last, counts, shares = cell, _as_counts(cell), {}
            total = float(sum(counts.values())) if counts else 0.0
        share = shares.get(cat) if isinstance(cat, str) else 0.0
        if share is None:
            share = shares[cat] = counts.get(cat, 0.0) / total if counts and cat and total > 0 else 0.0
        out.append(share)
    return np.asarray(out, dtype=np.float64)


def tower_history(session_items: Iterable[str] | None, user_items: Iterable[str] | None,
                  limit: int = SESSION_HISTORY_FOR_TOWER) -> list[str]:
    """What the user tower pools: the session's latest items, then the user's latest consumed ones (most
    recent first, distinct). A returning user without a live session is still known by what they did."""
    out: list[str] = []
    for item in [*(session_items or ()), *(user_items or ())]:
        if item not in out:
            out.append(item)
            if len(out) == limit:
                break
    return out


def tower_history_column(rows: pd.DataFrame) -> list[str]:
    """tower_history per row of a training frame (session_last_items, user_recent_items: JSON lists)."""
    n = len(rows)
    sess = rows["session_last_items"].tolist() if "session_last_items" in rows else [None] * n
    user = rows["user_recent_items"].tolist() if "user_recent_items" in rows else [None] * n
    cache: dict[tuple, str] = {}
    out = []
    for a, b in zip(sess, user):
        key = (a if isinstance(a, str) else json.dumps(list(a)) if isinstance(a, (list, tuple)) else "[]",
               b if isinstance(b, str) else json.dumps(list(b)) if isinstance(b, (list, tuple)) else "[]")
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = json.dumps(tower_history(_parse_list(key[0]), _parse_list(key[1])))
        out.append(hit)
    return out


def co_engagement(co_items: Iterable[str | Mapping[str, float] | None],
                  last_items: Iterable[str | list | tuple | None], limit: int = SESSION_HISTORY_FOR_TOWER) -> np.ndarray:
    """Per row: the share of the item's co-click mass (sessions that clicked both) shared with the
    `limit` latest items of the history (the session's, or the user's). 0 without history or co-clicks.
    A request's rows share one history object: it is parsed and cut once, not once per row."""
    out = []
    last: Any = _UNSET
    recent: list | tuple = ()
    zeros: tuple[float, ...] = ()
    for co, hist in zip(co_items, last_items):
        if hist is not last:
            last = hist
            if isinstance(hist, str):
                hist = _parse_list(hist)
            recent = hist[:limit] if isinstance(hist, (list, tuple)) and hist else ()
            zeros = (0.0,) * len(recent)
        if type(co) is WeightMap:  # the online store's decoded row: its total is already summed
            if not co or not recent or co.keys().isdisjoint(recent):
                out.append(0.0)
                continue
            shared = sum(map(co.get, recent, zeros))  # co.get(i, 0.0) over the history, in its order
            out.append(0.0 if shared == 0.0 else shared / (1.0 + co.total))
            continue
        co = _as_counts(co)
        if not co or not recent:
            out.append(0.0)
            continue
        # a packed row (features.online.PackedMap) finds all the history's keys in one scan of its key blob
        # instead of one search per key; the sum below runs over the history in the same order either way
        found = co.weights_of(recent) if hasattr(co, "weights_of") else co
        if not found:
            out.append(0.0)  # no shared co-clicks: 0 / (1 + total) without reading the total
            continue
        shared = sum(found.get(i, 0.0) for i in recent)
        if shared == 0.0:
            out.append(0.0)
            continue
        total = float(sum(co.values()))
        out.append(shared / (1.0 + total))
    return np.asarray(out, dtype=np.float64)


@lru_cache(maxsize=200_000)
def _parse_list(raw: str) -> tuple:
    return tuple(json.loads(raw)) if raw else ()


# --------------------------------------------------------------------------- request-time
def context_features(ts_ms: np.ndarray | int, device_type: Iterable[str] | str, n: int | None = None) -> dict[str, np.ndarray]:
    ts = np.asarray(ts_ms, dtype=np.int64)
    if n is not None and ts.ndim == 0:
        ts = np.full(n, int(ts))
    if isinstance(device_type, str):
        codes = np.full(len(ts), DEVICE_CODES.get(device_type, 0.0))
    else:
        codes = np.array([DEVICE_CODES.get(d, 0.0) for d in device_type], dtype=float)
    return {
        "hour_of_day": ((ts // 3_600_000) % 24).astype(float),
        "day_of_week": (((ts // 86_400_000) + 3) % 7).astype(float),  # 1970-01-01 was a Thursday
        "device_code": codes,
    }


def account_age_days(signup_ts: np.ndarray, now_ms: np.ndarray | int) -> np.ndarray:
    return np.clip((np.asarray(now_ms, dtype=float) - np.asarray(signup_ts, dtype=float)) / 86_400_000.0, 0.0, None)


def item_age_hours(publish_ts: np.ndarray, now_ms: np.ndarray | int) -> np.ndarray:
    age = (np.asarray(now_ms, dtype=float) - np.asarray(publish_ts, dtype=float)) / 3_600_000.0
    return np.clip(age, 0.0, None)


# --------------------------------------------------------------------------- assembly
# --------------------------------------------------------------------------- one function per feature
# the raw columns a feature function reads: a training frame (pandas) or one request's columns (a dict of arrays
# and lists, serving.pipeline.build_rows); a function reads them only by name (`rows[col]`, `col in rows`)
Columns = Any
FeatureFunction = Callable[[Columns], np.ndarray]
FEATURE_FUNCTIONS: dict[str, FeatureFunction] = {}


def feature_function(name: str) -> Callable[[FeatureFunction], FeatureFunction]:
    """Register how the feature `name` is computed from its registry `inputs` (NaN where unknown)."""
    def register(fn: FeatureFunction) -> FeatureFunction:
        FEATURE_FUNCTIONS[name] = fn
        return fn
    return register


def _numeric(rows: Columns, col: str) -> np.ndarray:
    column = rows[col]
    dtype = getattr(column, "dtype", None)
    if dtype is not None and dtype.kind in "fiu":  # already numeric: to_numeric would return it unchanged (~40 us)
        return np.asarray(column, dtype=float)
    return np.asarray(pd.to_numeric(column, errors="coerce"), dtype=float)


def _cells(rows: Columns, col: str) -> list:
    """A column's values as a list of Python objects (a frame's Series or an array: tolist; a list as it is)."""
    column = rows[col]
    return column if isinstance(column, list) else column.tolist()


@feature_function("user_account_age_days")
def _account_age(rows: Columns) -> np.ndarray:
    signup = _numeric(rows, "signup_ts")
    return np.where(np.isnan(signup), np.nan, account_age_days(np.nan_to_num(signup), _numeric(rows, "request_ts")))


@feature_function("item_age_hours")
def _item_age(rows: Columns) -> np.ndarray:
    publish = _numeric(rows, "publish_ts")
    return np.where(np.isnan(publish), np.nan, item_age_hours(np.nan_to_num(publish), _numeric(rows, "request_ts")))


@feature_function("user_category_affinity")
def _category_affinity(rows: Columns) -> np.ndarray:
    return category_affinity(_cells(rows, "user_category_clicks_30d"), _cells(rows, "category"))


@feature_function("user_category_pref_decayed")
def _category_pref_decayed(rows: Columns) -> np.ndarray:
    return category_affinity(_cells(rows, "user_category_decayed_30d"), _cells(rows, "category"))


@feature_function("co_engagement")
def _co_engagement(rows: Columns) -> np.ndarray:
    return co_engagement(_cells(rows, "co_items_30d"), _cells(rows, "session_last_items"))


@feature_function("user_history_co_engagement")
def _history_co_engagement(rows: Columns) -> np.ndarray:
    return co_engagement(_cells(rows, "co_items_30d"), _cells(rows, "user_recent_items"), limit=USER_HISTORY_ITEMS)


@feature_function("hour_of_day")
def _hour(rows: Columns) -> np.ndarray:
    return context_features(np.asarray(rows["request_ts"], dtype=np.int64), "mobile")["hour_of_day"]


@feature_function("day_of_week")
def _weekday(rows: Columns) -> np.ndarray:
    return context_features(np.asarray(rows["request_ts"], dtype=np.int64), "mobile")["day_of_week"]


@feature_function("device_code")
def _device(rows: Columns) -> np.ndarray:
    return np.array([DEVICE_CODES.get(d, 0.0) if isinstance(d, str) else 0.0 for d in rows["device_type"]], dtype=float)


def _feature_values(rows: Columns, spec: FeatureSpec, n: int) -> np.ndarray:
    """One feature over `n` rows: its function over its declared inputs (or the column of its name), the registry
    default where an input column is absent or a value unknown."""
    if not all(c in rows for c in spec.input_columns):
        return np.full(n, float(spec.default))
    fn = FEATURE_FUNCTIONS.get(spec.name)
    values = np.asarray(fn(rows), dtype=float) if fn is not None else _numeric(rows, spec.name)
    return np.where(np.isnan(values), float(spec.default), values)


def assemble_features(rows: pd.DataFrame) -> pd.DataFrame:
    """The ranker's feature frame, in registry order, from raw columns: for each registered feature, its
    function over its declared inputs (or the column of its name), the registry default where an input
    column is absent or a value unknown. Used verbatim by training (millions of rows) and serving (200 rows),
    so adding a feature is one declaration in the registry plus, if it is not a plain column, one function.
    """
    n = len(rows)
    return pd.DataFrame({spec.name: _feature_values(rows, spec, n) for spec in REGISTRY}, index=rows.index)


@lru_cache(maxsize=64)
def _specs_of(names: tuple[str, ...]) -> tuple[FeatureSpec, ...]:
    """The registry declarations of a model's feature columns, in its order: looked up once per column order (one
    per model version), not per request. KeyError for a column the registry does not declare."""
    by_name = {spec.name: spec for spec in REGISTRY}
    return tuple(by_name[name] for name in names)


def feature_matrix(rows: Columns, n: int, names: Sequence[str]) -> np.ndarray:
    """float64 [n, len(names)]: column j is the feature names[j], computed exactly as assemble_features computes it
    (the same function and default), laid out in the ranker's column order, so a request's rows go to the ranker
    with no frame built and no reorder. `rows` holds the raw columns (serving.pipeline.build_rows)."""
    specs = _specs_of(tuple(names))
    out = np.empty((n, len(specs)), dtype=np.float64)
    for j, spec in enumerate(specs):
        out[:, j] = _feature_values(rows, spec, n)
    return out


__all__ = [name for name in dir() if not name.startswith("_")] + ["REGISTRY"]
