"""Train/serve skew: recompute logged served features offline, as of the request time, and compare.

For each logged impression (serving.impressions) we take the user and item
snapshots with the newest feature_ts strictly before the request time (the same
as-of rule the training set uses, DESIGN invariant 2), build the raw store
columns, run the one shared `assemble_features`, and compare feature by feature
with what the server fed the ranker. A mismatch means the online store, the
request path or the batch job disagree with training: exactly the skew that
silently ruins a model.

Checked: every batch and request-time feature of user, item, user×item and
context entities. Not checked here: session features (recomputed from the stream's
events, which reach the lake with the streaming job's micro-batches; their parity
with training is the replay test) and `embedding_affinity` (a model output,
checked by the bundle round-trip test).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.functions import assemble_features
from features.registry import REGISTRY, SNAPSHOT_MAX_AGE_DAYS, USER_STORE_COLUMNS

DEFAULT_MAX_AGE_DAYS = SNAPSHOT_MAX_AGE_DAYS
SKIPPED = frozenset({"embedding_affinity"})


def checked_features() -> list[str]:
    return [f.name for f in REGISTRY if f.entity in ("user", "item", "user_item", "context") and f.tier != "streaming"
            and f.name not in SKIPPED]


@dataclass
class SkewReport:
    rows: int
    per_feature: pd.DataFrame  # feature, mismatches, mismatch_rate, max_abs_diff
    threshold: float

    @property
    def passed(self) -> bool:
        return self.rows > 0 and bool((self.per_feature["mismatch_rate"] <= self.threshold).all())

    @property
    def worst(self) -> tuple[str, float]:
        if self.per_feature.empty:
            return "", 0.0
        row = self.per_feature.sort_values("mismatch_rate", ascending=False).iloc[0]
        return str(row["feature"]), float(row["mismatch_rate"])


def _as_of(rows: pd.DataFrame, snaps: pd.DataFrame, key: str, max_age_days: int) -> pd.DataFrame:
    """Each row joined to the newest snapshot of its `key` stamped strictly before request_ts (within max age)."""
    left = rows.reset_index().rename(columns={"index": "_row"}).sort_values("request_ts", kind="mergesort")
    right = snaps.sort_values("feature_ts", kind="mergesort")
    joined = pd.merge_asof(left, right, left_on="request_ts", right_on="feature_ts", by=key, direction="backward",
                           allow_exact_matches=False, tolerance=max_age_days * 86_400_000)
    return joined.sort_values("_row").set_index("_row")


def recompute_offline(logged: pd.DataFrame, user_snaps: pd.DataFrame, item_snaps: pd.DataFrame,
                      items: pd.DataFrame, max_age_days: int = DEFAULT_MAX_AGE_DAYS) -> pd.DataFrame:
    """The features training would have computed for each logged (user, item, request_ts, device)."""
    rows = logged[["user_id", "item_id", "request_ts", "device_type"]].reset_index(drop=True)
    rows["request_ts"] = rows["request_ts"].astype("int64")
    users = user_snaps[["user_id", "feature_ts", *USER_STORE_COLUMNS]].copy()
    users["feature_ts"] = users["feature_ts"].astype("int64")
    item_cols = [c for c in item_snaps.columns if c not in ("category", "publish_ts")]
    its = item_snaps[item_cols].copy()
    its["feature_ts"] = its["feature_ts"].astype("int64")
    with_user = _as_of(rows, users, "user_id", max_age_days).drop(columns=["feature_ts"])
    with_item = _as_of(with_user, its, "item_id", max_age_days).drop(columns=["feature_ts"])
    catalog = items[["item_id", "category", "publish_ts"]].drop_duplicates("item_id")
    full = with_item.reset_index(drop=True).merge(catalog, on="item_id", how="left")
    return assemble_features(full)


def skew_report(served: pd.DataFrame, offline: pd.DataFrame, features: list[str] | None = None,
                threshold: float = 0.01, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> SkewReport:
    """Per feature: how many rows differ between served and offline values (beyond float tolerance)."""
    features = features or checked_features()
    out = []
    for name in features:
        a = served[name].to_numpy(dtype=np.float64)
        b = offline[name].to_numpy(dtype=np.float64)
        close = np.isclose(a, b, rtol=rel_tol, atol=abs_tol, equal_nan=True)
        diff = np.abs(a - b)
        out.append({"feature": name, "mismatches": int((~close).sum()), "mismatch_rate": float((~close).mean()) if len(a) else 0.0,
                    "max_abs_diff": float(np.nanmax(diff)) if len(a) and np.isfinite(diff).any() else 0.0})
    return SkewReport(rows=len(served), per_feature=pd.DataFrame(out), threshold=threshold)


def served_feature_frame(logged: pd.DataFrame) -> pd.DataFrame:
    """The logged `features` JSON column as a frame (one column per feature)."""
    return pd.DataFrame([json.loads(v) for v in logged["features"]], index=logged.index).reset_index(drop=True)


__all__ = ["SkewReport", "checked_features", "recompute_offline", "served_feature_frame", "skew_report"]
