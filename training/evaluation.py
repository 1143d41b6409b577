"""Offline evaluation on the time-split test window: the two-stage model beside its baselines."""
from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from features.functions import assemble_features

log = logging.getLogger("kairos.evaluation")

TIE_SEED = 20240601


def ranking_metrics(frame: pd.DataFrame, scores: Any, k: int = 10, probabilities: bool | None = None,
                    also_k: Sequence[int] = ()) -> dict[str, float]:
    """AUC (label_binary), logloss (only for probabilities), NDCG@k, HR@k and MRR per query_id.

    `also_k` adds NDCG and HR at further cut-offs (e.g. 20: the page below the fold still
    matters, and a model can win @10 by shuffling what it loses @20).

    NDCG uses the graded gain max(label, 0) with a 1/log2(rank+1) discount; NDCG, HR and MRR
    are averaged over queries with at least one positive (label_binary == 1). Ties in the
    score are broken by a fixed pseudo-random order, never by the logged order (which carries
    the logging policy's position bias). `probabilities=None` infers it from the score range.
    """
    s = _finite_scores(scores, len(frame))
    yb = frame["label_binary"].to_numpy(dtype=np.float64)
    gain = np.clip(frame["label"].to_numpy(dtype=np.float64) if "label" in frame else yb, 0.0, None)
    out: dict[str, float] = {"rows": float(len(s)), "positive_rate": float(yb.mean()) if len(yb) else float("nan")}
    ks = [k] + [c for c in dict.fromkeys(also_k) if c != k]
    if len(s) == 0:
        return {**out, "auc": float("nan"), **{f"{m}_at_{c}": float("nan") for c in ks for m in ("ndcg", "hr")},
                "mrr": float("nan"), "queries": 0.0}
    from sklearn.metrics import log_loss, roc_auc_score

    out["auc"] = float(roc_auc_score(yb, s)) if 0 < yb.sum() < len(yb) else float("nan")
    if probabilities is None:
        probabilities = bool((s >= 0).all() and (s <= 1).all())
    if probabilities and 0 < yb.sum() < len(yb):
        out["logloss"] = float(log_loss(yb, np.clip(s, 1e-7, 1 - 1e-7), labels=[0, 1]))

    q, order, rank = _query_ranks(frame["query_id"].to_numpy(), s)
    q_o, g_o, y_o = q[order], gain[order], yb[order]
    disc = 1.0 / np.log2(rank + 2.0)
    n_q = len(np.unique(q_o))
    # ideal: gains sorted descending within each query
    ideal_order = np.lexsort((-g_o, q_o))
    g_i = g_o[ideal_order]
    dcg = {c: np.bincount(q_o, weights=np.where(rank < c, g_o * disc, 0.0), minlength=q.max() + 1) for c in ks}
    idcg = {c: np.bincount(q_o, weights=np.where(rank < c, g_i * disc, 0.0), minlength=q.max() + 1) for c in ks}
    has_pos = np.bincount(q_o, weights=y_o, minlength=q.max() + 1) > 0
    first_pos = np.full(q.max() + 1, np.inf)
    pos_rank = rank[y_o == 1]
    np.minimum.at(first_pos, q_o[y_o == 1], pos_rank)
    sel = has_pos
    out["queries"] = float(n_q)
    out["queries_with_positive"] = float(sel.sum())
    for c in ks:
        if sel.any():
            d, i = dcg[c][sel], idcg[c][sel]
            out[f"ndcg_at_{c}"] = float(np.where(i > 0, d / np.where(i > 0, i, 1.0), 0.0).mean())
            out[f"hr_at_{c}"] = float((first_pos[sel] < c).mean())
        else:
            out[f"ndcg_at_{c}"] = out[f"hr_at_{c}"] = float("nan")
    out["mrr"] = float((1.0 / (first_pos[sel] + 1.0)).mean()) if sel.any() else float("nan")
    return out


