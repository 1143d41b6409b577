"""bench/wrk_load.py: wrk's Lua builds the same bodies as bench/ranking.py `_body` and counts what came back."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests._loopback_http import recording_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install -y wrk)")


def test_wrk_bodies_match_the_httpx_driver_and_codes_are_counted():
    from bench.ranking import _body
    from bench.wrk_load import wrk_load

    def answer(n: int, body: dict) -> tuple[int, dict, dict[str, str]]:
        return (503 if n % 10 == 0 else 200), {"served_by": "two_stage",
                                               "latency_breakdown_ms": {"feature_fetch": 0.5, "total": 1.25}}, {}

    users = ["u1", 'u"2', "u3"]
    with recording_server(answer) as (url, recorded):
        r = wrk_load(url, users, 1_700_000_000_123, clients=3, seconds=1)
    seen = [body for _, body in recorded]
    assert r["requests"] >= 10 and seen
    for body in seen:
        assert any(body == _body(users[k % 3], f"bench-{k % 3}-{k % 7}", 1_700_000_000_123) for k in range(3 * 7)), body
    assert r["codes"].get(503, 0) >= 1 and r["non_2xx"] == r["codes"][503]
    assert r["served_by"]["two_stage"] == r["codes"][200]
    assert r["pipeline_p50"] == pytest.approx(1.25)
    assert r["client_cpu_s"] >= 0 and r["p50"] <= r["p99"]
