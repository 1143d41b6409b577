"""Quality benchmark: the whole pipeline on MovieLens-100K and on the simulator, models side by side.

    .venv/bin/python bench/quality.py                          # both data sets
    .venv/bin/python bench/quality.py --sources simulator

Each source runs the real asset graph (Dagster, Spark, Delta, MLflow) in a fresh
KAIROS_HOME, then prints the test-window metrics of every model the evaluation
reports (popularity, per-segment popularity, co-occurrence, logistic regression,
two-tower alone, two-stage) and whether the gate let the two-stage model through.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"simulator": {"source": "simulator", "n_users": 300, "n_items": 400, "days": 14, "seed": 7},
           "movielens-100k": {"source": "movielens-100k"}}
METRICS = ("ndcg_at_10", "hr_at_10", "mrr", "auc")


def _one(name: str) -> dict:
    from dagster import AssetKey, DagsterInstance

    from orchestration.cli import ensure_redis, materialize_all, prepare_home
    from orchestration.settings import Settings

    settings = Settings.from_env()
    prepare_home(settings)
    redis = ensure_redis(settings)  # the online store is part of the graph: an embedded redis-server
    settings = Settings.from_env()
    try:
        run = materialize_all(settings, SOURCES[name])
    finally:
        if redis is not None:
            redis.stop()
    instance = DagsterInstance.get()
    evaluation = instance.get_latest_materialization_event(AssetKey("model_evaluation")).asset_materialization.metadata
    gate = instance.get_latest_materialization_event(AssetKey("validation_gate")).asset_materialization.metadata
    return {"source": name, "seconds": round(run["seconds"], 1), "table": evaluation["table"].value,
            "gate_passed": bool(gate["passed"].value), "reasons": gate["reasons"].value}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(_one(args.one), default=str))
        return 0
    for name in args.sources:
        with tempfile.TemporaryDirectory() as home:
            env = {**os.environ, "KAIROS_HOME": home}
            for k in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "KAIROS_LAKE_URI", "REDIS_URL"):
                env.pop(k, None)
            if name.startswith("movielens"):
                env.setdefault("KAIROS_PARTITION_START", "1997-09-01")
            print(f"[bench] {name}: running the whole asset graph in {home} ...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--one", name], env=env, cwd=ROOT, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(out.stderr[-4000:], file=sys.stderr)
                return out.returncode or 1
            r = json.loads(lines[-1][len("RESULT "):])
            table = r["table"]
            models = [m for m, v in table.items() if isinstance(v, dict) and "ndcg_at_10" in v and m != "champion"]
            print(f"\n{name}: test window, {r['seconds']}s for the whole graph; gate "
                  f"{'PASSED' if r['gate_passed'] else 'FAILED'}")
            print(f"  {'model':<22}" + "".join(f"{m:>12}" for m in METRICS))
            for m in sorted(models, key=lambda m: -float(table[m].get("ndcg_at_10") or 0)):
                print(f"  {m:<22}" + "".join(f"{float(table[m].get(k, float('nan'))):>12.4f}" for k in METRICS))
            for reason in r["reasons"]:
                print(f"  gate: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
