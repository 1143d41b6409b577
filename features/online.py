"""The online feature store: a thin Redis adapter over the shared feature definitions.

Key layout (`{version}` is the snapshot id chosen by the materialize asset, e.g. ``u12-i12-1767916800000``;
every key of a version expires at the same instant, `expires_at_ms` in its meta):

    kairos:fs:current                       STRING  the live snapshot version; expires with that version's data
    kairos:fs:versions                      ZSET    materialized versions scored by the ms their data expires;
                                                    the key itself expires with the longest-lived member
    kairos:fs:{version}:user:{user_id}      HASH    USER_STORE_COLUMNS (floats as text,
                                                    user_category_clicks_30d as a JSON string;
                                                    NaN/None fields are omitted -> registry defaults)
    kairos:fs:{version}:items               HASH    item_id -> one packed row (ItemCodec: a format byte,
                                                    float32/float64 numbers, length-prefixed text and maps)
    kairos:fs:{version}:published           ZSET    item_id scored by publish_ts, the newest PUBLISHED_KEEP
                                                    (the fresh channel's index)
    kairos:fs:{version}:rev                 HASH    {epoch, seq}: epoch changes when the version is (re)written
                                                    whole, seq counts incremental item writes
    kairos:fs:{version}:changes             ZSET    item_id scored by the seq that last wrote it
    kairos:fs:{version}:popular             STRING  JSON list of popular item ids, most popular first
    kairos:fs:{version}:meta                STRING  JSON {users, items, written_at, expires_at_ms, layout}
    kairos:session:{session_id}             STRING  JSON session state (features.functions.new_session_state
                                                    / update_session), TTL 30 min refreshed on update
                                                    (written by streaming.job)

Snapshots are written completely under their new version and only then is
``kairos:fs:current`` flipped, so a reader never sees half a snapshot. The previous
version is kept (readers that fetched it a moment ago stay consistent, and it is an
instant rollback target); anything older is deleted.

Item rows are read per request for exactly the ids asked for (one HMGET for the ones a
bounded in-process LRU does not hold), so no process ever loads a whole catalog and a
new version serves from its first request. Incremental writes (`write_items`) bump the
version's seq in the same transaction as the rows; readers see the seq in the round trip
they already make and drop exactly the changed rows from their cache.

The store holds no feature logic: values go in as the batch job computed them and
come out as raw store columns for features.functions.assemble_features.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from itertools import compress, repeat, starmap
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from features.functions import WeightMap
from features.registry import ITEM_STORE_COLUMNS
from ground.settings import redis_client
from features.online_keys import (CURRENT_KEY, _s, _str, changes_key, items_key, meta_key, popular_key, published_key,
                                  rev_key, session_key, session_owner_key, text_key, user_key)
from features.online_codec import ItemCodec, decode_session, decode_user
from features.online_items import ItemTable, VersionState
from features.online_write import StoreWriter

log = logging.getLogger("kairos.online")

STALE_CACHE_USERS = 100_000
# Defaults only: a server sets both from KAIROS_ITEM_CACHE_ROWS / KAIROS_FRESH_WINDOW (serving/settings.py, read
# once at its start) through OnlineStore(item_cache_rows=, fresh_window=); importing this module reads no environment.
# decoded item rows kept per process (all versions together); a row with its co-click map is ~1-2 KB
ITEM_CACHE_ROWS = 50_000
# the fresh channel looks at this many newest items (by publish_ts) of the serving version
FRESH_WINDOW = 1000


class OnlineStore(StoreWriter):
    """Redis-backed online store. `client` is a redis.Redis (decode_responses either way)."""

    def __init__(self, client: Any, breaker_s: float = 1.0, item_cache_rows: int = ITEM_CACHE_ROWS,
                 fresh_window: int = FRESH_WINDOW) -> None:
        self.client = client
        # circuit breaker: after a failed read, fail fast for breaker_s instead of paying a socket
        # timeout on every request while Redis is down or hung (callers fall back meanwhile)
        self.breaker_s = breaker_s
        self._down_until = 0.0
        self._version: str | None = None
        self._states: dict[str, VersionState] = {}
        self._popular: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._bin: Any = None
        self.item_cache_rows = max(0, int(item_cache_rows))
        self.fresh_window = max(1, int(fresh_window))  # looking past PUBLISHED_KEEP finds nothing more
        # the last rows read per user, for the stale path when Redis is slow or down (bounded LRU)
        self._stale: "OrderedDict[str, tuple[float, dict | None, str | None]]" = OrderedDict()
        self.stale_capacity = STALE_CACHE_USERS
        self.table_hits = 0   # item rows answered from the in-process LRU
        self.table_loads = 0  # ... and read from Redis
        self._warned_no_version = False

    @classmethod
    def from_url(cls, url: str, timeout_s: float = 0.1, breaker_s: float = 1.0, item_cache_rows: int = ITEM_CACHE_ROWS,
                 fresh_window: int = FRESH_WINDOW) -> "OnlineStore":
        """A store on the request path: short socket timeouts and one immediate retry (a pooled
        connection gone stale after a Redis restart), so a slow or dead Redis costs a request at
        most ~2 timeouts before the circuit breaker answers from the fallback at once."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry


        # password / TLS from the environment (REDIS_PASSWORD, rediss://, KAIROS_REDIS_TLS_*)
        client = redis_client(url, decode_responses=True, socket_timeout=timeout_s,
                              socket_connect_timeout=timeout_s, health_check_interval=30,
                              retry=Retry(NoBackoff(), 1))
        return cls(client, breaker_s=breaker_s, item_cache_rows=item_cache_rows, fresh_window=fresh_window)

    # ------------------------------------------------------------------ keys
    @staticmethod
    def session_key(session_id: str) -> str:
        return session_key(session_id)

    def _binary(self) -> Any:
        """A client on the same connection settings that returns bytes (item rows are binary)."""
        kwargs = self.client.connection_pool.connection_kwargs
        if not kwargs.get("decode_responses"):
            return self.client
        if self._bin is None:
            import redis

            kw = dict(kwargs)
            kw["decode_responses"] = False
            pool = redis.ConnectionPool(connection_class=self.client.connection_pool.connection_class, **kw)
            self._bin = redis.Redis(connection_pool=pool)
        return self._bin

    # ------------------------------------------------------------------ read path
    def current_version(self) -> str | None:
        """The live version in Redis (does not change the version this store is serving)."""
        return _s(self.client.get(CURRENT_KEY))

    @property
    def serving_version(self) -> str | None:
        return self._version

    def fetch(self, user_id: str, session_id: str | None) -> tuple[dict | None, dict | None, str | None]:
        """(user_row, session_state, version) in one pipelined round trip.

        GET current + HGETALL user under the serving version + GET session + the version's rev. When
        `current` moves on, the user is re-read under the new version with its meta (a second round trip,
        once per version per process); item rows of the new version are then read on demand, so no
        request ever waits for a bulk load. When the rev shows incremental item writes, their ids are read
        (one more small round trip, once per write) and dropped from the row cache.
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
        """(user_row, version, age_s) last read for this user if younger than max_age_s and its version is
        still known here; None otherwise. What the server serves from while Redis is unavailable."""
        hit = self._stale.get(user_id)
        if hit is None:
            return None
        at, user, version = hit
        age = time.time() - at
        if age > max_age_s or version is None or version not in self._states:
            return None
        return user, version, age

    def _fetch(self, user_id: str, session_id: str | None) -> tuple[dict | None, dict | None, str | None]:
        known = self._version
        pipe = self.client.pipeline(transaction=False)
        pipe.get(CURRENT_KEY)
        if known:
            pipe.hgetall(user_key(known, user_id))
            pipe.hmget(rev_key(known), ["epoch", "seq"])
        if session_id:
            pipe.get(session_key(session_id))
            pipe.get(session_owner_key(session_id))
        res = pipe.execute()
        current = _s(res[0])
        raw_user = rev = None
        pos = 1
        if known:
            raw_user, rev = res[1], res[2]
            pos = 3
        raw_session = res[pos] if session_id else None
        owner = _s(res[pos + 1]) if session_id else None
        if owner is not None and owner != user_id:  # another user's session: never personalize from it
            log.warning("session %s belongs to another user; request for %s served without session state",
                        session_id, user_id)
            raw_session = None
        version = known
        if current and current != known:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(user_key(current, user_id))
            pipe.get(meta_key(current))
            pipe.hmget(rev_key(current), ["epoch", "seq"])
            new_user, raw_meta, new_rev = pipe.execute()
            if raw_meta is not None:
                self._adopt(current, raw_meta)
                raw_user, rev, version = new_user, new_rev, current
            else:  # gone between the two reads: keep serving what we had (its user row, its version)
                log.warning("online-store version %s named by %s has no meta; keeping %s", current, CURRENT_KEY, known)
        elif not current:
            if not self._warned_no_version:
                log.warning("no live online-store version: %s is missing (its snapshot expired or none was "
                            "materialized); serving defaults until the online_features asset runs", CURRENT_KEY)
                self._warned_no_version = True
            raw_user, version = None, None
            self._version = None
        if version:
            self._warned_no_version = False
            self._sync_rev(version, rev)
        user = decode_user(raw_user)
        if user is not None:
            user.pop("_", None)
        return user, decode_session(raw_session), version

    def _adopt(self, version: str, raw_meta: Any) -> VersionState:
        """Learn a version's codec and expiry from its meta and serve it from now on."""
        state = self._state_from_meta(version, raw_meta)
        with self._lock:
            # keep the serving version's state (in-flight requests) and the new one
            self._states = {k: v for k, v in self._states.items() if k == self._version}
            self._states[version] = state
            self._version = version
        return state

    @staticmethod
    def _state_from_meta(version: str, raw_meta: Any) -> VersionState:
        meta = json.loads(_str(raw_meta))
        if "layout" not in meta:
            log.error("online-store version %s has no item row layout (written by an older Kairos?): its items "
                      "read as missing until the online_features asset is materialized again", version)
        return VersionState(version=version, codec=ItemCodec.from_doc(meta.get("layout") or {}),
                            expires_at_ms=meta.get("expires_at_ms"))

    def _sync_rev(self, version: str, rev: Sequence[Any] | None) -> None:
        """Bring the row cache in line with the version's (epoch, seq) read in this round trip."""
        state = self._states.get(version)
        if state is None or not rev or rev[0] is None:
            return
        epoch, seq = _s(rev[0]) or "", int(_s(rev[1]) or 0)
        if epoch == state.epoch and seq == state.seq:
            return
        if epoch != state.epoch:  # (re)written whole: the rows cached for the old epoch go
            with self._lock:
                state.epoch, state.seq, state.fresh, state.texts, state.rows = epoch, seq, None, {}, OrderedDict()
            return
        if seq < state.seq:
            return
        changed = [_str(i) for i in self.client.zrangebyscore(changes_key(version), f"({state.seq}", seq)]
        with self._lock:
            for iid in changed:
                state.rows.pop(iid, None)  # its bytes and its decoded maps
            state.seq, state.fresh = seq, None

    def _item_columns(self, state: VersionState, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """ITEM_STORE_COLUMNS for item_ids (aligned): rows from the version's LRU, the misses in one HMGET (not
        cached when a write raced this read), all decoded together.

        One LRU entry per row holds its packed bytes and, once the row is read a second time, its decoded maps: one
        lookup per candidate in a dict keyed by the id itself (a 50k-row cache is memory-bound: each lookup costs
        its cache misses, so a separate (column, epoch, id)-keyed map cache had doubled them), and every per-id
        step is a C-level batch (map / compress / comprehension), no Python statement per row."""
        version, epoch, seq = state.version, state.epoch, state.seq
        distinct = list(dict.fromkeys(item_ids))
        with self._lock:
            rows = state.rows
            got: list[Any] = list(map(rows.get, distinct))
            hit = [g is not None for g in got]
            deque(map(rows.move_to_end, compress(distinct, hit)), maxlen=0)  # the LRU touch of every hit
        n_hits = sum(hit)
        self.table_hits += n_hits
        if n_hits < len(distinct):
            misses = [i for i, h in zip(distinct, hit) if not h]
            self.table_loads += len(misses)
            blank = state.codec.blank
            if time.monotonic() < self._down_until:  # Redis known down: what the cache holds, defaults for the rest
                fetched = [blank] * len(misses)
            else:
                fetched = [blank if r is None else r for r in self._binary().hmget(items_key(version), misses)]
                with self._lock:
                    if state.epoch == epoch and state.seq == seq and self.item_cache_rows:
                        rows.update(zip(misses, fetched))
                        self._evict_rows(state)
            it = iter(fetched)
            got = [g if h else next(it) for g, h in zip(got, hit)]
        if len(distinct) == len(item_ids):
            entries, was_hit = got, hit
        else:  # a repeated id: align with the request
            pos = {i: r for r, i in enumerate(distinct)}
            at = [pos[i] for i in item_ids]
            entries, was_hit = [got[j] for j in at], [hit[j] for j in at]
        raws = [e if type(e) is bytes else e[0] for e in entries]
        map_cols = state.codec.maps
        known: dict[str, dict[int, WeightMap]] = {}
        if n_hits and map_cols:  # rows decoded before: their cached maps (a hit's entry is (raw, *maps))
            decoded = [(r, e) for r, e in enumerate(entries) if type(e) is tuple]
            known = {col: {r: e[k + 1] for r, e in decoded if e[k + 1] is not None} for k, col in enumerate(map_cols)}
        cols = state.codec.decode(raws, ITEM_STORE_COLUMNS, lambda col, top: self._text_values(state, col, top), known)
        if n_hits and map_cols:
            self._weight_maps(state, epoch, seq, item_ids, entries, was_hit, cols)
        return cols

    def _evict_rows(self, keep: VersionState) -> None:
        """Hold the rows of every version together to item_cache_rows (under the lock): other versions' rows go
        first (they serve at most in-flight requests), then `keep`'s oldest."""
        others = [s for s in self._states.values() if s is not keep]
        over = sum(len(s.rows) for s in others) + len(keep.rows) - self.item_cache_rows
        for state in (*others, keep):
            n = min(over, len(state.rows))
            if n > 0:  # popitem(last=False) n times, looped in C
                deque(starmap(state.rows.popitem, repeat((False,), n)), maxlen=0)
                over -= n

    @property
    def cached_rows(self) -> int:
        """Item rows this process holds, every version together (at most item_cache_rows)."""
        return sum(len(s.rows) for s in self._states.values())

    def _weight_maps(self, state: VersionState, epoch: str, seq: int, item_ids: Sequence[str], entries: list[Any],
                     was_hit: list[bool], cols: dict[str, np.ndarray]) -> None:
        """The map columns of rows read before (in place) as WeightMaps, decoded once per (version, epoch, item) and
        kept in the row's LRU entry (decode serves them from there): a request's ~200 candidates cost dict lookups,
        not ~200 key-blob searches and sums. Only rows read before (`was_hit`) are decoded: a row seen once stays a
        lazy PackedMap, so a catalog read uniformly (1M items, ~5% hits) does not decode ~190 maps a request it will
        never see again. Kept only if no write raced this read (the rule of the packed rows)."""
        map_cols = state.codec.maps
        new: dict[str, tuple] = {}
        for r, (entry, h) in enumerate(zip(entries, was_hit)):
            if not h or type(entry) is not bytes:
                continue
            iid = item_ids[r]
            done = new.get(iid)
            if done is None:
                done = new[iid] = (entry, *(None if cols[c][r] is None else WeightMap(cols[c][r].items())
                                            for c in map_cols))
            for k, col in enumerate(map_cols):
                if done[k + 1] is not None:
                    cols[col][r] = done[k + 1]
        if new and self.item_cache_rows:
            rows = state.rows
            with self._lock:
                if state.epoch == epoch and state.seq == seq:
                    for iid, done in new.items():
                        if iid in rows:  # not evicted meanwhile: the entry keeps its place in the LRU
                            rows[iid] = done

    def _text_values(self, state: VersionState, column: str, top: int) -> np.ndarray:
        """The value table [None, v1, v2, ...] of a text column, re-read when a code is past what we hold
        (values only ever get appended within an epoch)."""
        table = state.texts.get(column)
        if table is None or top >= len(table):
            values = [_s(v) for v in self.client.lrange(text_key(state.version, column), 0, -1)]
            table = np.empty(len(values) + 1, dtype=object)
            table[0], table[1:] = None, values
            if top >= len(table):  # a code beyond the list: the row belongs to another epoch; read as missing
                table = np.append(table, [None] * (top + 1 - len(table)))
            else:
                state.texts[column] = table
        return table

    def _fresh_window(self, state: VersionState) -> tuple[list[str], np.ndarray]:
        """The version's newest `fresh_window` items with their publish_ts, re-read whenever its rev moves."""
        cached = state.fresh
        if cached is not None:
            return cached
        epoch, seq = state.epoch, state.seq
        pairs = self.client.zrevrange(published_key(state.version), 0, self.fresh_window - 1, withscores=True)
        window = ([_str(i) for i, _ in pairs], np.array([float(ts) for _, ts in pairs], dtype=np.float64))
        with self._lock:
            if state.epoch == epoch and state.seq == seq:
                state.fresh = window
        return window

    def item_table(self, version: str | None) -> ItemTable:
        """A view of `version`'s item rows for one request (rows are read on demand, never the catalog)."""
        if not version:
            return ItemTable.empty()
        state = self._states.get(version)
        if state is None:
            raw_meta = self.client.get(meta_key(version))
            if raw_meta is None:
                return ItemTable.empty(version)
            state = self._state_from_meta(version, raw_meta)
            rev = self.client.hmget(rev_key(version), ["epoch", "seq"])
            with self._lock:
                state = self._states.setdefault(version, state)
            self._sync_rev(version, rev)
        return ItemTable(self, version, state)

    def categories(self, version: str | None, item_ids: Iterable[str]) -> dict[str, str | None]:
        """item_id -> category for these ids under `version` (the streaming job's per-batch lookup)."""
        ids = [i for i in dict.fromkeys(item_ids) if i]
        if not ids or not version:
            return {}
        table = self.item_table(version)
        if table.state is not None:  # a reader outside fetch(): follow incremental writes here (one HMGET)
            self._sync_rev(version, self.client.hmget(rev_key(version), ["epoch", "seq"]))
        return dict(zip(ids, table.columns_for(ids)["category"].tolist()))

    def sample_items(self, version: str | None, n: int = 1000) -> pd.DataFrame:
        """Up to n item rows of `version` (an HSCAN sample, off the request path: monitoring)."""
        empty = pd.DataFrame({"item_id": pd.Series([], dtype=object),
                              **{c: pd.Series([], dtype=object) for c in ITEM_STORE_COLUMNS}})
        if not version:
            return empty
        raw_meta = self.client.get(meta_key(version))
        if raw_meta is None:
            return empty
        state = self._state_from_meta(version, raw_meta)
        ids: list[str] = []
        raws: list[bytes] = []
        for iid, raw in self._binary().hscan_iter(items_key(version), count=1000):
            ids.append(_str(iid))
            raws.append(raw)
            if len(ids) >= n:
                break
        if not raws:
            return empty
        cols = state.codec.decode(raws, ITEM_STORE_COLUMNS, lambda col, top: self._text_values(state, col, top))
        return pd.DataFrame({"item_id": ids, **cols})

    def warm(self) -> str | None:
        """Learn the live version (meta, rev) and its popular list (off the request path; no catalog load)."""
        current = self.current_version()
        if current:
            self.item_table(current)
            self.popular(current)
            if self._version is None:
                with self._lock:
                    self._version = current
        return current

    def popular(self, version: str | None) -> list[str]:
        if not version:
            return []
        cached = self._popular.get(version)
        if cached is not None:
            return cached
        raw = self.client.get(popular_key(version))
        ranked = json.loads(_str(raw)) if raw else []
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


__all__ = ["OnlineStore", "ITEM_CACHE_ROWS", "FRESH_WINDOW", "STALE_CACHE_USERS"]
