"""One version's item rows as a request reads them (ItemTable) and what a process knows about a version."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from features.functions import WeightMap
from features.registry import ITEM_STORE_COLUMNS
from features.online_codec import ItemCodec, STRING_ITEM_COLUMNS

if TYPE_CHECKING:
    from features.online import OnlineStore


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
    # the version's LRU of item rows at `epoch` (the store bounds all versions' together by item_cache_rows):
    # item_id -> its packed bytes, or, once read a second time, (bytes, *decoded maps): the map columns as
    # features.functions.WeightMap (its total summed), None where the row holds no map. An epoch change replaces it,
    # an incremental write drops the row, a version switch drops it with the version. An OrderedDict: evicting the
    # oldest is popitem(last=False), O(1) (a dict's del d[next(iter(d))] rescans the slots freed at its front on
    # every eviction)
    rows: OrderedDict[str, Any] = field(default_factory=OrderedDict)

    def decoded(self, column: str) -> dict[str, WeightMap]:
        """item_id -> the map of `column` decoded and cached for that row (introspection: what the LRU holds)."""
        if column not in self.codec.maps:
            return {}
        k = self.codec.maps.index(column) + 1
        return {i: e[k] for i, e in self.rows.items() if type(e) is tuple and e[k] is not None}


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
