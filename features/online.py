"""The online feature store: a thin Redis adapter over the shared feature definitions.

Key layout (all keys are plain Redis strings/hashes; `{version}` is the snapshot id
chosen by the materialize asset, e.g. ``u12-i12-1767916800000``):

    kairos:fs:current                       STRING  the live snapshot version
    kairos:fs:versions                      ZSET    every materialized version, scored by write time
    kairos:fs:{version}:user:{user_id}      HASH    USER_STORE_COLUMNS (floats as text,
                                                    user_category_clicks_30d as a JSON string;
                                                    NaN/None fields are omitted -> registry defaults)
    kairos:fs:{version}:items               STRING  the whole item table as one JSON blob
                                                    {"columns": [...], "data": {col: [values]}}
                                                    (item_id + ITEM_STORE_COLUMNS); servers load it
                                                    once per version and keep it in memory
    kairos:fs:{version}:popular             STRING  JSON list of popular item ids, most popular first
    kairos:fs:{version}:meta                STRING  JSON {users, items, written_at}
    kairos:session:{session_id}             STRING  JSON session state (features.functions.new_session_state
                                                    / update_session), TTL 30 min refreshed on update
                                                    (written by streaming.job)

Snapshots are written completely under their new version and only then is
``kairos:fs:current`` flipped, so a reader never sees half a snapshot. The previous
version is kept (readers that fetched it a moment ago stay consistent, and it is an
instant rollback target); anything older is deleted.

The store holds no feature logic: values go in as the batch job computed them and
come out as raw store columns for features.functions.assemble_features.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from features.registry import (ITEM_JSON_COLUMNS, ITEM_STORE_COLUMNS, USER_HISTORY_COLUMNS, USER_JSON_COLUMNS,
                               USER_STORE_COLUMNS)

log = logging.getLogger("kairos.online")

PREFIX = "kairos:fs"
CURRENT_KEY = f"{PREFIX}:current"
VERSIONS_KEY = f"{PREFIX}:versions"
SESSION_PREFIX = "kairos:session"
SESSION_TTL_S = 30 * 60
DEFAULT_TTL_S = 7 * 86400
CHUNK = 2000
STALE_CACHE_USERS = 100_000
STRING_USER_COLUMNS = frozenset(USER_JSON_COLUMNS) | frozenset(USER_HISTORY_COLUMNS)
STRING_ITEM_COLUMNS = frozenset({"category", *ITEM_JSON_COLUMNS})


def _s(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def user_key(version: str, user_id: str) -> str:
    return f"{PREFIX}:{version}:user:{user_id}"


def items_key(version: str) -> str:
    return f"{PREFIX}:{version}:items"


def popular_key(version: str) -> str:
    return f"{PREFIX}:{version}:popular"


def meta_key(version: str) -> str:
    return f"{PREFIX}:{version}:meta"


def session_key(session_id: str) -> str:
    return f"{SESSION_PREFIX}:{session_id}"


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return bool(pd.isna(value)) if not isinstance(value, (str, bytes, dict, list)) else False
    except (TypeError, ValueError):
        return False


def _user_mapping(row: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for col in (*USER_STORE_COLUMNS, *USER_HISTORY_COLUMNS):
        value = row.get(col)
        if _is_missing(value):
            continue
        if col in STRING_USER_COLUMNS:
            out[col] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        else:
            out[col] = repr(float(value))
    return out


def decode_user(raw: Mapping[Any, Any] | None) -> dict[str, Any] | None:
    """A user hash from Redis -> {column: float | JSON str}; None when the user has no row."""
    if not raw:
        return None
    out: dict[str, Any] = {}
    for k, v in raw.items():
        k, v = _s(k), _s(v)
        if k in STRING_USER_COLUMNS:
            out[k] = v
        else:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def decode_session(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        state = json.loads(_s(raw))
    except (TypeError, ValueError):
        log.warning("unreadable session state ignored")
        return None
    return state if isinstance(state, dict) else None


def pack_items(items: pd.DataFrame) -> str:
    cols = ["item_id", *[c for c in ITEM_STORE_COLUMNS]]
    data: dict[str, list] = {}
    for col in cols:
        if col not in items:
            data[col] = [None] * len(items)
            continue
        series = items[col]
        if col in ("item_id", *STRING_ITEM_COLUMNS):
            data[col] = [None if _is_missing(v) else str(v) for v in series.tolist()]
        elif col == "publish_ts":
            data[col] = [None if _is_missing(v) else int(v) for v in series.tolist()]
        else:
            data[col] = [None if _is_missing(v) else float(v) for v in series.tolist()]
    return json.dumps({"columns": cols, "data": data}, separators=(",", ":"))


@dataclass
class ItemTable:
    """One version's item table, in memory: a frame plus O(1) lookups for serving."""

    version: str
    frame: pd.DataFrame  # item_id + ITEM_STORE_COLUMNS, default RangeIndex
    row: dict[str, int] = field(default_factory=dict)
    category: dict[str, str | None] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_blob(cls, version: str, blob: str | bytes) -> "ItemTable":
        doc = json.loads(_s(blob))
        data = doc["data"]
        frame = pd.DataFrame({c: data.get(c, []) for c in doc["columns"]})
        for col in ITEM_STORE_COLUMNS:
            if col not in frame:
                frame[col] = None
        for col in ITEM_STORE_COLUMNS:
            if col not in STRING_ITEM_COLUMNS:
                frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
        ids = frame["item_id"].astype(str).tolist()
        arrays: dict[str, np.ndarray] = {}
        for col in ITEM_STORE_COLUMNS:
            if col in ITEM_JSON_COLUMNS:  # parsed once per snapshot, not per request
                values = frame[col].tolist()
                arrays[col] = np.empty(len(values) + 1, dtype=object)  # + the sentinel row (None)
                arrays[col][:-1] = [json.loads(v) if isinstance(v, str) and v else None for v in values]
            elif col in STRING_ITEM_COLUMNS:
                arrays[col] = np.append(frame[col].to_numpy(dtype=object), None)
            else:
                arrays[col] = np.append(frame[col].to_numpy(dtype=float), np.nan)
        return cls(version=version, frame=frame, row={iid: i for i, iid in enumerate(ids)},
                   category=dict(zip(ids, frame["category"].tolist())), arrays=arrays)

    @classmethod
    def empty(cls, version: str = "") -> "ItemTable":
        frame = pd.DataFrame({"item_id": pd.Series([], dtype=object), **{c: pd.Series([], dtype=object) for c in ITEM_STORE_COLUMNS}})
        arrays = {c: (np.array([None], dtype=object) if c in STRING_ITEM_COLUMNS else np.array([np.nan])) for c in ITEM_STORE_COLUMNS}
        return cls(version=version, frame=frame, arrays=arrays)

    @property
    def ids(self) -> list[str]:
        """Item ids in table order (cached: the table never changes once loaded)."""
        if "_ids" not in self.__dict__:
            self.__dict__["_ids"] = self.frame["item_id"].astype(str).tolist()
        return self.__dict__["_ids"]

    @property
    def co_items(self) -> dict[str, dict[str, float]]:
        """item_id -> its co-clicked items (parsed once per table)."""
        if "_co" not in self.__dict__:
            arr = self.arrays.get("co_items_30d")
            self.__dict__["_co"] = {} if arr is None else {i: c for i, c in zip(self.ids, arr[:-1]) if c}
        return self.__dict__["_co"]

    def columns_for(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        """Item store columns for candidate ids, aligned; unknown items get NaN/None (-> defaults)."""
        missing = len(self.row)
        idx = np.fromiter((self.row.get(i, missing) for i in item_ids), dtype=np.int64, count=len(item_ids))
        # the sentinel row (NaN/None) sits at index len(row) in every array
        return {c: a[idx] for c, a in self.arrays.items()}


class OnlineStore:
    """Redis-backed online store. `client` is a redis.Redis (decode_responses either way)."""

    def __init__(self, client: Any, breaker_s: float = 1.0) -> None:
        self.client = client
        # circuit breaker: after a failed read, fail fast for breaker_s instead of paying a socket
        # timeout on every request while Redis is down or hung (callers fall back meanwhile)
        self.breaker_s = breaker_s
        self._down_until = 0.0
        self._version: str | None = None
        self._tables: dict[str, ItemTable] = {}
        self._popular: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._loading: set[str] = set()
        self._bulk: Any = None
        # the last rows read per user, for the stale path when Redis is slow or down (bounded LRU)
        self._stale: "OrderedDict[str, tuple[float, dict | None, str | None]]" = OrderedDict()
        self.stale_capacity = STALE_CACHE_USERS
        self.table_hits = 0   # item-table lookups answered from memory
        self.table_loads = 0  # ... and loaded from Redis

    @classmethod
    def from_url(cls, url: str, timeout_s: float = 0.1, breaker_s: float = 1.0) -> "OnlineStore":
        """A store on the request path: short socket timeouts and one immediate retry (a pooled
        connection gone stale after a Redis restart), so a slow or dead Redis costs a request at
        most ~2 timeouts before the circuit breaker answers from the fallback at once. Bulk item
        table loads use a separate long-timeout client (see _bulk_client)."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from orchestration.settings import redis_client

        # password / TLS from the environment (REDIS_PASSWORD, rediss://, KAIROS_REDIS_TLS_*)
        client = redis_client(url, decode_responses=True, socket_timeout=timeout_s,
                              socket_connect_timeout=timeout_s, health_check_interval=30,
                              retry=Retry(NoBackoff(), 1))
        return cls(client, breaker_s=breaker_s)

    # ------------------------------------------------------------------ keys
    @staticmethod
    def session_key(session_id: str) -> str:
        return session_key(session_id)

    # ------------------------------------------------------------------ write path
    def materialize(self, users: pd.DataFrame, items: pd.DataFrame, version: str, ttl_s: int = DEFAULT_TTL_S,
                    popular: Iterable[str] | None = None) -> dict[str, Any]:
        """Write a whole snapshot under `version`, then flip `kairos:fs:current` to it."""
        t0 = time.perf_counter()
        version = str(version)
        c = self.client
        previous = _s(c.get(CURRENT_KEY))
        n_users = 0
        records = users.to_dict("records") if len(users) else []
        for start in range(0, len(records), CHUNK):
            # one MULTI per chunk: re-materializing a live version never exposes a deleted-but-unwritten user
            pipe = c.pipeline(transaction=True)
            for row in records[start:start + CHUNK]:
                uid = row.get("user_id")
                if _is_missing(uid):
                    continue
                key = user_key(version, str(uid))
                mapping = _user_mapping(row)
                pipe.delete(key)
                if mapping:
                    pipe.hset(key, mapping=mapping)
                else:  # a known user with every value missing: keep an empty marker field
                    pipe.hset(key, mapping={"_": "1"})
                pipe.expire(key, ttl_s)
                n_users += 1
            pipe.execute()
        t_users = time.perf_counter() - t0
        blob = pack_items(items)
        if popular is None:
            popular = (items.sort_values("item_clicks_7d", ascending=False, na_position="last")["item_id"].tolist()
                       if "item_clicks_7d" in items else items["item_id"].tolist())[:500]
        popular = [str(i) for i in popular]
        pipe = c.pipeline(transaction=True)
        pipe.set(items_key(version), blob, ex=ttl_s)
        pipe.set(popular_key(version), json.dumps(popular), ex=ttl_s)
        pipe.set(meta_key(version), json.dumps({"users": n_users, "items": len(items), "written_at": time.time()}), ex=ttl_s)
        pipe.zadd(VERSIONS_KEY, {version: time.time()})
        pipe.execute()
        # everything is written: now flip readers to the new version
        c.set(CURRENT_KEY, version)
        # keep the new version and the one before it (readers mid-request, instant rollback)
        others = [_s(v) for v in c.zrevrange(VERSIONS_KEY, 0, -1) if _s(v) != version]
        deleted = self._cleanup(keep={version, *others[:1]})
        seconds = time.perf_counter() - t0
        log.info("materialized %d users, %d items as %s in %.2fs (previous %s, deleted %s)",
                 n_users, len(items), version, seconds, previous, deleted)
        return {"version": version, "previous_version": previous or "", "users_written": n_users,
                "items_written": int(len(items)), "popular_written": len(popular), "item_blob_bytes": len(blob),
                "versions_deleted": len(deleted), "user_write_seconds": round(t_users, 3),
                "seconds": round(seconds, 3)}

    def _cleanup(self, keep: set[str]) -> list[str]:
        c = self.client
        versions = [_s(v) for v in c.zrange(VERSIONS_KEY, 0, -1)]
        doomed = [v for v in versions if v not in keep]
        for v in doomed:
            batch: list[str] = []
            for key in c.scan_iter(match=f"{PREFIX}:{v}:*", count=1000):
                batch.append(_s(key))
                if len(batch) >= 1000:
                    c.unlink(*batch)
                    batch = []
            if batch:
                c.unlink(*batch)
            c.zrem(VERSIONS_KEY, v)
        return doomed

    # ------------------------------------------------------------------ read path
    def current_version(self) -> str | None:
        """The live version in Redis (does not change the version this store is serving)."""
        return _s(self.client.get(CURRENT_KEY))

    @property
    def serving_version(self) -> str | None:
        return self._version

    def fetch(self, user_id: str, session_id: str | None) -> tuple[dict | None, dict | None, str | None]:
        """(user_row, session_state, version) in one pipelined round trip.

        GET current + HGETALL user under the serving version + GET session. The serving
        version is the last one whose item table is in memory. When `current` moves on:
        if the new item table is already loaded, the user is re-read under the new
        version (a second round trip, once); otherwise the request keeps reading the
        previous snapshot (kept by materialize for exactly this) while the new item
        table loads in the background, so no request ever waits for a bulk load.
        """
        import redis

        if time.monotonic() < self._down_until:
            raise redis.ConnectionError("online store circuit open after a recent failure")
        try:
            user, session, version = self._fetch(user_id, session_id)
        except (redis.RedisError, OSError):
            self._down_until = time.monotonic() + self.breaker_s
            raise
        with self._lock:
            self._stale[user_id] = (time.time(), user, version)
            self._stale.move_to_end(user_id)
            while len(self._stale) > self.stale_capacity:
                self._stale.popitem(last=False)
        return user, session, version

    def stale(self, user_id: str, max_age_s: float) -> tuple[dict | None, str, float] | None:
        """(user_row, version, age_s) last read for this user if younger than max_age_s and its item table
        is still in memory; None otherwise. What the server serves from while Redis is unavailable."""
        hit = self._stale.get(user_id)
        if hit is None:
            return None
        at, user, version = hit
        age = time.time() - at
        if age > max_age_s or version is None or version not in self._tables:
            return None
        return user, version, age

    def _fetch(self, user_id: str, session_id: str | None) -> tuple[dict | None, dict | None, str | None]:
        known = self._version
        pipe = self.client.pipeline(transaction=False)
        pipe.get(CURRENT_KEY)
        if known:
            pipe.hgetall(user_key(known, user_id))
        if session_id:
            pipe.get(session_key(session_id))
        res = pipe.execute()
        current = _s(res[0])
        pos = 1
        raw_user = None
        if known:
            raw_user = res[pos]
            pos += 1
        raw_session = res[pos] if session_id else None
        version = known
        if current and current != known:
            if known is None or current in self._tables:
                if known is None:
                    self.item_table(current)  # first contact: nothing to fall back on, load now
                raw_user = self.client.hgetall(user_key(current, user_id))
                self._version = version = current
            else:
                self._load_in_background(current)
        elif not current:
            raw_user, version = None, None
        user = decode_user(raw_user)
        if user is not None:
            user.pop("_", None)
        return user, decode_session(raw_session), version

    def _load_in_background(self, version: str) -> None:
        with self._lock:
            if version in self._loading or version in self._tables:
                return
            self._loading.add(version)

        def load() -> None:
            try:
                self._load_table(version, self._bulk_client())
                self.popular(version)
            except Exception as exc:  # noqa: BLE001 - retried by the next fetch
                log.warning("background load of item table %s failed: %s", version, exc)
            finally:
                with self._lock:
                    self._loading.discard(version)

        threading.Thread(target=load, name=f"kairos-items-{version}", daemon=True).start()

    def _bulk_client(self) -> Any:
        """A client on the same server with a generous timeout, for bulk reads off the request path."""
        if self._bulk is None:
            import redis

            kwargs = dict(self.client.connection_pool.connection_kwargs)
            kwargs["socket_timeout"] = max(float(kwargs.get("socket_timeout") or 0), 30.0)
            kwargs["socket_connect_timeout"] = max(float(kwargs.get("socket_connect_timeout") or 0), 5.0)
            pool = redis.ConnectionPool(connection_class=self.client.connection_pool.connection_class, **kwargs)
            self._bulk = redis.Redis(connection_pool=pool)
        return self._bulk

    def _load_table(self, version: str, client: Any) -> ItemTable:
        blob = client.get(items_key(version))
        table = ItemTable.from_blob(version, blob) if blob else ItemTable.empty(version)
        with self._lock:
            # keep the serving version's table and the new one only
            self._tables = {k: v for k, v in self._tables.items() if k == self._version}
            self._tables[version] = table
        return table

    def item_table(self, version: str | None) -> ItemTable:
        """The in-memory item table for `version` (loaded once per version, then cached)."""
        if not version:
            return ItemTable.empty()
        table = self._tables.get(version)
        if table is not None:
            self.table_hits += 1
            return table
        self.table_loads += 1
        return self._load_table(version, self.client)

    def warm(self) -> str | None:
        """Load the live version's item table and popular list into memory (off the request path)."""
        current = self.current_version()
        if current and current not in self._tables:
            self._load_table(current, self._bulk_client())
        if current:
            self.popular(current)
            if self._version is None:
                self._version = current
        return current

    def items(self, version: str | None) -> pd.DataFrame:
        return self.item_table(version).frame

    def popular(self, version: str | None) -> list[str]:
        if not version:
            return []
        cached = self._popular.get(version)
        if cached is not None:
            return cached
        raw = self.client.get(popular_key(version))
        ranked = json.loads(_s(raw)) if raw else []
        self._popular = {k: v for k, v in self._popular.items() if k == self._version}
        self._popular[version] = ranked
        return ranked

    def last_popular(self) -> list[str]:
        """The most recent popular list held in memory (a stale local copy for when Redis is down)."""
        if self._version and self._version in self._popular:
            return self._popular[self._version]
        for ranked in reversed(list(self._popular.values())):
            return ranked
        return []

    def session(self, session_id: str) -> dict | None:
        return decode_session(self.client.get(session_key(session_id)))


__all__ = ["OnlineStore", "ItemTable", "CURRENT_KEY", "VERSIONS_KEY", "SESSION_TTL_S", "DEFAULT_TTL_S",
           "user_key", "items_key", "popular_key", "meta_key", "session_key", "pack_items", "decode_user",
           "decode_session"]
