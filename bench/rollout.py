"""Rollout benchmark: how long the registry operations of a staged rollout take, and the decisions.

    .venv/bin/python bench/rollout.py [--flips 20]

Against a real MLflow registry (SQLite under a temporary KAIROS_HOME, the embedded default), prints:
the p50/p99/max of `rollback` (champion <- previous_champion) and `promote`, of one `rollout_state`
read (what every server does per refresh poll), and the throughput of the pure `canary_verdict`
and `compare_shadow` on impression-log-sized inputs. A server applies a flip on its next poll
(KAIROS_MODEL_POLL_S, default 10 s; a rollback to the version it served before is a reference swap).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def _pct(xs: list[float]) -> str:
    a = np.asarray(xs) * 1000
    return f"p50 {np.percentile(a, 50):.1f} ms, p99 {np.percentile(a, 99):.1f} ms, max {a.max():.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flips", type=int, default=20)
    args = parser.parse_args()
    os.environ["KAIROS_HOME"] = tempfile.mkdtemp(prefix="kairos-bench-rollout-")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from models.registry import mlflow_client
    from models.rollout import rollout_state
    from ground.settings import Settings
    from training.rollout import (ArmMetrics, canary_verdict, compare_shadow, promote, rollback, start_canary,
                                  start_rollout)

    settings = Settings.from_env()
    client = mlflow_client(settings)
    client.create_registered_model(settings.model_name)
    versions = [str(client.create_model_version(settings.model_name, source=tempfile.mkdtemp()).version) for _ in range(2)]
    promote(settings, versions[0])
    promotes, rollbacks, flips, reads, stages = [], [], [], [], []
    for _ in range(args.flips):
        t = time.perf_counter()
        start_rollout(settings, versions[1])
        start_canary(settings, versions[1], 0.1)
        stages.append(time.perf_counter() - t)
        t = time.perf_counter()
        promote(settings, versions[1])
        promotes.append(time.perf_counter() - t)
        t = time.perf_counter()
        flips.append(rollback(settings)["seconds"])
        rollbacks.append(time.perf_counter() - t)
        t = time.perf_counter()
        rollout_state(settings)
        reads.append(time.perf_counter() - t)
    print(f"MLflow registry ({settings.mlflow_tracking_uri}), {args.flips} rounds each:")
    print(f"  rollback: champion alias back on the previous version after {_pct(flips)}")
    print(f"  rollback, with its bookkeeping (aliases, stage tag): {_pct(rollbacks)}")
    print(f"  promote  (champion <- canary, old kept):   {_pct(promotes)}")
    print(f"  shadow + canary start:                     {_pct(stages)}")
    print(f"  rollout_state read (per server poll):     {_pct(reads)}")

    rng = np.random.default_rng(0)
    arms = {"champion": ArmMetrics(9000, 10, 5.0, 14.0, 90_000, 18_000), "canary": ArmMetrics(1000, 1, 5.0, 15.0, 10_000, 1900)}
    n = 20_000
    t = time.perf_counter()
    for _ in range(n):
        canary_verdict(arms)
    print(f"canary_verdict: {n / (time.perf_counter() - t):,.0f} verdicts/s")
    lists = [[f"i{k}" for k in rng.permutation(200)[:10]] for _ in range(2000)]
    compare_shadow(rng.random(10), rng.random(10), lists[:1], lists[:1])  # warm-up: imports monitoring.drift
    t = time.perf_counter()
    compare_shadow(rng.random(20_000), rng.random(20_000), lists, [list(rng.permutation(x)) for x in lists])
    print(f"compare_shadow over 2,000 request pairs / 20,000 scores: {(time.perf_counter() - t) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