def _query_ranks(query_ids: Any, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query codes, row order by query then score desc, 0-based rank of each ordered row in its query).

    One ordering shared by every metric, so the top-k that coverage and diversity look at is the
    same top-k that NDCG scored; ties go to a fixed pseudo-random order, never the logged order.
    """
    q = pd.factorize(np.asarray(query_ids))[0]
    tie = np.random.default_rng(TIE_SEED).permutation(len(scores))
    order = np.lexsort((tie, -scores, q))
    q_o = q[order]
    starts = np.r_[0, np.flatnonzero(np.diff(q_o)) + 1] if len(q_o) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, len(q_o)])
    rank = np.arange(len(q_o)) - np.repeat(starts, sizes)
    return q, order, rank


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


def top_k_rows(frame: pd.DataFrame, scores: Any, k: int = 10) -> pd.DataFrame:
    """The rows each query would show in its top k under `scores` (same ordering as ranking_metrics),
    with a `rank` column (0-based); the common input of the beyond-accuracy metrics."""
    s = _finite_scores(scores, len(frame))
    if len(s) == 0:
        return frame.iloc[:0].assign(rank=np.zeros(0, dtype=np.int64))
    _, order, rank = _query_ranks(frame["query_id"].to_numpy(), s)
    keep = rank < k
    return frame.iloc[order[keep]].assign(rank=rank[keep])


def catalog_coverage(frame: pd.DataFrame, scores: Any, k: int = 10, item_col: str = "item_id") -> float:
    """Distinct items in any query's top k / distinct items in `frame`.

    Accuracy alone rewards showing everyone the same hits; coverage says how much of the
    candidate catalog the model ever surfaces (popularity sits near the floor).
    """
    n_items = frame[item_col].nunique()
    if n_items == 0:
        return float("nan")
    return float(top_k_rows(frame, scores, k)[item_col].nunique() / n_items)


def intra_list_diversity(frame: pd.DataFrame, scores: Any, k: int = 10, category_col: str = "category") -> float:
    """Mean over queries (with >= 2 shown items) of the share of top-k item pairs in different categories.

    A list of ten near-duplicates can score well on NDCG and still be a poor page; a missing
    category counts as a category of its own.
    """
    top = top_k_rows(frame, scores, k)
    if top.empty:
        return float("nan")
    cats = top[category_col].astype(object).where(top[category_col].notna(), "<missing>")
    per_cat = pd.DataFrame({"q": top["query_id"].to_numpy(), "c": cats.to_numpy()}).groupby(["q", "c"]).size()
    same = (per_cat * (per_cat - 1) / 2).groupby(level=0).sum()
    n = per_cat.groupby(level=0).sum()
    pairs = n * (n - 1) / 2
    ok = pairs > 0
    if not ok.any():
        return float("nan")
    return float((1.0 - same[ok] / pairs[ok]).mean())


def calibration_table(labels: Any, probs: Any, bins: int = 10) -> pd.DataFrame:
    """Reliability table over equal-width probability bins: bin, lower, upper, count, mean_predicted,
    observed_rate (NaN for empty bins). AUC ignores calibration, but a blender, a threshold or a
    bid that consumes the ranker's probability does not."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"{len(p)} probabilities for {len(y)} labels")
    ok = np.isfinite(p) & np.isfinite(y)
    y, p = y[ok], np.clip(p[ok], 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)  # p == 1.0 lands in the last bin
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / count, np.nan)
        rate = np.where(count > 0, sum_y / count, np.nan)
    return pd.DataFrame({"bin": np.arange(bins), "lower": edges[:-1], "upper": edges[1:], "count": count.astype(np.int64),
                         "mean_predicted": mean_p, "observed_rate": rate})


def expected_calibration_error(labels: Any, probs: Any, bins: int = 10) -> float:
    """Count-weighted mean |mean_predicted - observed_rate| over the calibration table's non-empty bins."""
    table = calibration_table(labels, probs, bins)
    filled = table[table["count"] > 0]
    total = float(filled["count"].sum())
    if total == 0:
        return float("nan")
    return float((filled["count"] / total * (filled["mean_predicted"] - filled["observed_rate"]).abs()).sum())


def popularity_segment_scores(train: pd.DataFrame, test: pd.DataFrame, segment_col: str = "device_type") -> np.ndarray:
    """Train-split clicks (label_binary == 1) of the item within the row's segment; a segment with no
    train clicks (new or missing) falls back to the item's global train clicks. Global clicks x 1e-6
    break ties inside a segment. The fair popularity baseline: a mobile feed is not a desktop feed."""
    pos = train[train["label_binary"] == 1]
    global_clicks = pos.groupby("item_id").size()
    g = test["item_id"].map(global_clicks).fillna(0.0).to_numpy(dtype=np.float64)
    if segment_col not in test or segment_col not in pos:
        return g
    seg_clicks = pos.groupby([segment_col, "item_id"]).size()
    key = pd.MultiIndex.from_arrays([test[segment_col].to_numpy(), test["item_id"].to_numpy()])
    seg = pd.Series(seg_clicks.reindex(key).to_numpy(), index=test.index).fillna(0.0).to_numpy(dtype=np.float64)
    known = test[segment_col].isin(set(pos[segment_col].dropna())).to_numpy()
    return np.where(known, seg + 1e-6 * g, g)


