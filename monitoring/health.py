"""Feature and model health: null and out-of-range rates, online-store staleness, served scores and CTR.

Pure functions over frames, plus thin readers of the online store in Redis (`*_freshness`,
`online_null_rates`). The monitoring assets (assets/monitoring.py) and the freshness sensor
(orchestration/sensors.py) call these; nothing here knows about Dagster.

Definitions (also in the README):
  null rate          share of rows where a feature's value is unknown before the registry default is
                     applied (a declared input column missing or the feature function returning NaN)
  out-of-range rate  share of known values outside the feature's declared `valid_range` (registry)
  staleness          age in seconds of the newest online value of a tier: batch = since the live
                     snapshot version was written to Redis; streaming = since the oldest event that is
                     in the stream but not yet applied to the session keys (0 when the sessionizer is
                     caught up); request-time features are computed per request (never stale)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from features.functions import FEATURE_FUNCTIONS
from features.registry import BY_NAME, ITEM_STORE_COLUMNS, REGISTRY, USER_STORE_COLUMNS, FeatureSpec
from ground.settings import env_number

ENTITIES: tuple[str, ...] = ("user", "item", "user_item", "session", "context")
SCORE_QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
CTR_POSITIONS: tuple[int, ...] = (1, 3, 10)


# --------------------------------------------------------------------------- null and out-of-range rates
def _missing(series: pd.Series) -> np.ndarray:
    """True where a raw value is unknown (None / NaN; an empty JSON map is a known 'no activity')."""
    return series.isna().to_numpy()


def raw_feature_values(rows: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
    """A feature's values before the registry default is filled in: NaN where it would be defaulted."""
    n = len(rows)
    if not all(c in rows for c in spec.input_columns):
        return np.full(n, np.nan)
    fn = FEATURE_FUNCTIONS.get(spec.name)
    values = (np.asarray(fn(rows), dtype=float) if fn is not None
              else pd.to_numeric(rows[spec.name], errors="coerce").to_numpy(dtype=float))
    unknown = np.zeros(n, dtype=bool)
    for col in spec.input_columns:
        unknown |= _missing(rows[col])
    return np.where(unknown, np.nan, values)


