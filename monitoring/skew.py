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
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from features.functions import assemble_features
from features.registry import REGISTRY, SNAPSHOT_MAX_AGE_DAYS, USER_STORE_COLUMNS

DEFAULT_MAX_AGE_DAYS = SNAPSHOT_MAX_AGE_DAYS
SKIPPED = frozenset({"embedding_affinity"})


def checked_features() -> list[str]:
    return [f.name for f in REGISTRY if f.entity in ("user", "item", "user_item", "context") and f.tier != "streaming"
            and f.name not in SKIPPED]


ALIGNED = "aligned"
# a request whose clock does not fall in the served snapshot's validity window: the offline as-of rule picks
# another snapshot than the server used, so every batch feature "differs" although nothing is skewed
CLOCK_CLASSES = ("request_before_snapshot", "request_past_max_age", "served_older_snapshot")


def served_snapshot_ts(feature_version: object) -> float:
    """The snapshot time in an online-store version id (``u12-i12-1767916800000``, assets/serving.py); NaN if none."""
    text = "" if feature_version is None else str(feature_version)
    tail = text.rsplit("-", 1)[-1]
    return float(tail) if tail.isdigit() else float("nan")


def clock_alignment(logged: pd.DataFrame, snapshot_ts: pd.Series | np.ndarray,
                    max_age_days: int = DEFAULT_MAX_AGE_DAYS) -> pd.Series:
    """Per logged row: `aligned` when the snapshot training's as-of rule picks for its request_ts is the one the
    server served (or the log names none), else why not: the request is stamped before the served snapshot
    (a client clock or replayed timestamp), past the snapshot's max age (no timestamp: the server's wall clock),
    or a newer snapshot existed (the server was behind)."""
    served = logged["feature_version"].map(served_snapshot_ts).to_numpy(dtype=float) \
        if "feature_version" in logged else np.full(len(logged), np.nan)
    request = logged["request_ts"].to_numpy(dtype=float)
    snaps = np.unique(np.asarray(snapshot_ts, dtype=float))
    idx = np.searchsorted(snaps, request, side="left") - 1  # newest snapshot strictly before the request
    as_of = np.where(idx >= 0, snaps[np.clip(idx, 0, None)] if len(snaps) else np.nan, np.nan)
    as_of = np.where(request - as_of <= max_age_days * 86_400_000, as_of, np.nan)
    out = np.full(len(logged), ALIGNED, dtype=object)
    known = ~np.isnan(served)
    out[known & (request <= served)] = "request_before_snapshot"
    out[known & (request > served) & np.isnan(as_of)] = "request_past_max_age"
    out[known & (request > served) & ~np.isnan(as_of) & (as_of > served)] = "served_older_snapshot"
    return pd.Series(out, index=logged.index)


@dataclass
class SkewReport:
    rows: int
    per_feature: pd.DataFrame  # feature, mismatches, mismatch_rate, max_abs_diff (over the aligned rows)
    threshold: float
    clock_mismatch: dict[str, int] = field(default_factory=dict)  # rows left out, by reason (CLOCK_CLASSES)

    @property
    def aligned_rows(self) -> int:
        return self.rows - sum(self.clock_mismatch.values())

    @property
    def skewed(self) -> bool:
        return bool((self.per_feature["mismatch_rate"] > self.threshold).any()) if len(self.per_feature) else False

    @property
    def verdict(self) -> str:
        """`skew` (features differ where the clocks agree), `clock_version_mismatch` (too many requests whose
        clock does not match the snapshot served: fix the clients' timestamps or the store refresh, not the
        features), `no_aligned_rows`, or `ok`."""
        if self.aligned_rows > 0 and self.skewed:
            return "skew"
        if self.rows and sum(self.clock_mismatch.values()) / self.rows > self.threshold:
            return "clock_version_mismatch"
        return "ok" if self.aligned_rows > 0 else "no_aligned_rows"

    @property
    def passed(self) -> bool:
        return self.verdict == "ok"

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
                threshold: float = 0.01, rel_tol: float = 1e-6, abs_tol: float = 1e-6,
                alignment: pd.Series | None = None) -> SkewReport:
    """Per feature: how many rows differ between served and offline values (beyond float tolerance), over the
    rows whose clock matches the served snapshot (`alignment` from clock_alignment; default: all rows)."""
    features = features or checked_features()
    keep = np.ones(len(served), dtype=bool) if alignment is None else (alignment.to_numpy() == ALIGNED)
    counts = {} if alignment is None else {k: int(v) for k, v in alignment[~keep].value_counts().items()}
    out = []
    for name in features:
        a = served[name].to_numpy(dtype=np.float64)[keep]
        b = offline[name].to_numpy(dtype=np.float64)[keep]
        close = np.isclose(a, b, rtol=rel_tol, atol=abs_tol, equal_nan=True)
        diff = np.abs(a - b)
        out.append({"feature": name, "mismatches": int((~close).sum()), "mismatch_rate": float((~close).mean()) if len(a) else 0.0,
                    "max_abs_diff": float(np.nanmax(diff)) if len(a) and np.isfinite(diff).any() else 0.0})
    return SkewReport(rows=len(served), per_feature=pd.DataFrame(out), threshold=threshold, clock_mismatch=counts)


def served_feature_frame(logged: pd.DataFrame) -> pd.DataFrame:
    """The logged `features` JSON column as a frame (one column per feature)."""
    return pd.DataFrame([json.loads(v) for v in logged["features"]], index=logged.index).reset_index(drop=True)


__all__ = ["SkewReport", "checked_features", "clock_alignment", "served_snapshot_ts", "recompute_offline", "served_feature_frame", "skew_report"]
