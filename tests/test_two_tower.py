"""Two-tower: content-only item embeddings, profile input, early stopping on validation recall, determinism."""
from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from models.two_tower import TwoTower, encode_users
from training.two_tower_config import TwoTowerConfig
from tests._trainset import make_training_set
from training.two_tower import _examples, recall_at_k, text_tokens, train_two_tower

NEW_ITEM = "i_new_0001"
NEW_USER = "u_new_0001"


@pytest.fixture(scope="module")
def trainset(small_world) -> pd.DataFrame:
    return make_training_set(small_world)


@pytest.fixture(scope="module")
def splits(trainset) -> tuple[pd.DataFrame, pd.DataFrame]:
    return trainset[trainset["split"] == "train"], trainset[trainset["split"] == "validation"]


@pytest.fixture(scope="module")
def cold(small_world, splits):
    """Trained with a few catalog items stripped of every training row, plus a brand-new catalog item and user."""
    train, valid = splits
    items = small_world.items
    by_cat = items.groupby("category")["item_id"].first()  # one held-out item per category
    held = list(by_cat.values)
    new = pd.DataFrame({"item_id": [NEW_ITEM], "title": ["zeta cat_02 #new"], "category": ["cat_02"],
                        "tags": ["cat_02 nova"], "publish_ts": [int(items["publish_ts"].max())]})
    catalog = pd.concat([items, new], ignore_index=True)
    users = pd.concat([small_world.users, pd.DataFrame({
        "user_id": [NEW_USER], "segment": ["new"], "device_type": ["desktop"], "geo_region": ["eu"],
        "signup_ts": [int(small_world.users["signup_ts"].max())]})], ignore_index=True)
    stripped = train[~train["item_id"].isin(held)]
    result = train_two_tower(stripped, catalog, users, TwoTowerConfig(), valid_rows=valid)
    return result, held, catalog


def test_items_without_training_positives_are_embedded_from_content(cold) -> None:
    result, held, catalog = cold
    model, emb = result.model, result.item_embeddings
    cat_of = dict(zip(catalog["item_id"], catalog["category"]))
    assert emb.shape == (len(catalog), model.dim) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    rows = result.item_rows([*held, NEW_ITEM])
    assert (rows >= 0).all()
    assert (model.item_has_id[torch.from_numpy(rows)] == 0).all()
    # the id embedding contributes nothing: scrambling those rows leaves the vectors unchanged
    with torch.no_grad():
        saved = model.item_emb.weight[torch.from_numpy(rows)].clone()
        model.item_emb.weight[torch.from_numpy(rows)] = torch.randn_like(saved)
        assert np.allclose(model.all_item_embeddings()[rows], emb[rows], atol=1e-6)
        model.item_emb.weight[torch.from_numpy(rows)] = saved
    shares = []
    for item, row in zip([*held, NEW_ITEM], rows):
        scores = emb @ emb[row]
        scores[row] = -np.inf
        top = np.argsort(-scores, kind="stable")[:10]
        shares.append(np.mean([cat_of[result.item_ids[j]] == cat_of[item] for j in top]))
    # chance is ~1/6 (six categories): content alone puts a new item among its own category
    assert np.mean(shares) >= 0.8, shares
    assert min(shares) >= 0.5, shares


def test_text_tokens_are_stable_hashed_bags() -> None:
    a = text_tokens("Alpha cat_00 #1", "cat_00 Luna", buckets=4096, length=16)
    assert a == text_tokens("alpha CAT_00 #1", ["cat_00", "luna"], buckets=4096, length=16)
    assert len(a) == 4 and all(0 <= t < 4096 for t in a)  # alpha, cat_00, 1, luna (distinct)
    assert text_tokens(None, float("nan")) == [] and len(text_tokens("a b c d e", length=3)) == 3


def test_early_stopping_keeps_the_best_epoch(splits, small_world) -> None:
    train, valid = splits
    cfg = TwoTowerConfig(epochs=12, patience=1, seed=5)
    res = train_two_tower(train, small_world.items, small_world.users, cfg, valid_rows=valid)
    m = res.metrics
    assert 1 <= m["best_epoch"] <= m["epochs_run"] <= cfg.epochs
    assert m["epochs_run"] <= m["best_epoch"] + cfg.patience
    assert {"validation_recall_at_100", "validation_recall_at_50", "random_recall_at_100"} <= set(m)
    # the returned model is the best epoch's: recomputing recall@100 gives the recorded value
    model = res.model
    assert np.array_equal(model.all_item_embeddings(), res.item_embeddings)
    vu, vh, vi = _examples(valid, res.user_row, res.item_row, model.n_users, model.n_items, model.history_len)
    assert len(vi) == m["validation_positives"]
    assert recall_at_k(model, res.item_embeddings, vu, vh, vi, 100) == pytest.approx(m["validation_recall_at_100"], abs=1e-6)
    assert m["validation_recall_at_100"] > 1.2 * m["random_recall_at_100"], m
    # without validation rows every epoch runs
    short = train_two_tower(train, small_world.items, small_world.users, TwoTowerConfig(epochs=2, seed=5))
    assert short.metrics["epochs_run"] == short.metrics["best_epoch"] == 2.0
    assert "validation_recall_at_100" not in short.metrics


