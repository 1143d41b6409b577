"""Every event source behind one call, and the label rule each kind of log follows.

`load_source_frames(config)` is what the Dagster assets and the CLI both call (the CLI
first, to derive partitions and split windows from the data before any heavy step);
frames are cached per config in the process, so a demo reads its files once.

Label rules (`LABEL_RULES`, applied by the CLI / world config to the `labels` asset):
* ratings (MovieLens, or a mapped `value` column): each rating is an impression and an
  outcome by rating (long click >= 4, short click >= 3, else skip); weighted labels as
  logged, skips and low ratings are hard negatives, and `CATALOG_NEGATIVES` catalog items per
  positive are sampled (as for every log: without them the ranker only learns to re-order what
  users chose to rate, not to rank the whole catalog it is asked to rank when serving);
* clicks (a log of clicks only, e.g. sessions of product views): every click is a positive
  whatever its dwell (`click_is_positive`), each (session, item) gets an implied impression,
  and negatives are sampled from the catalog (`easy_negative_ratio`);
* events (a mapped event-type column): as logged; when the log records no impressions
  (views/purchases) the click rule applies (implied impressions, clicks positive, sampled
  negatives); with impressions logged, the simulator's weighted rule.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ground.settings import Settings

SOURCES: tuple[str, ...] = ("simulator", "movielens-100k", "movielens-1m", "movielens-latest", "file")
SIMULATOR_DEFAULTS: dict[str, int] = {"n_users": 300, "n_items": 400, "n_categories": 8, "days": 14, "seed": 7,
                                      "shift_day": -1}
# the SourceConfig fields each source reads (the cache key: the CLI's and the assets' configs meet here)
_SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "simulator": tuple(SIMULATOR_DEFAULTS), "movielens-100k": ("path", "movielens_dir", "arrival"),
    "movielens-1m": ("path", "movielens_dir", "arrival"), "movielens-latest": ("path", "movielens_dir", "arrival"),
    "file": ("path", "mapping_json", "catalog_path", "catalog_mapping_json", "users_path", "users_mapping_json",
             "arrival"),
}
# When a historical log (file, MovieLens) "arrived": `export` (default) = all of it in one ingest batch on the day
# of its last event, so years of history are one Dagster partition and a few Delta commits (silver is still
# partitioned by the day each event happened); `event` = every event on its own day (one partition per day).
ARRIVALS: tuple[str, ...] = ("export", "event")
LOG_KINDS: tuple[str, ...] = ("simulator", "ratings", "clicks", "events", "events_with_impressions")
CATALOG_NEGATIVES = 2.0  # sampled catalog items per positive, logs with logged outcomes (the labels asset's default)
_LOGGED_RULE = {"click_is_positive": False, "easy_negative_ratio": CATALOG_NEGATIVES}
_CLICK_RULE = {"click_is_positive": True, "easy_negative_ratio": 4.0}
LABEL_RULES: dict[str, dict[str, Any]] = {
    "simulator": _LOGGED_RULE, "ratings": _LOGGED_RULE, "events_with_impressions": _LOGGED_RULE,
    "clicks": _CLICK_RULE, "events": _CLICK_RULE,
}


def _file_frames(config: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    from ingestion.catalog import (ItemCatalogMapping, UserCatalogMapping, join_items, join_users, read_item_catalog,
                                   read_user_catalog)
    from ingestion.generic import ColumnMapping, load_interactions

    if not config.get("path") or not config.get("mapping_json"):
        raise ValueError("source='file' needs `path` (a CSV/TSV/Parquet log) and `mapping_json` (its column mapping, "
                         'e.g. {"user": "uid", "item": "sku", "timestamp": "ts"}); CLI: --path and --mapping')
    mapping = ColumnMapping.from_json(config["mapping_json"])
    events, items, users = load_interactions(config["path"], mapping)
    if config.get("catalog_path"):
        item_map = ItemCatalogMapping.from_dict(config.get("catalog_mapping_json") or '{"item": "item_id"}')
        items = join_items(items, read_item_catalog(config["catalog_path"], item_map))
    if config.get("users_path"):
        user_map = UserCatalogMapping.from_dict(config.get("users_mapping_json") or '{"user": "user_id"}')
        users = join_users(users, read_user_catalog(config["users_path"], user_map))
    return events, items, users


def _movielens_dir(config: dict[str, Any], default: Path | None) -> Path:
    folder = config.get("path") or config.get("movielens_dir") or (str(default) if default else "")
    if not folder:
        raise ValueError(f"source='{config['source']}' needs `path`: the folder of the MovieLens files (CLI --path DIR)")
    return Path(folder)


@functools.lru_cache(maxsize=4)
def _load(config_json: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    config = json.loads(config_json)
    source = config.get("source", "simulator")
    if source == "simulator":
        from ingestion.simulator import SimulatorConfig, simulate

        world = simulate(SimulatorConfig(n_users=config["n_users"], n_items=config["n_items"],
                                         n_categories=config["n_categories"], days=config["days"], seed=config["seed"],
                                         shift_day=config["shift_day"] if config["shift_day"] >= 0 else None))
        events, items, users = world.events, world.items, world.users
    elif source == "movielens-100k":
        from ingestion.movielens import load_movielens_100k

        events, items, users = load_movielens_100k(_movielens_dir(config, Settings.from_env().movielens_100k_dir))
    elif source == "movielens-1m":
        from ingestion.movielens import load_movielens_1m

        events, items, users = load_movielens_1m(_movielens_dir(config, None))
    elif source == "movielens-latest":
        from ingestion.movielens import load_movielens_latest

        events, items, users = load_movielens_latest(_movielens_dir(config, None))
    elif source == "file":
        events, items, users = _file_frames(config)
    else:
        raise ValueError(f"unknown source '{source}': use one of {list(SOURCES)}")
    if "received_at" not in events:  # historical logs: see ARRIVALS
        events = events.assign(received_at=arrival_times(events["timestamp"], config.get("arrival") or "export"))
    return events, items, users


def arrival_times(timestamps: pd.Series, arrival: str) -> np.ndarray:
    """received_at of a historical log's events under the `arrival` rule (ARRIVALS)."""
    if arrival not in ARRIVALS:
        raise ValueError(f"unknown arrival {arrival!r}: use 'export' (the whole log arrives on its last day, one "
                         "ingest batch) or 'event' (each event arrives when it happened, one batch per day)")
    ts = pd.to_numeric(timestamps, errors="coerce")
    if arrival == "event" or ts.notna().sum() == 0:
        return ts.fillna(0).astype("int64").to_numpy()
    return np.full(len(ts), int(ts.max()), dtype="int64")