def out_of_range(values: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """True where a known value lies outside the declared valid_range."""
    lo, hi = spec.valid_range
    known = ~np.isnan(values)
    bad = np.zeros(len(values), dtype=bool)
    if lo is not None:
        bad |= known & (values < lo)
    if hi is not None:
        bad |= known & (values > hi)
    return bad


def feature_quality(rows: pd.DataFrame, features: Iterable[str] | None = None) -> pd.DataFrame:
    """Per feature: entity, tier, rows, null_rate, out_of_range_rate over raw (pre-default) rows."""
    names = list(features) if features is not None else [f.name for f in REGISTRY]
    out = []
    n = len(rows)
    for name in names:
        spec = BY_NAME[name]
        values = raw_feature_values(rows, spec)
        known = int((~np.isnan(values)).sum())
        out.append({"feature": name, "entity": spec.entity, "tier": spec.tier, "rows": n,
                    "null_rate": float(np.isnan(values).mean()) if n else 0.0,
                    "out_of_range_rate": float(out_of_range(values, spec).sum() / known) if known else 0.0})
    return pd.DataFrame(out, columns=["feature", "entity", "tier", "rows", "null_rate", "out_of_range_rate"])


def served_out_of_range(served: pd.DataFrame) -> pd.DataFrame:
    """Out-of-range rates of the feature values the ranker actually scored (logged, defaults applied)."""
    out = []
    for name in [f.name for f in REGISTRY if f.name in served]:
        values = pd.to_numeric(served[name], errors="coerce").to_numpy(dtype=float)
        known = int((~np.isnan(values)).sum())
        out.append({"feature": name, "entity": BY_NAME[name].entity,
                    "served_out_of_range_rate": float(out_of_range(values, BY_NAME[name]).sum() / known) if known else 0.0})
    return pd.DataFrame(out, columns=["feature", "entity", "served_out_of_range_rate"])


def group_summary(quality: pd.DataFrame, value_cols: Iterable[str] = ("null_rate", "out_of_range_rate")) -> dict[str, dict]:
    """Per entity (feature group): the worst rate of each kind and the feature it comes from."""
    summary: dict[str, dict] = {}
    for entity in ENTITIES:
        part = quality[quality["entity"] == entity]
        if part.empty:
            continue
        entry: dict[str, Any] = {"features": len(part)}
        for col in value_cols:
            if col not in part:
                continue
            worst = part.sort_values(col, ascending=False, kind="mergesort").iloc[0]
            entry[col] = round(float(worst[col]), 6)
            entry[f"{col}_worst_feature"] = str(worst["feature"])
        summary[entity] = entry
    return summary


def online_null_rates(client: Any, version: str | None, sample_users: int = 500,
                      sample_items: int = 5000) -> dict[str, float]:
    """Per store column of the live snapshot in Redis: the share of users (a SCAN sample) and items (an HSCAN
    sample) missing it.

    Missing user fields are the ones materialize omitted because the snapshot had no value (the server then
    serves the registry default)."""
    from features.online import OnlineStore
    from features.online_keys import PREFIX

    if not version:
        return {}
    out: dict[str, float] = {}
    keys = []
    for key in client.scan_iter(match=f"{PREFIX}:{version}:user:*", count=1000):
        keys.append(key)
        if len(keys) >= sample_users:
            break
    if keys:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hkeys(key)
        fields = [set(f.decode() if isinstance(f, bytes) else f for f in hk) for hk in pipe.execute()]
        for col in USER_STORE_COLUMNS:
            out[f"user.{col}"] = round(sum(col not in f for f in fields) / len(fields), 6)
    frame = OnlineStore(client).sample_items(_s(version), n=sample_items)
    if len(frame):
        for col in ITEM_STORE_COLUMNS:
            out[f"item.{col}"] = round(float(frame[col].isna().mean()), 6)
    return out


# --------------------------------------------------------------------------- staleness of the online store
@dataclass(frozen=True)
class FreshnessThresholds:
    """Max age in seconds before a tier counts as stale. Batch: the daily snapshot plus slack; streaming: an
    event waiting this long unapplied means the sessionizer is down or far behind."""

    batch_max_age_s: float = 26 * 3600.0
    streaming_max_age_s: float = 120.0

    @classmethod
    def from_env(cls, batch_max_age_s: float = -1.0, streaming_max_age_s: float = -1.0,
                 env: Mapping[str, str] = os.environ) -> "FreshnessThresholds":
        """KAIROS_FRESHNESS_BATCH_MAX_AGE_S / KAIROS_FRESHNESS_STREAMING_MAX_AGE_S (seconds, else the defaults); a
        non-negative argument overrides its variable (asset config)."""
        def pick(given: float, var: str, default: float) -> float:
            return float(given) if given >= 0 else float(env_number(env, var, float, default, 0.0))

        return cls(batch_max_age_s=pick(batch_max_age_s, "KAIROS_FRESHNESS_BATCH_MAX_AGE_S", cls.batch_max_age_s),
                   streaming_max_age_s=pick(streaming_max_age_s, "KAIROS_FRESHNESS_STREAMING_MAX_AGE_S",
                                            cls.streaming_max_age_s))

    def limit(self, tier: str) -> float:
        return {"batch": self.batch_max_age_s, "streaming": self.streaming_max_age_s}.get(tier, math.inf)


def _s(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _id_ms(stream_id: str) -> int:
    return int(str(stream_id).split("-")[0])


def batch_freshness(client: Any, now_s: float) -> dict[str, Any]:
    """The live snapshot version, when it was written to Redis, and its age (None without a live version)."""
    from features.online_keys import CURRENT_KEY, meta_key

    version = _s(client.get(CURRENT_KEY))
    if not version:
        return {"version": None, "age_s": None, "written_at": None}
    raw = client.get(meta_key(version))
    meta = json.loads(_s(raw)) if raw else {}
    written = meta.get("written_at")
    snapshot_ts = version.rsplit("-", 1)[-1]
    return {"version": version, "written_at": written,
            "age_s": None if written is None else max(now_s - float(written), 0.0),
            "snapshot_ts": int(snapshot_ts) if snapshot_ts.isdigit() else None,
            "users": meta.get("users"), "items": meta.get("items")}


def streaming_freshness(client: Any, now_ms: int, stream: str | None = None, group: str | None = None,
                        session_sample: int = 2000) -> dict[str, Any]:
    """How far the session keys lag the event stream: age of the oldest event not yet applied by the sessionizer
    group (streaming/retention.stream_lag: pending or never delivered, on the Redis server's clock; every entry when
    the group was never created), plus the newest session write (from its TTL) as context."""
    from features.online_keys import SESSION_PREFIX, SESSION_TTL_S
    from streaming.job import GROUP, STREAM
    from streaming.retention import stream_lag

    stream, group = stream or STREAM, group or GROUP
    out: dict[str, Any] = {"stream_length": 0, "pending": 0, "age_s": None, "newest_session_write_age_s": None}
    if client.exists(stream):
        lag = stream_lag(client, stream)
        out["stream_length"] = lag["length"]
        if group in lag["groups"]:
            out["pending"] = lag["groups"][group]["pending"]
            out["age_s"] = lag["groups"][group]["lag_ms"] / 1000.0
        else:  # the sessionizer never ran: everything in the stream is unapplied
            first = client.xrange(stream, count=1)
            out["age_s"] = max(now_ms - _id_ms(_s(first[0][0])), 0) / 1000.0 if first else 0.0
    # the newest session write: a key written t seconds ago has TTL SESSION_TTL_S - t left
    best_ttl, best_key, seen = -1, None, 0
    keys = []
    for key in client.scan_iter(match=f"{SESSION_PREFIX}:*", count=1000):
        keys.append(key)
        seen += 1
        if seen >= session_sample:
            break
    if keys:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.ttl(key)
        for key, ttl in zip(keys, pipe.execute()):
            if ttl is not None and int(ttl) > best_ttl:
                best_ttl, best_key = int(ttl), key
        if best_key is not None and best_ttl >= 0:
            out["newest_session_write_age_s"] = float(max(SESSION_TTL_S - best_ttl, 0))
            state = client.get(best_key)
            try:
                out["newest_session_event_ts"] = int(json.loads(_s(state)).get("last_ts", 0)) if state else None
            except (TypeError, ValueError):
                out["newest_session_event_ts"] = None
        out["session_keys_sampled"] = len(keys)
    return out


def online_freshness(client: Any, now_s: float, stream: str | None = None, group: str | None = None) -> dict[str, dict]:
    """{"batch": batch_freshness, "streaming": streaming_freshness} read from Redis at `now_s`."""
    return {"batch": batch_freshness(client, now_s),
            "streaming": streaming_freshness(client, int(now_s * 1000), stream=stream, group=group)}


def stale_tiers(freshness: Mapping[str, Mapping[str, Any]], thresholds: FreshnessThresholds,
                missing_batch_is_stale: bool = True) -> dict[str, float]:
    """Tier -> age in seconds for every tier older than its threshold (a missing live snapshot counts as stale,
    age inf: the server has nothing but popularity to serve)."""
    stale: dict[str, float] = {}
    for tier, info in freshness.items():
        age = info.get("age_s")
        if age is None:
            if tier == "batch" and missing_batch_is_stale:
                stale[tier] = math.inf
            continue
        if float(age) > thresholds.limit(tier):
            stale[tier] = float(age)
    return stale


def group_staleness(tier_ages: Mapping[str, float | None]) -> dict[str, float | None]:
    """Per feature group: the oldest tier among its features (request-time features are never stale)."""
    out: dict[str, float | None] = {}
    for entity in ENTITIES:
        ages = [0.0 if f.tier == "request" else tier_ages.get(f.tier) for f in REGISTRY if f.entity == entity]
        known = [a for a in ages if a is not None]
        out[entity] = max(known) if known else None
    return out


# --------------------------------------------------------------------------- served model health
def attribute_engagement(impressions: pd.DataFrame, events: pd.DataFrame, window_ms: int) -> pd.DataFrame:
    """Served impressions with `clicked` (a click credited to them) and `label` / `label_binary` (the training
    label), by the training labels' rule (ingestion/labels.py): an engagement goes to the latest impression of the
    same (user, item) before it, within the attribution window. Impressions whose window is still open get what has
    arrived so far (`window_closed` says which)."""
    from ingestion.labels import ENGAGEMENT_EVENT_TYPES, LabelConfig, build_labels

    imp = impressions.reset_index(drop=True)
    if imp.empty:
        return imp.assign(clicked=pd.Series(dtype=int), label=pd.Series(dtype=float),
                          label_binary=pd.Series(dtype=int), window_closed=pd.Series(dtype=bool))
    keys = pd.Series([f"served:{k}" for k in range(len(imp))])
    served = pd.DataFrame({"event_id": keys, "user_id": imp["user_id"].astype(str), "item_id": imp["item_id"].astype(str),
                           "event_type": "impression", "timestamp": imp["request_ts"].astype("int64"),
                           "dwell_time_ms": np.nan})
    start = int(served["timestamp"].min())
    eng = events[events["event_type"].isin(ENGAGEMENT_EVENT_TYPES) & (events["timestamp"] >= start)
                 & events["user_id"].isin(set(served["user_id"]))]
    eng = eng[["event_id", "user_id", "item_id", "event_type", "timestamp", "dwell_time_ms"]]
    as_of = int(served["timestamp"].max()) + int(window_ms)
    config = LabelConfig(attribution_window_ms=int(window_ms))
    newest_event = int(events["timestamp"].max()) if len(events) else start

    def credited(engagements: pd.DataFrame) -> pd.DataFrame:
        both = pd.concat([served, engagements], ignore_index=True)
        return build_labels(both, as_of, config).set_index("event_id")

    all_eng = credited(eng)
    clicks = credited(eng[eng["event_type"] == "click"])
    out = imp.copy()
    out["clicked"] = (clicks["n_engagements"].reindex(keys).fillna(0).to_numpy() > 0).astype(int)
    out["label"] = all_eng["label"].reindex(keys).fillna(0.0).to_numpy()
    out["label_binary"] = all_eng["label_binary"].reindex(keys).fillna(0).astype(int).to_numpy()
    out["window_closed"] = (out["request_ts"].astype("int64") + int(window_ms) <= newest_event).to_numpy()
    return out


def prediction_entropy(scores: np.ndarray, requests: np.ndarray | None = None) -> dict[str, float]:
    """Mean binary entropy of the scores in bits (a score of 0.5 = 1 bit: the model cannot tell), and the mean
    normalized entropy of each request's scores as a distribution over its slate (1 = a flat ranking)."""
    s = np.asarray(scores, dtype=float)
    out: dict[str, float] = {}
    if len(s) and s.min() >= 0 and s.max() <= 1:
        p = np.clip(s, 1e-12, 1 - 1e-12)
        out["mean_binary_entropy_bits"] = float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))
    if requests is not None and len(s):
        ents = []
        for _, grp in pd.Series(s).groupby(np.asarray(requests)):
            v = grp.to_numpy()
            if len(v) < 2:
                continue
            q = np.exp(v - v.max()) if v.min() < 0 else v  # unbounded ranker scores: softmax; probabilities: as is
            q = q / q.sum() if q.sum() > 0 else np.full(len(v), 1.0 / len(v))
            q = q[q > 0]
            ents.append(float(-(q * np.log(q)).sum() / np.log(len(v))))
        if ents:
            out["mean_slate_entropy"] = float(np.mean(ents))
    return out


