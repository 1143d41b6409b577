"""Quality benchmark: the served top-K over the whole catalog, beside the baselines a user would try first.

    .venv/bin/python bench/quality.py                                 # MovieLens-100K and the simulator
    .venv/bin/python bench/quality.py --sources simulator --json out.json
    .venv/bin/python bench/quality.py --sources movielens-100k --home /tmp/ml --build-ops '{"labels": {"config": {...}}}'

Each source runs the real asset graph (Dagster, Spark, Delta, MLflow) in a fresh KAIROS_HOME. Its
`model_evaluation` asset replays `serving.pipeline.personalize` at the test window's start for every
test user over the whole catalog (training/served_eval.py) and scores it beside popularity, recent
popularity (14-day window and decayed), SAR-style co-occurrence and ALS (`implicit`) on the same
temporal split (training/catalog_eval.py); the session protocol (every prefix of a held-out session
-> its next click) beside session-kNN. On the simulator the oracle (the true expected click rate of
every item for every user, which the simulator knows) is scored on the same split too. Prints the
tables, the targets (served >= 1.15 x best baseline; simulator >= 0.9 x oracle; sessions P@20 >=
session-kNN) and the gate's verdict.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIM = {"source": "simulator", "n_users": 300, "n_items": 400, "days": 14, "seed": 7}
SOURCES = {"simulator": SIM, "movielens-100k": {"source": "movielens-100k"}}
COLS = ("ndcg_at_10", "ndcg_at_10_ci_low", "ndcg_at_10_ci_high", "recall_at_10", "recall_at_20", "hr_at_10", "mrr_at_10",
        "warm_ndcg_at_10", "cold_ndcg_at_10", "catalog_coverage", "personalized_share")
TARGET_LIFT = 0.15
TARGET_ORACLE = 0.9


def oracle_scores(cfg: dict):
    """(user -> score vector over the catalog, catalog ids): each item's expected click probability for the user,
    marginalized over the session intent, from the simulator's own tastes and item quality."""
    import numpy as np

    from ingestion.simulator import SimulatorConfig, build_world

    keys = {k: v for k, v in cfg.items() if k != "source"}
    world = build_world(SimulatorConfig(**keys))
    c = world.config
    tastes, q, cat = world.tastes, world.item_quality, world.item_cat
    p_intent = 0.85 * tastes + 0.15 / c.n_categories          # users x categories
    base = q[None, :] + 3.0 * tastes[:, cat]                    # users x items
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    pi = p_intent[:, cat]
    expected = pi * sig(base + c.intent_strength - 2.2) + (1 - pi) * sig(base - 2.2)
    return dict(zip(world.users["user_id"], expected)), world.items["item_id"].tolist()


def _one(name: str, build_ops: dict | None = None) -> dict:
    from dagster import AssetKey, DagsterInstance

    from ground.settings import Settings
    from orchestration.cli import ensure_redis, materialize_all, prepare_home

    settings = Settings.from_env()
    prepare_home(settings)
    redis = ensure_redis(settings)  # the online store is part of the graph: an embedded redis-server
    settings = Settings.from_env()
    ops = {"model_evaluation": {"config": {"ablations": True, "max_session_cases": 2000}}}
    for asset, cfg in (build_ops or {}).items():  # an experiment's run config, merged per asset
        ops[asset] = {"config": {**ops.get(asset, {}).get("config", {}), **cfg.get("config", {})}}
    try:
        run = materialize_all(settings, SOURCES[name], build_ops=ops)
    finally:
        if redis is not None:
            redis.stop()
    instance = DagsterInstance.get()
    evaluation = instance.get_latest_materialization_event(AssetKey("model_evaluation")).asset_materialization.metadata
    gate = instance.get_latest_materialization_event(AssetKey("validation_gate")).asset_materialization.metadata
    table = evaluation["table"].value
    catalog = table["catalog"]
    out = {"source": name, "seconds": round(run["seconds"], 1), "catalog": {k: catalog[k] for k in ("split", "systems")},
           "sessions": catalog.get("sessions", {}), "gate_passed": bool(gate["passed"].value),
           "reasons": gate["reasons"].value,
           "ranker_diagnostics": {m: {k: table[m].get(k) for k in ("auc", "ndcg_at_10", "logloss")}
                                  for m in ("two_stage", "popularity", "logistic_regression") if m in table}}
    if name == "simulator":
        out["catalog"]["systems"]["oracle"] = _oracle(settings, catalog["split"]["split_ms"])
    return out


