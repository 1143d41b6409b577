"""The event and catalog schemas every source writes and every consumer reads.

Timestamps are int64 epoch milliseconds (UTC) everywhere: pandas, Spark, delta-rs,
Redis and JSON agree on them without time-zone surprises.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

EVENT_TYPES: tuple[str, ...] = ("impression", "click", "add_to_cart", "purchase", "skip", "share")
# Event types that must name an item (the contract enforces it).
ITEM_EVENT_TYPES: frozenset[str] = frozenset({"impression", "click", "add_to_cart", "purchase", "skip", "share"})
DEVICE_TYPES: tuple[str, ...] = ("mobile", "desktop", "tablet")
PAGE_CONTEXTS: tuple[str, ...] = ("home_feed", "search", "related_items")

EVENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("timestamp", pa.int64()),
        ("session_id", pa.string()),
        ("position", pa.int64()),
        ("page_context", pa.string()),
        ("device_type", pa.string()),
        ("dwell_time_ms", pa.int64()),
        ("schema_version", pa.int64()),
        ("source", pa.string()),
    ]
)
EVENT_COLUMNS: list[str] = EVENT_SCHEMA.names

ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("category", pa.string()),
        ("tags", pa.string()),
        ("publish_ts", pa.int64()),
    ]
)

USER_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("segment", pa.string()),
        ("device_type", pa.string()),
        ("geo_region", pa.string()),
        ("signup_ts", pa.int64()),
    ]
)

DAY_MS = 86_400_000
HOUR_MS = 3_600_000

# Bronze keeps events as received plus when they arrived and the ingest batch (a UTC day) they arrived in.
BRONZE_SCHEMA = pa.schema(list(EVENT_SCHEMA) + [("received_at", pa.int64()), ("ingest_date", pa.string())])
