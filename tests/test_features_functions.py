"""The shared feature functions: session folding, point-in-time replay, assembly."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.functions import (assemble_features, category_affinity, context_features, new_session_state,
                                replay_session_features, session_features, update_session)
from features.registry import ranker_feature_names, registry_version


def test_update_session_is_pure_and_tracks_categories() -> None:
    s0 = new_session_state()
    s1 = update_session(s0, "click", "i1", "books", 1_000)
    s2 = update_session(s1, "click", "i2", "books", 2_000)
    s3 = update_session(s2, "impression", "i3", "music", 3_000)
    assert s0 == new_session_state()
    assert s3["last_items"] == ["i2", "i1"]
    assert s3["length"] == 3 and s3["clicks"] == 2 and s3["last_ts"] == 3_000
    feats = session_features(s3, ["i1", "i9"], ["books", "music"], 4_000)
    assert feats["session_category_share"].tolist() == [1.0, 0.0]
    assert feats["session_item_seen"].tolist() == [1.0, 0.0]
    assert feats["seconds_since_last_event"].tolist() == [1.0, 1.0]


def test_replay_sees_only_strictly_earlier_events() -> None:
    events = pd.DataFrame({
        "event_id": ["a", "b", "c", "d"],
        "session_id": ["s"] * 4,
        "event_type": ["impression", "click", "impression", "impression"],
        "item_id": ["i1", "i1", "i2", "i3"],
        "timestamp": [0, 10, 20, 10],  # d shares the click's timestamp: it must not see the click
    })
    out = replay_session_features(events, {"i1": "x", "i2": "x", "i3": "x"}).set_index("event_id")
    assert out.loc["a", "session_clicks"] == 0
    assert out.loc["d", "session_clicks"] == 0
    assert out.loc["c", "session_clicks"] == 1 and out.loc["c", "session_category_share"] == 1.0


def test_assemble_uses_registry_order_and_defaults() -> None:
    rows = pd.DataFrame({"category": ["a", "b"], "user_category_clicks_30d": ['{"a": 3, "b": 1}', None],
                         "request_ts": [3_600_000 * 5, 0], "publish_ts": [0, None], "device_type": ["desktop", "mobile"]})
    frame = assemble_features(rows)
    assert list(frame.columns) == ranker_feature_names()
    assert frame["user_category_affinity"].tolist() == [0.75, 0.0]
    assert frame["item_age_hours"].iloc[0] == 5.0 and frame["item_age_hours"].iloc[1] == 24 * 365
    assert frame["hour_of_day"].tolist() == [5.0, 0.0] and frame["device_code"].tolist() == [1.0, 0.0]
    assert len(registry_version()) == 12


def test_context_and_affinity_helpers() -> None:
    ctx = context_features(np.array([0, 86_400_000 * 4]), ["tablet", "mobile"])
    assert ctx["day_of_week"].tolist() == [3.0, 0.0]  # Thursday, then Monday
    assert category_affinity([{"a": 1.0}], ["a"]).tolist() == [1.0]


def test_assembly_is_driven_by_the_registry() -> None:
    """Every declared feature is computed by its registered function over its declared inputs; a missing
    input column gives the declared default; a plain column needs no function at all."""
    from features.functions import FEATURE_FUNCTIONS, assemble_features
    from features.registry import REGISTRY

    for spec in REGISTRY:
        if spec.inputs:  # derived features must have a function, plain columns must not need one
            assert spec.name in FEATURE_FUNCTIONS, spec.name
    empty = assemble_features(pd.DataFrame(index=range(3)))
    assert list(empty.columns) == [f.name for f in REGISTRY]
    assert all((empty[f.name] == f.default).all() for f in REGISTRY)
    rows = pd.DataFrame({"user_clicks_7d": [4.0, None], "publish_ts": [0, 0], "request_ts": [7_200_000, 3_600_000]})
    feats = assemble_features(rows)
    assert feats["user_clicks_7d"].tolist() == [4.0, 0.0] and feats["item_age_hours"].tolist() == [2.0, 1.0]


def test_co_engagement_on_packed_rows_equals_the_dict_definition() -> None:
    """The online store's packed rows (features.online.PackedMap, one regex scan for the whole history) give
    exactly the value the plain-dict definition gives, for histories with repeats, unknown and adjacent keys."""
    import random
    import struct

    from features.functions import co_engagement
    from features.online_codec import _SEP, PackedMap

    rng = random.Random(7)
    universe = [f"i{k:03d}" for k in range(60)] + ["i1", "i10", "i100"]  # prefixes of each other
    dicts, packed, histories = [], [], []
    for _ in range(400):
        keys = rng.sample(universe, rng.randint(0, 20))
        weights = [float(struct.unpack("<f", struct.pack("<f", rng.uniform(0.1, 9)))[0]) for _ in keys]
        blob = (_SEP + _SEP.join(keys) + _SEP).encode() if keys else b""
        raw = struct.pack(f"<{len(keys)}f", *weights) + blob
        packed.append(PackedMap(raw, 0, len(keys), 4 * len(keys), len(raw)))
        dicts.append(dict(zip(keys, weights)))
        histories.append([rng.choice(universe + ["unknown"]) for _ in range(rng.randint(0, 12))])
    assert [dict(p.items()) for p in packed] == dicts
    expected = co_engagement(dicts, histories, limit=10)
    got = co_engagement(packed, histories, limit=10)
    assert np.array_equal(expected, got) and (expected > 0).sum() > 100


def test_co_engagement_served_from_packed_item_rows_equals_the_training_set_value() -> None:
    """Train/serve parity of co_engagement: the training set carries co_items_30d as JSON strings (or None /
    NaN / "" where an item has none), the server and the offline replay read the same rows back packed
    (serving.offline.FrameItemTable, the online store's codec: PackedMap or None). Both must give the value of
    the definition, for histories as JSON strings, tuples, None, with repeats, unknown and non-string ids."""
    import json
    import random

    from features.functions import SESSION_HISTORY_FOR_TOWER, USER_HISTORY_ITEMS
    from serving.offline import FrameItemTable

    def definition(co: dict | None, hist: list | None, limit: int) -> float:
        if not co or not hist:
            return 0.0
        return sum(co.get(i, 0.0) for i in hist[:limit]) / (1.0 + sum(co.values()))

    rng = random.Random(11)
    universe = [f"i{k}" for k in range(40)] + ["i1x", "x"]  # ids that are prefixes of each other
    ids, stored, dicts = [], [], []
    for n in range(600):
        keys = rng.sample(universe, rng.randint(0, 12))
        co = {k: float(rng.randint(1, 40)) / 2 for k in keys}  # co-click counts: exact in the store's float32
        form = rng.choice(["json", "json", "json", "none", "nan", "empty", "braces"])
        stored.append({"json": json.dumps(co), "none": None, "nan": np.nan, "empty": "", "braces": "{}"}[form])
        dicts.append(co if form == "json" else None)
        ids.append(f"item{n}")
    histories: list = []
    for _ in ids:
        hist = [rng.choice([*universe, "unknown", 7]) for _ in range(rng.randint(0, 14))]
        histories.append(rng.choice([json.dumps(hist), tuple(hist), None, "", "[]"]))
    training_rows = pd.DataFrame({"co_items_30d": stored, "session_last_items": histories,
                                  "user_recent_items": histories})
    table = FrameItemTable(pd.DataFrame({"item_id": ids, "co_items_30d": stored}), "v1")
    served = table.columns_for(ids)["co_items_30d"]
    served_rows = pd.DataFrame({"co_items_30d": list(served), "session_last_items": histories,
                                "user_recent_items": histories})
    parsed = [json.loads(h) if isinstance(h, str) and h else list(h) if isinstance(h, tuple) else None
              for h in histories]
    for feature, limit in (("co_engagement", SESSION_HISTORY_FOR_TOWER),
                           ("user_history_co_engagement", USER_HISTORY_ITEMS)):
        expected = np.array([definition(c, h, limit) for c, h in zip(dicts, parsed)])
        train = assemble_features(training_rows)[feature].to_numpy()
        serve = assemble_features(served_rows)[feature].to_numpy()
        assert (expected > 0).sum() > 30  # enough rows that share co-clicks with their history
        np.testing.assert_array_equal(train, expected)
        np.testing.assert_array_equal(serve, train)


def _replay_by_fold(events: pd.DataFrame, item_category: dict) -> pd.DataFrame:
    """The replay as its definition reads, one product call per row: fold update_session over each session's
    events in time order, ask session_features before each block of equal timestamps (candidates never fold)."""
    import json

    from features.functions import CANDIDATE_EVENT, FEATURE_QUERY_TYPES, SESSION_HISTORY_FOR_TOWER

    rows = []
    for _, session in events.sort_values(["session_id", "timestamp"], kind="mergesort").groupby("session_id", sort=True):
        state = new_session_state()
        for _, block in session.groupby("timestamp", sort=True):
            for r in block.itertuples():
                if r.event_type in FEATURE_QUERY_TYPES:
                    feats = session_features(state, [r.item_id], [item_category.get(r.item_id)], int(r.timestamp))
                    rows.append({"event_id": r.event_id, **{k: float(v[0]) for k, v in feats.items()},
                                 "session_last_items": json.dumps(state["last_items"][:SESSION_HISTORY_FOR_TOWER])})
            for r in block.itertuples():
                if r.event_type != CANDIDATE_EVENT:
                    state = update_session(state, r.event_type, r.item_id, item_category.get(r.item_id), int(r.timestamp))
    return pd.DataFrame(rows).set_index("event_id").sort_index()


@pytest.mark.parametrize("cap", [50, 5])
def test_replay_equals_the_per_event_fold_on_generated_sessions(cap: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectorized replay gives exactly (float for float, JSON for JSON) what folding the product's
    update_session / session_features event by event gives: ties, candidates, impressions of engaged items,
    items without a category or id, sessions past the SESSION_MAX_ITEMS cap (the product's 50, and 5: below
    the tower's 10-item history, and most engaged items fall out of it), skips and purchases."""
    import features.functions

    monkeypatch.setattr(features.functions, "SESSION_MAX_ITEMS", cap)  # both the fold and the replay read it
    rng = np.random.default_rng(5)
    frames = []
    for s in range(120):
        n = int(rng.choice([1, 3, 8, 30, 140])) if s % 10 else 160  # long sessions exceed the 50-item cap
        pool = int(rng.choice([4, 20, 200]))
        frames.append(pd.DataFrame({
            "session_id": f"s{s % 97}" if s < 97 else f"late{s}",
            "event_type": rng.choice(["click", "impression", "candidate", "skip", "purchase", "add_to_cart"], n,
                                     p=[0.45, 0.2, 0.2, 0.05, 0.05, 0.05]),
            "item_id": [f"i{k}" if k % 41 else None for k in rng.integers(0, pool, n)],
            "timestamp": 1_000_000 + np.sort(rng.integers(0, 40, n)) * 1_000 * int(rng.choice([1, 5000])),
        }))
    events = pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=3).reset_index(drop=True)
    events["event_id"] = [f"e{k}" for k in range(len(events))]
    cats = {f"i{k}": ("" if k % 13 == 0 else f"c{k % 7}") for k in range(200) if k % 11}
    got = replay_session_features(events, cats).set_index("event_id").sort_index()
    expected = _replay_by_fold(events, cats)
    assert len(got) == int(events["event_type"].isin(["impression", "candidate"]).sum()) > 500
    pd.testing.assert_frame_equal(got[expected.columns], expected, check_exact=True)
    assert got["session_item_seen"].sum() > 100 and (got["session_category_share"].between(0, 1, inclusive="neither")).sum() > 100
    assert (got["session_length"] > cap).sum() > 50  # the cap was exercised