def co_occurrence_scores(features: pd.DataFrame) -> np.ndarray:
    """Item-to-item baseline from assembled features: co_engagement with the session's last items,
    item_clicks_7d x 1e-6 as the tie-break (most rows have no co-clicks). What a session-based
    'people who clicked this also clicked' carousel would rank."""
    return (features["co_engagement"].to_numpy(dtype=np.float64)
            + 1e-6 * features["item_clicks_7d"].to_numpy(dtype=np.float64))


SLICE_MIN_ROWS = 20
FRESH_ITEM_MS = 48 * 3600 * 1000


def slice_masks(test: pd.DataFrame) -> dict[str, np.ndarray]:
    """Boolean row masks of the evaluation slices: new vs established users (user_clicks_7d missing or 0),
    fresh vs older items (< 48h since publish at request time; unknown publish time in neither), and one
    per device type. An average can hide a model that is worse exactly where it matters (cold start)."""
    out: dict[str, np.ndarray] = {}
    if "user_clicks_7d" in test:
        uc = pd.to_numeric(test["user_clicks_7d"], errors="coerce").to_numpy(dtype=np.float64)
        new = np.isnan(uc) | (uc == 0)
        out["user_new"], out["user_established"] = new, ~new
    if "publish_ts" in test and "request_ts" in test:
        age = (pd.to_numeric(test["request_ts"], errors="coerce").to_numpy(dtype=np.float64)
               - pd.to_numeric(test["publish_ts"], errors="coerce").to_numpy(dtype=np.float64))
        known = np.isfinite(age)
        out["item_fresh"] = known & (age < FRESH_ITEM_MS)
        out["item_older"] = known & (age >= FRESH_ITEM_MS)
    if "device_type" in test:
        dev = test["device_type"]
        for value in sorted(dev.dropna().astype(str).unique()):
            out[f"device_{value}"] = (dev.astype(str) == value).to_numpy() & dev.notna().to_numpy()
    return out


def slice_metrics(test: pd.DataFrame, model_scores: dict[str, np.ndarray], k: int = 10,
                  min_rows: int = SLICE_MIN_ROWS) -> dict[str, dict[str, dict[str, float]]]:
    """slice -> model -> {"auc", "ndcg_at_{k}", "rows"}; slices with fewer than `min_rows` rows or no
    positive get {"rows"} only (a metric on 5 rows is noise, not a finding)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, mask in slice_masks(test).items():
        rows = int(mask.sum())
        sub = test[mask]
        enough = rows >= min_rows and float(sub["label_binary"].sum()) > 0
        per_model: dict[str, dict[str, float]] = {}
        for model, scores in model_scores.items():
            if not enough:
                per_model[model] = {"rows": float(rows)}
                continue
            m = ranking_metrics(sub, np.asarray(scores)[mask], k, probabilities=False)
            per_model[model] = {"auc": m["auc"], f"ndcg_at_{k}": m[f"ndcg_at_{k}"], "rows": float(rows)}
        out[name] = per_model
    return out


def _finite_scores(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != n:
        raise ValueError(f"{len(s)} scores for {n} rows")
    finite = np.isfinite(s)
    return np.where(finite, s, np.nanmin(s[finite]) if finite.any() else 0.0)


def _is_probability(scores: np.ndarray) -> bool:
    return bool(len(scores) and np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all())


def _json_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame -> JSON-safe records (python scalars, NaN -> None) for MLflow/Dagster metadata."""
    records = []
    for row in table.to_dict("records"):
        records.append({key: (None if isinstance(v, float) and not np.isfinite(v) else
                              v.item() if isinstance(v, np.generic) else v) for key, v in row.items()})
    return records


# keys of evaluate_models' result that are not a model's metrics dict
EXTRA_KEYS = ("catalog", "calibration", "slices", "scoring_latency", "feature_health", "champion_source", "report_html",
              "report_plot")


def model_names(results: dict[str, Any]) -> list[str]:
    """The keys of an evaluation result that hold one model's flat metrics dict."""
    return [m for m, v in results.items() if m not in EXTRA_KEYS and isinstance(v, dict) and v
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())]