def load_source_frames(config: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """events (with received_at), items, users of a source config (a SourceConfig's dict); cached per config."""
    return _load(json.dumps(normalized(config), sort_keys=True))


def normalized(config: dict[str, Any]) -> dict[str, Any]:
    """Only the fields the source reads, simulator defaults filled in, empty values dropped."""
    source = config.get("source") or "simulator"
    if source not in _SOURCE_FIELDS:
        raise ValueError(f"unknown source '{source}': use one of {list(SOURCES)}")
    base = dict(SIMULATOR_DEFAULTS) if source == "simulator" else {}
    base.update({k: config[k] for k in _SOURCE_FIELDS[source] if config.get(k) not in (None, "")})
    return {"source": source, **base}


def log_kind(config: dict[str, Any], events: pd.DataFrame) -> str:
    """Which LABEL_RULES entry the source follows (see the module docstring)."""
    source = config.get("source", "simulator")
    if source == "simulator":
        return "simulator"
    if source.startswith("movielens"):
        return "ratings"
    from ingestion.generic import ColumnMapping

    kind = ColumnMapping.from_json(config["mapping_json"]).log_kind()
    if kind == "events" and not _implied_only(events):
        return "events_with_impressions"
    return kind


def _implied_only(events: pd.DataFrame) -> bool:
    """True when every impression sits exactly one implied-impression delay before an engagement of its item."""
    from ingestion.generic import OUTCOME_DELAY_MS

    imp = events[events["event_type"] == "impression"]
    eng = events[events["event_type"] != "impression"]
    keys = set(zip(eng["session_id"], eng["item_id"], eng["timestamp"] - OUTCOME_DELAY_MS))
    return all(k in keys for k in zip(imp["session_id"], imp["item_id"], imp["timestamp"]))


__all__ = ["ARRIVALS", "CATALOG_NEGATIVES", "LABEL_RULES", "arrival_times", "LOG_KINDS", "SOURCES", "load_source_frames", "log_kind"]
