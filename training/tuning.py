"""Hyperparameter search for the LightGBM ranker: a seeded random search scored on the validation window.

Why not the test window: the test window judges the final model (evaluation, gate); tuning on it would
leak. Why random search: with ~6 knobs and a few dozen trials it finds as good a region as a
sequential optimizer (Bergstra & Bengio 2012) and needs no extra dependency; every trial is
reproducible from (seed, trial number). The best trial is written as JSON that `ranker_model` reads
when its config says `use_tuned_params: true`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.ranker import RankerConfig, train_ranker

log = logging.getLogger("kairos.tuning")

# the searched space: name -> (low, high, scale); ints are rounded
SPACE: dict[str, tuple[float, float, str]] = {
    "learning_rate": (0.02, 0.2, "log"),
    "num_leaves": (7, 127, "log_int"),
    "min_data_in_leaf": (10, 200, "log_int"),
    "feature_fraction": (0.5, 1.0, "linear"),
    "bagging_fraction": (0.5, 1.0, "linear"),
    "lambda_l2": (1e-3, 10.0, "log"),
}
TUNED_FILE = "ranker_params.json"


def sample_params(rng: np.random.Generator, space: dict[str, tuple[float, float, str]] = SPACE) -> dict[str, Any]:
    """One point of the search space."""
    out: dict[str, Any] = {}
    for name, (lo, hi, scale) in space.items():
        if scale.startswith("log"):
            v = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        else:
            v = float(rng.uniform(lo, hi))
        out[name] = int(round(v)) if scale.endswith("int") else round(v, 5)
    return out


def tune_ranker(train_rows: pd.DataFrame, valid_rows: pd.DataFrame, trials: int = 12, seed: int = 7,
                base: RankerConfig | None = None, k: int = 10) -> dict[str, Any]:
    """Train `trials` rankers (trial 0 = the base config, so tuning never reports worse than the default)
    and score each by validation NDCG@k; returns {"best": {...}, "trials": [...], "metric": ...}."""
    from training.evaluation import ranking_metrics
    from features.functions import assemble_features

    if valid_rows.empty or valid_rows["label_binary"].nunique() < 2:
        raise ValueError("tuning needs validation rows with both classes; widen the validation window "
                         "(training_set config) or add data")
    base = base or RankerConfig()
    rng = np.random.default_rng(seed)
    x_valid = assemble_features(valid_rows).to_numpy(dtype=np.float64)
    results: list[dict[str, Any]] = []
    for trial in range(trials):
        params = {} if trial == 0 else sample_params(rng)
        config = replace(base, **params)
        t0 = time.perf_counter()
        booster = train_ranker(train_rows, valid_rows, config)
        scores = booster.predict(x_valid, num_threads=1)
        m = ranking_metrics(valid_rows, scores, k, probabilities=False)
        row = {"trial": trial, **{name: getattr(config, name) for name in SPACE},
               f"validation_ndcg_at_{k}": m[f"ndcg_at_{k}"], "validation_auc": m["auc"],
               "best_iteration": int(booster.best_iteration or booster.current_iteration()),
               "seconds": round(time.perf_counter() - t0, 3)}
        results.append(row)
        log.info("tuning trial %d/%d: %s", trial + 1, trials, row)
    key = f"validation_ndcg_at_{k}"
    best = max(results, key=lambda r: (np.nan_to_num(r[key], nan=-1.0), -r["trial"]))
    tuned = replace(base, **{name: best[name] for name in SPACE},
                    num_boost_round=max(int(best["best_iteration"]), 1) if base.early_stopping_rounds else base.num_boost_round)
    return {"metric": key, "best": best, "best_config": asdict(tuned), "trials": results,
            "default": results[0], "lift_over_default": float(best[key] - results[0][key])}


def save_tuned(result: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TUNED_FILE
    path.write_text(json.dumps(result, indent=2, default=float))
    return path


def load_tuned(folder: Path, base: RankerConfig) -> RankerConfig:
    """The base config with the tuned knobs applied; a clear error when no search has been run."""
    path = folder / TUNED_FILE
    if not path.exists():
        raise FileNotFoundError(f"no tuned ranker parameters at {path}: materialize the `ranker_tuning` asset "
                                "(job `tune_ranker`) first, or set use_tuned_params: false")
    best = json.loads(path.read_text())["best"]
    return replace(base, **{name: best[name] for name in SPACE if name in best})
