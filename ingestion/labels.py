"""Labels: what each impression earned, once its attribution window has closed.

An engagement (click, add_to_cart, purchase, share, skip) is credited to the latest
impression of the same (user, item) at or before it, if that impression is less
than `attribution_window_ms` older. An impression is labeled only after its window
has closed (timestamp + window <= as_of), so a label never changes after it is
written and never peeks past `as_of` (DESIGN invariant 2: labels come after the
features, and only from what was known at as_of).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from data_contracts.schema import HOUR_MS

# The seed's weighted engagement, declared once: the scalar and the vectorized score both read these.
EVENT_WEIGHTS: dict[str, float] = {"purchase": 1.0, "share": 0.8, "skip": -0.1, "add_to_cart": 0.0, "impression": 0.0}
CLICK_DWELL_WEIGHTS: tuple[tuple[int, float], ...] = ((30_000, 0.6), (5_000, 0.3), (0, 0.1))  # (min dwell ms, score)
ENGAGEMENT_EVENT_TYPES: tuple[str, ...] = ("click", "add_to_cart", "purchase", "share", "skip")
ENGAGEMENT_KEYS: tuple[str, ...] = ("user_id", "item_id", "timestamp")  # an engagement counts only with all three
LABEL_MIN, LABEL_MAX = -0.1, 1.0

LABEL_COLUMNS: list[str] = ["event_id", "user_id", "item_id", "session_id", "timestamp", "position", "device_type",
                            "page_context", "label", "label_binary", "n_engagements", "negative_kind"]
REQUIRED_COLUMNS: tuple[str, ...] = ("event_id", "user_id", "item_id", "event_type", "timestamp")


@dataclass(frozen=True)
class LabelConfig:
    attribution_window_ms: int = 72 * HOUR_MS
    positive_threshold: float = 0.3
    easy_negative_ratio: float = 0.0  # sampled unshown items per positive (fractions sample the remainder)
    # catalog negatives drawn with probability ~ (item's engagements + 1) ** alpha: 0 = uniform over the
    # catalog, 1 = as popular as items are engaged (the ranker must then separate taste from popularity)
    negative_popularity_alpha: float = 0.0
    click_is_positive: bool = False   # click-only logs (no dwell recorded): every click scores at least the threshold
    seed: int = 17


def engagement_score(event_type: str, dwell_time_ms: float | None) -> float:
    """Score of one event: purchases and shares are strong, clicks scale with dwell, skips are negative."""
    if event_type == "click":
        dwell = 0.0 if dwell_time_ms is None or pd.isna(dwell_time_ms) else float(dwell_time_ms)
        for min_dwell, score in CLICK_DWELL_WEIGHTS:
            if dwell >= min_dwell:
                return score
        return CLICK_DWELL_WEIGHTS[-1][1]  # negative dwell: a click is still a click
    return EVENT_WEIGHTS.get(event_type, 0.0)


def engagement_scores(event_types: pd.Series, dwell_time_ms: pd.Series) -> np.ndarray:
    """`engagement_score` over columns (same weights, no Python loop)."""
    types = event_types.to_numpy(dtype=object)
    dwell = pd.to_numeric(dwell_time_ms, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    dwell = np.nan_to_num(dwell, nan=0.0)
    scores = np.zeros(len(types), dtype="float64")
    for event_type, weight in EVENT_WEIGHTS.items():
        scores[types == event_type] = weight
    is_click = types == "click"
    click = np.full(len(types), CLICK_DWELL_WEIGHTS[-1][1])
    for min_dwell, score in reversed(CLICK_DWELL_WEIGHTS):
        click = np.where(dwell >= min_dwell, score, click)
    scores[is_click] = click[is_click]
    return scores


def _empty_labels() -> pd.DataFrame:
    return pd.DataFrame({
        "event_id": pd.Series([], dtype=object), "user_id": pd.Series([], dtype=object),
        "item_id": pd.Series([], dtype=object), "session_id": pd.Series([], dtype=object),
        "timestamp": pd.Series([], dtype="int64"), "position": pd.Series([], dtype="Int64"),
        "device_type": pd.Series([], dtype=object), "page_context": pd.Series([], dtype=object),
        "label": pd.Series([], dtype="float64"), "label_binary": pd.Series([], dtype="int64"),
        "n_engagements": pd.Series([], dtype="int64"), "negative_kind": pd.Series([], dtype=object),
    })


def item_engagements(events: pd.DataFrame) -> pd.Series:
    """Engagements per item (the catalog negatives' popularity): over events as `build_labels` reads them."""
    ev = events[np.logical_and.reduce([events[c].notna().to_numpy() for c in ENGAGEMENT_KEYS])]
    return ev.loc[ev["event_type"].isin(ENGAGEMENT_EVENT_TYPES).to_numpy(), "item_id"].value_counts()


def build_labels(events: pd.DataFrame, as_of_ms: int, config: LabelConfig = LabelConfig(),
                 catalog_item_ids: Sequence[str] | None = None,
                 engagements: pd.Series | None = None) -> pd.DataFrame:
    """One row per impression whose attribution window closed by `as_of_ms` (exclusive: events at or after
    as_of are unknown). Columns: LABEL_COLUMNS; label = attributed engagement summed, clipped to
    [-0.1, 1.0]; label_binary = label >= positive_threshold; impressions nobody engaged with get 0.
    Every row depends on its own user's events only, except the catalog negatives' popularity: `engagements`
    (item_engagements over all users' events before as_of) lets a caller judge a slice of users (the Spark
    engine, ingestion/labels_spark.py) and draw exactly what the whole log would.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"build_labels needs columns {list(REQUIRED_COLUMNS)} but {missing} are missing: "
                         f"pass silver events (the contract's accepted rows), not a projection of them.")
    window = int(config.attribution_window_ms)
    if window <= 0:
        raise ValueError(f"attribution_window_ms must be positive, got {window}")
    as_of_ms = int(as_of_ms)

    cols = [c for c in ("event_id", "user_id", "item_id", "event_type", "timestamp", "session_id", "position",
                        "device_type", "page_context", "dwell_time_ms") if c in events.columns]
    ev = events[cols]
    ev = ev[ev["user_id"].notna() & ev["item_id"].notna() & ev["timestamp"].notna()]
    ev = ev.assign(timestamp=ev["timestamp"].astype("int64"))
    ev = ev[ev["timestamp"] < as_of_ms]  # nothing from the future of as_of
    # one canonical order, whatever order the rows were read in (silver comes back one day file after another in
    # the order the Delta log lists them, which differs between identical runs): ties below and the easy negatives
    # drawn per positive depend on row order, so without it the same events gave a different training sample
    ev = ev.sort_values(["timestamp", "event_id"], kind="mergesort").reset_index(drop=True)
    ts = ev["timestamp"].to_numpy()
    is_imp = (ev["event_type"] == "impression").to_numpy()
    # impressions labeled now: their whole window [t, t + window) lies before as_of
    labeled = is_imp & (ts + window <= as_of_ms)
    if not labeled.any():
        return _empty_labels()
    eng_mask = ev["event_type"].isin(ENGAGEMENT_EVENT_TYPES).to_numpy()
    # credit per row of `ev` (only impression rows receive any), accumulated by row number: no string joins
    total = np.zeros(len(ev), dtype="float64")
    count = np.zeros(len(ev), dtype="int64")
    if eng_mask.any():
        eng = ev.loc[eng_mask, ["user_id", "item_id", "timestamp"]]
        dwell = ev.loc[eng_mask, "dwell_time_ms"] if "dwell_time_ms" in ev else pd.Series(np.nan, index=eng.index)
        eng = eng.assign(score=engagement_scores(ev.loc[eng_mask, "event_type"], dwell))
        if config.click_is_positive:  # the click-only label rule (ingestion/sources.py LABEL_RULES)
            is_click = (ev.loc[eng_mask, "event_type"] == "click").to_numpy()
            eng.loc[is_click, "score"] = np.maximum(eng.loc[is_click, "score"], config.positive_threshold)
        # every impression competes (one whose window is still open may be the latest before an engagement);
        # ties at one timestamp go to the impression later in the canonical order, the larger event_id (stable sort)
        right = (ev.loc[is_imp, ["user_id", "item_id", "timestamp"]]
                 .assign(impression_row=np.flatnonzero(is_imp))
                 .rename(columns={"timestamp": "impression_ts"})
                 .sort_values("impression_ts", kind="mergesort"))
        left = eng.sort_values("timestamp", kind="mergesort")
        matched = pd.merge_asof(
            left, right, left_on="timestamp", right_on="impression_ts", by=["user_id", "item_id"],
            direction="backward", allow_exact_matches=True, tolerance=window - 1,  # the window is half-open
        )
        rows = matched["impression_row"].to_numpy(dtype="float64", na_value=np.nan)
        hit = ~np.isnan(rows)
        rows = rows[hit].astype("int64")
        total = np.bincount(rows, weights=matched["score"].to_numpy()[hit], minlength=len(ev))
        count = np.bincount(rows, minlength=len(ev)).astype("int64")

    out = ev.loc[labeled].drop(columns=[c for c in ("event_type", "dwell_time_ms") if c in ev.columns])
    out["label"] = total[labeled]
    out["n_engagements"] = count[labeled]
    for col in ("session_id", "device_type", "page_context"):
        if col not in out:
            out[col] = None
    if "position" not in out:
        out["position"] = pd.NA
    # rounded so that sums like 0.1 + 0.2 meet a 0.3 threshold exactly
    out["label"] = np.round(np.clip(out["label"].to_numpy(), LABEL_MIN, LABEL_MAX), 6)
    out["label_binary"] = (out["label"] >= config.positive_threshold).astype("int64")
    out["position"] = pd.to_numeric(out["position"], errors="coerce").round().astype("Int64")
    out["negative_kind"] = np.where(out["label_binary"].to_numpy() == 1, "positive", "hard").astype(object)
    if config.easy_negative_ratio > 0:
        catalog = catalog_item_ids if catalog_item_ids is not None else ev["item_id"].dropna().unique()
        shown = ev.loc[is_imp, ["user_id", "item_id"]]
        catalog = np.asarray(sorted(pd.unique(np.asarray(list(catalog), dtype=object)), key=str), dtype=object)
        weights = None
        if config.negative_popularity_alpha > 0:
            counts = item_engagements(ev) if engagements is None else engagements
            weights = (pd.Series(catalog).map(counts).fillna(0.0).to_numpy(dtype=np.float64) + 1.0) ** config.negative_popularity_alpha
        easy = sample_easy_negatives(out[out["label_binary"] == 1], shown, catalog, config.easy_negative_ratio,
                                     config.seed, weights=weights)
        if len(easy):
            out = pd.concat([out, easy], ignore_index=True)
    out = out.sort_values("timestamp", kind="mergesort").reset_index(drop=True)  # stable: canonical order on ties
    return out[LABEL_COLUMNS]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _draws(event_ids: np.ndarray, seed: int, n: int) -> np.ndarray:
    """(len(event_ids), n) uniforms in [0, 1): splitmix64 of (seed, the event id's stable hash, column). A
    counter, not a stream: a positive's draws are the same whichever other positives are drawn with it, so a
    slice of users (a Spark partition) samples what the whole log samples."""
    with np.errstate(over="ignore"):
        base = pd.util.hash_array(np.asarray(event_ids, dtype=object)).astype(np.uint64)
        base ^= np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN
        z = base[:, None] + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_easy_negatives(positives: pd.DataFrame, shown: pd.DataFrame, catalog: np.ndarray, ratio: float,
                          seed: int, attempts: int = 4, weights: np.ndarray | None = None) -> pd.DataFrame:
    """Per positive row, round(ratio) catalog items (a fractional remainder drawn with its probability) that its
    user was never shown, drawn uniformly or with `weights` (e.g. popularity); each copies the positive's user,
    session, moment and context with label 0, and its event id names the positive (`easy:<event_id>:<n>`) so
    the training set replays the same session state for it (training/dataset.py)."""
    if positives.empty or len(catalog) == 0 or ratio <= 0:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    whole, frac = int(np.floor(ratio)), ratio - np.floor(ratio)
    k_cap = whole + (frac > 0)
    # column 0 decides a fractional remainder, the rest are item draws: all a function of (seed, event id) only
    u = _draws(positives["event_id"].to_numpy(dtype=object), seed, 1 + k_cap * attempts)
    k = whole + (u[:, 0] < frac).astype(int)
    k_max = int(k.max()) if len(k) else 0
    if k_max == 0:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    users, user_codes = np.unique(np.concatenate([positives["user_id"].astype(str).to_numpy(),
                                                  shown["user_id"].astype(str).to_numpy()]), return_inverse=True)
    item_index = {item: i for i, item in enumerate(catalog)}
    n_items = len(catalog)
    pos_users = user_codes[: len(positives)]
    shown_items = shown["item_id"].map(item_index)
    ok = shown_items.notna().to_numpy()
    seen = set((user_codes[len(positives):][ok].astype(np.int64) * n_items
                + shown_items[ok].to_numpy(dtype=np.int64)).tolist())
    u = u[:, 1:1 + k_max * attempts]
    if weights is None:
        draws = np.minimum((u * n_items).astype(np.int64), n_items - 1)
    else:
        cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
        draws = np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), n_items - 1)
    rows, picks = [], []
    for r in range(len(positives)):
        need, got = int(k[r]), list[int]()
        base = int(pos_users[r]) * n_items
        for item in draws[r]:
            if len(got) == need:
                break
            if base + int(item) not in seen and int(item) not in got:
                got.append(int(item))
        rows.extend([r] * len(got))
        picks.extend(got)
    if not rows:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    src = positives.iloc[rows].reset_index(drop=True)
    nth = pd.Series(rows).groupby(rows).cumcount().to_numpy()
    easy = pd.DataFrame({
        "event_id": [f"easy:{e}:{j}" for e, j in zip(src["event_id"], nth)], "user_id": src["user_id"],
        "item_id": catalog[np.asarray(picks)], "session_id": src["session_id"], "timestamp": src["timestamp"],
        "position": pd.array([pd.NA] * len(src), dtype="Int64"), "device_type": src["device_type"],
        "page_context": src["page_context"], "label": 0.0, "label_binary": 0, "n_engagements": 0,
        "negative_kind": "easy"})
    return easy[LABEL_COLUMNS]


def label_summary(labels: pd.DataFrame) -> dict[str, float]:
    """Rows, positive rate and counts per negative_kind (asset metadata)."""
    kinds = labels["negative_kind"].value_counts().to_dict() if "negative_kind" in labels else {}
    return summary_of_counts(len(labels), int(labels["label_binary"].sum()) if len(labels) else 0, kinds)


def summary_of_counts(rows: int, positives: int, kinds: dict[str, int]) -> dict[str, float]:
    """`label_summary` from counts (the Spark engine aggregates them without collecting the labels)."""
    return {"rows": rows, "positive_rate": round(positives / rows, 4) if rows else 0.0,
            **{f"{k}_rows": int(kinds.get(k, 0)) for k in ("positive", "hard", "easy")}}


def untrainable_reason(events: pd.DataFrame, labels: pd.DataFrame, click_is_positive: bool) -> str:
    """Why a log yields no positive label, and what to change: said before any feature or training step."""
    types = events["event_type"].value_counts().to_dict() if "event_type" in events else {}
    return untrainable_reason_of(types, len(labels), click_is_positive)


def untrainable_reason_of(types: dict[str, int], n_labels: int, click_is_positive: bool) -> str:
    """`untrainable_reason` from the log's event-type counts and the number of labeled rows."""
    seen = ", ".join(f"{k}={v}" for k, v in sorted(types.items())) or "no events"
    if not types.get("impression"):
        hint = ("the log has no impressions to label; import it with the generic importer, which implies one "
                "impression per (session, item) engagement for click-only and views/purchases logs")
    elif not n_labels:
        hint = ("no impression's attribution window has closed yet; lower attribution_window_hours in the labels "
                "config or wait for more data")
    elif not click_is_positive and types.get("click"):
        hint = ("clicks carry no dwell, so each scores below positive_threshold; use the click-only label rule "
                "(labels config click_is_positive: true, easy_negative_ratio > 0) or map a value/rating column")
    else:
        hint = "no engagement was credited to an impression; check the event types mapping (event_type_map)"
    return f"no positive labels from {n_labels} labeled impressions (events: {seen}): {hint}"


__all__ = ["CLICK_DWELL_WEIGHTS", "ENGAGEMENT_EVENT_TYPES", "ENGAGEMENT_KEYS", "EVENT_WEIGHTS", "LABEL_COLUMNS", "LabelConfig",
           "build_labels", "engagement_score", "item_engagements", "engagement_scores", "label_summary", "sample_easy_negatives",
           "summary_of_counts", "untrainable_reason", "untrainable_reason_of"]