def test_profile_moves_the_user_vector(cold) -> None:
    result, _, _ = cold
    model = result.model
    assert {"casual", "core", "new"} <= set(model.segments) and "desktop" in model.devices
    hist = [[result.item_row[result.item_ids[3]], result.item_row[result.item_ids[8]]]] * 2
    # the same unknown id and history, different segment -> different vectors
    a, b = encode_users(model, [-1, -1], hist, segment_rows=[model.segments.index("casual"), model.segments.index("core")])
    assert not np.allclose(a, b, atol=1e-4)
    via_raw = result.user_vectors([None, None], [[result.item_ids[3], result.item_ids[8]]] * 2, segments=["casual", "core"])
    assert np.allclose(via_raw, np.stack([a, b]), atol=1e-6)
    # a catalog user without training rows: the unknown id row with the catalog profile (what serving gets)
    row = result.user_row[NEW_USER]
    assert float(model.user_has_id[row]) == 0.0
    own = encode_users(model, [row], hist[:1])
    profile = encode_users(model, [-1], hist[:1], segment_rows=[model.segments.index("new")],
                           device_rows=[model.devices.index("desktop")])
    assert np.allclose(own, profile, atol=1e-6)
    assert not np.allclose(own, encode_users(model, [-1], hist[:1]), atol=1e-4)  # unknown user: unknown profile


def test_two_runs_with_one_seed_are_identical_and_reload(splits, small_world) -> None:
    train, valid = splits
    cfg = TwoTowerConfig(epochs=3, seed=9)
    a = train_two_tower(train, small_world.items, small_world.users, cfg, valid_rows=valid)
    b = train_two_tower(train, small_world.items, small_world.users, cfg, valid_rows=valid)
    assert np.array_equal(a.item_embeddings, b.item_embeddings)
    assert {k: v for k, v in a.metrics.items() if k != "train_seconds"} == \
        {k: v for k, v in b.metrics.items() if k != "train_seconds"}
    users = a.user_vectors(list(small_world.users["user_id"][:20]), ["[]"] * 20)
    assert np.array_equal(users, b.user_vectors(list(small_world.users["user_id"][:20]), ["[]"] * 20))
    json.dumps(a.config)
    # the bundle path: JSON config + weights_only state dict (content and profile buffers included)
    buf = io.BytesIO()
    torch.save({"config": a.model.config, "state_dict": a.model.state_dict()}, buf)
    buf.seek(0)
    blob = torch.load(buf, map_location="cpu", weights_only=True)
    rebuilt = TwoTower(**json.loads(json.dumps(blob["config"])))
    rebuilt.load_state_dict(blob["state_dict"])
    rebuilt.eval()
    assert np.array_equal(rebuilt.all_item_embeddings(), a.item_embeddings)
    assert np.allclose(encode_users(rebuilt, [0, -1], [[1], []]), encode_users(a.model, [0, -1], [[1], []]))
    clone = pickle.loads(pickle.dumps(a))
    assert np.array_equal(clone.model.all_item_embeddings(), a.item_embeddings)


def test_bundles_saved_before_content_features_still_load() -> None:
    legacy = TwoTower(n_users=5, n_items=7, n_categories=2, dim=8, hidden=16)  # the old config keys only
    state = legacy.state_dict()
    assert not any(k.startswith(("text_emb", "seg_emb", "item_tokens", "user_has_id")) for k in state)
    again = TwoTower(**json.loads(json.dumps(legacy.config)))
    again.load_state_dict(state)
    vec = encode_users(again.eval(), [0, -1], [[1, 2], []])
    assert vec.shape == (2, 8) and np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    assert again.all_item_embeddings().shape == (7, 8)


def test_training_budget_caps_examples_per_epoch_and_validation_seeded(splits, small_world) -> None:
    train, valid = splits
    cfg = TwoTowerConfig(epochs=2, seed=9, patience=5, max_examples_per_epoch=300, max_validation_examples=50)
    a = train_two_tower(train, small_world.items, small_world.users, cfg, valid_rows=valid)
    b = train_two_tower(train, small_world.items, small_world.users, cfg, valid_rows=valid)
    assert np.array_equal(a.item_embeddings, b.item_embeddings)  # the sample is seeded
    m = a.metrics
    assert m["train_positives"] > 300 and m["examples_per_epoch"] == 300 and m["budget_capped"] == 1.0
    assert m["examples_seen"] == 300 * m["epochs_run"]
    assert m["validation_positives"] == 50
    assert a.config["max_examples_per_epoch"] == 300  # the budget lands in the registered params (two_tower.*)
    whole = train_two_tower(train, small_world.items, small_world.users,
                            TwoTowerConfig(epochs=2, seed=9, patience=5, max_examples_per_epoch=0), valid_rows=valid)
    assert whole.metrics["budget_capped"] == 0.0 and whole.metrics["examples_per_epoch"] == whole.metrics["train_positives"]
