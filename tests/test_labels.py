"""Labels: attribution to the latest impression within the window, only once the window has closed."""
from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from data_contracts.schema import HOUR_MS
from ingestion.simulator import START_MS
from ingestion.labels import (LABEL_COLUMNS, LabelConfig, build_labels, engagement_score, engagement_scores)

T0 = START_MS
AS_OF = T0 + 100 * HOUR_MS
WINDOW = 72 * HOUR_MS
_ids = itertools.count()


def ev(event_type: str, user: str, item: str, ts: int, dwell: int | None = 0, session: str = "s1",
       position: int | None = 0) -> dict:
    return {"event_id": f"e{next(_ids):04d}", "user_id": user, "item_id": item, "event_type": event_type,
            "timestamp": ts, "session_id": session, "position": position, "page_context": "home_feed",
            "device_type": "mobile", "dwell_time_ms": dwell, "schema_version": 1, "source": "test"}


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).sort_values("timestamp", kind="mergesort").reset_index(drop=True)


def by_id(labels: pd.DataFrame) -> dict[str, pd.Series]:
    return {row["event_id"]: row for _, row in labels.iterrows()}


def test_engagement_score_weights() -> None:
    assert engagement_score("purchase", None) == 1.0
    assert engagement_score("share", 0) == 0.8
    assert engagement_score("click", 40_000) == 0.6
    assert engagement_score("click", 30_000) == 0.6
    assert engagement_score("click", 29_999) == 0.3
    assert engagement_score("click", 5_000) == 0.3
    assert engagement_score("click", 4_999) == 0.1
    assert engagement_score("click", None) == 0.1
    assert engagement_score("click", float("nan")) == 0.1 and engagement_score("click", pd.NA) == 0.1
    assert engagement_score("skip", 0) == -0.1
    assert engagement_score("impression", 0) == 0.0 and engagement_score("add_to_cart", 0) == 0.0


def test_vectorized_scores_match_the_scalar_definition() -> None:
    types = ["purchase", "share", "click", "skip", "impression", "add_to_cart", "teleport"]
    dwells = [None, -1, 0, 4_999, 5_000, 29_999, 30_000, 600_000]
    grid = [(t, d) for t in types for d in dwells]
    vec = engagement_scores(pd.Series([t for t, _ in grid]), pd.Series([d for _, d in grid], dtype="Float64"))
    assert vec.tolist() == [engagement_score(t, d) for t, d in grid]


@pytest.fixture(scope="module")
def hand_built() -> tuple[dict[str, dict], pd.DataFrame]:
    rows = {
        "click40": ev("impression", "u1", "i1", T0),
        "purchase50h": ev("impression", "u1", "i2", T0),
        "purchase80h": ev("impression", "u1", "i3", T0),
        "open": ev("impression", "u2", "i1", AS_OF - 10 * HOUR_MS),
        "shown_first": ev("impression", "u3", "i1", T0),
        "shown_again": ev("impression", "u3", "i1", T0 + HOUR_MS),
        "skipped": ev("impression", "u4", "i1", T0),
        "ignored": ev("impression", "u5", "i1", T0),
        "edge_in": ev("impression", "u6", "i1", T0),
        "edge_out": ev("impression", "u6", "i2", T0),
    }
    engagements = [
        ev("click", "u1", "i1", T0 + 1_000, dwell=40_000),
        ev("click", "u1", "i2", T0 + 2_000, dwell=40_000),
        ev("purchase", "u1", "i2", T0 + 50 * HOUR_MS),
        ev("purchase", "u1", "i3", T0 + 80 * HOUR_MS),
        ev("click", "u2", "i1", AS_OF - 9 * HOUR_MS, dwell=40_000),
        ev("click", "u3", "i1", T0 + 2 * HOUR_MS, dwell=10_000),
        ev("skip", "u4", "i1", T0 + 500),
        ev("click", "u5", "i1", T0 - 1_000, dwell=40_000),   # before the impression: not attributable
        ev("click", "u9", "i1", T0 + 1_000, dwell=40_000),   # another user: not this impression's
        ev("purchase", "u6", "i1", T0 + WINDOW - 1),        # last millisecond of the window
        ev("purchase", "u6", "i2", T0 + WINDOW),            # the window is half-open: just outside
        ev("purchase", "u1", "i1", AS_OF + HOUR_MS),        # after as_of: unknown yet
    ]
    return rows, frame(list(rows.values()) + engagements)


