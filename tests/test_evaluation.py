"""Evaluation extras: NDCG/HR@20, baselines side by side, calibration, beyond-accuracy, slices, HTML report."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from training.evaluation import (calibration_table, catalog_coverage, evaluate_models, evaluation_report_html,
                                 expected_calibration_error, intra_list_diversity, model_names,
                                 popularity_segment_scores, ranking_metrics, slice_metrics)

MODELS = {"two_stage", "two_tower", "popularity", "popularity_segment", "co_occurrence", "logistic_regression"}


def test_ndcg_and_hr_at_20_by_hand() -> None:
    # one query of 25 rows, the only positive at rank 15 (0-based 14): missed @10, caught @20
    frame = pd.DataFrame({"query_id": ["a"] * 25, "label": [0.0] * 14 + [0.6] + [0.0] * 10,
                          "label_binary": [0] * 14 + [1] + [0] * 10})
    scores = -np.arange(25, dtype=float)
    m = ranking_metrics(frame, scores, also_k=(20,))
    assert m["ndcg_at_10"] == 0.0 and m["hr_at_10"] == 0.0
    assert m["hr_at_20"] == 1.0 and m["ndcg_at_20"] == pytest.approx(1 / np.log2(16))
    assert m["ndcg_at_20"] >= m["ndcg_at_10"] and m["mrr"] == pytest.approx(1 / 15)
    # random scores over many queries: @20 never below @10
    rng = np.random.default_rng(3)
    many = pd.DataFrame({"query_id": np.repeat(np.arange(200), 30), "label": rng.choice([0.0, 0.1, 0.6], 6000, p=[.9, .05, .05])})
    many["label_binary"] = (many["label"] > 0).astype(int)
    r = ranking_metrics(many, rng.normal(size=6000), also_k=(20,))
    assert r["ndcg_at_20"] >= r["ndcg_at_10"] and r["hr_at_20"] >= r["hr_at_10"]
    assert "ndcg_at_20" not in ranking_metrics(many, rng.normal(size=6000))  # opt-in: old callers unchanged


def test_calibration_table_and_ece() -> None:
    rng = np.random.default_rng(42)
    p = rng.uniform(size=20_000)
    y = (rng.uniform(size=20_000) < p).astype(int)
    table = calibration_table(y, p, bins=10)
    assert list(table.columns) == ["bin", "lower", "upper", "count", "mean_predicted", "observed_rate"]
    assert len(table) == 10 and table["count"].sum() == 20_000
    assert table["lower"].iloc[0] == 0.0 and table["upper"].iloc[-1] == 1.0
    assert np.allclose(table["mean_predicted"], table["lower"] + 0.05, atol=0.01)
    assert expected_calibration_error(y, p) < 0.03
    # overconfident: predicts p**0.25 for an event of rate p
    bad = expected_calibration_error(y, p ** 0.25)
    assert bad > 0.15
    # all mass in one bin; empty bins carry NaN, not zero
    t = calibration_table([0, 1, 1, 1], [0.75, 0.75, 0.75, 1.0], bins=4)
    assert t["count"].tolist() == [0, 0, 0, 4] and t["mean_predicted"].isna().sum() == 3
    assert expected_calibration_error([0, 1, 1, 1], [0.75, 0.75, 0.75, 1.0], bins=4) == pytest.approx(abs(0.8125 - 0.75))


def test_coverage_and_diversity_by_hand() -> None:
    # 2 queries, k=2; 5 distinct items in the frame
    frame = pd.DataFrame({"query_id": ["q1"] * 3 + ["q2"] * 3,
                          "item_id": ["a", "b", "c", "a", "d", "e"],
                          "category": ["x", "x", "y", "x", "y", "z"],
                          "label_binary": [1, 0, 0, 0, 1, 0]})
    scores = np.array([3.0, 2.0, 1.0, 3.0, 2.0, 1.0])
    # top-2: q1 -> a, b (same category); q2 -> a, d (different)
    assert catalog_coverage(frame, scores, k=2) == pytest.approx(3 / 5)
    assert intra_list_diversity(frame, scores, k=2) == pytest.approx((0.0 + 1.0) / 2)
    # k=3: q1 {x,x,y}: 2 of 3 pairs differ; q2 {x,y,z}: all 3 differ
    assert catalog_coverage(frame, scores, k=3) == 1.0
    assert intra_list_diversity(frame, scores, k=3) == pytest.approx((2 / 3 + 1.0) / 2)


def test_popularity_segment_falls_back_to_global() -> None:
    train = pd.DataFrame({"item_id": ["a", "a", "a", "b", "b"], "device_type": ["mobile", "mobile", "desktop", "desktop", "desktop"],
                          "label_binary": [1, 1, 1, 1, 0]})
    test = pd.DataFrame({"item_id": ["a", "b", "a", "b", "c"], "device_type": ["mobile", "mobile", "tablet", "tablet", "mobile"]})
    s = popularity_segment_scores(train, test)
    assert s[0] == pytest.approx(2 + 3e-6) and s[1] == pytest.approx(1e-6)  # segment clicks, global as tie-break
    assert s[2] == 3.0 and s[3] == 1.0 and s[4] == 0.0  # tablet has no train clicks: global


def test_slices_skip_small_or_positive_free_slices() -> None:
    n = 60
    test = pd.DataFrame({"query_id": np.repeat(np.arange(6), 10), "label": np.tile([0.6] + [0.0] * 9, 6),
                         "label_binary": np.tile([1] + [0] * 9, 6),
                         "user_clicks_7d": [np.nan] * 10 + [0.0] * 10 + [3.0] * 40,
                         "request_ts": np.full(n, 10 * 86_400_000), "publish_ts": np.full(n, 0),
                         "device_type": ["tablet"] * 10 + ["mobile"] * 50})
    out = slice_metrics(test, {"two_stage": -np.tile(np.arange(10.0), 6), "popularity": np.zeros(n)})
    assert out["user_new"]["two_stage"]["rows"] == 20.0 and out["user_new"]["two_stage"]["ndcg_at_10"] == 1.0
    assert out["user_established"]["two_stage"]["rows"] == 40.0
    assert out["item_fresh"]["popularity"] == {"rows": 0.0} and out["item_older"]["two_stage"]["rows"] == 60.0
    assert out["device_tablet"]["two_stage"] == {"rows": 10.0}  # under 20 rows: no metrics
    assert set(out["device_mobile"]["popularity"]) == {"auc", "ndcg_at_10", "rows"}


def test_evaluate_models_reports_everything(outcome, trainset, tmp_path) -> None:
    from training.ranker import add_embedding_affinity

    frame = add_embedding_affinity(trainset, outcome.two_tower)
    res = evaluate_models(frame, outcome.two_tower, outcome.booster)
    assert set(model_names(res)) == MODELS and set(res) == MODELS | {"calibration", "slices"}
    for name in MODELS:
        vals = res[name]
        assert all(type(v) is float for v in vals.values()), name
        assert {"auc", "ndcg_at_10", "ndcg_at_20", "hr_at_10", "hr_at_20", "mrr"} <= set(vals)
        assert vals["ndcg_at_20"] >= vals["ndcg_at_10"] - 1e-12 and vals["hr_at_20"] >= vals["hr_at_10"]
    ts, pop = res["two_stage"], res["popularity"]
    for d in (ts, pop):
        assert 0 < d["catalog_coverage"] <= 1 and 0 <= d["intra_list_diversity"] <= 1
    assert ts["catalog_coverage"] > pop["catalog_coverage"]  # popularity shows the same few items everywhere
    # the default ranker is binary: probabilities, so logloss, ECE and a 10-bin table
    assert "logloss" in ts and 0 <= ts["ece"] < 0.5
    assert len(res["calibration"]) == 10 and sum(r["count"] for r in res["calibration"]) == ts["rows"]
    slices = res["slices"]
    assert {"user_new", "user_established", "item_fresh", "item_older", "device_mobile"} <= set(slices)
    for name in ("user_new", "user_established"):
        assert set(slices[name]) == {"two_stage", "popularity"}
    # every test-window user of the small world clicked in the last 7 days: user_new is reported with rows only
    assert slices["user_new"]["two_stage"] == {"rows": 0.0}
    assert {"auc", "ndcg_at_10", "rows"} == set(slices["user_established"]["two_stage"])
    assert set(slices["item_fresh"]["two_stage"]) == {"auc", "ndcg_at_10", "rows"}
    assert slices["user_new"]["two_stage"]["rows"] + slices["user_established"]["two_stage"]["rows"] == ts["rows"]
    # backward compatible: the gate's keys, and the result survives the JSON round trip MLflow/Dagster do
    assert res["two_stage"]["ndcg_at_10"] == pytest.approx(outcome.metrics["two_stage"]["ndcg_at_10"])
    assert res["two_stage"]["auc"] == pytest.approx(outcome.metrics["two_stage"]["auc"])
    json.loads(json.dumps(res))
    from training.registry import flatten_metrics

    flat = flatten_metrics(res)
    assert "test.popularity_segment.ndcg_at_20" in flat and not any(k.startswith(("test.slices", "test.calibration")) for k in flat)

    page = evaluation_report_html(res, tmp_path / "report" / "evaluation.html")
    text = page.read_text(encoding="utf-8")
    assert page.exists() and text.startswith("<!DOCTYPE html>")
    assert "ndcg_at_20" in text and "calibration" in text.lower() and "user_new" in text and "co_occurrence" in text
    assert "http" not in text and "<script" not in text  # self-contained
    catalog = {"split": {"split_ms": 5, "users": 2, "warm_users": 1, "catalog_items": 9},
               "systems": {"popularity": {"ndcg_at_10": 0.2}, "served": {"ndcg_at_10": 0.3, "recall_at_20": 0.5}},
               "sessions": {"served": {"cases": 4.0, "p_at_20": 25.0}}}
    text = evaluation_report_html({**res, "catalog": catalog}, tmp_path / "c.html").read_text(encoding="utf-8")
    assert text.index("whole catalog") < text.index("Ranker diagnostics")  # the gate's evidence leads the page
    assert text.index("<td>served</td>") < text.index("<td>popularity</td>") and "Session protocol" in text
    from training.evaluation import evaluation_plot_png

    png = evaluation_plot_png(res, tmp_path / "report" / "evaluation.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_escapes_and_handles_missing_calibration(tmp_path) -> None:
    res = {"<b>model</b>": {"auc": 0.7, "ndcg_at_10": 0.3, "ndcg_at_20": float("nan")}, "calibration": [], "slices": {}}
    text = evaluation_report_html(res, tmp_path / "r.html").read_text()
    assert "&lt;b&gt;model&lt;/b&gt;" in text and "<b>model" not in text
    assert "calibration" in text.lower() and "ndcg_at_20" in text


def test_retrieval_recall_on_the_test_window(outcome, trainset) -> None:
    from training.two_tower import retrieval_recall

    test = trainset[trainset["split"] == "test"]
    r = retrieval_recall(outcome.two_tower, test, ks=(10, 100))
    assert r["positives"] == float((test["label_binary"] == 1).sum()) > 0
    assert 0 <= r["recall_at_10"] <= r["recall_at_100"] <= 1
    assert r["random_recall_at_100"] == pytest.approx(min(100, len(outcome.two_tower.item_ids)) / len(outcome.two_tower.item_ids))
    # the towers learned something: well above picking 10 items at random
    assert r["recall_at_10"] > 2 * r["random_recall_at_10"], r
    # evaluate_models carries it on the two-tower row, where the report shows it
    assert outcome.metrics["two_tower"]["retrieval_recall_at_100"] == pytest.approx(
        retrieval_recall(outcome.two_tower, test)["recall_at_100"])


def test_a_saved_bundle_rescored_matches_the_model_it_was_built_from(outcome, trainset, tmp_path) -> None:
    """The champion is compared on the candidate's own test window: re-scoring a bundle loaded from disk
    must reproduce the in-memory model's metrics exactly (same affinity, same features, same ranker)."""
    from models.bundle import Bundle
    from training.evaluation import evaluate_bundle
    from training.ranker import add_embedding_affinity

    bundle = Bundle.load(outcome.bundle.save(tmp_path / "bundle"), model_version="3", allow_untrusted_path=True)
    frame = add_embedding_affinity(trainset, outcome.two_tower)
    again = evaluate_bundle(frame, bundle)
    for key in ("auc", "ndcg_at_10", "ndcg_at_20", "mrr"):
        assert again[key] == pytest.approx(outcome.metrics["two_stage"][key], abs=1e-9), key
    assert again["model_version"] == 3.0
    bundle.manifest["ranker_features"] = [*bundle.manifest["ranker_features"], "feature_from_the_future"]
    with pytest.raises(KeyError, match="feature_from_the_future"):
        evaluate_bundle(frame, bundle)


