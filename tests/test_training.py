"""Training: two-tower, FAISS index, LightGBM ranker, evaluation, gate and the bundle round trip."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from features.functions import assemble_features
from models.bundle import Bundle
from models.two_tower import TwoTower, encode_users
from training.evaluation import evaluate_models, ranking_metrics
from training.gates import GateConfig, GateResult, evaluate_gate
from training.index import build_faiss_index, index_recall_at_k
from training.ranker import RankerConfig, add_embedding_affinity, train_ranker
from training.trainer import assemble_bundle
from training.two_tower import train_two_tower
from training.two_tower_config import TwoTowerConfig


def test_training_set_helper_is_point_in_time(trainset) -> None:
    assert set(trainset["split"]) == {"train", "validation", "test"}
    order = {"train": 0, "validation": 1, "test": 2}
    assert trainset["split"].map(order).is_monotonic_increasing  # sorted by time, split by time
    assert 0.05 < trainset["label_binary"].mean() < 0.6
    # the product's label (ingestion/labels.py): attributed engagement scores summed and clipped, every per-event
    # score a multiple of 0.1 (clicks 0.1/0.3/0.6 by dwell, share 0.8, purchase 1.0, skip -0.1); binary by the threshold
    from ingestion.labels import LABEL_MAX, LABEL_MIN, LabelConfig

    assert trainset["label"].between(LABEL_MIN, LABEL_MAX).all()
    assert np.allclose(trainset["label"] * 10, np.round(trainset["label"] * 10))
    assert (trainset["label_binary"] == (trainset["label"] >= LabelConfig().positive_threshold)).all()
    assert {0.6, 1.0} <= set(trainset["label"].round(6))  # long-dwell clicks and purchases both occur
    assert (trainset["query_id"] == trainset["session_id"]).all()
    # the first day has no earlier snapshot
    first_day = trainset["timestamp"] < trainset["timestamp"].min() + 86_400_000 - trainset["timestamp"].min() % 86_400_000
    assert trainset.loc[first_day, "item_clicks_7d"].isna().all()
    assert trainset["user_category_clicks_30d"].notna().any()
    hist = trainset["session_last_items"].map(json.loads)
    assert (hist.map(len) <= 10).all() and (hist.map(len) > 0).any()


def test_two_tower_learns(outcome) -> None:
    m = outcome.two_tower.metrics
    assert m["validation_recall_at_50"] > 1.6 * m["random_recall_at_50"], m
    emb = outcome.two_tower.item_embeddings
    dim = outcome.two_tower.model.dim
    assert dim == 128 and emb.dtype == np.float32 and emb.shape == (len(outcome.two_tower.item_ids), dim)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    # the two-tower affinity alone already ranks better than chance on the test window
    assert outcome.metrics["two_tower"]["auc"] > 0.55


def test_encode_users_unknown_user_and_empty_history(outcome) -> None:
    tt = outcome.two_tower
    model = tt.model
    known = tt.user_row[tt.user_ids[0]]
    vecs = encode_users(model, [-1, known, -1, 10**9], [[], [], [0, 1, 2], [5]])
    assert vecs.shape == (4, model.dim) and vecs.dtype == np.float32
    assert np.isfinite(vecs).all() and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(vecs[0], vecs[2])  # the session history moves the vector
    # unknown item rows in the history are ignored, not an error
    assert np.allclose(encode_users(model, [known], [[-1, 10**9]])[0], vecs[1], atol=1e-6)
    assert encode_users(model, [], []).shape == (0, model.dim)


def test_two_tower_is_deterministic(trainset, small_world) -> None:
    train, valid = trainset[trainset["split"] == "train"], trainset[trainset["split"] == "validation"]
    cfg = TwoTowerConfig(epochs=2, seed=3)
    a = train_two_tower(train, small_world.items, small_world.users, cfg, valid_rows=valid)
    b = train_two_tower(train, small_world.items, small_world.users, cfg, valid_rows=valid)
    assert np.array_equal(a.item_embeddings, b.item_embeddings)
    assert a.metrics["validation_recall_at_50"] == b.metrics["validation_recall_at_50"]
    c = train_two_tower(train, small_world.items, small_world.users, TwoTowerConfig(epochs=2, seed=4))
    assert not np.array_equal(a.item_embeddings, c.item_embeddings)
    clone = pickle.loads(pickle.dumps(a))  # passes between Dagster assets pickled
    assert np.array_equal(clone.item_embeddings, a.item_embeddings) and clone.item_row == a.item_row
    rebuilt = TwoTower(**json.loads(json.dumps(a.model.config)))
    rebuilt.load_state_dict(a.model.state_dict())
    rebuilt.eval()
    assert np.allclose(encode_users(rebuilt, [0, -1], [[1], []]), encode_users(a.model, [0, -1], [[1], []]))


def test_hnsw_recall_vs_exact(outcome) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5_000, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = build_faiss_index(emb, kind="hnsw")
    assert index.hnsw.efSearch >= 128
    queries = emb[rng.choice(len(emb), 200, replace=False)] + 0.05 * rng.normal(size=(200, 64)).astype(np.float32)
    recall = index_recall_at_k(index, emb, queries, k=100)
    assert recall >= 0.95, recall
    flat = build_faiss_index(emb, kind="flat")
    assert index_recall_at_k(flat, emb, queries, k=100) == 1.0
    assert outcome.index_recall_at_100 >= 0.95


def test_ranking_metrics_by_hand() -> None:
    frame = pd.DataFrame({"query_id": ["a"] * 4 + ["b"] * 3 + ["c"] * 2,
                          "label": [0.6, 0.0, 0.1, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0],
                          "label_binary": [1, 0, 1, 0, 0, 0, 1, 0, 0]})
    perfect = ranking_metrics(frame, [4, 3, 3.5, 1, 1, 2, 3, 1, 2])
    assert perfect["ndcg_at_10"] == pytest.approx(1.0) and perfect["hr_at_10"] == 1.0 and perfect["mrr"] == 1.0
    assert perfect["queries_with_positive"] == 2.0 and perfect["queries"] == 3.0
    assert "logloss" not in perfect  # scores are not probabilities
    worst = ranking_metrics(frame, [1, 3, 2, 4, 3, 2, 1, 1, 1], k=1)
    assert worst["hr_at_1"] == 0.0 and worst["mrr"] == pytest.approx(1 / 3)
    # query b, positive last: ideal gain .3 at rank 1 vs at rank 3
    b = ranking_metrics(frame.iloc[4:7], [3, 2, 1])
    assert b["ndcg_at_10"] == pytest.approx(1 / np.log2(4))
    probs = ranking_metrics(frame, np.linspace(0.1, 0.9, 9))
    assert all(isinstance(v, float) for v in probs.values()) and "logloss" in probs
    # ties are not broken by the logged order: a constant score averages out
    many = pd.DataFrame({"query_id": np.repeat(np.arange(400), 10), "label": np.tile([1.0] + [0.0] * 9, 400),
                         "label_binary": np.tile([1] + [0] * 9, 400)})
    flat = ranking_metrics(many, np.zeros(len(many)), k=1)
    assert 0.05 < flat["hr_at_1"] < 0.15


def test_two_stage_beats_popularity_and_metrics_are_floats(outcome) -> None:
    from training.evaluation import model_names

    m = outcome.metrics
    assert set(model_names(m)) == {"two_stage", "two_tower", "popularity", "popularity_segment", "co_occurrence",
                                   "logistic_regression"}
    for name in model_names(m):
        vals = m[name]
        assert all(type(v) is float for v in vals.values())
        assert {"auc", "ndcg_at_10", "hr_at_10", "mrr"} <= set(vals)
    assert m["two_stage"]["ndcg_at_10"] > m["popularity"]["ndcg_at_10"], m
    assert m["two_stage"]["auc"] > m["popularity"]["auc"] + 0.05, m
    booster = outcome.booster
    assert booster.feature_name() == list(assemble_features(pd.DataFrame({"a": [1]})).columns)


def test_gate_refuses_a_worse_model_and_accepts_a_good_one(outcome, trainset) -> None:
    frame = add_embedding_affinity(trainset, outcome.two_tower)
    good = evaluate_gate(outcome.metrics["two_stage"], outcome.metrics["popularity"], None, GateConfig())
    assert good.passed, good.reasons
    assert any("no champion yet" in r for r in good.reasons)
    # a ranker trained on shuffled labels learns nothing
    shuffled = frame.copy()
    rng = np.random.default_rng(1)
    train_mask = (shuffled["split"] == "train").to_numpy()
    shuffled.loc[train_mask, "label_binary"] = rng.permutation(shuffled.loc[train_mask, "label_binary"].to_numpy())
    bad_booster = train_ranker(shuffled[shuffled["split"] == "train"], None, RankerConfig(num_boost_round=60))
    bad = evaluate_models(frame, outcome.two_tower, bad_booster)
    gate = evaluate_gate(bad["two_stage"], bad["popularity"], outcome.metrics["two_stage"], GateConfig())
    assert not gate.passed
    assert not gate.checks["no_auc_regression"]["passed"]
    assert any(r.startswith("FAIL no_auc_regression") and "AUC" in r for r in gate.reasons), gate.reasons
    # a demanding lift over popularity is refused with the numbers in the sentence
    strict = evaluate_gate(outcome.metrics["two_stage"], outcome.metrics["popularity"], None, GateConfig(5.0))
    assert not strict.passed and "NDCG@10" in strict.reasons[0] and "FAIL" in strict.reasons[0]
    # the champion check: the same model against itself passes, against a much better champion fails
    champ = dict(outcome.metrics["two_stage"])
    assert evaluate_gate(champ, outcome.metrics["popularity"], champ, GateConfig()).passed
    better = {**champ, "auc": champ["auc"] + 0.01}
    assert not evaluate_gate(champ, outcome.metrics["popularity"], better, GateConfig()).passed
    assert evaluate_gate(champ, outcome.metrics["popularity"], {}, GateConfig()).passed
    clone = pickle.loads(pickle.dumps(gate))
    assert isinstance(clone, GateResult) and clone.reasons == gate.reasons
    json.dumps(gate.checks)


def test_bundle_round_trip_gives_identical_scores(outcome, trainset, small_world, tmp_path) -> None:
    import faiss

    bundle = outcome.bundle
    path = bundle.save(tmp_path / "bundle")
    loaded = Bundle.load(path, model_version="7", allow_untrusted_path=True)
    assert loaded.model_version == "7" and loaded.item_ids == bundle.item_ids
    test = add_embedding_affinity(trainset[trainset["split"] == "test"], outcome.two_tower)
    feats = assemble_features(test)
    assert np.array_equal(loaded.rank(feats), bundle.rank(feats))
    assert np.allclose(bundle.rank(feats), outcome.booster.predict(feats.to_numpy()))
    uid = small_world.users["user_id"].iloc[3]
    hist = [small_world.items["item_id"].iloc[5], "not-an-item"]
    q1, q2 = bundle.user_vector(uid, hist), loaded.user_vector(uid, hist)
    assert np.array_equal(q1, q2)
    (ids_a, sc_a), (ids_b, sc_b) = loaded.retrieve(q2, 20), bundle.retrieve(q1, 20)
    assert ids_a == ids_b and np.allclose(sc_a, sc_b)
    assert np.isfinite(loaded.user_vector(None, [])).all()
    # the tower's output is cached per (user, history) on the bundle: a repeat is the tower's own answer, read-only
    from models.two_tower import encode_users

    again = loaded.user_vector(uid, hist)
    assert again is q2 and not again.flags.writeable
    assert np.array_equal(again, encode_users(loaded.towers, [loaded.user_row[uid]], [[loaded.item_row[hist[0]]]])[0])
    held = len(loaded._user_vectors)
    assert np.array_equal(loaded.user_vector(uid, []), encode_users(loaded.towers, [loaded.user_row[uid]], [[]])[0])
    assert len(loaded._user_vectors) == held + 1  # another history: another entry, the tower's own answer for it
    # popularity: global covers the catalog, per device and per segment lists exist
    assert sorted(loaded.popular(10_000)) == sorted(bundle.item_ids)
    assert {"global", "mobile", "desktop"} <= set(loaded.popularity)
    assert set(small_world.users["segment"]) <= set(loaded.popularity)
    assert loaded.popular(5, "no-such-segment") == loaded.popular(5)
    # the Dagster path: the index passed as serialized bytes
    again = assemble_bundle(outcome.two_tower, faiss.serialize_index(bundle.index), outcome.booster, trainset,
                            small_world.users, manifest={"data_versions": {"training_set": 3}})
    assert again.index.ntotal == len(bundle.item_ids) and again.manifest["data_versions"] == {"training_set": 3}
    assert again.popularity == bundle.popularity


def test_popularity_prior_multiplies_the_odds_and_travels_with_the_bundle(outcome, trainset, tmp_path) -> None:
    from models.bundle import POPULARITY_PRIOR, fuse_popularity_prior

    p = np.array([0.2, 0.2, 0.5, 0.9])
    pop = np.array([0.0, 9.0, 3.0, np.nan])
    assert np.allclose(fuse_popularity_prior(p, pop, 0.0), p)  # weight 0 = the ranker alone
    fused = fuse_popularity_prior(p, pop, 1.0)
    odds = lambda q: q / (1 - q)  # noqa: E731
    assert np.allclose(odds(fused), odds(p) * (1 + np.nan_to_num(pop)))  # odds x (1 + popularity) ** weight
    assert fused[1] > fused[0] and np.isclose(fused[3], 0.9)  # more popular ranks higher; unknown = no change

    bundle = outcome.bundle
    test = add_embedding_affinity(trainset[trainset["split"] == "test"], outcome.two_tower)
    feats = assemble_features(test)
    plain = bundle.rank(feats)
    bundle.manifest[POPULARITY_PRIOR] = {"feature": "item_clicks_7d", "weight": 2.0}
    try:
        expected = fuse_popularity_prior(plain, feats["item_clicks_7d"].to_numpy(), 2.0)
        assert np.allclose(bundle.rank(feats), expected)
        loaded = Bundle.load(bundle.save(tmp_path / "prior"), model_version="1", allow_untrusted_path=True)
        assert loaded.manifest[POPULARITY_PRIOR] == {"feature": "item_clicks_7d", "weight": 2.0}
        assert np.allclose(loaded.rank(feats), expected)  # the server applies what the manifest says
        # inside a live session (session_length > 0) the session weight applies instead
        bundle.manifest[POPULARITY_PRIOR] = {"feature": "item_clicks_7d", "weight": 2.0, "session_weight": 0.5}
        live = feats["session_length"].to_numpy() > 0
        assert live.any() and (~live).any()
        per_row = np.where(live, 0.5, 2.0)
        assert np.allclose(bundle.rank(feats), fuse_popularity_prior(plain, feats["item_clicks_7d"].to_numpy(), per_row))
    finally:
        bundle.manifest.pop(POPULARITY_PRIOR)


def test_gate_checks_scoring_latency_and_feature_health(outcome, trainset) -> None:
    from features.functions import assemble_features
    from training.gates import feature_health, scoring_latency

    test = add_embedding_affinity(trainset[trainset["split"] == "test"], outcome.two_tower)
    x = assemble_features(test)
    latency = scoring_latency(lambda b: outcome.booster.predict(b, num_threads=1), x.to_numpy(), requests=200)
    assert latency["requests"] == 200 and 0 < latency["p50_ms"] <= latency["p99_ms"]
    health = feature_health(x)
    assert set(health) == set(x.columns) and all(h["null_rate"] == 0.0 for h in health.values())
    assert health["user_clicks_7d"]["coverage"] > 0.1 and health["user_clicks_7d"]["tier"] == "batch"
    metrics, pop = outcome.metrics["two_stage"], outcome.metrics["popularity"]
    ok = evaluate_gate(metrics, pop, None, GateConfig(max_p99_scoring_ms=1_000.0), latency=latency, health=health)
    assert ok.passed and ok.checks["scoring_latency"]["passed"] and ok.checks["feature_health"]["passed"]
    slow = evaluate_gate(metrics, pop, None, GateConfig(max_p99_scoring_ms=1e-6), latency=latency, health=health)
    assert not slow.passed and any(r.startswith("FAIL scoring_latency") for r in slow.reasons)
    broken = {**health, "user_ctr_30d": {"null_rate": 0.2, "coverage": 0.0, "tier": "batch"}}
    sick = evaluate_gate(metrics, pop, None, GateConfig(max_p99_scoring_ms=1_000.0), latency=latency, health=broken)
    assert not sick.passed and sick.checks["feature_health"]["null_features"] == {"user_ctr_30d": 0.2}
    assert "user_ctr_30d" in sick.checks["feature_health"]["uncovered_batch_features"]


def test_cold_start_popularity_by_device_and_region() -> None:
    """A cold user gets the items popular in their (device, region) segment, then device, region, global."""
    from models.bundle import Bundle
    from training.trainer import popularity_lists

    frame = pd.DataFrame({"split": "train", "label_binary": 1,
                          "user_id": ["a", "a", "b", "c", "c", "c", "d"],
                          "item_id": ["i1", "i1", "i2", "i3", "i3", "i3", "i2"],
                          "device_type": ["mobile", "mobile", "mobile", "desktop", "desktop", "desktop", "desktop"]})
    users = pd.DataFrame({"user_id": ["a", "b", "c", "d"], "geo_region": ["eu", "us", "eu", "us"], "segment": "s"})
    lists = popularity_lists(frame, users, ["i1", "i2", "i3", "i4"])
    assert lists["global"][:3] == ["i3", "i1", "i2"] and lists["global"][-1] == "i4"
    assert lists["mobile|eu"][0] == "i1" and lists["mobile|us"][0] == "i2" and lists["desktop|us"][0] == "i2"
    assert lists["region:eu"][0] == "i3" and lists["mobile"][0] == "i1"
    bundle = Bundle(towers=None, item_ids=["i1", "i2", "i3", "i4"], user_ids=[], item_embeddings=np.zeros((4, 2)),
                    index=None, ranker=None, popularity=lists)
    assert bundle.popular(1, segment="mobile", region="us") == ["i2"]
    assert bundle.popular(1, segment="mobile", region="mars") == ["i1"]  # unknown region: the device's list
    assert bundle.popular(1, segment="tv", region="eu") == ["i3"]  # unknown device: the region's list
    assert bundle.popular(2) == ["i3", "i1"]


def test_item_similarity_is_fitted_on_the_train_split_and_fused_at_its_manifest_weight(outcome, trainset, tmp_path) -> None:
    """The bundle carries SAR item-item similarity of the train split's positives; the server fuses each candidate's
    summed similarity to the user's history at the SIMILARITY_PRIOR weight (0 = the ranker alone)."""
    from models.bundle import SIMILARITY_PRIOR, fuse_similarity
    from models.item_similarity import ItemSimilarity

    p = np.array([0.2, 0.2, 0.5])
    assert np.allclose(fuse_similarity(p, np.array([0.0, 2.0, 1.0]), 0.0), p)
    assert np.allclose(fuse_similarity(p, np.zeros(3), 3.0), p)  # no similarity at all: nothing changes
    fused = fuse_similarity(p, np.array([0.0, 2.0, 1.0]), 1.0)
    odds = lambda q: q / (1 - q)  # noqa: E731
    assert np.allclose(odds(fused), odds(p) * np.exp([0.0, 1.0, 0.5]))  # scaled by the request's best

    bundle = outcome.bundle
    assert isinstance(bundle.similarity, ItemSimilarity)
    train = trainset[(trainset["split"] == "train") & (trainset["label_binary"] == 1)]
    assert set(bundle.similarity.item_ids) == set(train["item_id"].astype(str))
    user = str(train["user_id"].value_counts().index[0])
    history = train[train["user_id"] == user]["item_id"].astype(str).tolist()
    similar = bundle.similar_items(history, 5)
    assert similar and bundle.history_similarity(history, similar)[0] > 0
    assert bundle.history_similarity([], similar) is None and bundle.similar_items([], 5) == []

    test = add_embedding_affinity(trainset[trainset["split"] == "test"], outcome.two_tower)
    feats = assemble_features(test)
    sims = bundle.history_similarity(history, test["item_id"].astype(str).tolist())
    plain = bundle.rank(feats, similarity=sims)
    bundle.manifest[SIMILARITY_PRIOR] = {"weight": 2.0, "session_weight": 0.0}
    try:
        live = feats["session_length"].to_numpy() > 0
        expected = fuse_similarity(plain, sims, np.where(live, 0.0, 2.0))
        assert np.allclose(bundle.rank(feats, similarity=sims), expected)
        assert np.allclose(bundle.rank(feats), plain)  # no history given: the ranker alone
        loaded = Bundle.load(bundle.save(tmp_path / "similarity"), model_version="1", allow_untrusted_path=True)
        assert loaded.similarity is not None and loaded.similarity.item_ids == bundle.similarity.item_ids
        assert np.allclose(loaded.similarity.matrix.toarray(), bundle.similarity.matrix.toarray(), atol=1e-6)
        assert np.allclose(loaded.rank(feats, similarity=loaded.history_similarity(history, test["item_id"].astype(str).tolist())),
                           expected, atol=1e-6)
    finally:
        bundle.manifest.pop(SIMILARITY_PRIOR)


