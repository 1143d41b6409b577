"""Catalog files beside an interaction log: items (categories, title, tags, publish time) and users.

A bare log only says which ids exist; a catalog file says what they are. Both are
joined into the `catalog_items` / `catalog_users` frames the importers return:
every id of the file is kept (catalog items never seen in the log are still
candidates and sampled negatives), ids seen only in the log keep the log-derived
defaults ("unknown" category, first-seen times). A multi-valued category column
(e.g. MovieLens genres `Comedy|Drama`) gives `category` = the first value and
`tags` = every value plus the tag column's words, space-separated.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ingestion.generic import (PARQUET_SUFFIXES, TIMESTAMP_UNITS, ColumnMapping, _check_encoding, _ids,
                               _timestamps_ms, read_delimited, read_parquet_file)
from ingestion.movielens import ImportError_
from data_contracts.schema import ITEM_SCHEMA, USER_SCHEMA

NO_CATEGORY = "unknown"
# MovieLens spells "no genre" this way; it is no category at all
NO_CATEGORY_VALUES: frozenset[str] = frozenset({"", "(no genres listed)", "unknown", "none", "null"})


def _mapping_from(cls: type, data: Mapping[str, Any] | str, required: tuple[str, ...]) -> Any:
    """A frozen mapping dataclass from a dict or JSON object; unknown or missing keys are config errors."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cls.__name__} is not valid JSON ({exc})") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} must be an object, got {type(data).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; allowed keys are {allowed}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{cls.__name__} lacks required key(s) {missing}; allowed keys are {allowed}")
    return cls(**data)


@dataclass(frozen=True)
class ItemCatalogMapping:
    """Columns of an item catalog file (only `item` is required)."""

    item: str
    title: str | None = None
    categories: str | None = None       # one or several categories per item, split on category_separator
    category_separator: str = "|"
    tags: str | None = None             # free tags, split on tag_separator
    tag_separator: str = "|"
    publish_ts: str | None = None
    publish_ts_unit: str = "s"
    delimiter: str | None = None        # None: sniffed from the header line
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.publish_ts_unit not in TIMESTAMP_UNITS:
            raise ValueError(f"ItemCatalogMapping.publish_ts_unit must be one of {list(TIMESTAMP_UNITS)}, "
                             f"got {self.publish_ts_unit!r}")
        _check_encoding(self.encoding)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> ItemCatalogMapping:
        return _mapping_from(cls, data, ("item",))

    def columns(self) -> list[str]:
        cols = [self.item, self.title, self.categories, self.tags, self.publish_ts]
        return list(dict.fromkeys(c for c in cols if c))


@dataclass(frozen=True)
class UserCatalogMapping:
    """Columns of a user profile file (only `user` is required)."""

    user: str
    segment: str | None = None
    device: str | None = None
    region: str | None = None
    signup_ts: str | None = None
    signup_ts_unit: str = "s"
    delimiter: str | None = None
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.signup_ts_unit not in TIMESTAMP_UNITS:
            raise ValueError(f"UserCatalogMapping.signup_ts_unit must be one of {list(TIMESTAMP_UNITS)}, "
                             f"got {self.signup_ts_unit!r}")
        _check_encoding(self.encoding)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> UserCatalogMapping:
        return _mapping_from(cls, data, ("user",))

    def columns(self) -> list[str]:
        cols = [self.user, self.segment, self.device, self.region, self.signup_ts]
        return list(dict.fromkeys(c for c in cols if c))


def _read_file(path: Path, columns: list[str], delimiter: str | None, encoding: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: point the catalog option at a .csv/.tsv/.parquet file")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        frame = read_parquet_file(path, columns)
    else:
        frame = read_delimited(path, columns, delimiter, encoding)
    frame["__kairos_file"] = str(path)
    return frame


def _times(frame: pd.DataFrame, column: str, unit: str) -> pd.Series:
    """Epoch ms of a catalog time column; bad cells raise naming file, line and column (the log's rules)."""
    return _timestamps_ms(frame, ColumnMapping(user=column, item=column, timestamp=column, timestamp_unit=unit))


def _split(values: pd.Series, separator: str) -> list[list[str]]:
    out = []
    for v in values.to_numpy(dtype=object):
        parts = [] if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).split(separator)
        out.append([p.strip() for p in parts if p.strip().lower() not in NO_CATEGORY_VALUES])
    return out


def _duplicate_ids(frame: pd.DataFrame, ids: pd.Series, column: str) -> None:
    dup = ids.duplicated(keep="first").to_numpy() & ids.notna().to_numpy()
    if dup.any():
        pos = int(np.flatnonzero(dup)[0])
        raise ImportError_(f"{frame['__kairos_file'].iloc[pos]}: {frame['__kairos_kind'].iloc[pos]} "
                           f"{int(frame['__kairos_row'].iloc[pos])}, column '{column}': id {ids.iloc[pos]!r} appears "
                           "twice; keep one row per id in the catalog file")


def read_item_catalog(path: Path | str, mapping: ItemCatalogMapping) -> pd.DataFrame:
    """item_id, title, category, tags, publish_ts (NaN where the file has none) from an item catalog file."""
    path = Path(path)
    frame = _read_file(path, mapping.columns(), mapping.delimiter, mapping.encoding)
    ids = _ids(frame[mapping.item])
    _duplicate_ids(frame, ids, mapping.item)
    cats = _split(frame[mapping.categories], mapping.category_separator) if mapping.categories else [[]] * len(frame)
    tags = _split(frame[mapping.tags], mapping.tag_separator) if mapping.tags else [[]] * len(frame)
    out = pd.DataFrame({
        "item_id": ids.to_numpy(),
        "title": frame[mapping.title].fillna("").astype(str).to_numpy() if mapping.title else "",
        "category": [c[0] if c else NO_CATEGORY for c in cats],
        "tags": [" ".join(dict.fromkeys(c + t)) or NO_CATEGORY for c, t in zip(cats, tags)],
        "publish_ts": (_times(frame, mapping.publish_ts, mapping.publish_ts_unit).astype("float64").to_numpy()
                       if mapping.publish_ts else np.nan),
    })
    return out[out["item_id"].notna()].reset_index(drop=True)


def read_user_catalog(path: Path | str, mapping: UserCatalogMapping) -> pd.DataFrame:
    """user_id, segment, device_type, geo_region, signup_ts (None/NaN where the file has none)."""
    path = Path(path)
    frame = _read_file(path, mapping.columns(), mapping.delimiter, mapping.encoding)
    ids = _ids(frame[mapping.user])
    _duplicate_ids(frame, ids, mapping.user)

    def col(name: str | None) -> Any:
        return _ids(frame[name]).to_numpy() if name else None

    out = pd.DataFrame({"user_id": ids.to_numpy(), "segment": col(mapping.segment),
                        "device_type": col(mapping.device), "geo_region": col(mapping.region),
                        "signup_ts": (_times(frame, mapping.signup_ts, mapping.signup_ts_unit).astype("float64")
                                      .to_numpy() if mapping.signup_ts else np.nan)})
    if mapping.device:
        out["device_type"] = out["device_type"].map(lambda v: v.lower() if isinstance(v, str) else v)
    return out[out["user_id"].notna()].reset_index(drop=True)


def join_items(log_items: pd.DataFrame, catalog: pd.DataFrame) -> pd.DataFrame:
    """ITEM_SCHEMA frame: every catalog item and every log item; the file's fields win, the log fills gaps.

    publish_ts: the file's, else the item's first appearance in the log, else the log's first event
    (an item listed but never seen existed, as far as we know, from the start of the log).
    """
    merged = catalog.merge(log_items, on="item_id", how="outer", suffixes=("", "_log"), sort=True)
    start = int(log_items["publish_ts"].min()) if len(log_items) else 0
    publish = merged["publish_ts"].where(merged["publish_ts"].notna(), merged["publish_ts_log"]).fillna(start)
    out = pd.DataFrame({
        "item_id": merged["item_id"].astype(object),
        "title": merged["title"].where(merged["title"].notna() & (merged["title"] != ""), merged["title_log"]).fillna(""),
        "category": merged["category"].where(merged["category"].notna(), merged["category_log"]).fillna(NO_CATEGORY),
        "tags": merged["tags"].where(merged["tags"].notna(), merged["tags_log"]).fillna(NO_CATEGORY),
        "publish_ts": publish.astype("int64"),
    })
    return out[ITEM_SCHEMA.names]


def join_users(log_users: pd.DataFrame, profiles: pd.DataFrame) -> pd.DataFrame:
    """USER_SCHEMA frame: every profile and every log user; profile fields win, log-derived defaults fill gaps."""
    merged = profiles.merge(log_users, on="user_id", how="outer", suffixes=("", "_log"), sort=True)
    start = int(log_users["signup_ts"].min()) if len(log_users) else 0
    out = pd.DataFrame({"user_id": merged["user_id"].astype(object)})
    for name, default in (("segment", "unknown"), ("device_type", "desktop"), ("geo_region", "other")):
        out[name] = merged[name].where(merged[name].notna(), merged[f"{name}_log"]).fillna(default).astype(object)
    signup = merged["signup_ts"].where(merged["signup_ts"].notna(), merged["signup_ts_log"]).fillna(start)
    out["signup_ts"] = signup.astype("int64")
    return out[USER_SCHEMA.names]


__all__ = ["ItemCatalogMapping", "UserCatalogMapping", "join_items", "join_users", "read_item_catalog",
           "read_user_catalog"]