def test_hand_built_labels(hand_built) -> None:
    rows, events = hand_built
    labels = build_labels(events, as_of_ms=AS_OF)
    assert list(labels.columns) == LABEL_COLUMNS
    got = by_id(labels)
    lab = {name: got[r["event_id"]] for name, r in rows.items() if r["event_id"] in got}

    assert "open" not in lab  # window not closed by as_of: not labeled yet
    assert len(labels) == len(rows) - 1
    assert (lab["click40"]["label"], lab["click40"]["label_binary"], lab["click40"]["n_engagements"]) == (0.6, 1, 1)
    # click 0.6 + purchase 1.0 fifty hours later, inside 72 h: counted, capped at 1.0
    assert (lab["purchase50h"]["label"], lab["purchase50h"]["n_engagements"]) == (1.0, 2)
    late = lab["purchase80h"]  # the purchase came 80 h after the impression: outside the window
    assert (late["label"], late["label_binary"], late["n_engagements"]) == (0.0, 0, 0)
    # the same item shown twice: the click goes to the latest impression before it
    assert (lab["shown_again"]["label"], lab["shown_again"]["n_engagements"]) == (0.3, 1)
    assert (lab["shown_first"]["label"], lab["shown_first"]["n_engagements"]) == (0.0, 0)
    assert (lab["skipped"]["label"], lab["skipped"]["label_binary"]) == (-0.1, 0)
    assert (lab["ignored"]["label"], lab["ignored"]["n_engagements"]) == (0.0, 0)
    assert lab["edge_in"]["label"] == 1.0 and lab["edge_out"]["label"] == 0.0


def test_label_row_carries_the_impression_context(hand_built) -> None:
    rows, events = hand_built
    labels = build_labels(events, as_of_ms=AS_OF)
    row = labels[labels["event_id"] == rows["click40"]["event_id"]].iloc[0]
    imp = rows["click40"]
    assert (row["user_id"], row["item_id"], row["session_id"], row["timestamp"], row["position"],
            row["device_type"], row["page_context"]) == (imp["user_id"], imp["item_id"], imp["session_id"],
                                                          imp["timestamp"], imp["position"], imp["device_type"],
                                                          imp["page_context"])
    assert labels["timestamp"].dtype == np.int64 and labels["label"].dtype == np.float64
    assert labels["label_binary"].dtype == np.int64 and labels["n_engagements"].dtype == np.int64
    assert labels["timestamp"].is_monotonic_increasing


def test_as_of_decides_which_windows_are_closed(hand_built) -> None:
    rows, events = hand_built
    open_id = rows["open"]["event_id"]
    later = build_labels(events, as_of_ms=AS_OF + 100 * HOUR_MS)
    assert open_id in set(later["event_id"])
    assert later.set_index("event_id").loc[open_id, "label"] == 0.6
    assert build_labels(events, as_of_ms=T0 + WINDOW - 1).empty  # nothing has closed yet
    assert list(build_labels(events, as_of_ms=T0).columns) == LABEL_COLUMNS


def test_threshold_and_window_come_from_config(hand_built) -> None:
    rows, events = hand_built
    strict = by_id(build_labels(events, as_of_ms=AS_OF, config=LabelConfig(positive_threshold=0.7)))
    assert strict[rows["click40"]["event_id"]]["label_binary"] == 0
    short = by_id(build_labels(events, as_of_ms=AS_OF, config=LabelConfig(attribution_window_ms=24 * HOUR_MS)))
    assert short[rows["purchase50h"]["event_id"]]["label"] == 0.6  # the purchase falls outside 24 h


def test_movielens_shape_impression_then_click_one_second_later() -> None:
    imp = ev("impression", "ml1", "m1", T0, session="ml-s", position=None)
    rows = [imp, ev("click", "ml1", "m1", T0 + 1_000, dwell=None, session="ml-s"),
            ev("impression", "ml1", "m2", T0, session="ml-s", position=None),
            ev("skip", "ml1", "m2", T0 + 1_000, session="ml-s")]
    labels = build_labels(frame(rows), as_of_ms=AS_OF)
    assert labels["label"].tolist() == [0.1, -0.1]
    assert labels["position"].isna().all()