def evaluate_models(frame: pd.DataFrame, tt: Any, booster: Any, k: int = 10) -> dict[str, Any]:
    """Test-split metrics, side by side, of "two_stage", "two_tower", "popularity", "popularity_segment",
    "co_occurrence" and "logistic_regression" (each a flat dict of floats, NDCG/HR @k and @20), plus
    "calibration" (the two-stage reliability table as records; [] when the ranker does not output
    probabilities) and "slices" (slice -> model -> auc / ndcg / rows for two_stage and popularity).

    The two-stage and popularity dicts also carry catalog_coverage and intra_list_diversity of
    their top k, and two_stage its ECE when it outputs probabilities.
    """
    from training.ranker import add_embedding_affinity

    if "embedding_affinity" not in frame:
        frame = add_embedding_affinity(frame, tt)
    train = frame[frame["split"] == "train"]
    test = frame[frame["split"] == "test"]
    if test.empty:
        raise ValueError("no test rows to evaluate on (split == 'test')")
    x_test = assemble_features(test)
    also = (20,)
    results: dict[str, Any] = {}
    # logloss only when the ranker outputs probabilities (binary objective; not for lambdarank scores)
    two_stage = np.asarray(booster.predict(x_test.to_numpy(dtype=np.float64)), dtype=np.float64).reshape(-1)
    popularity = x_test["item_clicks_7d"].to_numpy(dtype=np.float64)
    results["two_stage"] = ranking_metrics(test, two_stage, k, probabilities=None, also_k=also)
    results["two_tower"] = ranking_metrics(test, x_test["embedding_affinity"].to_numpy(), k, probabilities=False, also_k=also)
    results["popularity"] = ranking_metrics(test, popularity, k, probabilities=False, also_k=also)
    results["popularity_segment"] = ranking_metrics(test, popularity_segment_scores(train, test), k, probabilities=False,
                                                    also_k=also)
    results["co_occurrence"] = ranking_metrics(test, co_occurrence_scores(x_test), k, probabilities=False, also_k=also)
    if not train.empty and train["label_binary"].nunique() > 1:
        lr = fit_logistic_regression(train)
        results["logistic_regression"] = ranking_metrics(test, lr.predict_proba(x_test.to_numpy(dtype=np.float64))[:, 1], k,
                                                         probabilities=True, also_k=also)
    from training.two_tower import retrieval_recall

    if hasattr(tt, "item_row") and hasattr(tt, "model"):
        results["two_tower"].update({f"retrieval_{m}": v for m, v in retrieval_recall(tt, test).items()
                                     if m.startswith(("recall_at_", "random_recall_at_"))})
    for name, scores in (("two_stage", two_stage), ("popularity", popularity)):
        results[name]["catalog_coverage"] = catalog_coverage(test, scores, k)
        if "category" in test:
            results[name]["intra_list_diversity"] = intra_list_diversity(test, scores, k)
    labels = test["label_binary"].to_numpy(dtype=np.float64)
    if _is_probability(two_stage):
        results["two_stage"]["ece"] = expected_calibration_error(labels, two_stage)
        results["calibration"] = _json_records(calibration_table(labels, two_stage))
    else:
        results["calibration"] = []
    results["slices"] = slice_metrics(test, {"two_stage": two_stage, "popularity": popularity}, k)
    log.info("evaluation: %s", {m: {kk: round(v, 4) for kk, v in results[m].items()} for m in model_names(results)})
    return results


def bundle_two_tower(bundle: Any) -> Any:
    """A registered bundle's towers in the shape training produces (TwoTowerResult), so the same
    affinity and feature code scores an old model exactly as it scores a new one."""
    from training.two_tower import TwoTowerResult

    return TwoTowerResult(model=bundle.towers, item_ids=list(bundle.item_ids), user_ids=list(bundle.user_ids),
                          item_embeddings=bundle.item_embeddings)


def evaluate_bundle(frame: pd.DataFrame, bundle: Any, k: int = 10) -> dict[str, float]:
    """The two-stage metrics of a registered bundle (e.g. the current champion) on `frame`'s test split.

    A candidate must be compared with the champion on the *same* test window: the champion's own
    run measured it on an older window, whose AUC is not comparable. Raises KeyError when the
    bundle's feature schema asks for a feature this code no longer assembles.
    """
    from training.ranker import add_embedding_affinity

    test = frame[frame["split"] == "test"].drop(columns=["embedding_affinity"], errors="ignore")
    if test.empty:
        raise ValueError("no test rows to evaluate on (split == 'test')")
    rows = add_embedding_affinity(test, bundle_two_tower(bundle))
    x = assemble_features(rows)
    missing = [c for c in bundle.manifest.get("ranker_features", []) if c not in x]
    if missing:
        raise KeyError(f"bundle {bundle.model_version} needs features this code does not assemble: {missing}")
    scores = np.asarray(bundle.rank(x), dtype=np.float64).reshape(-1)
    out = ranking_metrics(test, scores, k, probabilities=None, also_k=(20,))
    out["model_version"] = float(bundle.model_version) if str(bundle.model_version).isdigit() else float("nan")
    return out


