"""Monitoring benchmark: off-policy estimators against a known truth, the cost of the monitoring functions at
scale, and what PSI says on the simulator with and without a taste shift.

    .venv/bin/python bench/monitor.py                  # everything (a few minutes on 2 cores)
    .venv/bin/python bench/monitor.py --skip-psi       # OPE accuracy and throughput only
    .venv/bin/python bench/monitor.py --only-psi       # the PSI table only

Prints, per estimator (IPS, clipped IPS, SNIPS) and sample size: bias, standard deviation, RMSE against the
analytic value of the target policy, and the coverage of the 95% bootstrap interval; seconds for
evaluate_policy / slate_target_probabilities / feature_quality / attribute_engagement on large frames; and the
max behaviour PSI and max ranker-feature PSI (actionable features) on simulated worlds, stationary and shifted.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd

from monitoring.ope import SyntheticBandit, clipped_ips, evaluate_policy, ips, slate_target_probabilities, snips
from ground.settings import PROJECT_ROOT

CLIP = 5.0


def bench_ope_accuracy(sizes: list[int], replicates: int, coverage_reps: int) -> None:
    world = SyntheticBandit.make(0)
    truth = world.true_value
    print(f"\nOPE on a synthetic bandit (5 contexts x 6 actions): true target value {truth:.4f}, "
          f"logging policy value {world.logging_value:.4f}")
    print(f"{'n':>7} {'estimator':<12} {'bias':>9} {'std':>8} {'rmse':>8} {'95% CI coverage':>16}")
    for n in sizes:
        logs = [world.log(n, s) for s in range(replicates)]
        est = {"ips": [ips(d["reward"], d["propensity"], d["pi"]) for d in logs],
               f"clipped@{CLIP:g}": [clipped_ips(d["reward"], d["propensity"], d["pi"], CLIP) for d in logs],
               "snips": [snips(d["reward"], d["propensity"], d["pi"]) for d in logs]}
        cover = {"ips": 0, f"clipped@{CLIP:g}": 0, "snips": 0}
        for s in range(coverage_reps):
            res = evaluate_policy(world.log(n, 10_000 + s), "pi", max_weight=CLIP, n_bootstrap=300, seed=s)
            for name, key in (("ips", "ips"), (f"clipped@{CLIP:g}", "clipped_ips"), ("snips", "snips")):
                lo, hi = res.ci[key]
                cover[name] += lo <= truth <= hi
        for name, values in est.items():
            v = np.asarray(values)
            print(f"{n:>7} {name:<12} {v.mean() - truth:>+9.5f} {v.std():>8.5f} "
                  f"{np.sqrt(np.mean((v - truth) ** 2)):>8.5f} {cover[name] / coverage_reps:>15.0%}")


def bench_throughput(rows: int) -> None:
    from features.registry import ranker_feature_names
    from monitoring.health import attribute_engagement, feature_quality

    rng = np.random.default_rng(0)
    print(f"\nThroughput on {rows:,} logged rows (10 per request):")
    n_req = rows // 10
    log = pd.DataFrame({"request_id": np.repeat(np.arange(n_req), 10), "position": np.tile(np.arange(10), n_req),
                        "reward": (rng.random(rows) < 0.05).astype(float),
                        "propensity": np.where(rng.random(rows) < 0.05, 0.05 / 190, 0.95)})
    log.loc[log["position"] == 0, "propensity"] = 1.0
    t = time.perf_counter()
    pi = slate_target_probabilities(log, rng.normal(size=rows), epsilon=0.05)
    print(f"  slate_target_probabilities {rows:>10,} rows  {time.perf_counter() - t:7.2f} s")
    t = time.perf_counter()
    res = evaluate_policy(log, pi, n_bootstrap=500, seed=0)
    print(f"  evaluate_policy (B=500)  {rows:>12,} rows  {time.perf_counter() - t:7.2f} s  (ESS {res.ess:,.0f})")
    frame = pd.DataFrame({name: rng.random(rows) for name in ranker_feature_names()})
    frame.loc[frame.sample(frac=0.1, random_state=0).index, "user_clicks_7d"] = np.nan
    frame["request_ts"] = 1_767_225_600_000 + rng.integers(0, 86_400_000, rows)
    frame["device_type"] = "mobile"
    t = time.perf_counter()
    feature_quality(frame, [f for f in ranker_feature_names() if f not in ("user_category_affinity",
                                                                            "user_category_pref_decayed",
                                                                            "co_engagement")])
    print(f"  feature_quality (18 numeric) {rows:>8,} rows  {time.perf_counter() - t:7.2f} s")
    users = rng.integers(0, rows // 20, rows).astype(str)
    items = rng.integers(0, 5_000, rows).astype(str)
    ts = np.sort(rng.integers(0, 7 * 86_400_000, rows))
    imp = pd.DataFrame({"user_id": users, "item_id": items, "request_ts": ts, "position": log["position"],
                        "request_id": log["request_id"]})
    pick = rng.random(rows) < 0.05
    events = pd.DataFrame({"event_id": np.arange(int(pick.sum())).astype(str), "user_id": users[pick],
                           "item_id": items[pick], "event_type": "click", "timestamp": ts[pick] + 30_000,
                           "dwell_time_ms": 40_000})
    t = time.perf_counter()
    out = attribute_engagement(imp, events, 72 * 3_600_000)
    print(f"  attribute_engagement     {rows:>12,} impressions, {len(events):,} clicks  "
          f"{time.perf_counter() - t:7.2f} s  (CTR {out['clicked'].mean():.4f})")


def bench_psi(worlds: list[tuple[int, int]]) -> None:
    sys.path.insert(0, str(PROJECT_ROOT))
    from features.functions import assemble_features
    from data_contracts.schema import DAY_MS
    from ingestion.simulator import SimulatorConfig, simulate
    from monitoring.drift import drift_report, event_drift_frame, ranker_drift_columns, ranker_feature_drift
    from tests._trainset import make_training_set

    print("\nPSI on the simulator: first half of the days (reference) vs the second half (current); a shifted world "
          "changes tastes at the midpoint")
    print(f"{'users':>6} {'days':>5} {'shift':>6} {'behaviour max':>14} {'status':>7} {'ranker max':>11} "
          f"{'status':>7}  worst behaviour / ranker features")
    actionable, _ = ranker_drift_columns()
    for users, days in worlds:
        for shift in (None, days // 2):
            world = simulate(SimulatorConfig(n_users=users, n_items=150, n_categories=6, days=days, seed=11,
                                             shift_day=shift, malformed_rate=0, duplicate_rate=0))
            ev = world.events
            cut = world.config.start_ms + (days // 2) * DAY_MS
            ref = event_drift_frame(ev[ev["timestamp"] < cut], world.items)
            cur = event_drift_frame(ev[ev["timestamp"] >= cut], world.items)
            cols = [c for c in ref.columns if c in cur.columns and c not in ("session_id", "user_id")]
            behaviour = drift_report(ref, cur, cols)
            ts = make_training_set(world)
            ranker = ranker_feature_drift(assemble_features(ts[ts["timestamp"] < cut]),
                                          assemble_features(ts[ts["timestamp"] >= cut]))
            worst_b = max(behaviour.psi.items(), key=lambda kv: kv[1])
            worst_r = sorted(((v, k) for k, v in ranker.psi.items() if k in actionable), reverse=True)[:2]
            print(f"{users:>6} {days:>5} {str(shift):>6} {behaviour.max_psi:>14.3f} {behaviour.status:>7} "
                  f"{ranker.max_psi:>11.3f} {ranker.status:>7}  {worst_b[0]} {worst_b[1]:.2f} / "
                  + ", ".join(f"{k} {v:.2f}" for v, k in worst_r))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--replicates", type=int, default=300)
    parser.add_argument("--coverage-reps", type=int, default=100)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--skip-psi", action="store_true")
    parser.add_argument("--only-psi", action="store_true")
    args = parser.parse_args()
    if not args.only_psi:
        bench_ope_accuracy(args.sizes, args.replicates, args.coverage_reps)
        bench_throughput(args.rows)
    if not args.skip_psi:
        bench_psi([(120, 10), (400, 21)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