def test_ranker_row_budget_keeps_whole_queries_and_small_sets_whole(trainset) -> None:
    """max_train_rows: a set within the budget trains on every row (the same booster as without a cap); a larger
    one on a seeded sample of whole queries within the budget, in the original row order."""
    from training.ranker import budget_rows

    train = trainset[trainset["split"] == "train"]
    assert budget_rows(train, len(train), 7) is train and budget_rows(train, 0, 7) is train
    cap = len(train) // 3
    sample = budget_rows(train, cap, 7)
    assert 0.8 * cap < len(sample) <= cap
    assert (np.diff(train.index.get_indexer(sample.index)) > 0).all()  # the original order
    per_query = train.groupby("query_id").size()
    kept = sample.groupby("query_id").size()
    assert kept.equals(per_query[kept.index])  # a query is never split
    assert sample.index.equals(budget_rows(train, cap, 7).index) and not sample.index.equals(budget_rows(train, cap, 8).index)
    small = RankerConfig(num_boost_round=20, max_train_rows=len(train))
    uncapped = RankerConfig(num_boost_round=20, max_train_rows=0)
    a, b = train_ranker(train, None, small), train_ranker(train, None, uncapped)
    x = assemble_features(train.head(200)).to_numpy()
    np.testing.assert_array_equal(a.predict(x), b.predict(x))


