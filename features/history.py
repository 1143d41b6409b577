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
    server reads from the online store (training rows see only their past)."""
    ev = engagements[engagements["event_type"].isin(CONSUMED_TYPES) & engagements["item_id"].notna()]
    ev = ev[["user_id", "item_id", "timestamp"]].sort_values(["user_id", "timestamp"], kind="mergesort")
    by_user = {u: (g["timestamp"].to_numpy(dtype=np.int64), g["item_id"].astype(str).to_numpy())
               for u, g in ev.groupby("user_id", sort=False)}
    out: list[str] = []
    empty = json.dumps([])
    for user, ts in zip(rows["user_id"].to_numpy(), rows["timestamp"].to_numpy(dtype=np.int64)):
        hit = by_user.get(user)
        if hit is None:
            out.append(empty)
            continue
        times, items = hit
        j = int(np.searchsorted(times, ts, side="left")) - 1
        recent: list[str] = []
        while j >= 0 and len(recent) < n:
            if items[j] not in recent:
                recent.append(items[j])
            j -= 1
        out.append(json.dumps(recent) if recent else empty)
    return out


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
