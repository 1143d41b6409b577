"""PSI drift of recent behaviour against the training window, computed by Evidently.

Drift is measured on per-session behaviour (clicks, CTR, dwell, time of day,
device, the share of clicks per category) because those move first when user
tastes shift; the sensor acts on the PSI thresholds (0.2 warn, 0.25 act).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from features.functions import DEVICE_CODES

log = logging.getLogger("kairos.drift")


@dataclass(frozen=True)
class DriftThresholds:
    warn: float = 0.2
    act: float = 0.25


@dataclass
class DriftResult:
    psi: dict[str, float]
    max_psi: float
    status: str  # "ok" | "warn" | "act"
    drifted_features: list[str] = field(default_factory=list)
    html_path: str | None = None
    n_reference: int = 0
    n_current: int = 0
    noise_floor: float = 0.0  # expected PSI without drift at these sample sizes; status uses max_psi - this
    report_drifted: list[str] = field(default_factory=list)  # columns the Evidently HTML marks "detected"
    notes: list[str] = field(default_factory=list)  # why a column or the whole verdict was set aside

    def as_metadata(self) -> dict:
        """Flat scalars for Dagster metadata and run tags (status/max_psi/psi are added by the caller)."""
        return {"n_reference": self.n_reference, "n_current": self.n_current,
                "psi_noise_floor": round(float(self.noise_floor), 5),
                "drifted_features": ",".join(self.drifted_features) or "none",
                "report_drifted_features": ",".join(self.report_drifted) or "none",
                "notes": "; ".join(self.notes) or "none",
                **{f"psi.{k}": round(float(v), 5) for k, v in self.psi.items()}}


SESSION_OPEN_GAP_MS = 30 * 60 * 1000  # a session with an event this recent may still be going on
PSI_BINS = 10


def psi_noise_floor(n_reference: int, n_current: int, bins: int = PSI_BINS) -> float:
    """The PSI two samples of these sizes show on average when nothing drifted: about
    (bins - 1) * (1/n_reference + 1/n_current) (PSI is a symmetrized KL divergence, whose small-sample bias is
    the chi-square's). With 130 sessions in a 2-day window that is ~0.08: a third of the act threshold
    spent on noise. Status is decided on the PSI above this floor."""
    if n_reference <= 0 or n_current <= 0:
        return float("inf")
    return (bins - 1) * (1.0 / n_reference + 1.0 / n_current)


def effective_sizes(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[int, int]:
    """Sample sizes for the noise floor: distinct users when the rows carry `user_id` (one user's sessions share
    their tastes, so they are not independent draws: 178 sessions of ~130 users once read cat_share PSI 0.29 on a
    stationary world), else the row counts."""
    if "user_id" in reference and "user_id" in current:
        return int(reference["user_id"].nunique()), int(current["user_id"].nunique())
    return len(reference), len(current)


def whole_sessions(events: pd.DataFrame, start_ms: int, end_ms: int, data_end_ms: int | None = None,
                   open_gap_ms: int = SESSION_OPEN_GAP_MS) -> pd.DataFrame:
    """All events of the sessions that *start* in [start_ms, end_ms] and are closed (last event at least
    `open_gap_ms` before `data_end_ms`, default the newest event).

    Cutting a window by event time truncates the sessions that cross its edges, and the newest window
    holds the sessions still going on: both look like shorter sessions (fewer impressions and clicks)
    and made a stationary world read as drifted."""
    if events.empty:
        return events
    data_end = int(events["timestamp"].max()) if data_end_ms is None else int(data_end_ms)
    span = events.groupby("session_id")["timestamp"].agg(["min", "max"])
    keep = span.index[(span["min"] >= start_ms) & (span["min"] <= end_ms) & (span["max"] <= data_end - open_gap_ms)]
    return events[events["session_id"].isin(keep)]


INSUFFICIENT = "insufficient_data"  # too few rows on a side to judge: never a retrain
MIN_SESSIONS = 300  # per window: one simulated day of ~175 sessions read mean dwell or CTR PSI ~0.3 on a stationary world
# features on a clock cycle: their distribution is comparable only over whole cycles (a partial last day holds
# only its first hours); the behaviour windows are therefore cut to whole UTC days
CYCLICAL_FEATURES: dict[str, int] = {"hour_of_day": 86_400_000}


def whole_days(events: pd.DataFrame, start_ms: int, end_ms: int) -> pd.DataFrame:
    """The events of the sessions that start inside the whole UTC days between start_ms and end_ms (the partial
    days at both ends dropped), so a cyclical feature such as the hour of day sees every hour equally often."""
    if events.empty:
        return events
    day = CYCLICAL_FEATURES["hour_of_day"]
    first, last = -(-int(start_ms) // day) * day, (int(end_ms) // day) * day
    starts = events.groupby("session_id")["timestamp"].min()
    keep = starts.index[(starts >= first) & (starts < last)]
    return events[events["session_id"].isin(keep)]


@dataclass
class BehaviourWindows:
    """The reference (training) and current (newest) sessions the behaviour drift compares, and how they
    were cut; `aligned` is False when the current window holds less than a whole day (then the cyclical
    features are reported only)."""

    reference: pd.DataFrame
    current: pd.DataFrame
    aligned: bool
    notes: list[str] = field(default_factory=list)


STRAGGLER_DAY_SHARE = 0.05  # a UTC day with fewer events than this share of the median day holds stragglers only


def data_end_ms(events: pd.DataFrame, straggler_share: float = STRAGGLER_DAY_SHARE) -> tuple[int, int]:
    """(the newest event time of the newest UTC day that carries real traffic, events dropped after it).

    Anchoring the newest window on the single newest event let a handful of late events (sessions crossing
    midnight, a clock a day ahead) place the window on a nearly empty day: a shifted world's 3 new days read
    27 sessions and `insufficient_data`. Days holding fewer than `straggler_share` of the median day's events
    after the last full day are stragglers; they are left out of both windows (and counted in the notes)."""
    day = CYCLICAL_FEATURES["hour_of_day"]
    days = (events["timestamp"] // day).astype("int64")
    counts = days.value_counts().sort_index()
    real = counts.index[counts >= straggler_share * float(counts.median())]
    last_day = int(real.max())
    after = days > last_day
    end = int(events.loc[~after, "timestamp"].max())
    return end, int(after.sum())


def behaviour_windows(events: pd.DataFrame, train_start_ms: int, train_end_ms: int, recent_days: float,
                      min_sessions: int = MIN_SESSIONS) -> BehaviourWindows:
    """Whole, closed sessions of the training window vs the newest `recent_days` after it (ending at
    data_end_ms, stragglers left out), both cut to whole UTC days when the current side keeps at least
    `min_sessions` sessions that way."""
    notes: list[str] = []
    data_end, stragglers = data_end_ms(events)
    if stragglers:
        notes.append(f"{stragglers} straggler events on near-empty days after the newest full day left out")
        events = events[events["timestamp"] <= data_end]
    recent_start = max(data_end - int(recent_days * 86_400_000), int(train_end_ms) + 1)
    ref = whole_sessions(events, int(train_start_ms), int(train_end_ms), data_end)
    if ref.empty:
        ref = events[(events["timestamp"] >= train_start_ms) & (events["timestamp"] <= train_end_ms)]
        notes.append("reference: no whole session in the training window, events cut by time")
    cur = whole_sessions(events, recent_start, data_end, data_end)
    if cur.empty:
        cur = whole_sessions(events, data_end - int(recent_days * 86_400_000), data_end, data_end)
        notes.append("current: no closed session after the training window, the newest days overlap it")
    if cur.empty:
        cur = events[events["timestamp"] > data_end - int(recent_days * 86_400_000)]
        notes.append("current: no closed session in the window, events cut by time")
    ref_days = whole_days(ref, int(train_start_ms), int(train_end_ms) + 1)
    cur_days = whole_days(cur, int(cur["timestamp"].min()) if len(cur) else recent_start, data_end)
    if cur_days["session_id"].nunique() >= min_sessions and ref_days["session_id"].nunique() >= min_sessions:
        return BehaviourWindows(ref_days, cur_days, True, notes)
    notes.append(f"current window has {cur_days['session_id'].nunique()} sessions in whole days (< {min_sessions}): "
                 f"{', '.join(CYCLICAL_FEATURES)} reported only")
    return BehaviourWindows(ref, cur, False, notes)


def psi_status(value: float, thresholds: DriftThresholds = DriftThresholds()) -> str:
    """"ok" below warn, "warn" from warn, "act" from act."""
    return "act" if value >= thresholds.act else "warn" if value >= thresholds.warn else "ok"


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index with quantile bins of the reference (a cross-check for Evidently)."""
    reference = np.asarray(reference, dtype=float)
    current = np.asarray(current, dtype=float)
    reference, current = reference[~np.isnan(reference)], current[~np.isnan(current)]
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:
        return 0.0 if np.allclose(current, reference[0] if len(reference) else 0.0) else float("inf")
    edges[0], edges[-1] = -np.inf, np.inf
    ref_p = np.histogram(reference, edges)[0] / max(len(reference), 1)
    cur_p = np.histogram(current, edges)[0] / max(len(current), 1)
    ref_p, cur_p = np.clip(ref_p, eps, None), np.clip(cur_p, eps, None)
    return float(np.sum((cur_p - ref_p) * np.log(cur_p / ref_p)))


# the event columns the behaviour drift reads (behaviour_windows cuts on timestamp and session_id): a reader of
# the silver table needs no other
BEHAVIOUR_EVENT_COLUMNS = ["session_id", "user_id", "item_id", "event_type", "timestamp", "device_type", "dwell_time_ms"]


def event_drift_frame(events: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Per-session behaviour features from raw events (one row per session)."""
    if events.empty:
        raise ValueError("no events to compute drift features from: the window is empty")
    ev = events[BEHAVIOUR_EVENT_COLUMNS]
    cats = dict(zip(items["item_id"], items["category"]))
    is_click = ev["event_type"].eq("click")
    grouped = ev.assign(click=is_click.astype(float), impression=ev["event_type"].eq("impression").astype(float),
                        dwell=ev["dwell_time_ms"].where(is_click).astype(float)).groupby("session_id")
    frame = pd.DataFrame({
        "user_id": grouped["user_id"].first(),
        "clicks": grouped["click"].sum(),
        "impressions": grouped["impression"].sum(),
        "mean_dwell_s": grouped["dwell"].mean() / 1000.0,
        "hour_of_day": (grouped["timestamp"].min() // 3_600_000) % 24,
        "device_code": grouped["device_type"].first().map(DEVICE_CODES).fillna(0.0),
    })
    frame["ctr"] = frame["clicks"] / frame["impressions"].where(frame["impressions"] > 0)
    clicks = ev[is_click].assign(category=lambda d: d["item_id"].map(cats).fillna("unknown"))
    if not clicks.empty:
        shares = pd.crosstab(clicks["session_id"], clicks["category"], normalize="index")
        shares.columns = [f"cat_share_{c}" for c in shares.columns]
        frame = frame.join(shares, how="left")
    share_cols = [c for c in frame.columns if c.startswith("cat_share_")]
    frame[share_cols] = frame[share_cols].fillna(0.0)
    return frame.reset_index()


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str],
                 html_path: str | Path | None = None, thresholds: DriftThresholds = DriftThresholds(),
                 status_columns: list[str] | None = None, noise_correction: bool = True,
                 min_rows: int = 0) -> DriftResult:
    """PSI per column (Evidently ValueDrift, method psi), an HTML report, and the ok/warn/act status.

    `status_columns` (default: all) are the columns whose PSI decides the status; the others are reported
    for a person to read (e.g. features that move with the clock by construction). With `noise_correction`
    the status compares PSI minus psi_noise_floor(effective_sizes(...)) with the thresholds, so a small
    window does not read as drift; the reported PSI values are Evidently's, unchanged. Fewer than `min_rows`
    rows on a side give status `insufficient_data` (never a retrain). The HTML report is built with the same
    rule: a deciding column's Evidently threshold is act + noise floor, the others' is unreachable, so the
    columns the report marks "drift detected" are exactly `drifted_features`."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    if reference.empty or current.empty:
        raise ValueError(f"drift needs rows on both sides (reference {len(reference)}, current {len(current)})")
    usable = [c for c in columns if c in reference and c in current
              and reference[c].notna().any() and current[c].notna().any()]
    if not usable:
        raise ValueError(f"none of the columns {columns} has values on both sides")
    floor = psi_noise_floor(*effective_sizes(reference, current)) if noise_correction else 0.0
    enough = len(reference) >= min_rows and len(current) >= min_rows
    never = 1e9  # an Evidently threshold no PSI reaches: the column is shown, never marked drifted

    def threshold(column: str) -> float:
        deciding = status_columns is None or column in status_columns
        return thresholds.act + floor if deciding and enough else never

    definition = DataDefinition(numerical_columns=usable)
    ref = Dataset.from_pandas(reference[usable].astype(float), data_definition=definition)
    cur = Dataset.from_pandas(current[usable].astype(float), data_definition=definition)
    report = Report([ValueDrift(column=c, method="psi", threshold=threshold(c)) for c in usable])
    snapshot = report.run(cur, ref)
    values: dict[str, float] = {}
    report_drifted: list[str] = []
    for metric in snapshot.dict()["metrics"]:
        column = metric["config"]["column"]
        value = metric["value"]
        values[column] = float(value if np.isfinite(value) else 10.0)
        if values[column] >= float(metric["config"]["threshold"]):  # Evidently's PSI rule: score >= threshold
            report_drifted.append(column)
    if html_path is not None:
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(html_path))
    deciding = {c: v for c, v in values.items() if status_columns is None or c in status_columns}
    max_psi = max(deciding.values()) if deciding else 0.0
    notes: list[str] = []
    if enough:
        status = psi_status(max_psi - floor, thresholds)
        drifted = sorted(c for c, v in deciding.items() if v - floor >= thresholds.act)
    else:
        status, drifted = INSUFFICIENT, []
        notes.append(f"{len(reference)} reference / {len(current)} current rows: fewer than {min_rows} on a side")
    log.info("drift: status %s, max PSI %.3f (noise floor %.3f) over %s columns (%s reference rows, %s current)",
             status, max_psi, floor, len(values), len(reference), len(current))
    return DriftResult(values, max_psi, status, drifted, str(html_path) if html_path else None, len(reference),
                       len(current), floor, sorted(report_drifted), notes)


# --------------------------------------------------------------------------- the ranker's own features
# Features whose distribution moves with the clock by construction (a later window has later hours, other
# weekdays, older accounts and items) and the model's own output: their PSI is reported, never acted on.
CLOCK_DRIVEN_FEATURES: tuple[str, ...] = ("hour_of_day", "day_of_week", "user_account_age_days", "item_age_hours")
MODEL_OUTPUT_FEATURES: tuple[str, ...] = ("embedding_affinity",)


def ranker_drift_columns() -> tuple[list[str], list[str]]:
    """(actionable, informational) ranker features, in registry order."""
    from features.registry import ranker_feature_names

    info = set(CLOCK_DRIVEN_FEATURES) | set(MODEL_OUTPUT_FEATURES)
    names = ranker_feature_names()
    return [n for n in names if n not in info], [n for n in names if n in info]


def ranker_feature_drift(reference: pd.DataFrame, current: pd.DataFrame, html_path: str | Path | None = None,
                         thresholds: DriftThresholds = DriftThresholds()) -> DriftResult:
    """PSI of every ranker feature (frames in registry columns, as assemble_features returns them or as the
    impression log holds them); the status is decided by the actionable features only."""
    actionable, informational = ranker_drift_columns()
    return drift_report(reference, current, actionable + informational, html_path=html_path, thresholds=thresholds,
                        status_columns=actionable)


def feature_statuses(result: DriftResult, thresholds: DriftThresholds = DriftThresholds()) -> dict[str, str]:
    """Per feature: ok / warn / act, or info for the clock-driven and model-output features."""
    _, informational = ranker_drift_columns()
    return {c: ("info" if c in informational else psi_status(v, thresholds)) for c, v in result.psi.items()}


def served_feature_window(logged: pd.DataFrame, recent_days: float) -> pd.DataFrame:
    """The ranker features the two-stage model scored on shown answers (not shadow, not fallbacks) over the
    last `recent_days` of the impression log, one column per feature."""
    from monitoring.skew import served_feature_frame

    if logged.empty:
        return pd.DataFrame()
    shown = ~logged["shadow"].fillna(False).astype(bool) if "shadow" in logged else pd.Series(True, index=logged.index)
    rows = logged[shown & logged["features"].notna() & logged["served_by"].fillna("").str.startswith("two_stage")]
    if rows.empty:
        return pd.DataFrame()
    ts = rows["request_ts"].astype("int64")
    rows = rows[ts > int(ts.max()) - int(recent_days * 86_400_000)]
    return served_feature_frame(rows)