def test_missing_columns_raise() -> None:
    with pytest.raises(ValueError, match="item_id"):
        build_labels(pd.DataFrame({"event_id": [], "user_id": [], "event_type": [], "timestamp": []}), AS_OF)


def brute_force(events: pd.DataFrame, as_of: int, cfg: LabelConfig) -> dict[str, tuple[float, int]]:
    """The definition, one engagement at a time (slow, obviously right)."""
    window = cfg.attribution_window_ms
    ev_ = events[events["timestamp"] < as_of].reset_index(drop=True)
    shown: dict[tuple[str, str], list[tuple[int, int, str]]] = defaultdict(list)
    for i, r in ev_[ev_["event_type"] == "impression"].iterrows():
        shown[(r["user_id"], r["item_id"])].append((r["timestamp"], i, r["event_id"]))
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for _, r in ev_[ev_["event_type"].isin(["click", "add_to_cart", "purchase", "share", "skip"])].iterrows():
        cands = [c for c in shown.get((r["user_id"], r["item_id"]), []) if c[0] <= r["timestamp"] < c[0] + window]
        if cands:
            target = max(cands)[2]
            total[target] += engagement_score(r["event_type"], r["dwell_time_ms"])
            count[target] += 1
    out = {}
    for _, r in ev_[(ev_["event_type"] == "impression") & (ev_["timestamp"] + window <= as_of)].iterrows():
        out[r["event_id"]] = (round(min(max(total[r["event_id"]], -0.1), 1.0), 6), count[r["event_id"]])
    return out


def test_matches_the_definition_on_simulated_events(small_world) -> None:
    events = small_world.events
    events = events[events["user_id"].notna() & events["item_id"].notna() & (events["timestamp"] > 0)]
    events = events.drop_duplicates("event_id").reset_index(drop=True)
    cfg = LabelConfig(attribution_window_ms=6 * HOUR_MS)  # short, so windows close across the simulated days
    as_of = int(events["timestamp"].quantile(0.8))
    labels = build_labels(events, as_of_ms=as_of, config=cfg)
    expected = brute_force(events, as_of, cfg)
    got = {eid: (lab, n) for eid, lab, n in zip(labels["event_id"], labels["label"], labels["n_engagements"])}
    assert got == expected
    assert labels["label_binary"].sum() > 0 and (labels["label"] < 0).sum() > 0


def test_negative_kinds_and_sampled_easy_negatives() -> None:
    from ingestion.labels import label_summary

    t0 = 1_767_225_600_000
    rows = []
    for u in range(4):
        for k in range(3):
            rows.append({"event_id": f"imp-{u}-{k}", "user_id": f"u{u}", "item_id": f"i{k}", "event_type": "impression",
                         "timestamp": t0 + k * 1000, "session_id": f"s{u}", "position": k, "dwell_time_ms": 0})
        rows.append({"event_id": f"clk-{u}", "user_id": f"u{u}", "item_id": "i0", "event_type": "click",
                     "timestamp": t0 + 5000, "session_id": f"s{u}", "position": 0, "dwell_time_ms": 40_000})
    events = pd.DataFrame(rows)
    catalog = [f"i{k}" for k in range(50)]
    as_of = t0 + 100 * 3_600_000
    plain = build_labels(events, as_of, LabelConfig())
    assert set(plain["negative_kind"]) == {"positive", "hard"} and (plain["negative_kind"] == "positive").sum() == 4
    two = build_labels(events, as_of, LabelConfig(easy_negative_ratio=2.0), catalog_item_ids=catalog)
    easy = two[two["negative_kind"] == "easy"]
    assert len(easy) == 8 and (easy["label"] == 0.0).all() and (easy["label_binary"] == 0).all()
    assert not easy["item_id"].isin(["i0", "i1", "i2"]).any()  # never an item the user was shown
    assert easy["position"].isna().all() and easy.groupby("user_id").size().to_dict() == {f"u{u}": 2 for u in range(4)}
    again = build_labels(events, as_of, LabelConfig(easy_negative_ratio=2.0), catalog_item_ids=catalog)
    pd.testing.assert_frame_equal(two, again)  # seeded
    other = build_labels(events, as_of, LabelConfig(easy_negative_ratio=2.0, seed=99), catalog_item_ids=catalog)
    assert set(other.loc[other["negative_kind"] == "easy", "item_id"]) != set(easy["item_id"])
    half = build_labels(events, as_of, LabelConfig(easy_negative_ratio=0.5), catalog_item_ids=catalog)
    assert 0 <= (half["negative_kind"] == "easy").sum() <= 4
    tiny = build_labels(events, as_of, LabelConfig(easy_negative_ratio=3.0), catalog_item_ids=["i0", "i1", "i2"])
    assert (tiny["negative_kind"] == "easy").sum() == 0  # every catalog item was shown: nothing to sample
    summary = label_summary(two)
    assert summary["rows"] == len(two) == summary["positive_rows"] + summary["hard_rows"] + summary["easy_rows"]


