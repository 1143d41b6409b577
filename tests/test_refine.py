"""Bronze → silver: deduplication, bot filtering, quarantine of every reject, counts that reconcile."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_contracts.schema import SCHEMA_VERSION
from ingestion.bots import BotConfig, bot_mask, bot_sessions
from ingestion.dedup import exact_duplicates, window_duplicates
from ingestion.refine import REJECT_SCHEMA, SILVER_SCHEMA, event_dates, refine_batch
from ingestion.simulator import SimulatorConfig, simulate

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
FAR_FUTURE = 2_000_000_000_000


def _event(eid: str, ts: int, user: str = "u1", item: str = "i1", etype: str = "click", session: str = "s1",
           dwell: int = 20_000) -> dict:
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": etype, "timestamp": ts,
            "session_id": session, "position": 0, "page_context": "home_feed", "device_type": "mobile",
            "dwell_time_ms": dwell, "schema_version": SCHEMA_VERSION, "source": "test"}


def test_window_duplicates_keep_the_first_and_respect_the_window() -> None:
    ev = pd.DataFrame([
        _event("a", T0), _event("b", T0 + 60_000),            # retry 1 min later: duplicate
        _event("c", T0 + 299_000),                              # still within 5 min of a: duplicate
        _event("d", T0 + 301_000),                              # 5 min 1 s after a: a new action
        _event("e", T0 + 60_000, item="i2"),                    # other item: not a duplicate
        _event("f", T0 + 60_000, session="s2"),                 # other session: not a duplicate
        _event("g", T0 + 10_000, etype="share", dwell=0),       # other event type: not a duplicate
    ])
    assert window_duplicates(ev, None, 300_000).tolist() == [False, True, True, False, False, False, False]
    assert not window_duplicates(ev, None, 0).any()


def test_prior_batches_win_and_late_events_are_caught_in_both_directions() -> None:
    prior = pd.DataFrame([_event("p", T0 + 100_000)])
    batch = pd.DataFrame([_event("late", T0 + 20_000),       # arrived later but happened 80 s before p: duplicate
                          _event("new", T0 + 500_000)])       # far from p: kept
    assert window_duplicates(batch, prior, 300_000).tolist() == [True, False]
    assert exact_duplicates(pd.DataFrame([_event("p", T0), _event("q", T0), _event("q", T0)]), prior).tolist() == \
        [True, False, True]


def test_bot_sessions_need_both_velocity_and_near_zero_dwell() -> None:
    rng = np.random.default_rng(0)
    bot = [_event(f"b{i}", T0 + i * 1_000, user="bot", session="sb", item=f"i{i}", dwell=int(rng.integers(0, 200)))
           for i in range(150)]   # 150 clicks in 150 s, dwell < 200 ms
    reader = [_event(f"r{i}", T0 + i * 1_000, user="fast", session="sf", item=f"i{i}", dwell=30_000)
              for i in range(150)]  # as fast, but long dwell (a bulk import, say)
    slow = [_event(f"s{i}", T0 + i * 60_000, user="slow", session="ss", item=f"i{i}", dwell=100)
            for i in range(150)]  # near-zero dwell but 1 click a minute: 10 per window
    ev = pd.DataFrame(bot + reader + slow)
    found = bot_sessions(ev, BotConfig(max_clicks=100, window_ms=600_000, max_median_dwell_ms=1_000))
    assert found["user_id"].tolist() == ["bot"]
    assert int(found["max_clicks_in_window"].iloc[0]) == 150 and "150 clicks within 600s" in found["reason"].iloc[0]
    mask, reasons = bot_mask(ev, found)
    assert mask.sum() == 150 and set(ev.loc[mask, "user_id"]) == {"bot"} and reasons[mask][0].startswith("bot_session")
    assert bot_sessions(ev, BotConfig(max_clicks=151)).empty  # thresholds are config
    assert bot_sessions(ev, BotConfig(enabled=False)).empty
    with pytest.raises(ValueError, match="max_clicks"):
        BotConfig(max_clicks=1)


def test_refine_reconciles_and_stores_every_reject_with_its_disposition() -> None:
    world = simulate(SimulatorConfig(n_users=80, n_items=120, n_categories=5, days=6, seed=3, bot_sessions_per_day=1.0))
    raw = world.events
    result = refine_batch(raw, ingest_date="all", run_id="run-1", now_ms=FAR_FUTURE)
    c = result.counts()
    assert result.reconciles() and c["in"] == len(raw)
    assert c["quarantined"] > 0 and c["duplicates"] > 0 and c["bot_filtered"] > 0  # the simulator injects all three
    assert result.duplicate_reasons["duplicate_within_window"] > 0 and result.duplicate_reasons["duplicate_event_id"] > 0
    by_kind = result.rejected["disposition"].value_counts().to_dict()
    assert by_kind == {k: v for k, v in {"contract": c["quarantined"], "duplicate": c["duplicates"],
                                         "bot": c["bot_filtered"]}.items() if v}
    assert list(result.rejected.columns) == REJECT_SCHEMA.names and list(result.accepted.columns) == SILVER_SCHEMA.names
    assert result.rejected["reasons"].str.len().min() > 0 and result.rejected["raw_payload"].str.startswith("{").all()
    assert (result.rejected["run_id"] == "run-1").all()
    # accepted: no bot user, no duplicate id, every accepted event id came from the input
    assert not result.accepted["user_id"].str.startswith("bot").any()
    assert result.accepted["event_id"].is_unique and set(result.accepted["event_id"]) <= set(raw["event_id"])
    assert set(result.accepted["event_id"]) | set(result.rejected["event_id"].dropna()) >= set(raw["event_id"].dropna())
    assert (result.accepted["event_date"] == event_dates(result.accepted["timestamp"].astype("int64"))).all()


def test_replaying_a_batch_against_its_own_output_changes_nothing() -> None:
    world = simulate(SimulatorConfig(n_users=40, n_items=60, n_categories=4, days=3, seed=9))
    first = refine_batch(world.events, ingest_date="d1", run_id="r1", now_ms=FAR_FUTURE)
    again = refine_batch(world.events, ingest_date="d1", run_id="r2", now_ms=FAR_FUTURE)
    cols = [c for c in SILVER_SCHEMA.names]
    pd.testing.assert_frame_equal(first.accepted[cols], again.accepted[cols])
    assert first.counts() == again.counts()
    # the same events arriving in a later batch are all duplicates of what is already in silver
    replay = refine_batch(world.events, ingest_date="d2", run_id="r3", prior=first.accepted, now_ms=FAR_FUTURE)
    assert len(replay.accepted) == 0 and replay.reconciles()
    assert replay.duplicates == len(world.events) - replay.quarantined - replay.bot_filtered


def test_event_dates_are_utc_days() -> None:
    assert event_dates(np.array([T0, T0 + 86_399_999, T0 + 86_400_000])).tolist() == ["2026-01-01", "2026-01-01",
                                                                                      "2026-01-02"]


def test_simulator_injects_late_retried_and_bot_events() -> None:
    world = simulate(SimulatorConfig(n_users=60, n_items=80, n_categories=4, days=4, seed=5, bot_sessions_per_day=1.0,
                                     late_rate=0.01))
    ev = world.events
    delay = ev["received_at"] - ev["timestamp"].clip(lower=SimulatorConfig().start_ms)
    assert (delay > 0).all() and (delay >= 3_600_000).mean() > 0.005
    assert ev["event_id"].str.startswith("retry-").any() and ev["user_id"].fillna("").str.startswith("bot").any()
