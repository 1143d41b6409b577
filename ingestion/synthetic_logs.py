"""Seeded synthetic logs in public formats, at any size and time span (bench/world.py and the tests).

Two shapes a new user brings:
* a MovieLens "latest" folder (ratings.csv + movies.csv) of `n_events` ratings spread over `years`;
* a session click log `session_id;user_id;item_id;timeframe;eventdate` (semicolon-separated, "NA"
  for anonymous sessions, time = a date plus a millisecond offset) with a `products.csv` catalog.

Users prefer a few categories and items have a popularity skew, so a model has signal to find
and the quality gate has something to beat; numpy-vectorized, so a million rows take seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

START_MS = 1_104_537_600_000  # 2005-01-01
YEAR_MS = 365 * 86_400_000
N_CATEGORIES = 12


def _world(rng: np.random.Generator, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item category, item popularity weights, user preferred category)."""
    cats = rng.integers(0, N_CATEGORIES, n_items)
    pop = rng.zipf(1.6, n_items).astype("float64")
    pop = np.minimum(pop, 1000.0)
    return cats, pop / pop.sum(), rng.integers(0, N_CATEGORIES, n_users)


def _pick_items(rng: np.random.Generator, pref: np.ndarray, cats: np.ndarray, pop: np.ndarray,
                n: int, affinity: float = 0.6) -> np.ndarray:
    """n items: with probability `affinity` one of the user's preferred category (by popularity), else any."""
    by_cat = [np.flatnonzero(cats == c) for c in range(N_CATEGORIES)]
    any_item = rng.choice(len(cats), size=n, p=pop)
    items = any_item.copy()
    use_pref = rng.random(n) < affinity
    for c in range(N_CATEGORIES):
        rows = np.flatnonzero(use_pref & (pref == c))
        if len(rows) and len(by_cat[c]):
            w = pop[by_cat[c]] / pop[by_cat[c]].sum()
            items[rows] = rng.choice(by_cat[c], size=len(rows), p=w)
    return items


def _session_times(rng: np.random.Generator, n_sessions: int, years: float) -> np.ndarray:
    """Session start times spread over the span, activity growing over time (as public logs do)."""
    u = rng.random(n_sessions) ** 0.7
    return START_MS + (u * years * YEAR_MS).astype("int64")


def write_ratings_latest(folder: Path | str, n_events: int, years: float, seed: int = 11,
                         n_users: int | None = None, n_items: int | None = None) -> Path:
    """A MovieLens-"latest"-format folder with `n_events` ratings over `years` years."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_users = n_users or max(50, n_events // 60)
    n_items = n_items or max(100, n_events // 40)
    cats, pop, pref = _world(rng, n_users, n_items)
    per_session = 8
    n_sessions = max(1, n_events // per_session)
    s_user = rng.integers(0, n_users, n_sessions)
    s_start = _session_times(rng, n_sessions, years)
    user = np.repeat(s_user, per_session)[:n_events]
    ts = (np.repeat(s_start, per_session) + rng.integers(0, 20 * 60_000, n_sessions * per_session))[:n_events]
    items = _pick_items(rng, pref[user], cats, pop, n_events)
    liked = cats[items] == pref[user]
    rating = np.clip(np.round(np.where(liked, 4.2, 2.8) + rng.normal(0, 0.9, n_events)) / 1.0, 0.5, 5.0)
    ratings = pd.DataFrame({"userId": user + 1, "movieId": items + 1, "rating": rating, "timestamp": ts // 1000})
    ratings = ratings.drop_duplicates(["userId", "movieId"]).sort_values(["userId", "timestamp"])
    ratings.to_csv(folder / "ratings.csv", index=False)
    genres = [f"Genre{c}" for c in range(N_CATEGORIES)]
    second = (cats + 1 + rng.integers(0, N_CATEGORIES - 1, n_items)) % N_CATEGORIES
    movies = pd.DataFrame({"movieId": np.arange(1, n_items + 1),
                           "title": [f"Movie {i} ({1950 + i % 70})" for i in range(1, n_items + 1)],
                           "genres": [f"{genres[a]}|{genres[b]}" for a, b in zip(cats, second)]})
    movies.to_csv(folder / "movies.csv", index=False)
    return folder


def write_session_clicks(folder: Path | str, n_events: int, years: float, seed: int = 13,
                         anonymous_share: float = 0.6, n_users: int | None = None,
                         n_items: int | None = None) -> tuple[Path, Path]:
    """clicks.csv (`session_id;user_id;item_id;timeframe;eventdate`) and products.csv (`itemId;categoryId`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_users = n_users or max(50, n_events // 80)
    n_items = n_items or max(100, n_events // 50)
    cats, pop, pref = _world(rng, n_users, n_items)
    per_session = 5
    n_sessions = max(1, n_events // per_session)
    s_user = rng.integers(0, n_users, n_sessions)
    s_anon = rng.random(n_sessions) < anonymous_share
    s_pref = np.where(s_anon, rng.integers(0, N_CATEGORIES, n_sessions), pref[s_user])
    s_start = _session_times(rng, n_sessions, years)
    sess = np.repeat(np.arange(n_sessions), per_session)[:n_events]
    offset = (np.arange(n_sessions * per_session) % per_session)[:n_events] * 40_000 \
        + rng.integers(0, 30_000, n_events)
    items = _pick_items(rng, s_pref[sess], cats, pop, n_events, affinity=0.7)
    start_day = s_start // 86_400_000 * 86_400_000
    frame = pd.DataFrame({
        "session_id": sess + 1,
        "user_id": np.where(s_anon[sess], "NA", (s_user[sess] + 1).astype(str)),
        "item_id": items + 1,
        "timeframe": (s_start - start_day)[sess] + offset,
        "eventdate": pd.to_datetime(start_day[sess], unit="ms").strftime("%Y-%m-%d"),
    })
    clicks = folder / "clicks.csv"
    frame.to_csv(clicks, sep=";", index=False)
    products = folder / "products.csv"
    pd.DataFrame({"itemId": np.arange(1, n_items + 1), "categoryId": cats + 1}).to_csv(products, sep=";", index=False)
    return clicks, products


SESSION_CLICKS_MAPPING: dict[str, str] = {
    "session": "session_id", "user": "user_id", "item": "item_id", "timestamp": "eventdate", "timestamp_unit": "iso",
    "timestamp_offset": "timeframe", "timestamp_offset_unit": "ms"}
PRODUCTS_MAPPING: dict[str, str] = {"item": "itemId", "categories": "categoryId"}

__all__ = ["PRODUCTS_MAPPING", "SESSION_CLICKS_MAPPING", "write_ratings_latest", "write_session_clicks"]
