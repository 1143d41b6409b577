"""What a user already consumed, and the snapshot the online store serves at a moment.

`consumed_items` is one rule for "already consumed" (any engagement, skips included: a user who
rated or skipped an item has seen it), read by the online store (materialized with the user's
row), by the server (excluded from the ranking unless the surface allows repeats, and the
history the user tower pools when the session is empty) and by the catalog evaluation replay.
`serving_snapshot` is the one rule for which offline rows the online store holds at a moment:
the materialize asset takes it at the newest snapshot, the evaluation replay at the split time.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from features.functions import ENGAGEMENT_TYPES, USER_HISTORY_ITEMS

CONSUMED_TYPES: frozenset[str] = frozenset(ENGAGEMENT_TYPES | {"skip"})
CONSUMED_MAX_ITEMS = 500  # newest first; older consumption is rarely re-recommended anyway
POPULAR_LIST_SIZE = 500
CATALOG_COLUMNS = ("category", "publish_ts")  # item store columns the catalog owns
USER_RECENT_ITEMS = USER_HISTORY_ITEMS  # the user's latest consumed items user_history_co_engagement reads


def consumed_items(events: pd.DataFrame, as_of_ms: int | None = None, cap: int = CONSUMED_MAX_ITEMS) -> pd.DataFrame:
    """user_id, consumed_items (JSON list of distinct item ids, most recent first) from events before as_of."""
    ev = events[events["event_type"].isin(CONSUMED_TYPES) & events["item_id"].notna() & events["user_id"].notna()]
    if as_of_ms is not None:
        ev = ev[ev["timestamp"] < int(as_of_ms)]
    if ev.empty:
        return pd.DataFrame({"user_id": pd.Series([], dtype=object), "consumed_items": pd.Series([], dtype=object)})
    ev = (ev[["user_id", "item_id", "timestamp"]].sort_values("timestamp", ascending=False, kind="mergesort")
          .drop_duplicates(["user_id", "item_id"]))
    lists = ev.groupby("user_id", sort=True)["item_id"].agg(lambda s: json.dumps([str(i) for i in s.head(cap)]))
    return pd.DataFrame({"user_id": lists.index.astype(str), "consumed_items": lists.to_numpy()})


def recent_items_before(engagements: pd.DataFrame, rows: pd.DataFrame, n: int = USER_RECENT_ITEMS) -> list[str]:
    """For each row (user_id, timestamp): JSON list of the user's `n` latest distinct consumed items strictly
    before the row's timestamp, most recent first: the point-in-time twin of consumed_items()[:n], which the
    server reads from the online store (training rows see only their past).

    One vectorized search finds each row's last prior event (its position in the (user, time) order); the
    Python walk-back and the JSON encoding run once per distinct position, not per row (the impressions and
    negatives of one moment share it)."""
    empty = json.dumps([])
    ev = engagements[engagements["event_type"].isin(CONSUMED_TYPES) & engagements["item_id"].notna()
                     & engagements["user_id"].notna()]
    if ev.empty or not len(rows):
        return [empty] * len(rows)
    ev = ev[["user_id", "item_id", "timestamp"]].sort_values(["user_id", "timestamp"], kind="mergesort")
    users = pd.Index(pd.unique(ev["user_id"].to_numpy()))
    ev_code = users.get_indexer(ev["user_id"]).astype(np.int64)
    ev_ts = ev["timestamp"].to_numpy(dtype=np.int64)
    items = ev["item_id"].astype(str).tolist()
    row_code = users.get_indexer(rows["user_id"]).astype(np.int64)
    row_ts = rows["timestamp"].to_numpy(dtype=np.int64)
    known = np.flatnonzero(row_code >= 0)
    out = np.full(len(rows), empty, dtype=object)
    if not len(known):
        return out.tolist()
    code, ts = row_code[known], row_ts[known]
    first = np.searchsorted(ev_code, code, side="left")  # the user's first event
    last = _pair_searchsorted(ev_code, ev_ts, code, ts) - 1  # the user's last event strictly before the row
    hit = last >= first
    stops, inverse = np.unique(last[hit], return_inverse=True)
    first_of = np.empty(len(stops), dtype=np.int64)
    first_of[inverse] = first[hit]
    texts: list[str] = []
    for j, lo in zip(stops.tolist(), first_of.tolist()):
        recent: list[str] = []
        while j >= lo and len(recent) < n:
            if items[j] not in recent:
                recent.append(items[j])
            j -= 1
        texts.append(json.dumps(recent))
    out[known[hit]] = np.asarray(texts, dtype=object)[inverse]
    return out.tolist()


def _pair_searchsorted(a_code: np.ndarray, a_ts: np.ndarray, q_code: np.ndarray, q_ts: np.ndarray) -> np.ndarray:
    """searchsorted(side="left") of the pairs (q_code, q_ts) into the (code, ts)-sorted pairs (a_code, a_ts).

    Timestamps become their dense rank over both sets, so one int64 key (code × ranks + rank) keeps the pair
    order whatever the clock's span (at most (rows + events)² < 2⁶³)."""
    times, rank = np.unique(np.concatenate([a_ts, q_ts]), return_inverse=True)
    width = len(times)
    return np.searchsorted(a_code * width + rank[:len(a_ts)], q_code * width + rank[len(a_ts):], side="left")


def serving_snapshot(user_snaps: pd.DataFrame, item_snaps: pd.DataFrame, catalog: pd.DataFrame,
                     as_of_ms: int | None = None, consumed: pd.DataFrame | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame, list[str], int]:
    """(users, items, popular, snapshot_ts): the newest snapshot at or before `as_of_ms` (None = newest).

    Every catalog item is servable even without recent activity (defaults apply); a user with consumed
    items but no activity inside the snapshot windows still gets a row (for the exclusion).
    """
    def newest(frame: pd.DataFrame) -> float:
        ts = frame["feature_ts"] if as_of_ms is None else frame.loc[frame["feature_ts"] <= as_of_ms, "feature_ts"]
        return float(ts.max()) if len(ts) else float("nan")

    u_ts, i_ts = newest(user_snaps), newest(item_snaps)
    users = user_snaps[user_snaps["feature_ts"] == u_ts]
    items = item_snaps[item_snaps["feature_ts"] == i_ts]
    owned = [c for c in CATALOG_COLUMNS if c in catalog]  # the catalog's values win; a column it lacks stays absent
    items = catalog[["item_id", *owned]].merge(items.drop(columns=list(CATALOG_COLUMNS), errors="ignore"),
                                               on="item_id", how="left")
    snapshot_ts = int(i_ts) if np.isfinite(i_ts) else int(as_of_ms or 0)
    items["feature_ts"] = items["feature_ts"].fillna(snapshot_ts)
    if consumed is not None and len(consumed):
        users = users.drop(columns=["consumed_items"], errors="ignore").merge(consumed, on="user_id", how="outer")
        users["feature_ts"] = users["feature_ts"].fillna(u_ts if np.isfinite(u_ts) else snapshot_ts)
    popular = (items.sort_values(["item_clicks_7d", "item_id"], ascending=[False, True], na_position="last")["item_id"]
               .head(POPULAR_LIST_SIZE).astype(str).tolist())
    return users.reset_index(drop=True), items.reset_index(drop=True), popular, snapshot_ts


__all__ = ["CONSUMED_MAX_ITEMS", "CONSUMED_TYPES", "POPULAR_LIST_SIZE", "USER_RECENT_ITEMS", "consumed_items",
           "recent_items_before", "serving_snapshot"]
