"""A seeded world of users, items and sessions that emits events in the seed schema.

Users have latent tastes over categories; every session has an intent category,
so what a user clicks early in a session predicts what they click next (the
signal in-session personalization must pick up). Impressions carry positions
with position bias; clicks carry dwell time; some purchases arrive hours later.
The simulator also injects what real logs carry, so every filter is exercised on
every run: malformed events (contract), exact duplicates and client retries with
new ids a few seconds later (dedup), scripted bot sessions (bot filter), and late
arrivals (`received_at` hours after `timestamp`, so they land in a later ingest
batch than the day they happened).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_contracts.schema import DAY_MS, DEVICE_TYPES, EVENT_COLUMNS, PAGE_CONTEXTS, SCHEMA_VERSION

log = logging.getLogger("kairos.simulator")

REGIONS = ("na", "eu", "apac", "latam")
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: a fixed epoch keeps runs reproducible


@dataclass(frozen=True)
class SimulatorConfig:
    n_users: int = 300
    n_items: int = 400
    n_categories: int = 8
    days: int = 14
    sessions_per_user_day: float = 0.6
    pages_per_session: float = 2.5
    slate_size: int = 10
    start_ms: int = START_MS
    malformed_rate: float = 0.002
    duplicate_rate: float = 0.002
    retry_rate: float = 0.002          # re-sent with a new event_id 1-120 s later (window duplicates)
    late_rate: float = 0.005           # received 1-36 h after they happened
    bot_sessions_per_day: float = 0.3  # scripted sessions: 150-400 clicks in < 10 min, dwell < 300 ms
    taste_concentration: float = 0.35
    intent_strength: float = 2.2
    position_decay: float = 0.85
    # From this day on, tastes are re-drawn and half of every user's taste moves to the last
    # category (a trend: drift the monitoring must catch); None = no shift.
    shift_day: int | None = None
    seed: int = 7


@dataclass
class World:
    config: SimulatorConfig
    items: pd.DataFrame
    users: pd.DataFrame
    tastes: np.ndarray  # users x categories
    item_quality: np.ndarray
    item_cat: np.ndarray
    events: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def categories(self) -> list[str]:
        return [f"cat_{c:02d}" for c in range(self.config.n_categories)]


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def build_world(cfg: SimulatorConfig) -> World:
    rng = np.random.default_rng(cfg.seed)
    cats = [f"cat_{c:02d}" for c in range(cfg.n_categories)]
    item_cat = rng.integers(0, cfg.n_categories, cfg.n_items)
    quality = rng.normal(0.0, 0.6, cfg.n_items)
    # most of the catalog predates the window; ~10% is published during it (fresh items)
    fresh = rng.random(cfg.n_items) < 0.10
    publish = np.where(
        fresh,
        cfg.start_ms + rng.integers(0, cfg.days * DAY_MS, cfg.n_items),
        cfg.start_ms - rng.integers(1, 365, cfg.n_items) * DAY_MS,
    )
    words = ["alpha", "beta", "gamma", "delta", "omega", "nova", "terra", "luna", "sol", "aqua"]
    items = pd.DataFrame(
        {
            "item_id": _ids("i", cfg.n_items),
            "title": [f"{words[i % 10]} {cats[c]} #{i}" for i, c in enumerate(item_cat)],
            "category": [cats[c] for c in item_cat],
            "tags": [f"{cats[c]} {words[(i * 7) % 10]}" for i, c in enumerate(item_cat)],
            "publish_ts": publish.astype("int64"),
        }
    )
    tastes = rng.dirichlet(np.full(cfg.n_categories, cfg.taste_concentration), cfg.n_users)
    users = pd.DataFrame(
        {
            "user_id": _ids("u", cfg.n_users),
            "segment": rng.choice(["new", "casual", "core"], cfg.n_users, p=[0.2, 0.5, 0.3]),
            "device_type": rng.choice(list(DEVICE_TYPES), cfg.n_users, p=[0.6, 0.3, 0.1]),
            "geo_region": rng.choice(list(REGIONS), cfg.n_users),
            "signup_ts": (cfg.start_ms - rng.integers(1, 720, cfg.n_users) * DAY_MS).astype("int64"),
        }
    )
    return World(cfg, items, users, tastes, quality, item_cat)


def simulate(cfg: SimulatorConfig | None = None) -> World:
    """Build a world and run it for `cfg.days` days; returns the world with `.events`."""
    cfg = cfg or SimulatorConfig()
    world = build_world(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    tastes = world.tastes.copy()
    shifted = False
    n_items = cfg.n_items
    popularity = np.exp(world.item_quality)
    popularity /= popularity.sum()
    pos_weight = cfg.position_decay ** np.arange(cfg.slate_size)
    rows: list[tuple] = []
    uid = world.users["user_id"].to_numpy()
    iid = world.items["item_id"].to_numpy()
    devices = world.users["device_type"].to_numpy()
    cat_items = [np.flatnonzero(world.item_cat == c) for c in range(cfg.n_categories)]
    publish = world.items["publish_ts"].to_numpy()
    seq = 0

    def eid() -> str:
        nonlocal seq
        seq += 1
        return str(uuid.UUID(int=(cfg.seed << 96) | seq))

    for day in range(cfg.days):
        if cfg.shift_day is not None and day >= cfg.shift_day and not shifted:
            # a trend: every user's taste moves halfway toward one category, re-drawn around it
            trend = np.zeros(cfg.n_categories)
            trend[cfg.n_categories - 1] = 1.0
            fresh = rng.dirichlet(np.full(cfg.n_categories, cfg.taste_concentration), cfg.n_users)
            tastes = 0.5 * fresh + 0.5 * trend
            shifted = True
        day_start = cfg.start_ms + day * DAY_MS
        n_sessions = rng.poisson(cfg.sessions_per_user_day, cfg.n_users)
        for u in np.flatnonzero(n_sessions):
            for _ in range(int(n_sessions[u])):
                sid = eid()
                intent = rng.choice(cfg.n_categories, p=tastes[u]) if rng.random() < 0.85 else rng.integers(cfg.n_categories)
                t = day_start + int(rng.integers(0, DAY_MS - 3_600_000))
                device = devices[u] if rng.random() < 0.9 else rng.choice(list(DEVICE_TYPES))
                pages = 1 + rng.poisson(cfg.pages_per_session - 1)
                engaged_cats: list[int] = []
                for _page in range(pages):
                    page_ctx = PAGE_CONTEXTS[int(rng.integers(len(PAGE_CONTEXTS)))]
                    # the logging policy: popular items, items from the user's taste, and items
                    # like the session's recent clicks, shuffled (so logs carry learnable signal)
                    k = cfg.slate_size
                    taste_cat = rng.choice(cfg.n_categories, size=k // 2, p=tastes[u])
                    if engaged_cats:
                        taste_cat[: k // 4] = engaged_cats[-1]
                    cands = [int(rng.choice(cat_items[c])) for c in taste_cat if len(cat_items[c])]
                    cands += list(rng.choice(n_items, size=k, p=popularity))
                    slate = list(dict.fromkeys(c for c in cands if publish[c] <= t))[:k]
                    rng.shuffle(slate)
                    for pos, it in enumerate(slate):
                        rows.append((eid(), uid[u], iid[it], "impression", t, sid, pos, page_ctx, device, 0))
                    click_t = t
                    for pos, it in enumerate(slate):
                        c = int(world.item_cat[it])
                        rel = world.item_quality[it] + 3.0 * tastes[u, c] + (cfg.intent_strength if c == intent else 0.0)
                        p_click = pos_weight[pos] / (1.0 + np.exp(-(rel - 2.2)))
                        if rng.random() < p_click:
                            click_t += int(rng.integers(1_000, 20_000))
                            dwell = int(np.clip(rng.lognormal(np.log(4_000 + 9_000 * max(rel, 0.0)), 0.8), 200, 600_000))
                            rows.append((eid(), uid[u], iid[it], "click", click_t, sid, pos, page_ctx, device, dwell))
                            engaged_cats.append(c)
                            if rng.random() < 0.06 + 0.04 * max(rel - 2, 0):
                                rows.append((eid(), uid[u], iid[it], "share", click_t + 2_000, sid, pos, page_ctx, device, 0))
                            if rng.random() < 0.10:
                                rows.append((eid(), uid[u], iid[it], "add_to_cart", click_t + 3_000, sid, pos, page_ctx, device, 0))
                                if rng.random() < 0.5:
                                    delay = int(rng.integers(60_000, 48 * 3_600_000)) if rng.random() < 0.3 else 60_000
                                    rows.append((eid(), uid[u], iid[it], "purchase", click_t + delay, sid, pos, page_ctx, device, 0))
                            click_t += dwell
                        elif rng.random() < 0.08:
                            rows.append((eid(), uid[u], iid[it], "skip", t + 500, sid, pos, page_ctx, device, 0))
                    t = max(click_t, t) + int(rng.integers(5_000, 60_000))
    events = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "event_type", "timestamp", "session_id",
                                         "position", "page_context", "device_type", "dwell_time_ms"])
    events = _inject_bots(events, cfg, rng, iid)
    events = _inject_faults(events, cfg, rng)
    events["schema_version"] = SCHEMA_VERSION
    events["source"] = "simulator"
    events["received_at"] = _arrival_times(events["timestamp"].to_numpy(dtype="int64"), cfg, rng)
    world.events = events[EVENT_COLUMNS + ["received_at"]].sort_values("timestamp", kind="mergesort").reset_index(drop=True)
    log.info("simulated %s events for %s users, %s items over %s days", len(world.events), cfg.n_users, cfg.n_items, cfg.days)
    return world


def _arrival_times(ts: np.ndarray, cfg: SimulatorConfig, rng: np.random.Generator) -> np.ndarray:
    """When the platform received each event: 50 ms-5 s after it happened, hours later for late ones."""
    delay = rng.integers(50, 5_000, len(ts))
    late = rng.random(len(ts)) < cfg.late_rate
    delay[late] = rng.integers(3_600_000, 36 * 3_600_000, int(late.sum()))
    return np.maximum(ts, cfg.start_ms) + delay  # malformed timestamps still arrive at a real time


def _inject_bots(events: pd.DataFrame, cfg: SimulatorConfig, rng: np.random.Generator, item_ids: np.ndarray) -> pd.DataFrame:
    """Scripted sessions that click hundreds of items in minutes without reading any."""
    n_bots = int(rng.poisson(cfg.bot_sessions_per_day * cfg.days))
    if not n_bots:
        return events
    frames = []
    for b in range(n_bots):
        n = int(rng.integers(150, 400))
        start = cfg.start_ms + int(rng.integers(0, cfg.days * DAY_MS - 3_600_000))
        ts = start + np.sort(rng.integers(0, int(rng.integers(120_000, 540_000)), n))
        frames.append(pd.DataFrame({
            "event_id": [f"bot-{cfg.seed}-{b}-{i}" for i in range(n)], "user_id": f"bot{b:05d}",
            "item_id": rng.choice(item_ids, n), "event_type": "click", "timestamp": ts,
            "session_id": f"bot-session-{cfg.seed}-{b}", "position": rng.integers(0, cfg.slate_size, n),
            "page_context": "home_feed", "device_type": "desktop", "dwell_time_ms": rng.integers(0, 300, n),
        }))
    return pd.concat([events, *frames], ignore_index=True)


def _inject_faults(events: pd.DataFrame, cfg: SimulatorConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Add malformed rows, exact duplicates and client retries at the configured rates."""
    n = len(events)
    parts = [events]
    n_retry = int(round(n * cfg.retry_rate))
    if n_retry:
        retry = events.sample(n_retry, random_state=int(rng.integers(1 << 31))).copy()
        retry["event_id"] = [f"retry-{cfg.seed}-{i}" for i in range(n_retry)]
        retry["timestamp"] = retry["timestamp"] + rng.integers(1_000, 120_000, n_retry)
        parts.append(retry)
    n_bad = int(round(n * cfg.malformed_rate))
    if n_bad:
        bad = events.sample(n_bad, random_state=int(rng.integers(1 << 31))).copy()
        kinds = rng.integers(0, 5, n_bad)
        bad["event_id"] = [f"bad-{i}" for i in range(n_bad)]
        bad.loc[kinds == 0, "user_id"] = None
        bad.loc[kinds == 1, "event_type"] = "teleport"
        bad.loc[kinds == 2, "timestamp"] = -5
        bad.loc[kinds == 3, "dwell_time_ms"] = -1_000
        bad.loc[kinds == 4, "item_id"] = None
        parts.append(bad)
    n_dup = int(round(n * cfg.duplicate_rate))
    if n_dup:
        parts.append(events.sample(n_dup, random_state=int(rng.integers(1 << 31))))
    return pd.concat(parts, ignore_index=True)
