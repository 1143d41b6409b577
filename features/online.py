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
import math
import struct
import sys
import threading
import time
import uuid
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from features.functions import WeightMap
from features.registry import (ITEM_JSON_COLUMNS, ITEM_STORE_COLUMNS, USER_HISTORY_COLUMNS, USER_JSON_COLUMNS,
                               USER_STORE_COLUMNS)
from ground.settings import redis_client

log = logging.getLogger("kairos.online")

PREFIX = "kairos:fs"
CURRENT_KEY = f"{PREFIX}:current"
VERSIONS_KEY = f"{PREFIX}:versions"
SESSION_PREFIX = "kairos:session"
SESSION_TTL_S = 30 * 60
DEFAULT_TTL_S = 7 * 86400
CHUNK = 2000
ITEM_CHUNK = 5000
PROGRESS_EVERY = 20  # chunks between progress log lines (100k items, 40k users)
STALE_CACHE_USERS = 100_000
# Defaults only: a server sets both from KAIROS_ITEM_CACHE_ROWS / KAIROS_FRESH_WINDOW (serving/settings.py, read
# once at its start) through OnlineStore(item_cache_rows=, fresh_window=); importing this module reads no environment.
# decoded item rows kept per process (all versions together); a row with its co-click map is ~1-2 KB
ITEM_CACHE_ROWS = 50_000
# the fresh channel looks at this many newest items (by publish_ts) of the serving version
FRESH_WINDOW = 1000
# the publish_ts index holds only this many newest items (the fresh channel never looks further back, so a
# fresh window is at most this long)
PUBLISHED_KEEP = 20_000
STRING_USER_COLUMNS = frozenset(USER_JSON_COLUMNS) | frozenset(USER_HISTORY_COLUMNS)
# item store columns held as text / as float64 (ms timestamps need 53 bits); every other one is float32
ITEM_TEXT_COLUMNS: tuple[str, ...] = ("category",)
ITEM_EXACT_COLUMNS: tuple[str, ...] = ("publish_ts",)
STRING_ITEM_COLUMNS = frozenset({*ITEM_TEXT_COLUMNS, *ITEM_JSON_COLUMNS})
# columns the offline snapshots carry that are bookkeeping, not served values
SNAPSHOT_COLUMNS = frozenset({"feature_ts"})
ROW_FORMAT = 1
_NONE16 = 0xFFFF
_SEP = "\x1f"


def _s(value: Any) -> str | None:
    """A Redis reply that may be missing (nil) as text, or None."""
    return None if value is None else _str(value)


