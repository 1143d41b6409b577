"""PSI drift by Evidently: quiet on a stationary world, loud after a taste shift; cross-checked by numpy."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_contracts.schema import DAY_MS
from ingestion.simulator import SimulatorConfig, simulate
from monitoring.drift import drift_report, event_drift_frame, psi


def _halves(shift_day: int | None):
    world = simulate(SimulatorConfig(n_users=200, n_items=150, n_categories=5, days=8, seed=5, shift_day=shift_day,
                                     malformed_rate=0, duplicate_rate=0))
    ev = world.events
    cut = world.config.start_ms + 4 * DAY_MS
    ref = event_drift_frame(ev[ev["timestamp"] < cut], world.items)
    cur = event_drift_frame(ev[ev["timestamp"] >= cut], world.items)
    cols = [c for c in ref.columns if c.startswith("cat_share_")] + ["clicks", "ctr", "hour_of_day"]
    return ref, cur, cols


def test_stationary_world_is_ok_and_shift_acts(tmp_path) -> None:
    ref, cur, cols = _halves(None)
    quiet = drift_report(ref, cur, cols, html_path=tmp_path / "quiet.html")
    assert quiet.status == "ok", quiet.psi
    ref, cur, cols = _halves(4)
    loud = drift_report(ref, cur, cols, html_path=tmp_path / "loud.html")
    assert loud.status == "act" and loud.drifted_features, loud.psi
    assert any(c.startswith("cat_share_") for c in loud.drifted_features)
    assert (tmp_path / "loud.html").stat().st_size > 10_000
    meta = loud.as_metadata()
    assert meta["n_current"] == len(cur) and "status" not in meta


def test_evidently_psi_agrees_with_numpy() -> None:
    rng = np.random.default_rng(0)
    import pandas as pd

    ref = pd.DataFrame({"x": rng.normal(0, 1, 5000)})
    cur = pd.DataFrame({"x": rng.normal(0.5, 1, 5000)})
    ev = drift_report(ref, cur, ["x"]).psi["x"]
    assert ev == pytest.approx(psi(ref["x"].to_numpy(), cur["x"].to_numpy()), rel=0.35)
    assert psi(ref["x"].to_numpy(), ref["x"].to_numpy()) < 0.01


def test_empty_window_is_a_clear_error() -> None:
    import pandas as pd

    with pytest.raises(ValueError, match="empty"):
        event_drift_frame(pd.DataFrame(columns=["session_id", "user_id", "item_id", "event_type", "timestamp",
                                                "device_type", "dwell_time_ms"]), pd.DataFrame({"item_id": [], "category": []}))


def test_ranker_psi_acts_on_data_features_and_only_reports_clock_driven_ones() -> None:
    import json

    import pandas as pd

    from features.registry import ranker_feature_names
    from monitoring.drift import feature_statuses, ranker_feature_drift, served_feature_window

    rng = np.random.default_rng(1)
    names = ranker_feature_names()
    ref = pd.DataFrame({n: rng.normal(0, 1, 3000) for n in names})
    cur = pd.DataFrame({n: rng.normal(0, 1, 3000) for n in names})
    cur["day_of_week"] = ref["day_of_week"] + 5.0  # a later window has other weekdays: not drift
    quiet = ranker_feature_drift(ref, cur)
    assert quiet.status == "ok" and quiet.psi["day_of_week"] > 1.0
    assert feature_statuses(quiet)["day_of_week"] == "info" and feature_statuses(quiet)["user_ctr_30d"] == "ok"
    cur["user_ctr_30d"] = cur["user_ctr_30d"] + 1.0  # a real shift in a data feature
    loud = ranker_feature_drift(ref, cur)
    assert loud.status == "act" and loud.drifted_features == ["user_ctr_30d"]
    # the serving window: shown two-stage answers only, the last days of the log
    logged = pd.DataFrame({"request_ts": [0, 3 * 86_400_000, 3 * 86_400_000, 3 * 86_400_000],
                           "features": [json.dumps({"user_ctr_30d": v}) for v in (0.1, 0.2, 0.3, 0.4)],
                           "shadow": [False, False, True, False],
                           "served_by": ["two_stage", "two_stage", "two_stage", "popularity_fallback:no_model"]})
    assert served_feature_window(logged, recent_days=2.0)["user_ctr_30d"].tolist() == [0.2]


def test_small_windows_and_cut_sessions_do_not_read_as_drift(tmp_path) -> None:
    """A stationary world, windows as feature_drift takes them (training days vs the newest 2 days): cutting
    by event time truncates the sessions on the edges, and ~130 sessions carry ~0.08 PSI of pure noise."""
    from monitoring.drift import psi_noise_floor, whole_sessions

    world = simulate(SimulatorConfig(n_users=150, n_items=200, days=10, seed=3, malformed_rate=0, duplicate_rate=0))
    ev = world.events
    ev = ev[ev["session_id"].notna() & ev["item_id"].notna()]
    end = int(ev["timestamp"].max())
    train_end, recent = end - 4 * DAY_MS, end - 2 * DAY_MS
    cols = ["clicks", "impressions", "ctr", "hour_of_day", "mean_dwell_s"]
    # whole sessions: every event of a session that starts in the window and has ended
    sess = whole_sessions(ev, recent, end)
    spans = ev.groupby("session_id")["timestamp"].agg(["min", "max"])
    kept = spans.loc[sess["session_id"].unique()]
    assert (kept["min"] >= recent).all() and (kept["max"] <= end - 30 * 60 * 1000).all()
    assert len(sess) == int(ev["session_id"].isin(kept.index).sum())  # no session cut short
    # the noise floor: about (bins - 1)(1/n + 1/m), and what two same-distribution samples really show
    rng = np.random.default_rng(0)
    draws = [psi(rng.normal(size=600), rng.normal(size=130)) for _ in range(200)]
    assert psi_noise_floor(600, 130) == pytest.approx(np.mean(draws), rel=0.35)
    ref = event_drift_frame(whole_sessions(ev, int(ev["timestamp"].min()), train_end), world.items)
    cur = event_drift_frame(sess, world.items)
    corrected = drift_report(ref, cur, cols, html_path=tmp_path / "q.html")
    assert corrected.status == "ok", (corrected.psi, corrected.noise_floor)
    assert corrected.as_metadata()["psi_noise_floor"] == pytest.approx(psi_noise_floor(ref["user_id"].nunique(), cur["user_id"].nunique()), abs=1e-5)
    # a real shift still acts through the floor
    shifted = simulate(SimulatorConfig(n_users=150, n_items=200, days=10, seed=3, shift_day=8, malformed_rate=0,
                                       duplicate_rate=0)).events
    shifted = shifted[shifted["session_id"].notna() & shifted["item_id"].notna()]
    ref_s = event_drift_frame(whole_sessions(shifted, int(shifted["timestamp"].min()), train_end), world.items)
    cur_s = event_drift_frame(whole_sessions(shifted, recent, end), world.items)
    share_cols = [c for c in cur_s.columns if c.startswith("cat_share_") and c in ref_s.columns]
    loud = drift_report(ref_s, cur_s, share_cols + cols)
    assert loud.status == "act" and any(c.startswith("cat_share_") for c in loud.drifted_features), loud.psi


def _window_verdict(events, items, train_start: int, train_end: int, tmp_path, name: str):
    """feature_drift's behaviour verdict on these events (same window rule, same deciding columns)."""
    from monitoring.drift import CYCLICAL_FEATURES, behaviour_windows

    windows = behaviour_windows(events, train_start, train_end, recent_days=2.0)
    ref, cur = event_drift_frame(windows.reference, items), event_drift_frame(windows.current, items)
    cols = [c for c in ref.columns if c in cur.columns and c not in ("session_id", "user_id")]
    deciding = cols if windows.aligned else [c for c in cols if c not in CYCLICAL_FEATURES]
    return drift_report(ref, cur, cols, html_path=tmp_path / f"{name}.html", status_columns=deciding,
                        min_rows=300), windows


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stationary_worlds_read_ok_at_every_window_and_shifted_ones_act(seed: int, tmp_path) -> None:
    """Windows end mid-day and at midnight (a partial last day once read hour_of_day PSI 4.4): a stationary
    world is ok at each, a taste shift acts once the window is past it; the HTML marks what the status counts."""
    config = dict(n_users=300, n_items=200, n_categories=6, days=13, seed=seed, malformed_rate=0, duplicate_rate=0)
    for shift_day, expected in ((None, "ok"), (8, "act")):
        world = simulate(SimulatorConfig(**config, shift_day=shift_day))
        ev = world.events[world.events["session_id"].notna() & world.events["item_id"].notna()]
        start = world.config.start_ms
        train_end = start + 8 * DAY_MS - 1
        for end_h in (10 * 24 + 5, 11 * 24, 12 * 24 + 13, 13 * 24):  # partial last days and whole ones
            events = ev[ev["timestamp"] <= start + end_h * 3_600_000]
            result, windows = _window_verdict(events, world.items, start, train_end, tmp_path, f"{seed}-{end_h}")
            where = (seed, shift_day, end_h, windows.aligned, result.n_current)
            assert result.status == expected, (where, result.psi, result.noise_floor)
            assert result.report_drifted == result.drifted_features, where  # the report says what the status says
            if expected == "act":
                assert any(c.startswith("cat_share_") for c in result.drifted_features), (where, result.psi)
            else:
                assert result.psi["hour_of_day"] < 0.25 + result.noise_floor or not windows.aligned, where


