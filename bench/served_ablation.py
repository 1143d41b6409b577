"""Where the served pipeline loses to the simulator's oracle: retrieval (which test positives reach the candidate
pool) versus ordering (how the ranker orders the pool), on a world bench/quality.py built and kept (`--home`).

    .venv/bin/python bench/quality.py --sources simulator --home /tmp/q --json /tmp/q.json
    .venv/bin/python bench/served_ablation.py --home /tmp/q/simulator

Loads the registered champion (the bundle bench/quality.py's graph registered, fitted priors included) and
replays the served pipeline at the test window's start (training/served_eval.py's store and split), without
exploration, for every test user:

    served                   the served top 10
    served pool, oracle order  the same candidate pool, re-ordered by the oracle's true click rates (the
                             retrieval ceiling: a perfect ranker over these candidates)
    whole catalog, ranker    the pool widened to the whole catalog (retrieval removed), ordered by the ranker
    oracle                   the oracle over the whole catalog
plus the share of test positives inside the pool (pool recall) for the served pool and for an oracle pool
of the same size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", required=True, help="the simulator world bench/quality.py kept (<--home>/simulator)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    os.environ["KAIROS_HOME"] = str(Path(args.home).resolve())
    for k in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "KAIROS_LAKE_URI", "REDIS_URL"):
        os.environ.pop(k, None)

    from bench.quality import SIM, oracle_scores
    from ground.settings import Settings
    from lake.delta import DeltaLake
    from models.registry import CHAMPION, load_alias
    from serving.offline import one_thread_per_request, served_recommender
    from serving.rerank import RerankConfig
    from training.catalog_eval import evaluate_recommender, score_lists
    from training.served_eval import _store_at, catalog_split

    settings = Settings.from_env()
    lake = DeltaLake(settings.lake_uri)
    bundle = load_alias(settings, CHAMPION)
    if bundle is None:
        print("no champion registered in this home", file=sys.stderr)
        return 1
    labels = lake.read("labels")
    events = lake.read("silver_events", columns=["user_id", "item_id", "event_type", "timestamp", "session_id"])
    catalog = lake.read("catalog_items")
    users = lake.read("catalog_users")
    training = lake.read("training_set", columns=["timestamp", "split"])
    split_ms = int(training.loc[training["split"] == "test", "timestamp"].min())
    split = catalog_split(labels, events, catalog["item_id"].astype(str).tolist(), split_ms)
    store, _ = _store_at(lake.read("user_features"), lake.read("item_features"), catalog, events, split_ms, "ablation")
    rerank = replace(RerankConfig.from_env(), epsilon=0.0)
    truth, truth_ids = oracle_scores(SIM)
    col = {i: j for j, i in enumerate(truth_ids)}
    n_catalog = len(split.catalog)
    out: dict = {"split_ms": split_ms, "users": len(split.test_users), "manifest_priors": {
        k: bundle.manifest.get(k) for k in ("popularity_prior", "item_similarity_prior")}}

    from serving import pipeline
    from serving.offline import REPLAY_CHANNELS, replay_request

    profile = {str(r["user_id"]): r for r in users.to_dict("records")}

    def stages(user: str, whole_catalog: bool) -> list[str]:
        """The served pipeline's stages 1-3 for `user` (pool 200, or the whole catalog unconsumed): candidates by
        the ranker's fused score, best first."""
        p = profile.get(user, {})
        req = replay_request(user, split_ms, 10, "home_feed", device=p.get("device_type"), region=p.get("geo_region"))
        tr = pipeline._begin(req, bundle, split_ms, rerank, f"ablation-{user}")
        assert pipeline._fetch_features(tr, bundle, store, pipeline.STALE_MAX_AGE_S) is None
        assert pipeline._retrieve(tr, bundle, store, REPLAY_CHANNELS) is None
        if whole_catalog:
            tr.candidates = [i for i in split.catalog if i not in tr.seen_set and i in bundle.item_row]
        pipeline._rank(tr, bundle)
        return [tr.candidates[i] for i in np.argsort(-tr.scores, kind="stable")]

    with one_thread_per_request():
        served = served_recommender(bundle, store, split_ms, users, rerank=rerank)
        out["served"] = evaluate_recommender(split, served).summary
        pools = {u: stages(u, False) for u in split.test_users}
        whole = {u: stages(u, True) for u in split.test_users}

    def oracle_order(user: str, items: list[str]) -> list[str]:
        s = truth[user]
        return sorted(items, key=lambda i: -s[col[i]])

    def oracle_pool(user: str, n: int) -> list[str]:
        consumed = split.consumed.get(user, set())
        return oracle_order(user, [i for i in split.catalog if i not in consumed])[:n]

    pers = {u: True for u in split.test_users}
    out["served_pool_oracle_order"] = score_lists(split, {u: oracle_order(u, p)[:20] for u, p in pools.items()}, pers).summary
    out["whole_catalog_ranker"] = score_lists(split, {u: w[:20] for u, w in whole.items()}, pers).summary
    out["oracle"] = score_lists(split, {u: oracle_pool(u, 20) for u in split.test_users}, pers).summary

    def pool_recall(lists: dict[str, list[str]]) -> float:
        hit = total = 0
        for u, rel in split.relevant.items():
            got = set(lists[u])
            hit += sum(1 for i in rel if i in got)
            total += len(rel)
        return hit / max(total, 1)

    sizes = [len(p) for p in pools.values()]
    out["pool_size_mean"] = float(np.mean(sizes))
    out["pool_recall_served"] = pool_recall(pools)
    out["pool_recall_oracle_same_size"] = pool_recall({u: oracle_pool(u, len(p)) for u, p in pools.items()})
    out["positives_per_user"] = float(np.mean([len(r) for r in split.relevant.values()]))
    print(f"simulator ablation at {split_ms}: {out['users']} test users, pool {out['pool_size_mean']:.0f} of "
          f"{n_catalog} items, {out['positives_per_user']:.1f} positives a user; priors {out['manifest_priors']}")
    for name in ("served", "served_pool_oracle_order", "whole_catalog_ranker", "oracle"):
        m = out[name]
        print(f"  {name:<28} NDCG@10 {m['ndcg_at_10']:.4f}  Recall@10 {m['recall_at_10']:.4f}  Recall@20 {m['recall_at_20']:.4f}")
    print(f"  pool recall (test positives inside the candidate pool): served {out['pool_recall_served']:.3f}, "
          f"an oracle pool of the same size {out['pool_recall_oracle_same_size']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