def _str(value: Any) -> str:
    """A Redis reply that is never nil (a key, a member, a field, a value checked present) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def user_key(version: str, user_id: str) -> str:
    return f"{PREFIX}:{version}:user:{user_id}"


def items_key(version: str) -> str:
    return f"{PREFIX}:{version}:items"


def published_key(version: str) -> str:
    return f"{PREFIX}:{version}:published"


def rev_key(version: str) -> str:
    return f"{PREFIX}:{version}:rev"


def changes_key(version: str) -> str:
    return f"{PREFIX}:{version}:changes"


def text_key(version: str, column: str) -> str:
    return f"{PREFIX}:{version}:text:{column}"


def session_owner_key(session_id: str) -> str:
    """Who a session belongs to (the first user seen in it, set by the streaming job); expires with the session."""
    return f"kairos:session_owner:{session_id}"


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


def check_columns(frame: pd.DataFrame, id_column: str, declared: Sequence[str], entity: str) -> None:
    """Refuse columns the registry does not declare: a column dropped without a word is a feature that
    silently serves its default. ValueError naming the columns and what to do."""
    if id_column not in frame:
        raise ValueError(f"{entity} frame has no {id_column!r} column (got {sorted(map(str, frame.columns))})")
    unknown = sorted(str(c) for c in frame.columns if c not in {id_column, *declared, *SNAPSHOT_COLUMNS})
    if unknown:
        raise ValueError(
            f"{entity} column(s) {unknown} are not declared store columns; declare them in features/registry.py "
            f"({entity.upper()}_STORE_COLUMNS, with a FeatureSpec that reads them) or drop them before writing to "
            f"the online store. Declared: {list(declared)}")


def _user_mapping(row: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for col in (*USER_STORE_COLUMNS, *USER_HISTORY_COLUMNS):
        value = row.get(col)
        if value is None or _is_missing(value):
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
        k, v = _str(k), _s(v)
        if k in STRING_USER_COLUMNS:
            out[k] = v
        elif v is not None:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def decode_session(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        state = json.loads(_str(raw))
    except (TypeError, ValueError):
        log.warning("unreadable session state ignored")
        return None
    return state if isinstance(state, dict) else None


# ---------------------------------------------------------------------------------------- item rows
class PackedMap(Mapping):
    """A map column (item_id -> weight) read straight from a packed row: nothing is parsed until asked.

    len() and values() read the header and the float32 weights; get(key) is a substring search for the
    delimited key in the row's key blob, so a candidate whose co-items do not include the session's items
    (most of them) costs no dict at all. features.functions.co_engagement takes it as any Mapping."""

    __slots__ = ("_raw", "_w", "_n", "_k0", "_k1")

    def __init__(self, raw: bytes, weights_at: int, count: int, keys_at: int, keys_end: int) -> None:
        self._raw, self._w, self._n, self._k0, self._k1 = raw, weights_at, count, keys_at, keys_end

    def __len__(self) -> int:
        return self._n

    def values(self) -> tuple[float, ...]:  # type: ignore[override]
        return struct.unpack_from(f"<{self._n}f", self._raw, self._w)

    def keys(self) -> list[str]:  # type: ignore[override]
        return self._raw[self._k0 + 1:self._k1 - 1].decode().split(_SEP) if self._n else []

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        return zip(self.keys(), self.values())

    def get(self, key: Any, default: Any = None) -> Any:
        if not isinstance(key, str) or not self._n:
            return default
        pos = self._raw.find(_SEPB + key.encode() + _SEPB, self._k0, self._k1)
        if pos < 0:
            return default
        index = self._raw.count(_SEPB, self._k0, pos)
        return struct.unpack_from("<f", self._raw, self._w + 4 * index)[0]

    def weights_of(self, keys: Sequence[Any]) -> dict[str, float]:
        """{key: weight} for those of `keys` in this row, with each key's delimited needle built once per distinct
        key list (get() encodes and concatenates it on every call): the same search, a third of the cost."""
        if not self._n:
            return {}
        raw, k0, k1 = self._raw, self._k0, self._k1
        out: dict[str, float] = {}
        for key, needle in _needles(tuple(keys)):
            pos = raw.find(needle, k0, k1)
            if pos >= 0:
                out[key] = struct.unpack_from("<f", raw, self._w + 4 * raw.count(_SEPB, k0, pos))[0]
        return out

    def __getitem__(self, key: Any) -> float:
        value = self.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: Any) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT

    def __repr__(self) -> str:
        return f"PackedMap({dict(self.items())!r})"


_ABSENT = object()
_SEPB = _SEP.encode()


@lru_cache(maxsize=4096)
def _needles(keys: tuple) -> tuple[tuple[str, bytes], ...]:
    """Each distinct string key with the bytes PackedMap.get searches for (the key between separators)."""
    return tuple((k, _SEPB + k.encode() + _SEPB) for k in dict.fromkeys(keys) if isinstance(k, str))


@dataclass(frozen=True)
class ItemCodec:
    """How one version packs an item row. Stored in the version's meta, so a version is always read with the
    layout it was written with, whatever the registry says today.

    row = head | per map column: float32 x entries, then the keys, utf-8, each between 0x1F bytes
    head = u8 format | float32 x len(f4) | float64 x len(f8) | u32 code per text column
           | u16 entries per map column (0xFFFF = missing) | u16 key-blob bytes per map column
    Text columns are dictionary-coded per version (code 0 = missing, code k = the k-th value of the
    version's list `kairos:fs:{version}:text:{column}`): category labels are few and repeat. The head has
    the same size in every row, so a request's rows decode with numpy in one go; a map column comes out as
    a PackedMap over the row's bytes. Missing numbers are NaN. A column this version does not hold reads
    as missing (NaN / None).
    """

    f4: tuple[str, ...]
    f8: tuple[str, ...]
    text: tuple[str, ...]
    maps: tuple[str, ...]

    @classmethod
    def from_registry(cls) -> "ItemCodec":
        cols = ITEM_STORE_COLUMNS
        maps = tuple(c for c in cols if c in ITEM_JSON_COLUMNS)
        text = tuple(c for c in cols if c in ITEM_TEXT_COLUMNS)
        f8 = tuple(c for c in cols if c in ITEM_EXACT_COLUMNS)
        f4 = tuple(c for c in cols if c not in {*maps, *text, *f8})
        return cls(f4=f4, f8=f8, text=text, maps=maps)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> "ItemCodec":
        return cls(**{k: tuple(doc.get(k, ())) for k in ("f4", "f8", "text", "maps")})

    def to_doc(self) -> dict[str, list[str]]:
        return {"f4": list(self.f4), "f8": list(self.f8), "text": list(self.text), "maps": list(self.maps)}

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.f4, *self.f8, *self.text, *self.maps)

    @property
    def head_dtype(self) -> np.dtype:
        if "_dtype" not in self.__dict__:
            object.__setattr__(self, "_dtype", np.dtype([
                ("fmt", "u1"), ("f4", "<f4", (len(self.f4),)), ("f8", "<f8", (len(self.f8),)),
                ("text", "<u4", (len(self.text),)), ("n", "<u2", (len(self.maps),)),
                ("klen", "<u2", (len(self.maps),))]))
        return self.__dict__["_dtype"]

    @property
    def blank(self) -> bytes:
        """The row of an item the version does not hold: every value missing (-> registry defaults)."""
        head = np.zeros(1, dtype=self.head_dtype)
        head["fmt"], head["f4"], head["f8"], head["n"] = ROW_FORMAT, np.nan, np.nan, _NONE16
        return head.tobytes()

    # -- encode
    def encode_frame(self, items: pd.DataFrame, codes: Mapping[str, Mapping[str, int]]) -> list[bytes]:
        """One packed row per frame row. `codes[column][value]` is the dictionary code of a text value."""
        n = len(items)
        head = np.zeros(n, dtype=self.head_dtype)
        head["fmt"] = ROW_FORMAT
        for kind, cols in (("f4", self.f4), ("f8", self.f8)):
            for k, col in enumerate(cols):
                head[kind][:, k] = (pd.to_numeric(items[col], errors="raise").to_numpy(dtype=np.float64)
                                     if col in items else np.nan)
        for k, col in enumerate(self.text):
            if col in items:
                table = codes[col]
                head["text"][:, k] = [0 if _is_missing(v) else table[str(v)] for v in items[col].tolist()]
        tails: list[list[bytes]] = [[] for _ in range(n)]
        ids = items["item_id"].tolist()
        for k, col in enumerate(self.maps):
            values = items[col].tolist() if col in items else [None] * n
            for r, value in enumerate(values):
                count, blob = self._encode_map(ids[r], col, value)
                head["n"][r, k] = count
                head["klen"][r, k] = len(blob)
                tails[r].append(blob)
        raw_heads = head.tobytes()
        size = self.head_dtype.itemsize
        return [raw_heads[r * size:(r + 1) * size] + b"".join(tails[r]) for r in range(n)]

    @staticmethod
    def _encode_map(item_id: Any, col: str, value: Any) -> tuple[int, bytes]:
        if isinstance(value, str):
            value = json.loads(value) if value else None
        if value is None or (not isinstance(value, Mapping) and _is_missing(value)):
            return _NONE16, b""
        if not isinstance(value, Mapping):
            raise ValueError(f"item {item_id!r}: {col} must be a JSON object or a mapping, got {type(value).__name__}")
        keys = list(value)
        try:
            joined = _SEP.join(keys)
        except TypeError:  # non-string keys (a Python mapping, not JSON)
            keys = [str(k) for k in keys]
            joined = _SEP.join(keys)
        if joined.count(_SEP) != max(len(keys) - 1, 0):
            raise ValueError(f"item {item_id!r}: a key of {col} contains the byte 0x1F")
        blob = (_SEP + joined + _SEP).encode() if keys else b""
        if len(keys) >= _NONE16 or len(blob) >= _NONE16:
            raise ValueError(f"item {item_id!r}: {col} is too large ({len(keys)} entries, {len(blob)} bytes)")
        try:
            weights = array("f", value.values())
        except TypeError:
            raise ValueError(f"item {item_id!r}: {col} values must be numbers") from None
        if sys.byteorder != "little":
            weights.byteswap()
        return len(keys), weights.tobytes() + blob

    # -- decode
    def decode(self, raws: Sequence[bytes], columns: Sequence[str],
               text_values: Callable[[str, int], np.ndarray],
               known: Mapping[str, Sequence[Any]] | None = None) -> dict[str, np.ndarray]:
        """Packed rows -> {column: array aligned with raws} for `columns` (floats with NaN, object arrays for
        text and maps). text_values(column, highest code) gives the column's value table [None, v1, ...].
        known[map column][r], when not None, is row r's map already decoded (the online store's cache): served as
        it is where the row holds the map, instead of a new PackedMap."""
        n = len(raws)
        size = self.head_dtype.itemsize
        heads = np.frombuffer(b"".join([r[:size] for r in raws]), dtype=self.head_dtype) if n else \
            np.zeros(0, dtype=self.head_dtype)
        if n and np.any(heads["fmt"] != ROW_FORMAT):
            raise ValueError(f"item rows in an unknown format {sorted(set(heads['fmt'].tolist()))}; "
                             f"this reader knows format {ROW_FORMAT}: upgrade the reader")
        out: dict[str, np.ndarray] = {}
        for k, col in enumerate(self.f4):
            out[col] = heads["f4"][:, k].astype(np.float64)
        for k, col in enumerate(self.f8):
            out[col] = heads["f8"][:, k].copy()
        for k, col in enumerate(self.text):
            codes = heads["text"][:, k].astype(np.int64)
            table = text_values(col, int(codes.max()) if n else 0)
            out[col] = table[codes]
        if self.maps:
            counts = heads["n"].astype(np.int64)
            present = counts != _NONE16
            sizes = np.where(present, counts, 0) * 4 + heads["klen"].astype(np.int64)
            start = size + np.cumsum(sizes, axis=1) - sizes  # where each map's bytes begin in its row
            for k, col in enumerate(self.maps):
                arr = np.empty(n, dtype=object)
                cnt, beg, kl, has = counts[:, k].tolist(), start[:, k].tolist(), heads["klen"][:, k].tolist(), \
                    present[:, k].tolist()
                pre = (known or {}).get(col) or [None] * n
                for r in range(n):  # element-wise: numpy would otherwise read each Mapping as a sequence
                    if has[r]:
                        if pre[r] is not None:
                            arr[r] = pre[r]
                            continue
                        w = beg[r] + 4 * cnt[r]
                        arr[r] = PackedMap(raws[r], beg[r], cnt[r], w, w + kl[r])
                out[col] = arr
        for col in columns:
            if col not in out:
                if col in STRING_ITEM_COLUMNS:
                    out[col] = np.full(n, None, dtype=object)
                else:
                    out[col] = np.full(n, np.nan)
        return {c: out[c] for c in columns}


@dataclass
class VersionState:
    """What one process knows about a version: its codec, expiry, the (epoch, seq) its cache reflects, and
    the text columns' value tables."""

    version: str
    codec: ItemCodec
    expires_at_ms: int | None
    epoch: str = ""
    seq: int = 0
    fresh: tuple[list[str], np.ndarray] | None = None  # newest FRESH_WINDOW (ids, publish_ts) at (epoch, seq)
    texts: dict[str, np.ndarray] = field(default_factory=dict)
    # (map column, epoch, item_id) -> the row's map decoded once (features.functions.WeightMap, its total summed):
    # held with the version, so a version switch drops them with it; an epoch change or an incremental write
    # drops them as it drops the packed rows; at most the store's item_cache_rows of them
    maps: dict[tuple[str, str, str], WeightMap] = field(default_factory=dict)