def test_the_ranker_learns_the_train_split_affinity_out_of_fold(outcome, trainset, small_world) -> None:
    """The two-tower was fit on the train split's positives: its affinity on those rows is in-sample. The rows the
    ranker learns from get it from towers fit on the other time blocks; validation and test rows keep the tower's,
    which never saw them either (as serving reads it)."""
    from training.ranker import ranker_training_affinity

    tt = outcome.two_tower
    in_sample = add_embedding_affinity(trainset, tt)["embedding_affinity"].to_numpy()
    assert np.array_equal(ranker_training_affinity(trainset, tt, small_world.items, small_world.users, folds=1)
                          ["embedding_affinity"].to_numpy(), in_sample)
    oof = ranker_training_affinity(trainset, tt, small_world.items, small_world.users, folds=2)["embedding_affinity"].to_numpy()
    train = (trainset["split"] == "train").to_numpy()
    assert np.array_equal(oof[~train], in_sample[~train])
    assert not np.allclose(oof[train], in_sample[train])
    pos = trainset["label_binary"].to_numpy() == 1

    def gap(a: np.ndarray) -> float:  # mean affinity of the train split's positives minus its other rows'
        return float(a[train & pos].mean() - a[train & ~pos].mean())

    # out of fold, the positives stand out less than where the tower memorized them
    assert gap(oof) < gap(in_sample)


