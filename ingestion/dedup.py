"""Deduplication: exact event ids, and repeats of one action within a short window.

Clients retry, SDKs double-fire and pipelines replay, so the same action can reach
us several times with new event ids. An event is a *window duplicate* when the
same (user_id, item_id, event_type, session_id) was already kept less than
`window_ms` earlier or later. Earlier batches (`prior`) always win; inside a batch
the earlier timestamp wins. The rule depends only on the batch and earlier
batches, so replaying a batch, or backfilling one day, gives the same answer.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

DEDUP_KEY: tuple[str, ...] = ("user_id", "item_id", "event_type", "session_id")
DEFAULT_WINDOW_MS = 5 * 60 * 1000


def exact_duplicates(events: pd.DataFrame, prior: pd.DataFrame | None = None) -> np.ndarray:
    """True where the event_id was seen before: earlier in the batch, or in a prior batch."""
    ids = events["event_id"]
    dup = ids.duplicated(keep="first").to_numpy()
    if prior is not None and len(prior):
        dup |= ids.isin(prior["event_id"]).to_numpy()
    return dup


def _key_codes(frames: list[pd.DataFrame]) -> np.ndarray:
    """One int code per distinct DEDUP_KEY tuple across the frames (nulls are a value of their own)."""
    both = pd.concat([f[list(DEDUP_KEY)] for f in frames], ignore_index=True).astype(object).fillna("\x00")
    return both.groupby(list(DEDUP_KEY), sort=False, dropna=False).ngroup().to_numpy()


def window_duplicates(events: pd.DataFrame, prior: pd.DataFrame | None = None,
                      window_ms: int = DEFAULT_WINDOW_MS) -> np.ndarray:
    """True where the same action was already kept within `window_ms` (see module docstring).

    Vectorized pre-filter: only key groups with two events closer than the window are
    walked one by one, which is a tiny share of any real log.
    """
    n = len(events)
    if n == 0 or window_ms <= 0:
        return np.zeros(n, dtype=bool)
    prior = prior if prior is not None and len(prior) else None
    frames = [events] if prior is None else [prior, events]
    codes = _key_codes(frames)
    ts = np.concatenate([f["timestamp"].to_numpy(dtype="int64") for f in frames])
    is_prior = np.zeros(len(codes), dtype=bool)
    if prior is not None:
        is_prior[: len(prior)] = True
    order = np.lexsort((ts, codes))
    close = (np.diff(codes[order]) == 0) & (np.diff(ts[order]) < window_ms)
    if not close.any():
        return np.zeros(n, dtype=bool)
    suspect_codes = np.unique(codes[order][1:][close])
    dup = np.zeros(len(codes), dtype=bool)
    suspects = np.flatnonzero(np.isin(codes, suspect_codes))
    # walk each suspect group: prior rows first (always kept), then the batch by timestamp
    walk = suspects[np.lexsort((suspects, ts[suspects], ~is_prior[suspects], codes[suspects]))]
    current, kept = -1, list[int]()
    for row in walk:
        if codes[row] != current:
            current, kept = codes[row], []
        t = ts[row]
        if not is_prior[row] and any(abs(t - k) < window_ms for k in kept):
            dup[row] = True
        else:
            kept.append(t)
    return dup[len(codes) - n:]


__all__ = ["DEDUP_KEY", "DEFAULT_WINDOW_MS", "exact_duplicates", "window_duplicates"]