class ItemTable:
    """One version's item rows as one request sees them: read on demand, for exactly the ids asked for.

    Rows come from the store's LRU (packed bytes), the misses from Redis in one HMGET per call, and are
    decoded together with numpy. Nothing here holds or loads the whole catalog. `category` answers for
    the rows this view has read (the candidates) and fetches any other.
    """

    def __init__(self, store: "OnlineStore | None", version: str, state: VersionState | None) -> None:
        self.store = store
        self.version = version
        self.state = state
        self._category: dict[str, str | None] = {}
        self.category = _CategoryView(self)

    @classmethod
    def empty(cls, version: str = "") -> "ItemTable":
        return cls(None, version, None)

    def columns_for(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        """Item store columns for candidate ids, aligned; unknown items get NaN/None (-> defaults)."""
        if self.store is None or self.state is None:
            n = len(item_ids)
            return {c: np.full(n, None, dtype=object) if c in STRING_ITEM_COLUMNS else np.full(n, np.nan)
                    for c in ITEM_STORE_COLUMNS}
        cols = self.store._item_columns(self.state, item_ids)
        if "category" in cols:
            self._category.update(zip(item_ids, cols["category"].tolist()))
        return cols

    def co_items_for(self, item_ids: Sequence[str]) -> dict[str, Mapping[str, float]]:
        """item_id -> its co-clicked items, for just these ids (the session's last items)."""
        if "co_items_30d" not in ITEM_STORE_COLUMNS or not item_ids:
            return {}
        co = self.columns_for(list(item_ids))["co_items_30d"]
        return {i: m for i, m in zip(item_ids, co) if m}

    def fresh_window(self) -> tuple[list[str], np.ndarray]:
        """(ids, publish_ts) of the version's newest FRESH_WINDOW items, newest first: what the fresh
        channel ranks (an item newer than the index is among the newest by construction)."""
        if self.store is None or self.state is None:
            return [], np.array([], dtype=np.float64)
        return self.store._fresh_window(self.state)


class _CategoryView(Mapping):
    """item_id -> category for an ItemTable (None when unknown or when the version holds no category)."""

    def __init__(self, table: ItemTable) -> None:
        self._table = table

    def __getitem__(self, item_id: str) -> str | None:
        if item_id not in self._table._category:
            self._table.columns_for([item_id])
        return self._table._category.get(item_id)

    def get(self, item_id: str, default: Any = None) -> Any:  # noqa: D102 - Mapping.get without KeyError
        value = self[item_id]
        return default if value is None else value

    def __iter__(self):  # the rows this view has read
        return iter(self._table._category)

    def __len__(self) -> int:
        return len(self._table._category)


class OnlineStore:
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
        # packed item rows, (version, epoch, item_id) -> bytes; one bounded LRU shared by every version
        self._rows: "OrderedDict[tuple[str, str, str], bytes]" = OrderedDict()
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

    # ------------------------------------------------------------------ write path
    def materialize(self, users: pd.DataFrame, items: pd.DataFrame, version: str, ttl_s: int = DEFAULT_TTL_S,
                    popular: Iterable[str] | None = None) -> dict[str, Any]:
        """Write a whole snapshot under `version`, then flip `kairos:fs:current` to it.

        Every key of the version, and `current` itself, expires at one instant (now + ttl_s), so the pointer
        can never outlive what it points to. Unknown columns are refused before anything is written."""
        t0 = time.perf_counter()
        version = str(version)
        check_columns(users, "user_id", (*USER_STORE_COLUMNS, *USER_HISTORY_COLUMNS), "user")
        check_columns(items, "item_id", ITEM_STORE_COLUMNS, "item")
        codec = ItemCodec.from_registry()
        expires_at_ms = int(time.time() * 1000) + int(ttl_s) * 1000
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
                pipe.hset(key, mapping=mapping or {"_": "1"})  # a known user with every value missing: a marker
                pipe.pexpireat(key, expires_at_ms)
                n_users += 1
            pipe.execute()
            if (start // CHUNK) % PROGRESS_EVERY == PROGRESS_EVERY - 1:
                log.info("materialize %s: users %d/%d written", version, n_users, len(records))
        t_users = time.perf_counter() - t0
        t1 = time.perf_counter()
        texts = {col: sorted({str(v) for v in items[col].tolist() if not _is_missing(v)}) if col in items else []
                 for col in codec.text}
        codes = {col: {v: k + 1 for k, v in enumerate(values)} for col, values in texts.items()}
        packed, published = self._pack(items, codec, codes)
        if len(published) > PUBLISHED_KEEP:  # only the newest are ever fresh
            newest = sorted(published.items(), key=lambda kv: kv[1], reverse=True)[:PUBLISHED_KEEP]
            published = dict(newest)
        item_bytes = sum(len(v) for v in packed.values())
        t_pack = time.perf_counter() - t1
        # rows go to scratch keys, renamed over the live ones in one transaction: a reader of this version
        # sees the old rows or the new ones, never a half-written mix
        nonce = uuid.uuid4().hex[:12]
        live_keys = {"items": items_key(version), "published": published_key(version),
                     **{f"text:{col}": text_key(version, col) for col in codec.text}}
        tmp = {name: f"{key}:tmp:{nonce}" for name, key in live_keys.items()}
        b = self._binary()
        ids = list(packed)
        for start in range(0, len(ids), ITEM_CHUNK):
            pipe = b.pipeline(transaction=False)
            chunk = ids[start:start + ITEM_CHUNK]
            pipe.hset(tmp["items"], mapping={i: packed[i] for i in chunk})
            pub = {i: published[i] for i in chunk if i in published}
            if pub:
                pipe.zadd(tmp["published"], pub)
            pipe.execute()
            if (start // ITEM_CHUNK) % PROGRESS_EVERY == PROGRESS_EVERY - 1:
                log.info("materialize %s: items %d/%d written", version, start + len(chunk), len(ids))
        pipe = b.pipeline(transaction=False)
        for col, values in texts.items():
            if values:
                pipe.rpush(tmp[f"text:{col}"], *values)
        for key in tmp.values():
            pipe.pexpire(key, 3_600_000)  # scratch keys of a crashed write do not linger
        pipe.execute()
        if popular is None:
            popular = (items.sort_values("item_clicks_7d", ascending=False, na_position="last")["item_id"].tolist()
                       if "item_clicks_7d" in items else items["item_id"].tolist())[:500]
        popular = [str(i) for i in popular]
        meta = {"users": n_users, "items": len(packed), "written_at": time.time(), "expires_at_ms": expires_at_ms,
                "layout": codec.to_doc(), "row_format": ROW_FORMAT}
        sizes = {"items": len(ids), "published": len(published), **{f"text:{c}": len(v) for c, v in texts.items()}}
        pipe = c.pipeline(transaction=True)
        for name, live in live_keys.items():
            if sizes[name]:
                pipe.rename(tmp[name], live)
                pipe.pexpireat(live, expires_at_ms)
            else:
                pipe.delete(live)
        pipe.delete(changes_key(version), rev_key(version))
        pipe.hset(rev_key(version), mapping={"epoch": nonce, "seq": 0})
        pipe.pexpireat(rev_key(version), expires_at_ms)
        pipe.set(popular_key(version), json.dumps(popular), pxat=expires_at_ms)
        pipe.set(meta_key(version), json.dumps(meta), pxat=expires_at_ms)
        pipe.zadd(VERSIONS_KEY, {version: expires_at_ms})
        pipe.execute()
        # everything is written: now flip readers to the new version (the pointer expires with its data)
        c.set(CURRENT_KEY, version, pxat=expires_at_ms)
        # keep the new version and the one before it (readers mid-request, instant rollback)
        others = [_str(v) for v in c.zrevrange(VERSIONS_KEY, 0, -1) if _str(v) != version]
        deleted = self._cleanup(keep={version, *others[:1]})
        seconds = time.perf_counter() - t0
        log.info("materialized %d users, %d items as %s in %.2fs (previous %s, deleted %s)",
                 n_users, len(packed), version, seconds, previous, deleted)
        return {"version": version, "previous_version": previous or "", "users_written": n_users,
                "items_written": len(packed), "popular_written": len(popular), "item_row_bytes": item_bytes,
                "expires_at_ms": expires_at_ms, "versions_deleted": len(deleted),
                "user_write_seconds": round(t_users, 3), "item_pack_seconds": round(t_pack, 3),
                "seconds": round(seconds, 3)}

    @staticmethod
    def _pack(items: pd.DataFrame, codec: ItemCodec,
              codes: Mapping[str, Mapping[str, int]]) -> tuple[dict[str, bytes], dict[str, float]]:
        """item_id -> packed row, and item_id -> publish_ts for the items that have one."""
        items = items[~items["item_id"].isna()]
        ids = items["item_id"].astype(str).tolist()
        packed = dict(zip(ids, codec.encode_frame(items, codes)))
        published: dict[str, float] = {}
        if "publish_ts" in items:
            ts = pd.to_numeric(items["publish_ts"], errors="raise").to_numpy(dtype=np.float64)
            published = {i: float(t) for i, t in zip(ids, ts.tolist()) if not math.isnan(t)}
        return packed, published

    def write_items(self, items: pd.DataFrame, version: str | None = None) -> dict[str, Any]:
        """Write new or changed items alone into the live version (or `version`), with its layout and expiry.

        A row replaces the item's row whole (a column the frame lacks reads as missing). The rows, the
        fresh-channel index, new text values and the version's seq move in one transaction, so every server
        drops exactly these rows from its cache on its next request and the fresh channel sees a new item at
        once."""
        import redis

        check_columns(items, "item_id", ITEM_STORE_COLUMNS, "item")
        c = self.client
        version = str(version or _s(c.get(CURRENT_KEY)) or "")
        if not version:
            raise ValueError("no live online-store version to write items into: materialize a snapshot first "
                             "(the online_features asset)")
        raw_meta = c.get(meta_key(version))
        if raw_meta is None:
            raise ValueError(f"online-store version {version!r} does not exist (expired or never written): "
                             f"materialize a snapshot first")
        meta = json.loads(_str(raw_meta))
        codec = ItemCodec.from_doc(meta["layout"])
        expires_at_ms = int(meta["expires_at_ms"])
        if not len(items):
            return {"version": version, "items_written": 0, "seq": None}
        for _attempt in range(50):
            with c.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(rev_key(version))
                    seq = int(pipe.hget(rev_key(version), "seq") or 0) + 1
                    codes, added = {}, {}
                    for col in codec.text:
                        known = [_str(v) for v in pipe.lrange(text_key(version, col), 0, -1)]
                        fresh = sorted({str(v) for v in items[col].tolist() if not _is_missing(v)} - set(known)) \
                            if col in items else []
                        codes[col] = {v: k + 1 for k, v in enumerate(known + fresh)}
                        added[col] = fresh
                    packed, published = self._pack(items, codec, codes)
                    no_ts = [i for i in packed if i not in published]
                    pipe.multi()
                    pipe.hset(items_key(version), mapping=packed)
                    if published:
                        pipe.zadd(published_key(version), published)
                        pipe.zremrangebyrank(published_key(version), 0, -(PUBLISHED_KEEP + 1))
                    if no_ts:
                        pipe.zrem(published_key(version), *no_ts)
                    for col, values in added.items():
                        if values:
                            pipe.rpush(text_key(version, col), *values)
                    pipe.zadd(changes_key(version), {i: seq for i in packed})
                    pipe.hset(rev_key(version), "seq", seq)
                    for key in (items_key(version), published_key(version), changes_key(version), rev_key(version),
                                *(text_key(version, col) for col in codec.text)):
                        pipe.pexpireat(key, expires_at_ms)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        else:
            raise RuntimeError(f"could not write items into {version}: the version kept changing under 50 tries")
        log.info("wrote %d item rows into %s (seq %d)", len(packed), version, seq)
        return {"version": version, "items_written": len(packed), "seq": seq}

    def _cleanup(self, keep: set[str]) -> list[str]:
        c = self.client
        now_ms = int(time.time() * 1000)
        versions = [_str(v) for v in c.zrange(VERSIONS_KEY, 0, -1)]
        doomed = [v for v in versions if v not in keep]
        for v in doomed:
            batch: list[str] = []
            for key in c.scan_iter(match=f"{PREFIX}:{v}:*", count=1000):
                batch.append(_str(key))
                if len(batch) >= 1000:
                    c.unlink(*batch)
                    batch = []
            if batch:
                c.unlink(*batch)
            c.zrem(VERSIONS_KEY, v)
        # members whose data has expired are gone too; the list itself lives as long as its longest member
        c.zremrangebyscore(VERSIONS_KEY, "-inf", now_ms)
        newest = c.zrange(VERSIONS_KEY, -1, -1, withscores=True)
        if newest:
            c.pexpireat(VERSIONS_KEY, int(newest[0][1]))
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
        if epoch != state.epoch:  # (re)written whole: cached rows are keyed by epoch and simply stop matching
            with self._lock:
                state.epoch, state.seq, state.fresh, state.texts, state.maps = epoch, seq, None, {}, {}
            return
        if seq < state.seq:
            return
        changed = [_str(i) for i in self.client.zrangebyscore(changes_key(version), f"({state.seq}", seq)]
        with self._lock:
            for iid in changed:
                self._rows.pop((version, epoch, iid), None)
                for col in state.codec.maps:
                    state.maps.pop((col, epoch, iid), None)
            state.seq, state.fresh = seq, None

    def _item_columns(self, state: VersionState, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """ITEM_STORE_COLUMNS for item_ids (aligned): packed rows from the LRU, the misses in one HMGET (not
        cached when a write raced this read), all decoded together."""
        version, epoch, seq = state.version, state.epoch, state.seq
        distinct = list(dict.fromkeys(item_ids))
        found: dict[str, bytes] = {}
        misses: list[str] = []
        with self._lock:
            rows = self._rows
            for iid in distinct:
                raw = rows.get((version, epoch, iid))
                if raw is None:
                    misses.append(iid)
                else:
                    rows.move_to_end((version, epoch, iid))
                    found[iid] = raw
        self.table_hits += len(found)
        if misses:
            self.table_loads += len(misses)
            blank = state.codec.blank
            if time.monotonic() < self._down_until:  # Redis known down: what the cache holds, defaults for the rest
                fetched = {i: blank for i in misses}
            else:
                raws = self._binary().hmget(items_key(version), misses)
                fetched = {i: (blank if r is None else r) for i, r in zip(misses, raws)}
                with self._lock:
                    if state.epoch == epoch and state.seq == seq and self.item_cache_rows:
                        for iid, raw in fetched.items():
                            self._rows[(version, epoch, iid)] = raw
                        while len(self._rows) > self.item_cache_rows:
                            self._rows.popitem(last=False)
            found.update(fetched)
        cache = state.maps
        known = {col: [cache.get((col, epoch, i)) for i in item_ids] for col in state.codec.maps}
        cols = state.codec.decode([found[i] for i in item_ids], ITEM_STORE_COLUMNS,
                                  lambda col, top: self._text_values(state, col, top), known)
        for col in state.codec.maps:
            if col in cols:
                self._weight_maps(state, epoch, seq, col, item_ids, cols[col])
        return cols

    def _weight_maps(self, state: VersionState, epoch: str, seq: int, column: str, item_ids: Sequence[str],
                     rows: np.ndarray) -> None:
        """A map column's rows (in place) as WeightMaps, each decoded once per (version, epoch, item) and then read
        from the version's cache (decode serves the cached ones): a request's ~200 candidates cost dict lookups, not
        ~200 key-blob searches and sums. New ones are kept only if no write raced this read (the rule of the packed
        rows)."""
        cache = state.maps
        new: dict[tuple[str, str, str], WeightMap] = {}
        for r, iid in enumerate(item_ids):
            row = rows[r]
            if row is None or type(row) is WeightMap:
                continue
            key = (column, epoch, iid)
            hit = new.get(key)
            if hit is None:
                hit = new[key] = WeightMap(row.items())
            rows[r] = hit
        if new and self.item_cache_rows:
            with self._lock:
                if state.epoch == epoch and state.seq == seq:
                    cache.update(new)
                    while len(cache) > self.item_cache_rows:
                        del cache[next(iter(cache))]  # the oldest decoded first

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


__all__ = ["OnlineStore", "ItemTable", "ItemCodec", "CURRENT_KEY", "VERSIONS_KEY", "SESSION_TTL_S", "DEFAULT_TTL_S",
           "ITEM_CACHE_ROWS", "FRESH_WINDOW", "check_columns", "user_key", "items_key", "published_key", "rev_key",
           "changes_key", "text_key", "popular_key", "meta_key", "session_key", "decode_user", "decode_session",
           "PackedMap"]
