"""Offline evaluation on the time-split test window: the two-stage model beside its baselines."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from features.functions import assemble_features

log = logging.getLogger("kairos.evaluation")

TIE_SEED = 20240601


def ranking_metrics(frame: pd.DataFrame, scores: Any, k: int = 10, probabilities: bool | None = None) -> dict[str, float]:
    """AUC (label_binary), logloss (only for probabilities), NDCG@k, HR@k and MRR per query_id.

    NDCG uses the graded gain max(label, 0) with a 1/log2(rank+1) discount; NDCG, HR and MRR
    are averaged over queries with at least one positive (label_binary == 1). Ties in the
    score are broken by a fixed pseudo-random order, never by the logged order (which carries
    the logging policy's position bias). `probabilities=None` infers it from the score range.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(frame):
        raise ValueError(f"{len(s)} scores for {len(frame)} rows")
    yb = frame["label_binary"].to_numpy(dtype=np.float64)
    gain = np.clip(frame["label"].to_numpy(dtype=np.float64) if "label" in frame else yb, 0.0, None)
    s = np.where(np.isfinite(s), s, np.nanmin(s[np.isfinite(s)]) if np.isfinite(s).any() else 0.0)
    out: dict[str, float] = {"rows": float(len(s)), "positive_rate": float(yb.mean()) if len(yb) else float("nan")}
    if len(s) == 0:
        return {**out, "auc": float("nan"), f"ndcg_at_{k}": float("nan"), f"hr_at_{k}": float("nan"),
                "mrr": float("nan"), "queries": 0.0}
    from sklearn.metrics import log_loss, roc_auc_score

    out["auc"] = float(roc_auc_score(yb, s)) if 0 < yb.sum() < len(yb) else float("nan")
    if probabilities is None:
        probabilities = bool((s >= 0).all() and (s <= 1).all())
    if probabilities and 0 < yb.sum() < len(yb):
        out["logloss"] = float(log_loss(yb, np.clip(s, 1e-7, 1 - 1e-7), labels=[0, 1]))

    q = pd.factorize(frame["query_id"].to_numpy())[0]
    tie = np.random.default_rng(TIE_SEED).permutation(len(s))
    order = np.lexsort((tie, -s, q))
    q_o, g_o, y_o = q[order], gain[order], yb[order]
    starts = np.r_[0, np.flatnonzero(np.diff(q_o)) + 1]
    sizes = np.diff(np.r_[starts, len(q_o)])
    rank = np.arange(len(q_o)) - np.repeat(starts, sizes)  # 0-based rank within its query
    disc = 1.0 / np.log2(rank + 2.0)
    n_q = len(starts)
    dcg = np.bincount(q_o, weights=np.where(rank < k, g_o * disc, 0.0), minlength=q.max() + 1)
    # ideal: gains sorted descending within each query
    ideal_order = np.lexsort((-g_o, q_o))
    g_i = g_o[ideal_order]
    idcg = np.bincount(q_o, weights=np.where(rank < k, g_i * disc, 0.0), minlength=q.max() + 1)
    has_pos = np.bincount(q_o, weights=y_o, minlength=q.max() + 1) > 0
    first_pos = np.full(q.max() + 1, np.inf)
    pos_rank = rank[y_o == 1]
    np.minimum.at(first_pos, q_o[y_o == 1], pos_rank)
    sel = has_pos
    out["queries"] = float(n_q)
    out["queries_with_positive"] = float(sel.sum())
    if sel.any():
        ndcg = np.where(idcg[sel] > 0, dcg[sel] / np.where(idcg[sel] > 0, idcg[sel], 1.0), 0.0)
        out[f"ndcg_at_{k}"] = float(ndcg.mean())
        out[f"hr_at_{k}"] = float((first_pos[sel] < k).mean())
        out["mrr"] = float((1.0 / (first_pos[sel] + 1.0)).mean())
    else:
        out[f"ndcg_at_{k}"] = out[f"hr_at_{k}"] = out["mrr"] = float("nan")
    return out


def fit_logistic_regression(train_rows: pd.DataFrame):
    """The logistic-regression baseline on the same assembled features (standardized)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = assemble_features(train_rows).to_numpy(dtype=np.float64)
    y = train_rows["label_binary"].to_numpy(dtype=int)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0))
    model.fit(x, y)
    return model


def evaluate_models(frame: pd.DataFrame, tt: Any, booster: Any, k: int = 10) -> dict[str, dict[str, float]]:
    """Test-split metrics of "two_stage", "two_tower", "popularity" and "logistic_regression"."""
    from training.ranker import add_embedding_affinity

    if "embedding_affinity" not in frame:
        frame = add_embedding_affinity(frame, tt)
    train = frame[frame["split"] == "train"]
    test = frame[frame["split"] == "test"]
    if test.empty:
        raise ValueError("no test rows to evaluate on (split == 'test')")
    x_test = assemble_features(test)
    results: dict[str, dict[str, float]] = {}
    # logloss only when the ranker outputs probabilities (binary objective; not for lambdarank scores)
    results["two_stage"] = ranking_metrics(test, booster.predict(x_test.to_numpy(dtype=np.float64)), k, probabilities=None)
    results["two_tower"] = ranking_metrics(test, x_test["embedding_affinity"].to_numpy(), k, probabilities=False)
    results["popularity"] = ranking_metrics(test, x_test["item_clicks_7d"].to_numpy(), k, probabilities=False)
    if not train.empty and train["label_binary"].nunique() > 1:
        lr = fit_logistic_regression(train)
        results["logistic_regression"] = ranking_metrics(test, lr.predict_proba(x_test.to_numpy(dtype=np.float64))[:, 1], k,
                                                         probabilities=True)
    log.info("evaluation: %s", {m: {kk: round(v, 4) for kk, v in d.items()} for m, d in results.items()})
    return results
