"""The feature registry: every feature declared once, as data (Feast-style).

Training reads it to build the model's feature schema; the server reads it to
assemble the same columns in the same order; the online store reads it to know
which fields to materialize and which default to use when a value is missing.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterable, Literal

Entity = Literal["user", "item", "user_item", "session", "context"]
Tier = Literal["batch", "streaming", "request"]


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    entity: Entity
    dtype: Literal["float", "int"]
    default: float
    tier: Tier
    window: str | None = None
    version: int = 1
    owner: str = "kairos-ml"
    description: str = ""
    # raw columns (store columns, request fields) the feature is computed from; () = a column of its own name.
    # The computing function is registered under the feature's name in features.functions (@feature_function);
    # without one the column is passed through. A missing input or value gives `default`.
    inputs: tuple[str, ...] = ()
    # (min, max) a valid value lies in, None = unbounded on that side: declared from the feature's meaning
    # (shares in [0, 1], counts >= 0, hour 0..23), not fitted to data. Monitoring counts values outside it
    # (monitoring/health.py); it is not part of the feature's definition, so registry_version ignores it.
    valid_range: tuple[float | None, float | None] = (None, None)

    @property
    def input_columns(self) -> tuple[str, ...]:
        return self.inputs or (self.name,)


REGISTRY: tuple[FeatureSpec, ...] = (
    # user, batch (daily snapshots in the offline store, materialized to Redis)
    FeatureSpec("user_clicks_7d", "user", "float", 0.0, "batch", "7d", description="clicks by the user in the last 7 days", valid_range=(0.0, None)),
    FeatureSpec("user_impressions_30d", "user", "float", 0.0, "batch", "30d", description="impressions shown to the user in 30 days", valid_range=(0.0, None)),
    FeatureSpec("user_ctr_30d", "user", "float", 0.0, "batch", "30d", description="smoothed click-through rate over 30 days", valid_range=(0.0, 1.0)),
    FeatureSpec("user_avg_session_length_7d", "user", "float", 0.0, "batch", "7d",
                description="events per session over the user's last 7 days (browsers vs. snipers)", valid_range=(0.0, None)),
    # user, request time (needs the request clock)
    FeatureSpec("user_account_age_days", "user", "float", 365.0, "request",
                description="days since signup at request time (new accounts behave differently)",
                inputs=('signup_ts', 'request_ts'), valid_range=(0.0, None)),
    # item, batch
    FeatureSpec("item_clicks_7d", "item", "float", 0.0, "batch", "7d", description="clicks on the item in 7 days (popularity)", valid_range=(0.0, None)),
    FeatureSpec("item_impressions_7d", "item", "float", 0.0, "batch", "7d", description="impressions of the item in 7 days", valid_range=(0.0, None)),
    FeatureSpec("item_ctr_7d", "item", "float", 0.0, "batch", "7d", description="smoothed item click-through rate over 7 days", valid_range=(0.0, 1.0)),
    FeatureSpec("item_engaged_decayed_30d", "item", "float", 0.0, "batch", "30d",
                description="the item's engaged clicks (dwell >= 5 s), purchases and shares over 30 days, each decayed with a "
                            "7-day half-life (yesterday counts fully): what is popular now, without a window's cliff",
                valid_range=(0.0, None)),
    # item, request time (needs the request clock)
    FeatureSpec("item_age_hours", "item", "float", 24.0 * 365, "request", description="hours since the item was published",
                inputs=('publish_ts', 'request_ts'), valid_range=(0.0, None)),
    # user x item
    FeatureSpec("user_category_affinity", "user_item", "float", 0.0, "batch", "30d", description="share of the user's 30d clicks in the item's category",
                inputs=('user_category_clicks_30d', 'category'), valid_range=(0.0, 1.0)),
    FeatureSpec("user_category_pref_decayed", "user_item", "float", 0.0, "batch", "30d",
                description="share of the user's clicks in the item's category, each click decayed with a 7-day half-life",
                inputs=('user_category_decayed_30d', 'category'), valid_range=(0.0, 1.0)),
    FeatureSpec("embedding_affinity", "user_item", "float", 0.0, "request", description="two-tower dot product of user and item vectors", valid_range=(-1.0, 1.0)),
    FeatureSpec("co_engagement", "user_item", "float", 0.0, "streaming", "30d",
                description="share of the item's 30d session co-clicks that involve the session's last items",
                inputs=('co_items_30d', 'session_last_items'), valid_range=(0.0, 1.0)),
    FeatureSpec("user_history_co_engagement", "user_item", "float", 0.0, "streaming", "30d",
                description="share of the item's 30d session co-clicks that involve the user's 10 latest consumed items "
                            "(item-to-item over the user's whole history, not only this session: what SAR ranks by)",
                inputs=('co_items_30d', 'user_recent_items'), valid_range=(0.0, 1.0)),
    # session, streaming (kept fresh in Redis by the streaming job)
    FeatureSpec("session_length", "session", "float", 0.0, "streaming", description="events so far in the session", valid_range=(0.0, None)),
    FeatureSpec("session_clicks", "session", "float", 0.0, "streaming", description="clicks so far in the session", valid_range=(0.0, None)),
    FeatureSpec("session_category_share", "session", "float", 0.0, "streaming", description="decayed share of the session's clicks in the item's category", valid_range=(0.0, 1.0)),
    FeatureSpec("session_item_seen", "session", "float", 0.0, "streaming", description="1 if the item was already engaged in this session", valid_range=(0.0, 1.0)),
    FeatureSpec("seconds_since_last_event", "session", "float", 3600.0, "streaming", description="seconds since the session's previous event (capped at 1h)", valid_range=(0.0, 3600.0)),
    # context, request time
    FeatureSpec("hour_of_day", "context", "float", 12.0, "request", description="UTC hour of the request",
                inputs=('request_ts',), valid_range=(0.0, 23.0)),
    FeatureSpec("day_of_week", "context", "float", 0.0, "request", description="UTC day of week, Monday=0",
                inputs=('request_ts',), valid_range=(0.0, 6.0)),
    FeatureSpec("device_code", "context", "float", 0.0, "request", description="device type as a code (mobile 0, desktop 1, tablet 2)",
                inputs=('device_type',), valid_range=(0.0, 2.0)),
)

BY_NAME: dict[str, FeatureSpec] = {f.name: f for f in REGISTRY}
# declaration fields that describe how a feature is monitored, not how it is computed (left out of the hash)
MONITORING_ONLY_FIELDS = frozenset({"valid_range"})

# Raw per-entity columns stored in the offline and online stores (inputs to the
# feature functions, not model features themselves).
USER_STORE_COLUMNS: tuple[str, ...] = ("user_clicks_7d", "user_impressions_30d", "user_ctr_30d", "user_category_clicks_30d",
                                       "user_avg_session_length_7d", "user_category_decayed_30d", "signup_ts")
# user store columns holding JSON maps (category -> weight) rather than numbers
USER_JSON_COLUMNS: tuple[str, ...] = ("user_category_clicks_30d", "user_category_decayed_30d")
# user columns the online store holds beside the snapshot's (features/history.py): not ranker inputs,
# what the server excludes (already consumed) and pools in the user tower when the session is empty
USER_HISTORY_COLUMNS: tuple[str, ...] = ("consumed_items",)
CATEGORY_HALF_LIFE_DAYS = 7.0
ITEM_ENGAGED_HALF_LIFE_DAYS = 7.0
ITEM_ENGAGED_WINDOW_DAYS = 30
# an "engaged" event for item_engaged_decayed_30d: a click that held the user this long, a purchase or a share
ENGAGED_CLICK_MIN_DWELL_MS = 5_000
ENGAGED_EVENT_TYPES: tuple[str, ...] = ("purchase", "share")
# Snapshots are complete per day (an entity without activity in its windows has no row = all defaults), so a
# row may only use the snapshot of its own day: an older one would carry counts that have since expired and
# that the online store (serving the newest snapshot) no longer shows. Training, serving and the skew check agree.
SNAPSHOT_MAX_AGE_DAYS = 1
ITEM_STORE_COLUMNS: tuple[str, ...] = ("item_clicks_7d", "item_impressions_7d", "item_ctr_7d", "item_engaged_decayed_30d",
                                       "category", "publish_ts",
                                       "co_items_30d")
# item store columns holding JSON maps: the item's top co-clicked items (item_id -> sessions)
ITEM_JSON_COLUMNS: tuple[str, ...] = ("co_items_30d",)
CO_ITEMS_TOP_K = 20


def ranker_feature_names() -> list[str]:
    """The model's input columns, in registry order."""
    return [f.name for f in REGISTRY]


def feature_input_columns(names: Iterable[str] | None = None) -> list[str]:
    """The raw columns the features `names` (default: every registered feature) are computed from, in registry
    order, once each: what a reader of stored rows needs for assemble_features / monitoring's raw values (a frame
    without the other columns gives the same features)."""
    wanted = None if names is None else set(names)
    specs = [f for f in REGISTRY if wanted is None or f.name in wanted]
    return list(dict.fromkeys(c for f in specs for c in f.input_columns))


def features_of(entity: Entity) -> list[FeatureSpec]:
    return [f for f in REGISTRY if f.entity == entity]


def defaults() -> dict[str, float]:
    return {f.name: f.default for f in REGISTRY}


def registry_version() -> str:
    """A content hash of the registry: changes whenever any declaration changes."""
    payload = json.dumps([{k: v for k, v in asdict(f).items() if k not in MONITORING_ONLY_FIELDS} for f in REGISTRY],
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def schema_document() -> dict:
    """The feature schema bundled with every model version."""
    return {"registry_version": registry_version(), "features": [asdict(f) for f in REGISTRY]}