# --------------------------------------------------------------------------- report
REPORT_METRICS = ("auc", "logloss", "ndcg_at_10", "ndcg_at_20", "hr_at_10", "mrr", "catalog_coverage",
                  "intra_list_diversity", "ece", "retrieval_recall_at_100", "retrieval_random_recall_at_100")
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 2em}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:bold;padding:4px 0}"""


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):.4f}"
    return html.escape(str(v))


def _html_table(caption: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CATALOG_COLUMNS = ("ndcg_at_10", "ndcg_at_10_ci_low", "ndcg_at_10_ci_high", "recall_at_10", "recall_at_20", "hr_at_10",
                   "mrr_at_10", "warm_ndcg_at_10", "cold_ndcg_at_10", "catalog_coverage", "personalized_share")


def _catalog_tables(catalog: dict[str, Any]) -> list[str]:
    """The tables the gate decides on, first: the served top-K over the whole catalog beside every baseline (best
    first), and the session protocol (training/served_eval.py evaluate_catalog)."""
    systems = catalog.get("systems") or {}
    if not systems:
        return []
    split = catalog.get("split") or {}
    caption = (f"Served top-10 over the whole catalog vs baselines (split at {split.get('split_ms')}: "
               f"{split.get('users')} test users, {split.get('warm_users')} warm, {split.get('catalog_items')} items)")
    order = sorted(systems, key=lambda n: -float(systems[n].get("ndcg_at_10") or 0.0))
    out = [_html_table(caption, ["system", *CATALOG_COLUMNS], [[n, *(systems[n].get(c) for c in CATALOG_COLUMNS)] for n in order])]
    sessions = catalog.get("sessions") or {}
    if sessions:
        cols = ["cases", "p_at_20", "p_at_20_ci_low", "p_at_20_ci_high", "mrr_at_20"]
        out.append(_html_table("Session protocol: every prefix of a held-out session -> its next click (P@20, MRR@20 x 100)",
                               ["system", *cols], [[n, *(v.get(c) for c in cols)] for n, v in sessions.items()]))
    return out


def evaluation_report_html(results: dict[str, Any], path: str | Path) -> Path:
    """Write a self-contained HTML page (inline CSS, no external assets) of an evaluate_models result:
    models x metrics, the two-stage calibration table and the slices; a reviewer reads it off the run."""
    models = model_names(results)
    metrics = [m for m in REPORT_METRICS if any(m in results[name] for name in models)]
    parts = _catalog_tables(results.get("catalog") or {})
    parts.append(_html_table("Ranker diagnostics: the logged rows of the test split re-ranked (impression level)",
                             ["model", *metrics], [[name, *(results[name].get(m) for m in metrics)] for name in models]))
    calib = results.get("calibration") or []
    cols = ["bin", "lower", "upper", "count", "mean_predicted", "observed_rate"]
    parts.append(_html_table("Two-stage calibration" + ("" if calib else " (ranker does not output probabilities)"),
                             cols, [[r.get(c) for c in cols] for r in calib]))
    slices = results.get("slices") or {}
    slice_models = sorted({m for per in slices.values() for m in per})
    rows = []
    for name, per in slices.items():
        for model in slice_models:
            d = per.get(model, {})
            rows.append([name, model, d.get("rows"), d.get("auc"), d.get("ndcg_at_10")])
    parts.append(_html_table("Slices", ["slice", "model", "rows", "auc", "ndcg_at_10"], rows))
    doc = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Kairos evaluation</title>"
           f"<style>{_CSS}</style></head><body><h1>Kairos offline evaluation</h1>{''.join(parts)}</body></html>")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out


def evaluation_plot_png(results: dict[str, Any], path: str | Path) -> Path:
    """One PNG for the MLflow run: NDCG@10 / HR@10 per model (the side-by-side a reviewer looks for first)
    and the two-stage reliability diagram (predicted vs observed click rate per bin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in model_names(results) if "ndcg_at_10" in results[m]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(models))
    for offset, metric in ((-0.2, "ndcg_at_10"), (0.2, "hr_at_10")):
        left.bar(x + offset, [float(results[m].get(metric, np.nan)) for m in models], width=0.4, label=metric)
    left.set_xticks(x, models, rotation=30, ha="right")
    left.set_title("test window: models side by side")
    left.legend()
    calib = [r for r in results.get("calibration") or [] if r.get("count")]
    right.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    if calib:
        right.plot([r["mean_predicted"] for r in calib], [r["observed_rate"] for r in calib], marker="o", label="two_stage")
    right.set_xlabel("mean predicted probability")
    right.set_ylabel("observed click rate")
    right.set_title("two-stage reliability" + ("" if calib else " (no probabilities)"))
    right.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
