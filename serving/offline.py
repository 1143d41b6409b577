"""The served pipeline replayed offline: what `POST /v1/personalize` would have answered at a past moment.

The catalog evaluation (training/served_eval.py) must score exactly what users get: the same
`serving.pipeline.personalize` (channels, ranker, re-ranking, exclusions, cold-start path) over
the whole catalog. Only the feature source differs: `SnapshotStore` answers the online store's
read interface from the offline snapshot the online store held at that moment
(features.history.serving_snapshot), and the session state is folded from the session's events
with the streaming job's own `update_session`. Nothing here re-implements a serving rule.
The evaluation protocol and the prior fit that drive this replay are training code (training/served_eval.py):
training may import serving, never the reverse (tests/test_layering.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from features.functions import WeightMap, new_session_state, update_session
from features.online import FRESH_WINDOW, OnlineStore
from features.online_codec import ItemCodec
from features.online_items import ItemTable
from features.registry import ITEM_STORE_COLUMNS
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
        self._maps: dict[tuple[str, str], WeightMap] = {}  # (map column, item id) -> its map decoded once
        newest = sorted(published.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:FRESH_WINDOW]
        self._fresh = ([i for i, _ in newest], np.array([t for _, t in newest], dtype=np.float64))
        self.category: dict[str, Any] = {}
        if "category" in self.codec.text:
            decoded = self.columns_for(list(self._rows))
            self.category = dict(zip(self._rows, decoded["category"].tolist()))

    def columns_for(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        """The online table's columns_for: map columns served as the online store serves a row it has read before
        (its map decoded once into a features.functions.WeightMap, the weights' total summed once, the same values
        as the packed row), so a replay of thousands of requests does not decode and sum the same candidates'
        co-click maps in every request."""
        blank = self.codec.blank
        known: dict[str, dict[int, WeightMap]] = {}  # codec.decode's cache shape: {map column: {row: its map}}
        for col in self.codec.maps:
            known[col] = {r: m for r, i in enumerate(item_ids) if (m := self._maps.get((col, i))) is not None}
        cols = self.codec.decode([self._rows.get(i, blank) for i in item_ids], ITEM_STORE_COLUMNS,
                                 lambda col, top: self._values[col], known)
        for col in self.codec.maps:
            if col not in cols:
                continue
            rows = cols[col]
            for r, iid in enumerate(item_ids):
                row = rows[r]
                if row is not None and type(row) is not WeightMap:
                    rows[r] = self._maps[(col, iid)] = WeightMap(row.items())
        return cols

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


@contextmanager
def one_thread_per_request() -> Iterator[None]:
    """Run a replay the way a server worker runs requests: BLAS/OpenMP pools and torch at one thread (the
    server sets OMP_NUM_THREADS=1 and torch.set_num_threads(1) at start). A request's matrices are tiny; with
    the default pools torch's idle OpenMP threads spin after the user tower while NumPy's BLAS threads wait
    for a core, which multiplies the CPU of every replayed request on a small machine (MMR's 30 x 30
    similarity took ~6 ms instead of 0.07 ms inside the model_evaluation step)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def request_profiles(users: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """user id -> the catalog's device and region, what a client sends with each request: built once per user
    table (one replay asks served_recommender for many systems and prior weights over the same users)."""
    if users is None:
        return {}
    cols = [c for c in ("device_type", "geo_region") if c in users]
    return {str(r["user_id"]): r for r in users[["user_id", *cols]].to_dict("records")}


def memoized_model(bundle: Any) -> Any:
    """A shallow copy of `bundle` (its own manifest, the same towers, index, ranker and similarity) whose pure model
    functions remember their answers: the ranker's raw scores of a feature matrix (keyed by the matrix's sha256 and
    shape), the ANN search of a query and the item-similarity channel.

    A replay asks one model version the same questions many times: the prior fit replays the same users once per
    weight tried, the evaluation once per system variant (with / without exploration, MMR). Retrieval, features and
    the ranker's raw scores do not depend on those (the priors are fused after the ranker, models/bundle.py
    `_score`; re-ranking and exploration come after the scores), so each is computed once per (model, request),
    not once per trial -- the same answers, since every memoized function is deterministic in its arguments.
    The answers are returned read-only or copied, so no caller can change a remembered one."""
    out = copy.copy(bundle)
    predict = bundle.scorer if bundle.scorer is not None else (lambda x: bundle.ranker.predict(x, num_threads=1))
    scores: dict[tuple, np.ndarray] = {}
    found: dict[tuple, tuple[list[str], np.ndarray]] = {}
    similar: dict[tuple, list[str]] = {}

    def scorer(values: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(values, dtype=np.float64)
        key = (x.shape, hashlib.sha256(x.tobytes()).digest())
        hit = scores.get(key)
        if hit is None:
            hit = scores[key] = np.asarray(predict(x), dtype=np.float64)
        return hit.copy()

    def retrieve(query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
        q = np.ascontiguousarray(query, dtype=np.float32)
        key = (q.tobytes(), int(k))
        hit = found.get(key)
        if hit is None:
            ids, sc = bundle.retrieve(q, k)
            sc = np.asarray(sc)
            sc.setflags(write=False)
            hit = found[key] = (list(ids), sc)
        return list(hit[0]), hit[1]

    def similar_items(history: list[str], k: int) -> list[str]:
        key = (tuple(history), int(k))
        if key not in similar:
            similar[key] = list(bundle.similar_items(history, k))
        return list(similar[key])

    out.use_scorer(scorer, bundle.scorer_name)
    # the user tower needs no memo here: Bundle.user_vector keeps its answers per (user, history) for the version,
    # in the cache this shallow copy shares
    out.retrieve, out.similar_items = retrieve, similar_items
    return out


def served_recommender(bundle: Any, store: SnapshotStore, at_ms: int, profiles: Mapping[str, Mapping[str, Any]] | None = None,
                       surface: str = "home_feed", rerank: RerankConfig | None = None
                       ) -> Callable[[str, int], tuple[list[str], bool]]:
    """(user, k) -> the served top k at `at_ms` and whether the two-stage path served it (personalized).

    Each request carries the user's device and region from the catalog (`profiles`: request_profiles(users)),
    as a client would send them."""
    profile = profiles or {}

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

    def predict(case: Any, k: int) -> list[str]:  # a training.catalog_eval.SessionCase (duck-typed)
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


__all__ = ["REPLAY_CHANNELS", "FrameItemTable", "SnapshotStore", "describe_store", "memoized_model", "replay_request",
           "request_profiles",
           "served_recommender",
           "served_session_predictor", "session_state"]
