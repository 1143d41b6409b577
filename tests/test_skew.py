"""Impression log (real Redis stream) and the train/serve skew check."""
from __future__ import annotations

import json

import pandas as pd

from features.registry import BY_NAME
from monitoring.skew import checked_features, recompute_offline, served_feature_frame, skew_report
from serving.impressions import ImpressionLogger, impression_record, read_impressions

T0 = 1_767_225_600_000
DAY = 86_400_000


def _snaps():
    users = pd.DataFrame({"user_id": ["u1", "u1"], "feature_ts": [T0 + DAY, T0 + 2 * DAY],
                          "user_clicks_7d": [2.0, 9.0], "user_impressions_30d": [10.0, 30.0], "user_ctr_30d": [0.1, 0.3],
                          "user_category_clicks_30d": ['{"books": 2.0}', '{"books": 9.0}'],
                          "user_avg_session_length_7d": [3.0, 4.0],
                          "user_category_decayed_30d": ['{"books": 1.5}', '{"books": 8.0}'],
                          "signup_ts": [T0 - 10 * DAY] * 2})
    items = pd.DataFrame({"item_id": ["i1", "i1"], "feature_ts": [T0 + DAY, T0 + 2 * DAY], "item_clicks_7d": [1.0, 5.0],
                          "item_impressions_7d": [4.0, 8.0], "item_ctr_7d": [0.2, 0.4], "category": ["books"] * 2,
                          "publish_ts": [T0 - DAY] * 2})
    catalog = pd.DataFrame({"item_id": ["i1", "i2"], "category": ["books", "music"], "publish_ts": [T0 - DAY, T0]})
    return users, items, catalog


def test_recompute_uses_the_snapshot_before_the_request_never_a_later_one() -> None:
    users, items, catalog = _snaps()
    logged = pd.DataFrame({"user_id": ["u1", "u1", "u9"], "item_id": ["i1", "i1", "i2"],
                           "request_ts": [T0 + DAY + 5, T0 + 2 * DAY, T0 + 3 * DAY], "device_type": ["mobile"] * 3})
    off = recompute_offline(logged, users, items, catalog)
    assert off["user_clicks_7d"].tolist()[:2] == [2.0, 2.0]  # at exactly day 2 midnight the day-2 snapshot is not yet used
    assert off["item_clicks_7d"].tolist()[:2] == [1.0, 1.0]
    assert off["user_account_age_days"].iloc[0] > 11.0
    assert off["user_clicks_7d"].iloc[2] == BY_NAME["user_clicks_7d"].default  # unknown user: registry default


def test_skew_report_finds_the_feature_that_differs() -> None:
    users, items, catalog = _snaps()
    logged = pd.DataFrame({"user_id": ["u1"] * 4, "item_id": ["i1"] * 4, "request_ts": [T0 + 2 * DAY + 1] * 4,
                           "device_type": ["mobile"] * 4})
    off = recompute_offline(logged, users, items, catalog)
    served = off.copy()
    served.loc[0, "item_ctr_7d"] = 0.99  # the server used a stale item value on one row of four
    report = skew_report(served, off, checked_features(), threshold=0.1)
    rates = dict(zip(report.per_feature["feature"], report.per_feature["mismatch_rate"]))
    assert rates["item_ctr_7d"] == 0.25 and sum(rates.values()) == 0.25
    assert not report.passed and report.worst == ("item_ctr_7d", 0.25)
    assert skew_report(off, off, checked_features()).passed
    assert "embedding_affinity" not in checked_features() and "session_length" not in checked_features()


def test_impressions_round_trip_through_a_real_stream(redis_client) -> None:
    logger = ImpressionLogger(redis_client, stream="test:impressions")
    for k in range(3):
        response = {"request_id": f"r{k}", "ranked_items": [{"item_id": "i1", "score": 0.9, "rank": 1},
                                                            {"item_id": "i2", "score": 0.5, "rank": 2}],
                    "model_version": 3, "feature_version": "v1", "served_by": "two_stage"}
        request = {"user_id": "u1", "session_id": "s1", "device_type": "mobile"}
        logger(impression_record(response, request, T0 + k, {"i1": {"user_clicks_7d": 2.0}, "i2": {"user_clicks_7d": 2.0}}))
    logger.flush()
    assert logger.stats() == {"logged": 3, "dropped": 0, "queued": 0}
    rows, last = read_impressions(redis_client, stream="test:impressions")
    assert len(rows) == 6 and rows["position"].tolist() == [0, 1] * 3 and set(rows["model_version"]) == {"3"}
    assert served_feature_frame(rows)["user_clicks_7d"].tolist() == [2.0] * 6
    more, last2 = read_impressions(redis_client, after_id=last, stream="test:impressions")
    assert more.empty and last2 == last  # reading after the last id returns nothing new
    assert json.loads(rows["features"].iloc[0]) == {"user_clicks_7d": 2.0}
    logger.close()


def test_clock_or_version_mismatch_is_told_apart_from_skew() -> None:
    """Requests stamped before the snapshot they were served from (the README's example once did) or without a
    timestamp (the server's wall clock, months after the data) are a clock/version mismatch, not skew."""
    from monitoring.skew import clock_alignment, served_snapshot_ts

    users, items, catalog = _snaps()
    served_at = T0 + 2 * DAY  # the server read the day-2 snapshot
    version = f"u3-i3-{served_at}"
    assert served_snapshot_ts(version) == served_at and served_snapshot_ts(None) != served_snapshot_ts(None)
    ts = [served_at + 1] * 6 + [T0 + DAY + 5, T0 + 300 * DAY]  # 6 aligned, one early clock, one wall clock
    logged = pd.DataFrame({"user_id": ["u1"] * 8, "item_id": ["i1"] * 8, "request_ts": ts, "device_type": ["mobile"] * 8,
                           "feature_version": [version] * 8})
    served = recompute_offline(logged.assign(request_ts=served_at + 1), users, items, catalog)  # what the server used
    offline = recompute_offline(logged, users, items, catalog)
    alignment = clock_alignment(logged, users["feature_ts"])
    assert alignment.tolist() == ["aligned"] * 6 + ["request_before_snapshot", "request_past_max_age"]
    naive = skew_report(served, offline, checked_features(), threshold=0.01)
    assert naive.verdict == "skew"  # without the clock check: 2 of 8 rows "skewed"
    report = skew_report(served, offline, checked_features(), threshold=0.01, alignment=alignment)
    assert report.verdict == "clock_version_mismatch" and not report.passed
    assert report.clock_mismatch == {"request_before_snapshot": 1, "request_past_max_age": 1}
    assert report.aligned_rows == 6 and report.per_feature["mismatches"].sum() == 0
    # real skew among the aligned rows is still skew
    served.loc[0, "item_ctr_7d"] = 0.99
    assert skew_report(served, offline, checked_features(), threshold=0.01, alignment=alignment).verdict == "skew"
    # a server that was behind (a newer snapshot existed) is named as such
    behind = logged.assign(feature_version=f"u3-i3-{T0 + DAY}", request_ts=served_at + 1)
    assert set(clock_alignment(behind, users["feature_ts"])) == {"served_older_snapshot"}
    # clocks that agree: ok
    ok = skew_report(served.iloc[1:6].reset_index(drop=True), offline.iloc[1:6].reset_index(drop=True),
                     alignment=alignment.iloc[1:6].reset_index(drop=True))
    assert ok.verdict == "ok" and ok.passed
