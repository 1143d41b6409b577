"""recent_items_before (the training set's per-row user history, features/history.py) before/after on one slice.

    .venv/bin/python bench/recent_items.py                    # 1M clicks / 2 years, vs c71f4af
    .venv/bin/python bench/recent_items.py --events 200000 --ref HEAD~1

Generates a session click log shaped like bench/world.py's 2y-1m (short sessions, a click = an engagement,
rows = each click plus sampled negatives at the same moment), runs the function as of git `--ref` (exec'd
from `git show`) and the working tree's on the same frames, prints CPU and wall seconds of each and checks the
outputs are equal row for row. Not a test: the figures are for the README / the issue.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.ab import function_at_ref, timed  # noqa: E402


def slice_frames(events: int, users: int, items: int, negatives: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    span = 2 * 365 * 86_400_000
    t0 = 1_600_000_000_000
    user = rng.integers(0, users, events)
    ts = t0 + rng.integers(0, span, events)
    ts[rng.random(events) < 0.05] = ts[0]  # some ties
    item = rng.zipf(1.3, events) % items
    kind = np.where(rng.random(events) < 0.9, "click", "skip")
    uid = np.char.add("u", user.astype(str)).astype(object)
    uid[rng.random(events) < 0.02] = None  # anonymous
    ev = pd.DataFrame({"user_id": uid, "item_id": np.char.add("i", item.astype(str)).astype(object),
                       "event_type": kind, "timestamp": ts})
    rep = np.repeat(np.arange(events), 1 + negatives)
    rows = pd.DataFrame({"user_id": ev["user_id"].to_numpy()[rep], "timestamp": ev["timestamp"].to_numpy()[rep]})
    return ev, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--negatives", type=int, default=1, help="rows per click beyond the click itself")
    p.add_argument("--ref", default="c71f4af", help="git revision of the 'before' implementation")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    from features.history import recent_items_before as new

    ev, rows = slice_frames(a.events, a.users, a.items, a.negatives, a.seed)
    print(f"slice: {len(ev):,} events, {len(rows):,} rows, {ev['user_id'].nunique():,} users")
    before, bc, bw = timed(function_at_ref(a.ref, "features/history.py", "recent_items_before"), ev, rows)
    after, ac, aw = timed(new, ev, rows)
    same = before == after
    print(f"before ({a.ref}): cpu {bc:.1f} s  wall {bw:.1f} s")
    print(f"after (worktree): cpu {ac:.1f} s  wall {aw:.1f} s   cpu ratio {bc / max(ac, 1e-9):.1f}x")
    print(f"outputs identical: {same} ({len(after):,} rows, {sum(x != '[]' for x in after):,} non-empty)")
    if not same:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