def score_distribution(scores: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Quantiles, mean, std and a histogram (fixed [0, 1] bins for probabilities, else the data's range)."""
    s = np.asarray(scores, dtype=float)
    s = s[np.isfinite(s)]
    if not len(s):
        return {"n": 0}
    lo, hi = (0.0, 1.0) if s.min() >= 0 and s.max() <= 1 else (float(s.min()), float(s.max()))
    counts, edges = np.histogram(s, bins=bins, range=(lo, hi if hi > lo else lo + 1.0))
    return {"n": int(len(s)), "mean": round(float(s.mean()), 6), "std": round(float(s.std()), 6),
            "quantiles": {f"p{int(q * 100):02d}": round(float(np.quantile(s, q)), 6) for q in SCORE_QUANTILES},
            "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}}


def ctr_at_positions(log: pd.DataFrame, positions: Iterable[int] = CTR_POSITIONS, clicked_col: str = "clicked") -> dict[str, float]:
    """CTR of the top-k positions (position is 0-based in the log, so top-k = position < k)."""
    out = {}
    for k in positions:
        top = log[log["position"] < k]
        out[f"ctr_at_{k}"] = round(float(top[clicked_col].mean()), 6) if len(top) else float("nan")
    return out


def served_model_health(attributed: pd.DataFrame) -> dict[str, dict]:
    """Per model version (shadow answers separately, as `<version>:shadow`): rows, requests, two-stage share,
    score distribution and entropy of the two-stage answers, and CTR at the top positions of what was shown."""
    out: dict[str, dict] = {}
    frame = attributed.assign(_key=attributed["model_version"].fillna("none").astype(str)
                              + np.where(attributed["shadow"].fillna(False).astype(bool), ":shadow", ""))
    for key, part in frame.groupby("_key", sort=True):
        two_stage = part[part["served_by"].fillna("").str.startswith("two_stage")]
        entry: dict[str, Any] = {"rows": int(len(part)), "requests": int(part["request_id"].nunique()),
                                 "two_stage_share": round(float(len(two_stage) / len(part)), 6),
                                 "scores": score_distribution(two_stage["score"].to_numpy()),
                                 **prediction_entropy(two_stage["score"].to_numpy(), two_stage["request_id"].to_numpy())}
        if not key.endswith(":shadow") and "clicked" in part:
            entry.update(ctr_at_positions(part))
            entry["window_closed_share"] = round(float(part["window_closed"].mean()), 6) if "window_closed" in part else None
        out[str(key)] = entry
    return out


__all__ = ["CTR_POSITIONS", "ENTITIES", "FreshnessThresholds", "attribute_engagement", "batch_freshness",
           "ctr_at_positions", "feature_quality", "group_staleness", "group_summary", "online_freshness",
           "online_null_rates", "out_of_range", "prediction_entropy", "raw_feature_values", "score_distribution",
           "served_model_health", "served_out_of_range", "stale_tiers", "streaming_freshness"]