def test_the_ranker_keeps_the_affinity_that_ranks_the_validation_window_better(outcome, trainset, small_world) -> None:
    """`fit_ranker` trains the ranker on the in-sample and on the out-of-fold affinity and keeps the one with the
    better validation score (the early-stopping metric), saying which; with affinity_folds < 2 only in sample."""
    from training.ranker import RankerConfig, fit_ranker, validation_score

    tt = outcome.two_tower
    config = RankerConfig(num_boost_round=40)
    booster, frame, chosen = fit_ranker(trainset, tt, small_world.items, small_world.users, config)
    in_s, oof = chosen["validation_score_in_sample"], chosen["validation_score_out_of_fold"]
    assert 0.5 < in_s < 1 and 0.5 < oof < 1
    assert chosen["affinity_folds"] == (config.affinity_folds if oof > in_s else 1)
    assert validation_score(booster) == max(in_s, oof)
    want = add_embedding_affinity(trainset, tt)["embedding_affinity"].to_numpy()
    train = (trainset["split"] == "train").to_numpy()
    got = frame["embedding_affinity"].to_numpy()
    assert np.array_equal(got[~train], want[~train])  # validation / test rows: the full tower's, as serving reads
    assert np.array_equal(got[train], want[train]) == (chosen["affinity_folds"] == 1)
    single = fit_ranker(trainset, tt, small_world.items, small_world.users, RankerConfig(num_boost_round=40,
                                                                                          affinity_folds=1))
    assert single[2] == {"affinity_folds": 1, "validation_score_in_sample": in_s}
