"""MovieLens importers (100K `u.*`, 1M `::`, and the "latest" CSVs) into Kairos events and catalog.

Each rating becomes an impression followed one second later by its outcome: a
long click (rating ≥ 4), a short click (3) or a skip (≤ 2), so the same labels,
features and models run on public data as on the simulator. Sessions split a
user's ratings at 30-minute gaps.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from data_contracts.schema import (
    EVENT_COLUMNS,
    ITEM_SCHEMA,
    SCHEMA_VERSION,
    USER_SCHEMA,
)

GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
               "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
SESSION_GAP_MS = 30 * 60 * 1000
_NS = uuid.UUID("6f1c1c2e-6b0f-4a55-9d0e-6b6b1a0c2f11")


class ImportError_(ValueError):
    """Bad input file: the message names the file, the line and the column."""


def _numeric(frame: pd.DataFrame, column: str, path: Path, first_line: int = 1) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() & frame[column].notna() | frame[column].isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ImportError_(f"{path}: line {row + first_line}, column '{column}': expected a number, "
                           f"got {frame[column].iloc[row]!r}; fix or remove that line and import again")
    return values


def ratings_to_events(ratings: pd.DataFrame, source: str) -> pd.DataFrame:
    """ratings (user, item, rating, ts_s) -> impression + click/skip events in the Kairos schema."""
    r = ratings.sort_values(["user", "ts_s", "item"], kind="mergesort").reset_index(drop=True)
    ts = r["ts_s"].astype("int64") * 1000
    new_session = (r["user"] != r["user"].shift()) | (ts - ts.shift() > SESSION_GAP_MS)
    session_no = new_session.astype(int).groupby(r["user"]).cumsum() - 1
    session = "ml_s" + r["user"].astype(str) + "_" + session_no.astype(str)
    position = r.groupby(session).cumcount().astype("int64")
    user = "ml_u" + r["user"].astype(str)
    item = "ml_i" + r["item"].astype(str)
    outcome = np.where(r["rating"] >= 4, "click", np.where(r["rating"] >= 3, "click", "skip"))
    dwell = np.where(r["rating"] >= 4, 45_000, np.where(r["rating"] >= 3, 3_000, 0)).astype("int64")
    base = pd.DataFrame({"user_id": user, "item_id": item, "session_id": session, "position": position,
                         "page_context": "home_feed", "device_type": "desktop", "schema_version": SCHEMA_VERSION,
                         "source": source})
    imp = base.assign(event_type="impression", timestamp=ts, dwell_time_ms=np.int64(0))
    out = base.assign(event_type=outcome, timestamp=ts + 1000, dwell_time_ms=dwell)
    events = pd.concat([imp, out], ignore_index=True)
    keys = events["user_id"] + "|" + events["item_id"] + "|" + events["timestamp"].astype(str) + "|" + events["event_type"]
    events["event_id"] = [str(uuid.uuid5(_NS, k)) for k in keys]
    events = events.sort_values(["timestamp", "event_type"], kind="mergesort").reset_index(drop=True)
    return events[EVENT_COLUMNS].astype({"timestamp": "int64", "position": "int64", "dwell_time_ms": "int64",
                                         "schema_version": "int64"})


def _users_from(ratings: pd.DataFrame, profiles: pd.DataFrame | None) -> pd.DataFrame:
    first = ratings.groupby("user")["ts_s"].min().astype("int64") * 1000
    users = pd.DataFrame({"user": first.index, "signup_ts": first.to_numpy()})
    if profiles is not None:
        users = users.merge(profiles, on="user", how="left")
        zip_first = users["zip"].astype(str).str[0]
        users["geo_region"] = np.where(zip_first.str.isdigit(), "us_" + zip_first, "other")
        users["segment"] = users["occupation"].fillna("unknown")
    else:
        users["geo_region"] = "other"
        users["segment"] = "unknown"
    users["user_id"] = "ml_u" + users["user"].astype(str)
    users["device_type"] = "desktop"
    return users[USER_SCHEMA.names]


def load_movielens_100k(path: Path, limit: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """events, items, users from a MovieLens 100K folder (u.data, u.item, u.user)."""
    path = Path(path)
    for name in ("u.data", "u.item", "u.user"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name} is missing: point to the MovieLens 100K folder (u.data, u.item, u.user)")
    raw = pd.read_csv(path / "u.data", sep="\t", header=None, names=["user", "item", "rating", "ts_s"], dtype=str,
                      nrows=limit)
    ratings = pd.DataFrame({c: _numeric(raw, c, path / "u.data").astype("int64") for c in raw.columns})
    item_cols = ["item", "title", "release", "video_release", "url", *GENRES_100K]
    items_raw = pd.read_csv(path / "u.item", sep="|", header=None, names=item_cols, encoding="latin-1", dtype=str)
    flags = items_raw[GENRES_100K].apply(pd.to_numeric, errors="coerce").fillna(0).astype(int).to_numpy()
    first_genre = np.where(flags.any(axis=1), np.array(GENRES_100K)[flags.argmax(axis=1)], "unknown")
    tags = [" ".join(g for g, f in zip(GENRES_100K, row) if f) or "unknown" for row in flags]
    released = pd.to_datetime(items_raw["release"], format="%d-%b-%Y", errors="coerce", utc=True)
    first_seen = ratings.groupby("item")["ts_s"].min() * 1000
    item_num = _numeric(items_raw, "item", path / "u.item").astype("int64")
    publish = (released.astype("int64") // 1_000_000).where(released.notna(), item_num.map(first_seen))
    items = pd.DataFrame({"item_id": "ml_i" + item_num.astype(str), "title": items_raw["title"].fillna(""),
                          "category": first_genre, "tags": tags,
                          "publish_ts": publish.fillna(0).astype("int64")})[ITEM_SCHEMA.names]
    profiles = pd.read_csv(path / "u.user", sep="|", header=None, names=["user", "age", "gender", "occupation", "zip"],
                           dtype=str)
    first_line = 1
    if len(profiles) and not str(profiles["user"].iloc[0]).strip().isdigit():  # some copies carry a header row
        profiles, first_line = profiles.iloc[1:].reset_index(drop=True), 2
    profiles["user"] = _numeric(profiles, "user", path / "u.user", first_line).astype("int64")
    return ratings_to_events(ratings, "movielens-100k"), items, _users_from(ratings, profiles)


def load_movielens_latest(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """events, items, users from a MovieLens "latest" folder (ratings.csv, movies.csv)."""
    path = Path(path)
    raw = pd.read_csv(path / "ratings.csv", dtype=str)
    missing = {"userId", "movieId", "rating", "timestamp"} - set(raw.columns)
    if missing:
        raise ImportError_(f"{path / 'ratings.csv'}: line 1 (header) lacks columns {sorted(missing)}")
    raw = raw.rename(columns={"userId": "user", "movieId": "item", "timestamp": "ts_s"})
    ratings = pd.DataFrame({"user": _numeric(raw, "user", path / "ratings.csv", 2).astype("int64"),
                            "item": _numeric(raw, "item", path / "ratings.csv", 2).astype("int64"),
                            "rating": _numeric(raw, "rating", path / "ratings.csv", 2).astype(float),
                            "ts_s": _numeric(raw, "ts_s", path / "ratings.csv", 2).astype("int64")})
    movies = pd.read_csv(path / "movies.csv", dtype=str)
    genres = movies["genres"].fillna("(no genres listed)").str.split("|")
    first_seen = ratings.groupby("item")["ts_s"].min() * 1000
    ids = _numeric(movies, "movieId", path / "movies.csv", 2).astype("int64")
    items = pd.DataFrame({"item_id": "ml_i" + ids.astype(str), "title": movies["title"].fillna(""),
                          "category": [g[0] if g and g[0] != "(no genres listed)" else "unknown" for g in genres],
                          "tags": [" ".join(g) for g in genres],
                          "publish_ts": ids.map(first_seen).fillna(0).astype("int64")})[ITEM_SCHEMA.names]
    return ratings_to_events(ratings, "movielens-latest"), items, _users_from(ratings, None)


def load_movielens_1m(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """events, items, users from MovieLens 1M (`::`-separated ratings.dat, movies.dat, users.dat)."""
    path = Path(path)
    raw = pd.read_csv(path / "ratings.dat", sep="::", engine="python", header=None,
                      names=["user", "item", "rating", "ts_s"], dtype=str)
    ratings = pd.DataFrame({c: _numeric(raw, c, path / "ratings.dat").astype("int64") for c in raw.columns})
    movies = pd.read_csv(path / "movies.dat", sep="::", engine="python", header=None, names=["item", "title", "genres"],
                         encoding="latin-1", dtype=str)
    genres = movies["genres"].fillna("unknown").str.split("|")
    first_seen = ratings.groupby("item")["ts_s"].min() * 1000
    ids = _numeric(movies, "item", path / "movies.dat").astype("int64")
    items = pd.DataFrame({"item_id": "ml_i" + ids.astype(str), "title": movies["title"].fillna(""),
                          "category": [g[0] for g in genres], "tags": [" ".join(g) for g in genres],
                          "publish_ts": ids.map(first_seen).fillna(0).astype("int64")})[ITEM_SCHEMA.names]
    profiles = pd.read_csv(path / "users.dat", sep="::", engine="python", header=None,
                           names=["user", "gender", "age", "occupation", "zip"], dtype=str)
    profiles["user"] = _numeric(profiles, "user", path / "users.dat").astype("int64")
    return ratings_to_events(ratings, "movielens-1m"), items, _users_from(ratings, profiles[["user", "occupation", "zip"]])
