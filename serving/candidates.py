"""Candidate generation: several channels, each with its own share of the pool and time budget.

    ann            FAISS inner product on the session-aware user vector (personal taste + session)
    item_similarity  items engaged by the same users as the user's history items (SAR Jaccard, the bundle's)
    co_visitation  items co-clicked in past sessions with the session's last items (item-to-item)
    trending       the most clicked items in the user's segment (device) last week
    fresh          catalog items newer than the model's index, newest first (new items get a chance)
    recently_engaged  the session's and the user's consumed items, on surfaces that allow repeats

Channels are merged in order of their quota, deduplicated, items already engaged in the
session removed, and the pool capped. A channel that raises or overruns its budget is
dropped for this request (named in `channel_errors`), never failing the request.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

log = logging.getLogger("kairos.candidates")

FRESH_MAX_AGE_HOURS = 72.0


@dataclass(frozen=True)
class Channel:
    name: str
    share: float        # of candidate_pool_size
    timeout_ms: float   # results of a slower run are dropped


DEFAULT_CHANNELS: tuple[Channel, ...] = (
    Channel("ann", 0.60, 20.0),
    # only on surfaces that allow repeats (RerankConfig.repeat_surfaces): what the user engaged with lately
    # (first after ANN, so what it contributes is counted as its own)
    Channel("recently_engaged", 0.10, 2.0),
    # SAR: items co-engaged by the same users with the user's history (the bundle's models/item_similarity.py)
    Channel("item_similarity", 0.15, 5.0),
    Channel("co_visitation", 0.15, 5.0),
    Channel("trending", 0.15, 5.0),
    Channel("fresh", 0.10, 5.0),
)


CANDIDATE_BUDGET_SHARE = 0.4  # of a request's max_latency_ms that candidate generation may spend


def channels_for_budget(max_latency_ms: float | None,
                        channels: tuple[Channel, ...] = DEFAULT_CHANNELS) -> tuple[Channel, ...]:
    """The channels with their time budgets shrunk to fit a request's own latency budget.

    Candidate generation gets CANDIDATE_BUDGET_SHARE of `max_latency_ms`, split in proportion to the
    default budgets; a budget never grows past its default (a generous client does not make a slow
    channel welcome). None = the defaults.
    """
    if max_latency_ms is None:
        return channels
    total = sum(c.timeout_ms for c in channels)
    scale = min(1.0, CANDIDATE_BUDGET_SHARE * float(max_latency_ms) / total) if total > 0 else 1.0
    return tuple(Channel(c.name, c.share, c.timeout_ms * scale) for c in channels)


def co_visitation(co_items: Mapping[str, Mapping[str, float] | None], last_items: list[str], k: int) -> list[str]:
    """Items most co-clicked with the session's last items (more recent items weigh more)."""
    scores: dict[str, float] = {}
    for rank, item in enumerate(last_items[:10]):
        neighbours = co_items.get(item) or {}
        weight = 1.0 / (1.0 + rank)
        for other, n in neighbours.items():
            scores[other] = scores.get(other, 0.0) + weight * float(n)
    return [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


_LAST_UNINDEXED: tuple[Any, Any, np.ndarray] | None = None  # (window ids, index, mask) last computed


def unindexed_mask(item_ids: list[str], indexed: Mapping[str, int]) -> np.ndarray:
    """Which of the fresh window's items the model's index does not hold. Every request of a version asks about the
    same window object (the store re-reads it only when the version's rows move) against the same model's index,
    so the mask is computed once per (window, model version) -- both held here, so their ids stay theirs, and never
    changed in place -- not
    per request (~90 us over a 1000-item window)."""
    global _LAST_UNINDEXED
    last = _LAST_UNINDEXED
    if last is not None and last[0] is item_ids and last[1] is indexed:
        return last[2]
    mask = np.fromiter((i not in indexed for i in item_ids), dtype=bool, count=len(item_ids))
    mask.setflags(write=False)
    _LAST_UNINDEXED = (item_ids, indexed, mask)  # one assignment: a thread reads the old pair or the new one
    return mask


def fresh_items(item_ids: list[str], publish_ts: np.ndarray, indexed: Mapping[str, int], now_ms: int, k: int,
                max_age_hours: float = FRESH_MAX_AGE_HOURS) -> list[str]:
    """Items published recently or unknown to the index (published after it was built), newest first."""
    age_h = (now_ms - np.nan_to_num(publish_ts, nan=-1e18)) / 3_600_000.0
    recent = (age_h >= 0) & (age_h <= max_age_hours)
    unindexed = unindexed_mask(item_ids, indexed)
    pick = np.flatnonzero((recent | unindexed) & (age_h >= 0))
    order = pick[np.argsort(age_h[pick], kind="stable")]
    return [item_ids[i] for i in order[:k]]


def run_channels(producers: Mapping[str, Callable[[int], list[str]]], pool: int, exclude: set[str],
                 channels: tuple[Channel, ...] = DEFAULT_CHANNELS) -> tuple[list[str], dict[str, int], dict[str, str]]:
    """(candidates, how many each channel contributed, channel errors). Unfilled quota goes to the
    channels after it, then back to ANN (the deepest channel), so the pool fills whenever it can."""
    results: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    for ch in channels:
        if ch.name not in producers:
            continue
        quota = max(1, int(round(pool * ch.share))) + len(exclude)
        t = time.perf_counter()
        try:
            got = producers[ch.name](quota if ch.name != "ann" else pool + len(exclude))
        except Exception as exc:  # noqa: BLE001 - one channel failing must not fail the request
            errors[ch.name] = f"{type(exc).__name__}: {exc}"
            log.warning("candidate channel %s failed: %s", ch.name, exc)
            continue
        elapsed = (time.perf_counter() - t) * 1000
        if elapsed > ch.timeout_ms:
            errors[ch.name] = f"timeout: {elapsed:.1f} ms > {ch.timeout_ms} ms"
            continue
        results[ch.name] = got
    taken = set(exclude)
    out: list[str] = []
    contributed: dict[str, int] = {}
    # every channel first takes its own quota (ANN last, as the filler), then the rest fills from ANN
    asked = [c for c in channels if c.name in producers]
    order = [c for c in asked if c.name != "ann"] + [c for c in asked if c.name == "ann"]
    for ch in order:
        quota = max(1, int(round(pool * ch.share))) if ch.name != "ann" else pool
        n = 0
        for item in results.get(ch.name, []):
            if len(out) >= pool or n >= quota:
                break
            if item not in taken:
                taken.add(item)
                out.append(item)
                n += 1
        contributed[ch.name] = n
    for name in ("trending", "co_visitation", "fresh"):
        for item in results.get(name, []):
            if len(out) >= pool:
                break
            if item not in taken:
                taken.add(item)
                out.append(item)
                contributed[name] = contributed.get(name, 0) + 1
    return out, contributed, errors


__all__ = ["CANDIDATE_BUDGET_SHARE", "Channel", "DEFAULT_CHANNELS", "channels_for_budget", "co_visitation", "fresh_items",
           "run_channels", "unindexed_mask"]
