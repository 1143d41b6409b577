"""What non-personalized lists can reach on MovieLens-100K's catalog split, per warm/cold slice.

    .venv/bin/python bench/cold_start_ceiling.py [--path ../shared/data/movielens-100k]

Issue 14 asks the served top-10 to reach 1.15x the best baseline on the global temporal split (T = the 80th
percentile rating time). Two thirds of that split's test users have no rating before T: for them the server
can only use what is popular (and, on MovieLens, the user's demographic segment). This prints, on exactly the
protocol and metric code of training/catalog_eval.py (ratings >= 4 relevant, consumed items excluded):
decayed recent popularity (the best baseline), and the same list blended with the user's segment's own
decayed popularity (gender x age band, gender, occupation) at several blend weights, per slice, and recent
popularity per half-life, the half-life picked on a validation split before T. If no segment
blend beats global recent popularity on cold users, the cold two thirds cap what any model can gain there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.baselines import ScoreRecommender, _positives, decayed_counts  # noqa: E402
from training.catalog_eval import evaluate_recommender, temporal_split  # noqa: E402

AGE_BANDS = [0, 24, 34, 44, 200]
BLENDS = (0.0, 0.3, 0.5, 0.7, 1.0)
HALF_LIVES = (1.0, 3.0, 7.0, 14.0, 30.0, None)  # days; None = all-time counts
VALIDATION_QUANTILE = 0.875  # of the ratings before T: T_v = the 70th percentile overall, its test window < T


def _load(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    ratings = pd.read_csv(path / "u.data", sep="\t", names=["user_id", "item_id", "rating", "ts"])
    interactions = pd.DataFrame({"user_id": ratings["user_id"].astype(str), "item_id": ratings["item_id"].astype(str),
                                 "timestamp": ratings["ts"].astype("int64") * 1000, "positive": ratings["rating"] >= 4})
    users = pd.read_csv(path / "u.user", sep="|", header=None, encoding="latin-1",
                        names=["user_id", "age", "gender", "occupation", "zip"])
    users = users[pd.to_numeric(users["age"], errors="coerce").notna()]  # a header row, where the file has one
    users = users.assign(user_id=users["user_id"].astype(str), age=users["age"].astype(int))
    users["gender_age"] = users["gender"] + pd.cut(users["age"], AGE_BANDS, labels=False).astype(str)
    return interactions, users.set_index("user_id")


class SegmentBlend(ScoreRecommender):
    """(1 - a) * global recent popularity + a * the user's segment's recent popularity (each normalized)."""

    def __init__(self, split, segment_of: dict[str, str], alpha: float) -> None:
        pos = _positives(split)
        glob = decayed_counts(pos, split.catalog, split.split_ms, 7.0)
        super().__init__(split, glob / max(glob.sum(), 1e-12))
        self.alpha, self.segment_of = alpha, segment_of
        self.by_segment = {}
        for seg, rows in pos.assign(seg=pos["user_id"].map(segment_of)).groupby("seg"):
            s = decayed_counts(rows, split.catalog, split.split_ms, 7.0)
            self.by_segment[seg] = s / max(s.sum(), 1e-12)

    def __call__(self, user: str, k: int) -> tuple[list[str], bool]:
        seg = self.by_segment.get(self.segment_of.get(user))
        base = self.scores
        if seg is not None:
            self.scores = (1 - self.alpha) * base + self.alpha * seg
        try:
            return super().__call__(user, k)
        finally:
            self.scores = base


def half_life_sweep(interactions: pd.DataFrame, split) -> None:
    """Recent popularity per half-life, chosen on a validation split before T (never on the test window)."""
    before = interactions[interactions["timestamp"] < split.split_ms]
    valid = temporal_split(before, split.catalog, quantile=VALIDATION_QUANTILE)
    print(f"\nrecent popularity by half-life (validation: T_v {pd.to_datetime(valid.split_ms, unit='ms')}, "
          f"{len(valid.test_users)} users, test window < T)")
    print(f"{'half-life (days)':<20} {'validation':>10} {'test all':>9} {'warm':>7} {'cold':>7}")
    scores = {}
    for hl in HALF_LIVES:
        v = evaluate_recommender(valid, ScoreRecommender(valid, decayed_counts(_positives(valid), valid.catalog,
                                                                                 valid.split_ms, hl)), 10).summary
        t = evaluate_recommender(split, ScoreRecommender(split, decayed_counts(_positives(split), split.catalog,
                                                                                 split.split_ms, hl)), 10).summary
        scores[hl] = (v["ndcg_at_10"], t["ndcg_at_10"])
        print(f"{str(hl):<20} {v['ndcg_at_10']:>10.4f} {t['ndcg_at_10']:>9.4f} {t['warm_ndcg_at_10']:>7.4f} "
              f"{t['cold_ndcg_at_10']:>7.4f}", flush=True)
    pick = max(scores, key=lambda h: scores[h][0])
    print(f"validation picks half-life {pick}: test {scores[pick][1]:.4f} ({scores[pick][1] / scores[7.0][1]:.3f} x the "
          f"7-day half-life's {scores[7.0][1]:.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=ROOT.parent / "shared" / "data" / "movielens-100k")
    args = ap.parse_args()
    interactions, users = _load(args.path)
    split = temporal_split(interactions, sorted(interactions["item_id"].unique()), quantile=0.8)
    cold = len(split.test_users) - len(split.warm_users)
    print(f"split at {pd.to_datetime(split.split_ms, unit='ms')}: {len(split.test_users)} test users, "
          f"{cold} cold (no rating before T), {len(split.warm_users)} warm")
    print(f"{'list':<34} {'NDCG@10 all':>11} {'warm':>7} {'cold':>7}")
    best = None
    for key in ("gender_age", "gender", "occupation"):
        segment_of = users[key].astype(str).to_dict()
        for alpha in BLENDS:
            if alpha == 0.0 and key != "gender_age":
                continue  # alpha 0 is global recent popularity, printed once
            r = evaluate_recommender(split, SegmentBlend(split, segment_of, alpha), 10)
            name = "global recent popularity" if alpha == 0.0 else f"{key} blend a={alpha}"
            s = r.summary
            best = best or s
            print(f"{name:<34} {s['ndcg_at_10']:>11.4f} {s['warm_ndcg_at_10']:>7.4f} "
                  f"{s['cold_ndcg_at_10']:>7.4f}", flush=True)
    n, n_cold = len(split.test_users), cold
    need = (1.15 * best["ndcg_at_10"] * n - best["cold_ndcg_at_10"] * n_cold) / max(n - n_cold, 1)
    print(f"1.15 x global recent popularity = {1.15 * best['ndcg_at_10']:.4f}: with cold users at its "
          f"{best['cold_ndcg_at_10']:.4f}, warm users would need {need:.4f} "
          f"({need / best['warm_ndcg_at_10']:.2f} x its warm {best['warm_ndcg_at_10']:.4f})")
    half_life_sweep(interactions, split)


if __name__ == "__main__":
    main()
