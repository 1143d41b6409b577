"""PSI drift by Evidently: quiet on a stationary world, loud after a taste shift; cross-checked by numpy."""
from __future__ import annotations

import numpy as np
import pytest

from ingestion.schema import DAY_MS
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
