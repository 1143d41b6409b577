"""The LightGBM ranker over the registry's features (shared assembly) plus the two-tower affinity."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from features.functions import assemble_features, feature_matrix, tower_history_column
from features.registry import ranker_feature_names

log = logging.getLogger("kairos.ranker")

RANK_OBJECTIVES = ("lambdarank", "rank_xendcg")
AUTO_THREADS_MIN_ROWS = 200_000


def add_embedding_affinity(rows: pd.DataFrame, tt: Any, batch: int = 8192) -> pd.DataFrame:
    """A copy of `rows` with `embedding_affinity` = <user vector(user_id, tower_history), item vector>.

    Unknown items get the registry default (0.0), exactly as the server does for items
    missing from the bundle's vocabulary (their item vector is zero).
    """
    out = rows.copy()
    out["embedding_affinity"] = embedding_affinity(rows, tt, batch)
    return out


def embedding_affinity(rows: pd.DataFrame, tt: Any, batch: int = 8192) -> np.ndarray:
    """float64 per row of `rows`: what `add_embedding_affinity` adds, without copying the frame."""
    out = rows
    n = len(out)
    if n == 0:
        return np.zeros(0)
    item_rows = tt.item_rows(out["item_id"].tolist())
    hist = pd.Series(tower_history_column(out), index=out.index)  # session items, then the user's latest
    # one user vector per distinct (user, history): the impressions of one page share it
    # (factorized per column, then as one int64 pair code: a MultiIndex would build a tuple per row)
    user_codes, user_uniq = pd.factorize(out["user_id"].astype(object).where(out["user_id"].notna(), "").to_numpy())
    hist_codes, hist_uniq = pd.factorize(hist.to_numpy())
    codes, pairs = pd.factorize(user_codes.astype(np.int64) * max(len(hist_uniq), 1) + hist_codes)
    uv = tt.user_vectors(list(user_uniq[pairs // max(len(hist_uniq), 1)]), list(hist_uniq[pairs % max(len(hist_uniq), 1)]),
                         batch=batch)
    emb = tt.item_embeddings
    aff = np.zeros(n, dtype=np.float64)
    for s in range(0, n, batch):
        rows_ = item_rows[s: s + batch]
        known = rows_ >= 0
        u = uv[codes[s: s + batch]]
        iv = np.zeros_like(u)
        iv[known] = emb[rows_[known]]
        aff[s: s + batch] = np.einsum("ij,ij->i", u, iv)
    return aff


# time blocks of the train split that each get their embedding affinity from a two-tower fit on the other blocks
# (ranker_training_affinity); < 2 = the one tower's in-sample affinity on every row
AFFINITY_FOLDS = 4


def ranker_training_affinity(rows: pd.DataFrame, tt: Any, items: pd.DataFrame, users: pd.DataFrame,
                             folds: int = AFFINITY_FOLDS, in_sample: pd.DataFrame | None = None) -> pd.DataFrame:
    """`add_embedding_affinity` for the rows the ranker learns from: out of fold on the train split.

    Why: the two-tower is fit on the train split's positives, so on those very rows its affinity is in-sample
    (it memorized them: on the simulator the positive - negative affinity gap was 0.097 on train rows and 0.057
    on validation rows, which the tower never saw), and a ranker trained on it over-trusts a feature that at
    serving time (new moments, unseen pairs) is much weaker: ranked over the whole catalog, that ranker scored
    below user_category_pref_decayed alone. Stacking's rule: a model's output used as a feature is computed
    out of fold. The train split is cut into `folds` blocks by time; each block's affinity comes from a tower
    (`tt`'s own config) fit on the other blocks. Validation and test rows keep `tt`'s affinity, as serving
    reads it (`tt` never saw them either). A block whose other blocks hold no positives keeps `tt`'s.
    """
    out = add_embedding_affinity(rows, tt) if in_sample is None else in_sample.copy()
    train = (rows["split"] == "train").to_numpy() if "split" in rows else np.ones(len(rows), dtype=bool)
    if folds < 2 or train.sum() < folds:
        return out
    from training.two_tower import train_two_tower
    from training.two_tower_config import TWO_TOWER_COLUMNS, TwoTowerConfig

    config = TwoTowerConfig(**(getattr(tt, "config", None) or {}))
    if config.max_examples_per_epoch > 0:
        # the folds together cost one tower fit, not `folds` of them: on a log above the per-epoch budget every
        # fold tower would otherwise draw the full budget (issue 15: 2y-1m's tower is ~200 s); a log under the
        # budget (with 2 folds: whole train split <= the budget, so each fold's half fits in half of it) trains exactly as before
        config.max_examples_per_epoch = max(1, config.max_examples_per_epoch // folds)
    ts = rows["timestamp"].to_numpy(dtype=np.int64)
    edges = np.quantile(ts[train], np.linspace(0.0, 1.0, folds + 1)[1:-1])
    block = np.searchsorted(edges, ts, side="right")
    # the towers read a tenth of the columns: their row subsets copy only those (4 folds x 3/4 of the train split)
    tower_rows = rows[[c for c in TWO_TOWER_COLUMNS if c in rows]]
    valid = tower_rows[(rows["split"] == "validation").to_numpy()] if "split" in rows else tower_rows.iloc[:0]
    for k in range(folds):
        held = train & (block == k)
        fit_rows = tower_rows[train & ~held]
        if not held.any() or not (fit_rows["label_binary"] == 1).any():
            continue
        fold_tower = train_two_tower(fit_rows, items, users, config, valid_rows=valid if len(valid) else None)
        out.loc[held, "embedding_affinity"] = embedding_affinity(tower_rows[held], fold_tower)
        log.info("embedding affinity of train block %d of %d (%d rows) from a tower fit on the other blocks", k + 1,
                 folds, int(held.sum()))
    return out


def validation_score(booster: Any) -> float | None:
    """The booster's best validation score on its first metric (what early stopping watched), None without one."""
    scores = (getattr(booster, "best_score", None) or {}).get("validation") or {}
    return float(next(iter(scores.values()))) if scores else None


def fit_ranker(rows: pd.DataFrame, tt: Any, items: pd.DataFrame, users: pd.DataFrame,
               config: RankerConfig) -> tuple[Any, pd.DataFrame, dict[str, Any]]:
    """The ranker over the training set, its train split's embedding affinity in sample or out of fold, whichever
    ranks the validation window better (`validation_score`, the early-stopping metric: validation rows carry
    the full tower's affinity either way, as serving reads it, so the two rankers are compared on equal terms).

    Why a choice and not always out of fold: the fold towers each see part of the train split, so on a short log
    their affinity is much noisier than the full tower's (the 10-day test world: served NDCG 0.200 in sample,
    0.171 out of fold with 2 blocks, 0.193 with 4; the validation AUC prefers out of fold there as well), while on longer ones the in-sample affinity is the leak the ranker over-trusts (the
    simulator: 0.122 -> 0.137). Returns the booster, the rows it learned from (with their affinity) and what was
    chosen (run metadata)."""
    in_sample = add_embedding_affinity(rows, tt)
    split = rows["split"].to_numpy() if "split" in rows else np.full(len(rows), "train", dtype=object)
    train, valid = split == "train", split == "validation"
    # the features are row-wise and the two rankers' rows differ only in the train split's affinity: assembled once
    x = assemble_features(in_sample) if in_sample.index.is_unique else None
    booster = train_ranker(in_sample[train], in_sample[valid], config, features=x)
    base = validation_score(booster)
    chosen: dict[str, Any] = {"affinity_folds": 1, "validation_score_in_sample": base}
    if config.affinity_folds < 2 or base is None:
        return booster, in_sample, chosen
    oof = ranker_training_affinity(rows, tt, items, users, config.affinity_folds, in_sample=in_sample)
    if x is not None:
        x = x.assign(embedding_affinity=feature_matrix(oof, len(oof), ["embedding_affinity"])[:, 0])
    oof_booster = train_ranker(oof[train], oof[valid], config, features=x)
    chosen["validation_score_out_of_fold"] = score = validation_score(oof_booster)
    frame = in_sample
    if score is not None and score > base:
        booster, frame, chosen["affinity_folds"] = oof_booster, oof, config.affinity_folds
    log.info("ranker: train-split affinity %s (validation %s)", "out of fold" if chosen["affinity_folds"] > 1
             else "in sample", chosen)
    return booster, frame, chosen


@dataclass
class RankerConfig:
    num_boost_round: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 31
    early_stopping_rounds: int = 30
    objective: str = "binary"
    seed: int = 7
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.9
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    # 0 = auto: 1 thread below AUTO_THREADS_MIN_ROWS training rows, else 2. On this shared 2-core box,
    # 2 OpenMP threads on small data measured 5-15x slower under contention than 1.
    num_threads: int = 0
    # training budget (0 = no cap): above this many training rows the ranker trains on a seeded sample of whole
    # queries holding at most this many (LightGBM's time is linear in rows: 4M rows of a 1M-click log took
    # ~400 s); a smaller log trains exactly as without the cap. Measured (bench/stages.py, 2y-200k): 745k rows
    # capped at 250k trained in 60 CPU s instead of 138, validation AUC 0.8858 vs 0.8862
    max_train_rows: int = 1_000_000
    # time blocks for the train split's out-of-fold embedding affinity (ranker_training_affinity; fit_ranker keeps
    # it only where it scores the validation window better than the in-sample one; < 2 = in sample only): a small
    # log costs ~folds - 1 extra tower fits, one above the tower's per-epoch budget, plus a second ranker
    affinity_folds: int = AFFINITY_FOLDS


def ranker_params(config: RankerConfig, n_rows: int = 0) -> dict[str, Any]:
    params: dict[str, Any] = {
        "objective": config.objective,
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_data_in_leaf": config.min_data_in_leaf,
        "feature_fraction": config.feature_fraction,
        "bagging_fraction": config.bagging_fraction,
        "bagging_freq": config.bagging_freq,
        "lambda_l2": config.lambda_l2,
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": config.num_threads or (2 if n_rows >= AUTO_THREADS_MIN_ROWS else 1),
        "verbosity": -1,
    }
    # early stopping watches the first metric: validation AUC (stopping on logloss halted at ~20 trees and
    # lost ~0.02 AUC and ~0.018 NDCG@10 on six simulator seeds)
    params["metric"] = ["ndcg"] if config.objective in RANK_OBJECTIVES else ["auc", "binary_logloss"]
    if config.objective in RANK_OBJECTIVES:
        params["eval_at"] = [10]
    return params


def budget_rows(rows: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """`rows` if it has at most `cap` rows (or cap <= 0), else the rows of a seeded random set of whole queries
    (query_id) holding at most `cap` rows, in their original order: a ranking query is never split."""
    if cap <= 0 or len(rows) <= cap:
        return rows
    codes, uniques = pd.factorize(rows["query_id"].to_numpy() if "query_id" in rows else np.arange(len(rows)))
    missing = codes < 0  # a row without a query is a query of its own
    codes[missing] = len(uniques) + np.arange(int(missing.sum()))
    sizes = np.bincount(codes)
    order = np.random.default_rng(seed).permutation(len(sizes))
    kept = np.zeros(len(sizes), dtype=bool)
    kept[order[np.cumsum(sizes[order]) <= cap]] = True
    return rows[kept[codes]]


def _dataset(rows: pd.DataFrame, objective: str, reference: Any = None, features: pd.DataFrame | None = None):
    """`features`: assemble_features of a frame holding `rows` (same index labels), or None to assemble them here."""
    import lightgbm as lgb

    if objective in RANK_OBJECTIVES:
        rows = rows.sort_values(["query_id", "timestamp"], kind="mergesort") if "timestamp" in rows else \
            rows.sort_values("query_id", kind="mergesort")
    x = (assemble_features(rows) if features is None else features.loc[rows.index]).to_numpy(dtype=np.float64)
    y = rows["label_binary"].to_numpy(dtype=np.float64)
    ds = lgb.Dataset(x, label=y, feature_name=ranker_feature_names(), reference=reference, free_raw_data=False)
    if objective in RANK_OBJECTIVES:
        ds.set_group(rows.groupby("query_id", sort=False).size().to_numpy())
    return ds


def train_ranker(train_rows: pd.DataFrame, valid_rows: pd.DataFrame | None, config: RankerConfig | None = None,
                 features: pd.DataFrame | None = None):
    """A LightGBM Booster over assemble_features(rows) (registry order), label = label_binary.

    Early stopping on the validation rows when there are any (with both classes). `features`: those already
    assembled for a frame holding the train and validation rows (unique index labels), or None.
    """
    import lightgbm as lgb

    config = config or RankerConfig()
    t0 = time.perf_counter()
    if len(train_rows) == 0:
        raise ValueError("no training rows for the ranker")
    sampled = budget_rows(train_rows, int(config.max_train_rows), config.seed)
    if len(sampled) < len(train_rows):
        log.info("ranker trains on %d of %d rows (max_train_rows %d)", len(sampled), len(train_rows), config.max_train_rows)
    params = ranker_params(config, len(sampled))
    dtrain = _dataset(sampled, config.objective, features=features)
    valid_sets: list[lgb.Dataset] = []
    callbacks: list[Callable[..., Any]] = []
    if valid_rows is not None and len(valid_rows) and valid_rows["label_binary"].nunique() > 1:
        valid_sets = [_dataset(valid_rows, config.objective, reference=dtrain, features=features)]
        if config.early_stopping_rounds:
            callbacks.append(lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False))
    booster = lgb.train(params, dtrain, num_boost_round=config.num_boost_round, valid_sets=valid_sets,
                        valid_names=["validation"] if valid_sets else None, callbacks=callbacks)
    log.info("ranker trained in %.2fs (best iteration %s)", time.perf_counter() - t0, booster.best_iteration)
    return booster
