"""Bot filtering by session velocity.

A human reads what they click; a scraper or click-fraud script does not. A session
is a bot session when, inside some `window_ms` stretch, it clicks at least
`max_clicks` times AND its median click dwell is at most `max_median_dwell_ms`.
Both conditions must hold, so a fast but attentive human (or a bulk rating import
with long dwell) is never filtered. Thresholds are configuration; every filtered
session is reported with its figures so a reviewer can see why.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

BOT_SESSION_COLUMNS: list[str] = ["user_id", "session_id", "clicks", "max_clicks_in_window", "median_dwell_ms", "reason"]


@dataclass(frozen=True)
class BotConfig:
    enabled: bool = True
    max_clicks: int = 100          # clicks within window_ms at or above this ...
    window_ms: int = 10 * 60 * 1000
    max_median_dwell_ms: int = 1_000  # ... with a median dwell at or below this = bot

    def __post_init__(self) -> None:
        if self.max_clicks < 2 or self.window_ms <= 0 or self.max_median_dwell_ms < 0:
            raise ValueError(f"bad bot thresholds {self}: max_clicks >= 2, window_ms > 0, max_median_dwell_ms >= 0")


def bot_sessions(events: pd.DataFrame, config: BotConfig = BotConfig()) -> pd.DataFrame:
    """The sessions judged to be bots, one row each (BOT_SESSION_COLUMNS)."""
    empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in BOT_SESSION_COLUMNS})
    if not config.enabled or events.empty:
        return empty
    clicks = events.loc[events["event_type"] == "click", ["user_id", "session_id", "timestamp", "dwell_time_ms"]]
    if len(clicks) < config.max_clicks:
        return empty
    codes, uniques = pd.MultiIndex.from_frame(clicks[["user_id", "session_id"]].astype(object).fillna("")).factorize()
    ts = clicks["timestamp"].to_numpy(dtype="int64")
    rel = ts - ts.min()
    span = int(rel.max()) + config.window_ms + 1
    combined = codes.astype("int64") * span + rel  # sorted by session, then time
    order = np.argsort(combined, kind="stable")
    sorted_keys = combined[order]
    in_window = np.searchsorted(sorted_keys, sorted_keys + config.window_ms, side="left") - np.arange(len(order))
    per = pd.DataFrame({
        "code": codes[order],
        "in_window": in_window,
        "dwell": pd.to_numeric(clicks["dwell_time_ms"], errors="coerce").to_numpy(dtype="float64", na_value=np.nan)[order],
    }).groupby("code").agg(clicks=("in_window", "size"), max_clicks_in_window=("in_window", "max"),
                           median_dwell_ms=("dwell", "median"))
    per["median_dwell_ms"] = per["median_dwell_ms"].fillna(0.0)
    bad = per[(per["max_clicks_in_window"] >= config.max_clicks) & (per["median_dwell_ms"] <= config.max_median_dwell_ms)]
    if bad.empty:
        return empty
    keys = uniques[bad.index.to_numpy()]
    out = pd.DataFrame({"user_id": keys.get_level_values(0), "session_id": keys.get_level_values(1),
                        "clicks": bad["clicks"].to_numpy(), "max_clicks_in_window": bad["max_clicks_in_window"].to_numpy(),
                        "median_dwell_ms": bad["median_dwell_ms"].to_numpy()})
    template = bot_reason_format(config)
    out["reason"] = [template % (int(m), d) for m, d in zip(out["max_clicks_in_window"], out["median_dwell_ms"])]
    return out[BOT_SESSION_COLUMNS].reset_index(drop=True)


def bot_reason_format(config: BotConfig) -> str:
    """The quarantine reason of a bot session, a printf format of (clicks in the window, median dwell): one text
    for both engines (`%` here, Spark's `format_string` in ingestion/refine_spark.py; `%.0f` rounds half to even
    in Python, so Spark is handed the median already rounded that way, `bround`)."""
    return (f"bot_session_velocity: %d clicks within {config.window_ms // 1000}s (limit {config.max_clicks}), "
            f"median dwell %.0f ms (limit {config.max_median_dwell_ms})")


def bot_mask(events: pd.DataFrame, sessions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(mask, reasons): every event of a bot session, impressions included, and why."""
    if sessions.empty or events.empty:
        return np.zeros(len(events), dtype=bool), np.full(len(events), "", dtype=object)
    key = events["user_id"].astype(str) + "\x1f" + events["session_id"].astype(str)
    reason_of = dict(zip(sessions["user_id"].astype(str) + "\x1f" + sessions["session_id"].astype(str), sessions["reason"]))
    reasons = key.map(reason_of)
    mask = reasons.notna().to_numpy()
    return mask, reasons.fillna("").to_numpy(dtype=object)


__all__ = ["BOT_SESSION_COLUMNS", "BotConfig", "bot_mask", "bot_reason_format", "bot_sessions"]
