"""A training set built from the simulator in pure pandas (no Spark): fast fixtures for model tests.

Mirrors training.dataset.build_training_set: one row per impression, labeled by the product's own
rule (ingestion.labels.build_labels with its default LabelConfig: engagements attributed to the latest
impression of the same user and item within the attribution window, label_binary = label >= the
positive threshold), read once every window has closed so that no impression is left unlabeled;
user/item store columns counted from strictly earlier days (the daily snapshot as of the impression's
day; the engaged types and windows are features.batch's, the co-items map is its co_items_sweep over the
pair-days, the counts themselves are numpy sums the Spark snapshot jobs make in Spark); session columns
replayed with the shared fold; a time split (first 70% of days train, next 15%
validation, last 15% test). Labels are not re-implemented here: a test model trains on what the
product would have written.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from features.batch import (CO_ITEMS_WINDOW_DAYS, ENGAGED, ITEM_WINDOW_DAYS, USER_SHORT_WINDOW_DAYS, USER_WINDOW_DAYS,
                            co_items_sweep)
from features.functions import replay_session_features, smoothed_ctr
from ingestion.bots import bot_mask, bot_sessions
from ingestion.dedup import window_duplicates
from features.registry import (CATEGORY_HALF_LIFE_DAYS, CO_ITEMS_TOP_K, ENGAGED_CLICK_MIN_DWELL_MS, ENGAGED_EVENT_TYPES,
                               ITEM_ENGAGED_HALF_LIFE_DAYS, ITEM_ENGAGED_WINDOW_DAYS)
from data_contracts.schema import DAY_MS, EVENT_TYPES
from ingestion.labels import LabelConfig, build_labels

LABELS = LabelConfig()  # the product's rule, no catalog negatives: the fixture stays one row per impression


def clean_events(events: pd.DataFrame) -> pd.DataFrame:
    """Drop what silver would not accept: contract failures (nulls, unknown types, bad numbers), bot sessions,
    exact and window duplicates (the product's own filters, minus GX)."""
    ev = events.drop_duplicates("event_id")
    ok = (ev["user_id"].notna() & ev["item_id"].notna() & ev["event_type"].isin(EVENT_TYPES)
          & (ev["timestamp"] > 0) & (ev["dwell_time_ms"].fillna(0) >= 0) & ev["session_id"].notna())
    ev = ev[ok].reset_index(drop=True)
    is_bot, _ = bot_mask(ev, bot_sessions(ev))
    ev = ev[~is_bot].reset_index(drop=True)
    return ev[~window_duplicates(ev)].reset_index(drop=True)


def _window_counts(entity_codes: np.ndarray, days: np.ndarray, weights: np.ndarray, n_entities: int, n_days: int,
                   query_entity: np.ndarray, query_day: np.ndarray, window: int) -> np.ndarray:
    """Sum of weights for the entity over days [d - window, d - 1] for each query (entity, day d)."""
    grid = np.zeros((n_entities, n_days + 1))
    np.add.at(grid, (entity_codes, days + 1), weights)
    cs = np.cumsum(grid, axis=1)  # cs[e, j] = sum over days < j
    hi = cs[query_entity, query_day]
    lo = cs[query_entity, np.clip(query_day - window, 0, None)]
    return hi - lo


def _labels(ev: pd.DataFrame) -> pd.DataFrame:
    """event_id, label, label_binary by the product's rule. The world is over, so labels are read as of the
    last event plus one attribution window (every window closed, nothing after the log is known): the labels
    job run then would write exactly these."""
    as_of = int(ev["timestamp"].max()) + 1 + int(LABELS.attribution_window_ms)
    lab = build_labels(ev, as_of_ms=as_of, config=LABELS)
    return lab[["event_id", "label", "label_binary"]]


def make_training_set(world) -> pd.DataFrame:
    ev = clean_events(world.events)
    items = world.items
    cat_of = dict(zip(items["item_id"], items["category"]))
    day0 = int(ev["timestamp"].min()) // DAY_MS
    ev = ev.assign(day=(ev["timestamp"] // DAY_MS - day0).astype(np.int64))
    n_days = int(ev["day"].max()) + 1

    imp = ev[ev["event_type"] == "impression"][["event_id", "user_id", "item_id", "session_id", "timestamp", "position",
                                                "device_type", "page_context", "day"]].copy()
    imp = imp.merge(_labels(ev), on="event_id", how="left", validate="one_to_one")
    assert imp["label"].notna().all(), "every impression is labeled once every attribution window has closed"

    # user store columns: counts from days strictly before the impression's day
    u_codes, u_uni = pd.factorize(pd.concat([ev["user_id"], imp["user_id"]]))
    u_ev, u_imp = u_codes[: len(ev)], u_codes[len(ev):]
    is_click = ev["event_type"].isin(ENGAGED).to_numpy(dtype=float)
    is_imp = (ev["event_type"] == "impression").to_numpy(dtype=float)
    ed, qd = ev["day"].to_numpy(), imp["day"].to_numpy()
    nu = len(u_uni)
    uc7 = _window_counts(u_ev, ed, is_click, nu, n_days, u_imp, qd, USER_SHORT_WINDOW_DAYS)
    uc30 = _window_counts(u_ev, ed, is_click, nu, n_days, u_imp, qd, USER_WINDOW_DAYS)
    ui30 = _window_counts(u_ev, ed, is_imp, nu, n_days, u_imp, qd, USER_WINDOW_DAYS)
    ua30 = _window_counts(u_ev, ed, np.ones(len(ev)), nu, n_days, u_imp, qd, USER_WINDOW_DAYS)
    has_user = ua30 > 0  # no snapshot row for a user without events in the window
    imp["user_clicks_7d"] = np.where(has_user, uc7, np.nan)
    imp["user_impressions_30d"] = np.where(has_user, ui30, np.nan)
    imp["user_ctr_30d"] = np.where(has_user, smoothed_ctr(uc30, ui30), np.nan)
    cats = sorted(set(cat_of.values()))
    c_index = {c: k for k, c in enumerate(cats)}
    ev_cat = ev["item_id"].map(cat_of).map(c_index).fillna(-1).to_numpy(dtype=np.int64)
    per_cat = np.stack([
        _window_counts(u_ev, ed, is_click * (ev_cat == k), nu, n_days, u_imp, qd, USER_WINDOW_DAYS) for k in range(len(cats))
    ], axis=1)
    cache: dict[tuple, str | None] = {}
    ucc = []
    for row, ok in zip(per_cat, has_user):
        key = tuple(row) if ok else None
        if key not in cache:
            cache[key] = (json.dumps({cats[k]: float(v) for k, v in enumerate(row) if v > 0}, sort_keys=True)
                          if ok and row.sum() > 0 else None)
        ucc.append(cache[key])
    imp["user_category_clicks_30d"] = pd.Series(ucc, index=imp.index, dtype=object)
    # decayed category counts: a click d days before the snapshot day q weighs 0.5 ** ((q - d - 1) / half-life)
    grow = 2.0 ** (ed / CATEGORY_HALF_LIFE_DAYS)
    shrink = 2.0 ** ((1 - qd) / CATEGORY_HALF_LIFE_DAYS)
    per_cat_decayed = np.stack([
        _window_counts(u_ev, ed, is_click * (ev_cat == k) * grow, nu, n_days, u_imp, qd, USER_WINDOW_DAYS) * shrink
        for k in range(len(cats))
    ], axis=1)
    imp["user_category_decayed_30d"] = [
        json.dumps({cats[k]: round(float(v), 6) for k, v in enumerate(row) if v > 1e-12}, sort_keys=True)
        if ok and row.sum() > 0 else None for row, ok in zip(per_cat_decayed, has_user)]
    # events per session over 7 days (sessions counted per day, as the Spark job does)
    ue7 = _window_counts(u_ev, ed, np.ones(len(ev)), nu, n_days, u_imp, qd, USER_SHORT_WINDOW_DAYS)
    first_of_day = ~ev.duplicated(["user_id", "day", "session_id"]).to_numpy()
    us7 = _window_counts(u_ev, ed, first_of_day.astype(float), nu, n_days, u_imp, qd, USER_SHORT_WINDOW_DAYS)
    imp["user_avg_session_length_7d"] = np.where(has_user, np.where(us7 > 0, ue7 / np.maximum(us7, 1), 0.0), np.nan)
    signup = dict(zip(world.users["user_id"], world.users["signup_ts"]))
    imp["signup_ts"] = np.where(has_user, imp["user_id"].map(signup).astype(float), np.nan)

    # item store columns
    i_codes, i_uni = pd.factorize(pd.concat([ev["item_id"], imp["item_id"]]))
    i_ev, i_imp = i_codes[: len(ev)], i_codes[len(ev):]
    ni = len(i_uni)
    ic7 = _window_counts(i_ev, ed, is_click, ni, n_days, i_imp, qd, ITEM_WINDOW_DAYS)
    ii7 = _window_counts(i_ev, ed, is_imp, ni, n_days, i_imp, qd, ITEM_WINDOW_DAYS)
    ia7 = _window_counts(i_ev, ed, np.ones(len(ev)), ni, n_days, i_imp, qd, ITEM_WINDOW_DAYS)
    has_item = ia7 > 0
    imp["item_clicks_7d"] = np.where(has_item, ic7, np.nan)
    imp["item_impressions_7d"] = np.where(has_item, ii7, np.nan)
    imp["item_ctr_7d"] = np.where(has_item, smoothed_ctr(ic7, ii7), np.nan)
    # engaged events over 30 days, each decayed like features/batch.py: 0.5 ** ((q - d - 1) / half-life)
    engaged = (ev["event_type"].isin(ENGAGED_EVENT_TYPES) | ((ev["event_type"] == "click")
               & (ev["dwell_time_ms"].fillna(0) >= ENGAGED_CLICK_MIN_DWELL_MS))).to_numpy(dtype=float)
    ie30 = _window_counts(i_ev, ed, engaged * 2.0 ** (ed / ITEM_ENGAGED_HALF_LIFE_DAYS), ni, n_days, i_imp, qd,
                          ITEM_ENGAGED_WINDOW_DAYS) * 2.0 ** ((1 - qd) / ITEM_ENGAGED_HALF_LIFE_DAYS)
    imp["item_engaged_decayed_30d"] = np.where(has_item | (ie30 > 1e-12), np.round(ie30, 6), np.nan)
    # co-clicked items (sessions that clicked both) in the window before the snapshot day, top-K per item: the
    # product's sweep (features.batch.co_items_sweep) over the pair-days co_item_pairs would count
    clicks = ev.loc[ev["event_type"].isin(ENGAGED), ["session_id", "item_id", "day"]].drop_duplicates(["session_id", "item_id"])
    pairs = clicks.merge(clicks, on="session_id", suffixes=("", "_o"))
    pairs = pairs[pairs["item_id"] != pairs["item_id_o"]]
    pairs = (pairs.assign(day=np.maximum(pairs["day"], pairs["day_o"])).rename(columns={"item_id_o": "other"})
             .groupby(["item_id", "other", "day"]).size().astype(float).reset_index(name="n"))
    co = co_items_sweep(pairs, CO_ITEMS_WINDOW_DAYS, n_days, CO_ITEMS_TOP_K)
    co_json = dict(zip(zip(co["item_id"], co["snap_day"].astype(int)), co["co_items_30d"]))
    imp["co_items_30d"] = [co_json.get((i, int(q))) if ok else None
                           for i, q, ok in zip(imp["item_id"], imp["day"], has_item)]
    imp["category"] = imp["item_id"].map(cat_of)
    imp["publish_ts"] = imp["item_id"].map(dict(zip(items["item_id"], items["publish_ts"])))

    sess = replay_session_features(ev[["event_id", "session_id", "event_type", "item_id", "timestamp"]], cat_of)
    imp = imp.merge(sess, on="event_id", how="left")
    for c in ("session_length", "session_clicks", "session_category_share", "session_item_seen"):
        imp[c] = imp[c].fillna(0.0)
    imp["seconds_since_last_event"] = imp["seconds_since_last_event"].fillna(3600.0)
    imp["session_last_items"] = imp["session_last_items"].fillna("[]")
    # the user's latest consumed items before each row, by the product's own rule (features/history.py)
    from features.history import recent_items_before

    imp["user_recent_items"] = recent_items_before(ev, imp)
    imp["query_id"] = imp["session_id"]
    imp["request_ts"] = imp["timestamp"]
    imp_days = int(imp["day"].max()) + 1  # late purchases may run past the last impression day
    train_end, valid_end = int(0.70 * imp_days + 0.5), int(0.85 * imp_days + 0.5)
    imp["split"] = np.where(imp["day"] < train_end, "train", np.where(imp["day"] < valid_end, "validation", "test"))
    imp = imp.drop(columns="day").sort_values(["timestamp", "event_id"], kind="mergesort").reset_index(drop=True)
    return imp