def test_labels_do_not_depend_on_the_order_events_are_read_in(small_world) -> None:
    """Silver is read one day file after another in whatever order the Delta log lists them (random file names):
    the same events must give the same labels, easy negatives included, or every build trains on a different
    sample and the gate's verdict moves between identical runs."""
    events = small_world.events
    events = events[events["user_id"].notna() & events["item_id"].notna() & (events["timestamp"] > 0)]
    events = events.drop_duplicates("event_id").reset_index(drop=True)
    catalog = sorted(events["item_id"].unique())
    cfg = LabelConfig(easy_negative_ratio=2.0, negative_popularity_alpha=0.5)
    as_of = int(events["timestamp"].max()) + 1
    day = events["timestamp"] // (24 * HOUR_MS)
    days_reversed = events.iloc[np.argsort(-day.to_numpy(), kind="stable")].reset_index(drop=True)
    shuffled = events.sample(frac=1.0, random_state=3).reset_index(drop=True)
    expected = build_labels(events, as_of, cfg, catalog_item_ids=catalog)
    assert (expected["negative_kind"] == "easy").sum() > 100
    for other in (days_reversed, shuffled):
        got = build_labels(other, as_of, cfg, catalog_item_ids=catalog[::-1])
        pd.testing.assert_frame_equal(got, expected)


def test_spark_labels_leave_out_forgotten_users_as_the_pandas_engine_does(small_world) -> None:
    """labels_on_spark with an exclusion mask: the forgotten users' events leave in the JVM (one mask call per
    distinct user, an anti-join), the popularity counts come from the JVM, and the rows equal build_labels on the
    kept events (catalog negatives by popularity included)."""
    from compliance.exclusion import forgotten_mask, user_hash
    from data_contracts.schema import EVENT_COLUMNS
    from ingestion.labels_spark import labels_on_spark
    from lake.spark import spark_session

    events = small_world.events
    events = events[events["user_id"].notna() & events["item_id"].notna() & (events["timestamp"] > 0)]
    events = events.drop_duplicates("event_id").reset_index(drop=True)[EVENT_COLUMNS]
    key = b"k" * 32
    gone = sorted(events["user_id"].unique())[:7]
    hashes = frozenset(user_hash(key, u) for u in gone)
    cfg = LabelConfig(attribution_window_ms=6 * HOUR_MS, easy_negative_ratio=1.0, negative_popularity_alpha=1.0)
    kept = events[~events["user_id"].isin(gone)]
    catalog = sorted(events["item_id"].unique())
    expected = build_labels(kept, as_of_ms=int(kept["timestamp"].max()) + 1, config=cfg, catalog_item_ids=catalog)
    spark = spark_session("local[2]")
    out = labels_on_spark(spark, spark.createDataFrame(events.astype({"position": "float64",
                                                                      "dwell_time_ms": "float64"})),
                          cfg, catalog, lambda users: forgotten_mask(users, hashes, key).to_numpy())
    got = out.frame.toPandas()
    out.frame.unpersist()
    assert out.forgotten == len(events) - len(kept) > 0 and out.n_events == len(kept)
    assert out.as_of_ms == int(kept["timestamp"].max()) + 1
    assert (got["negative_kind"] == "easy").any()

    def canon(frame: pd.DataFrame) -> list[tuple]:
        frame = frame.astype({"position": "Int64", "n_engagements": "int64", "label_binary": "int64"})
        frame = frame.assign(label=frame["label"].round(9))
        rows = frame[LABEL_COLUMNS].astype(object).where(frame[LABEL_COLUMNS].notna(), None)
        return sorted(tuple(str(v) for v in r) for r in rows.itertuples(index=False))

    assert canon(got) == canon(expected)