def test_too_few_sessions_is_insufficient_data_never_act(tmp_path) -> None:
    world = simulate(SimulatorConfig(n_users=40, n_items=60, n_categories=4, days=6, seed=4, shift_day=3,
                                     malformed_rate=0, duplicate_rate=0))
    ev = world.events[world.events["session_id"].notna() & world.events["item_id"].notna()]
    start = world.config.start_ms
    result, _ = _window_verdict(ev, world.items, start, start + 3 * DAY_MS - 1, tmp_path, "small")
    assert result.status == "insufficient_data" and result.drifted_features == [] and result.report_drifted == []
    assert "fewer than 300" in result.notes[-1]


def test_straggler_events_after_the_last_full_day_do_not_empty_the_newest_window(tmp_path) -> None:
    """A few late events a day or two after the log's last full day (sessions crossing midnight, a skewed
    clock) once anchored the newest window on a nearly empty day: a shifted world read 27 sessions and
    insufficient_data. The window ends at the newest day with real traffic; the stragglers are named."""
    world = simulate(SimulatorConfig(n_users=300, n_items=200, n_categories=6, days=13, seed=2, shift_day=8,
                                     malformed_rate=0, duplicate_rate=0))
    ev = world.events[world.events["session_id"].notna() & world.events["item_id"].notna()]
    start = world.config.start_ms
    late = ev.tail(3).assign(timestamp=lambda d: d["timestamp"] + 2 * DAY_MS,
                             session_id=lambda d: d["session_id"] + "-late")
    clean, _ = _window_verdict(ev, world.items, start, start + 8 * DAY_MS - 1, tmp_path, "clean")
    with_late, windows = _window_verdict(pd.concat([ev, late]), world.items, start, start + 8 * DAY_MS - 1,
                                         tmp_path, "late")
    assert clean.status == "act" and with_late.status == "act", (with_late.n_current, with_late.notes)
    assert with_late.n_current == clean.n_current and with_late.psi == pytest.approx(clean.psi)
    clean_windows = _window_verdict(ev, world.items, start, start + 8 * DAY_MS - 1, tmp_path, "again")[1]
    named = [int(n.split()[0]) for n in windows.notes if "straggler events" in n]
    before = [int(n.split()[0]) for n in clean_windows.notes if "straggler events" in n] or [0]
    assert named == [before[0] + 3], (windows.notes, clean_windows.notes)  # the simulator's own midnight tails too