def _oracle(settings, split_ms: int) -> dict:
    from lake.delta import DeltaLake
    from training.catalog_eval import evaluate_recommender, top_k_excluding
    from training.served_eval import catalog_split

    lake = DeltaLake(settings.lake_uri)
    scores, item_ids = oracle_scores(SIM)
    split = catalog_split(lake.read("labels"), lake.read("silver_events", columns=["user_id", "item_id", "event_type",
                                                                                   "timestamp", "session_id"]),
                          lake.read("catalog_items", columns=["item_id"])["item_id"].astype(str).tolist(), split_ms)
    index = {i: j for j, i in enumerate(item_ids)}
    order = [index[i] for i in split.catalog]

    def recommend(user: str, k: int):
        s = scores[user][order]
        return top_k_excluding(s, split.catalog, split.consumed.get(user, ()), k), True

    return evaluate_recommender(split, recommend).summary


def _print(r: dict) -> None:
    systems = r["catalog"]["systems"]
    split = r["catalog"]["split"]
    print(f"\n{r['source']}: whole graph {r['seconds']} s; split at {split['split_ms']} (snapshot {split['snapshot_ts']}), "
          f"{split['users']} test users ({split['warm_users']} warm), {split['catalog_items']} catalog items")
    print(f"  {'system':<32}" + "".join(f"{c.replace('_at_', '@').replace('ndcg@10_', ''):>13}" for c in COLS))
    for name in sorted(systems, key=lambda n: -float(systems[n].get("ndcg_at_10") or 0)):
        print(f"  {name:<32}" + "".join(f"{float(systems[name].get(c, float('nan'))):>13.4f}" for c in COLS))
    baselines = {n: m["ndcg_at_10"] for n, m in systems.items() if not n.startswith(("served", "champion")) and n != "oracle"}
    best = max(baselines, key=baselines.get)
    served = systems["served"]["ndcg_at_10"]
    ratio = served / baselines[best] if baselines[best] else float("nan")
    print(f"  target served >= {1 + TARGET_LIFT:.2f} x best baseline ({best} {baselines[best]:.4f}): {ratio:.3f} x "
          f"-> {'MET' if ratio >= 1 + TARGET_LIFT else f'MISSED by {(1 + TARGET_LIFT - ratio) * baselines[best]:.4f} NDCG@10'}")
    if "oracle" in systems:
        share = served / systems["oracle"]["ndcg_at_10"]
        print(f"  target served >= {TARGET_ORACLE} x oracle ({systems['oracle']['ndcg_at_10']:.4f}): {share:.3f} x -> "
              f"{'MET' if share >= TARGET_ORACLE else 'MISSED'}")
    if r.get("sessions"):
        print("  session protocol (every prefix of a held-out session -> next click), x100:")
        for name, m in sorted(r["sessions"].items(), key=lambda kv: -kv[1].get("p_at_20", 0)):
            print(f"    {name:<30} P@20 {m['p_at_20']:7.2f} [{m.get('p_at_20_ci_low', float('nan')):.2f}, "
                  f"{m.get('p_at_20_ci_high', float('nan')):.2f}]  MRR@20 {m['mrr_at_20']:7.2f}  cases {int(m['cases'])}")
        knn = r["sessions"].get("session_knn", {}).get("p_at_20", float("nan"))
        best_served = max(m["p_at_20"] for n, m in r["sessions"].items() if n.startswith("served"))
        print(f"  target session P@20 >= session-kNN ({knn:.2f}): served {best_served:.2f} -> "
              f"{'MET' if best_served >= knn else 'MISSED'}")
    print("  ranker diagnostics (impression level): " + json.dumps(r["ranker_diagnostics"]))
    print(f"  gate {'PASSED' if r['gate_passed'] else 'FAILED'}")
    for reason in r["reasons"]:
        print(f"    {reason}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--home", help="build in this KAIROS_HOME (one sub-folder per source) and keep it, e.g. to "
                                         "re-score serving changes on the built world; default: a temporary folder")
    parser.add_argument("--build-ops", default="{}",
                        help='run config per build asset, JSON, e.g. \'{"labels": {"config": {"easy_negative_ratio": 4}}}\'')
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    build_ops = json.loads(args.build_ops)
    if args.one:
        print("RESULT " + json.dumps(_one(args.one, build_ops), default=str))
        return 0
    results = []
    for name in args.sources:
        with (contextlib.nullcontext(str(Path(args.home) / name)) if args.home else tempfile.TemporaryDirectory()) as home:
            Path(home).mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "KAIROS_HOME": home, "OPENBLAS_NUM_THREADS": "1"}
            for k in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "KAIROS_LAKE_URI", "REDIS_URL"):
                env.pop(k, None)
            if name.startswith("movielens"):
                env.setdefault("KAIROS_PARTITION_START", "1997-09-01")
            print(f"[bench] {name}: running the whole asset graph in {home} ...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--one", name, "--build-ops", json.dumps(build_ops)], env=env, cwd=ROOT, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(out.stderr[-4000:], file=sys.stderr)
                return out.returncode or 1
            r = json.loads(lines[-1][len("RESULT "):])
            results.append(r)
            _print(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
