"""bench/open_loop.py: the open-loop generator sends bench/ranking.py's bodies on schedule, in its own process,
measures from the scheduled time and reads the server's server-timing header."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests._loopback_http import recording_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_open_loop_sends_on_schedule_and_splits_the_tail():
    from bench.open_loop import open_loop
    from bench.ranking import _body

    def answer(n: int, body: dict) -> tuple[int, dict, dict[str, str]]:
        slow = n % 10 == 0  # every 10th request takes 80 ms in the "app": the tail must say so
        if slow:
            time.sleep(0.08)
        code = 503 if n % 7 == 0 else 200
        return code, {"served_by": "two_stage"}, {"server-timing": f"wait;dur=0.5, app;dur={80.0 if slow else 1.0}"}

    users = ["u1", 'u"2', "u3"]
    with recording_server(answer) as (url, seen):
        r = open_loop(url, users, 1_700_000_000_123, rate=50, seconds=2)
    assert r["requests"] == len(seen) == 100
    bodies = [b for _, b in seen]
    expected = [_body(users[i % 3], f"open-{i % 13}", 1_700_000_000_123) for i in range(100)]
    assert sorted(map(json.dumps, bodies)) == sorted(map(json.dumps, expected))
    # an open loop: the arrivals keep the rate while some answers take 80 ms (a closed loop would slow down)
    arrivals = sorted(t for t, _ in seen)
    assert 1.6 < arrivals[-1] - arrivals[0] < 2.6
    assert r["codes"][503] == 14 and r["codes"][200] == 86 and r["served_by"]["two_stage"] == 86
    assert r["wait_p50"] == 0.5 and r["app_max"] == 80.0
    assert r["p99"] >= 80.0 and r["tail"]["app"] >= 40.0  # the slow answers are the tail, and the split says why
    assert r["client_cpu_s"] > 0 and r["send_lag_p50"] < 20.0