def test_tuning_is_seeded_and_never_worse_than_the_default(outcome, trainset, tmp_path) -> None:
    from training.ranker import RankerConfig, add_embedding_affinity
    from training.tuning import SPACE, load_tuned, sample_params, save_tuned, tune_ranker

    a, b = sample_params(np.random.default_rng(5)), sample_params(np.random.default_rng(5))
    assert a == b and set(a) == set(SPACE)
    for name, (lo, hi, _) in SPACE.items():
        assert lo <= a[name] <= hi
    frame = add_embedding_affinity(trainset, outcome.two_tower)
    base = RankerConfig(num_boost_round=80)
    result = tune_ranker(frame[frame["split"] == "train"], frame[frame["split"] == "validation"], trials=3, seed=1, base=base)
    key = result["metric"]
    assert [t["trial"] for t in result["trials"]] == [0, 1, 2]
    assert result["default"]["learning_rate"] == base.learning_rate
    assert result["best"][key] == max(t[key] for t in result["trials"]) and result["lift_over_default"] >= 0
    with pytest.raises(FileNotFoundError, match="ranker_tuning"):
        load_tuned(tmp_path / "none", base)
    save_tuned(result, tmp_path / "tuning")
    tuned = load_tuned(tmp_path / "tuning", base)
    assert tuned.num_leaves == result["best"]["num_leaves"] and tuned.learning_rate == result["best"]["learning_rate"]
    with pytest.raises(ValueError, match="both classes"):
        tune_ranker(frame[frame["split"] == "train"], frame.iloc[:0], trials=1)
