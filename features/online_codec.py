"""How online store values are laid out in Redis: user hashes, session JSON and packed item rows (ItemCodec,
PackedMap), with the column checks a write runs first."""
from __future__ import annotations

import json
import logging
import math
import struct
import sys
from array import array
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from features.registry import (ITEM_JSON_COLUMNS, ITEM_STORE_COLUMNS, USER_HISTORY_COLUMNS, USER_JSON_COLUMNS,
                               USER_STORE_COLUMNS)
from features.online_keys import _s, _str

log = logging.getLogger("kairos.online")

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
        if len(keys) >= _NONE16 or 4 * len(keys) + len(blob) >= _NONE16:  # klen holds weights + keys
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
               known: Mapping[str, Mapping[int, Any]] | None = None) -> dict[str, np.ndarray]:
        """Packed rows -> {column: array aligned with raws} for `columns` (floats with NaN, object arrays for
        text and maps). text_values(column, highest code) gives the column's value table [None, v1, ...].
        known[map column][r], when given, is row r's map already decoded (the online store's cache): served as
        it is where the row holds the map, instead of a new PackedMap.

        Batch work only, no Python step per row but the PackedMap constructor: the heads are one numpy array, a
        map column's offsets are computed for all rows at once and its PackedMaps are built by one map() call
        over the rows that hold a map (a request's ~200 rows: ~0.1 ms)."""
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
            sizes = heads["klen"].astype(np.int64)  # a map entry's whole length: its weights, then its keys
            start = size + np.cumsum(sizes, axis=1) - sizes  # where each map's bytes begin in its row
            for k, col in enumerate(self.maps):
                arr = np.full(n, None, dtype=object)
                need = present[:, k].copy()
                pre = known.get(col) if known else None
                if pre:  # served where the row holds its map, in one fancy-indexed assignment
                    at = np.fromiter(pre, dtype=np.int64, count=len(pre))
                    held = need[at]
                    arr[at[held]] = np.fromiter(pre.values(), dtype=object, count=len(pre))[held]
                    need[at] = False
                rows = np.flatnonzero(need)
                if len(rows):
                    beg, cnt = start[rows, k], counts[rows, k]
                    packed = list(map(PackedMap, [raws[r] for r in rows.tolist()], beg.tolist(), cnt.tolist(),
                                      (beg + 4 * cnt).tolist(), (beg + sizes[rows, k]).tolist()))
                    # fromiter keeps each Mapping one element (assigning the list would read them as sequences)
                    arr[rows] = np.fromiter(packed, dtype=object, count=len(packed))
                out[col] = arr
        for col in columns:
            if col not in out:
                if col in STRING_ITEM_COLUMNS:
                    out[col] = np.full(n, None, dtype=object)
                else:
                    out[col] = np.full(n, np.nan)
        return {c: out[c] for c in columns}
