"""replay_session_features (the training set's session features, features/functions.py) before/after on one frame.

    .venv/bin/python bench/session_replay.py                          # 1M clicks + 4 candidates each, vs b11c86f
    .venv/bin/python bench/session_replay.py --events 200000 --ref HEAD~1

Generates the replay input the training set builds on bench/world.py's 2y-1m shape (short click sessions, each
click followed by `--candidates` sampled catalog negatives at its moment, some impressions and skips, a few
long sessions past the 50-item cap), runs the function as of git `--ref` (exec'd from `git show`) and the
working tree's on the same frame, prints CPU and wall seconds of each and checks the outputs are equal
(exact floats, same rows in the same order). Not a test: the figures are for the README / the issue.
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


def replay_frame(events: int, items: int, candidates: int, seed: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """event_id, session_id, event_type, item_id, timestamp (+ the item -> category map) like the 2y-1m replay."""
    rng = np.random.default_rng(seed)
    per_session = 5
    n_sessions = max(1, events // per_session)
    sess = np.repeat(np.arange(n_sessions), per_session)[:events]
    long = rng.random(n_sessions) < 0.002  # a few sessions of 120 events: the last-items cap is reached
    sess = np.concatenate([sess, np.repeat(np.flatnonzero(long), 120)])
    n = len(sess)
    start = 1_104_537_600_000 + rng.integers(0, 2 * 365 * 86_400_000, n_sessions)
    ts = start[sess] + rng.integers(0, 30 * 60_000, n)
    ts = np.where(rng.random(n) < 0.03, start[sess], ts)  # ties inside a session
    item = rng.zipf(1.3, n) % items
    kind = rng.choice(np.array(["click", "impression", "skip", "add_to_cart"], dtype=object), n, p=[0.85, 0.08, 0.05, 0.02])
    ev = pd.DataFrame({"event_id": np.char.add("e", np.arange(n).astype(str)).astype(object),
                       "session_id": np.char.add("s", sess.astype(str)).astype(object),
                       "event_type": kind, "item_id": np.char.add("i", item.astype(str)).astype(object),
                       "timestamp": ts.astype(np.int64)})
    clicks = ev[ev["event_type"] == "click"]
    rep = np.repeat(np.arange(len(clicks)), candidates)
    cand = pd.DataFrame({"event_id": np.char.add("easy", np.arange(len(rep)).astype(str)).astype(object),
                         "session_id": clicks["session_id"].to_numpy()[rep], "event_type": "candidate",
                         "item_id": np.char.add("i", rng.integers(0, items, len(rep)).astype(str)).astype(object),
                         "timestamp": clicks["timestamp"].to_numpy()[rep]})
    frame = pd.concat([ev, cand], ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    cats = {f"i{k}": f"c{k % 12}" for k in range(items) if k % 97}  # a few items without a category
    return frame, cats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1_000_000, help="real events (clicks, impressions, skips)")
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--candidates", type=int, default=4, help="sampled candidates per click (2y-1m: 4)")
    p.add_argument("--ref", default="b11c86f", help="git revision of the 'before' implementation")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    from features.functions import replay_session_features as new

    frame, cats = replay_frame(a.events, a.items, a.candidates, a.seed)
    print(f"frame: {len(frame):,} rows, {frame['session_id'].nunique():,} sessions")
    after, ac, aw = timed(new, frame, cats)
    before, bc, bw = timed(function_at_ref(a.ref, "features/functions.py", "replay_session_features"), frame, cats)
    print(f"before ({a.ref}): cpu {bc:.1f} s  wall {bw:.1f} s")
    print(f"after (worktree): cpu {ac:.1f} s  wall {aw:.1f} s   cpu ratio {bc / max(ac, 1e-9):.1f}x")
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after.reset_index(drop=True), check_exact=True)
    print(f"outputs identical: True ({len(after):,} rows, {int((after['session_item_seen'] > 0).sum()):,} seen, "
          f"{int((after['session_last_items'] != '[]').sum()):,} with a history)")


if __name__ == "__main__":
    main()
