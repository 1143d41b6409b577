"""bench/wrk_load.py: wrk's Lua builds the same bodies as bench/ranking.py `_body` and counts what came back."""
from __future__ import annotations

import json
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install -y wrk)")


def test_wrk_bodies_match_the_httpx_driver_and_codes_are_counted():
    from bench.ranking import _body
    from bench.wrk_load import wrk_load

    seen: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with lock:
                seen.append(body)
                n = len(seen)
            code = 503 if n % 10 == 0 else 200
            out = json.dumps({"served_by": "two_stage", "latency_breakdown_ms": {"feature_fetch": 0.5, "total": 1.25}},
                             separators=(",", ":")).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    users = ["u1", 'u"2', "u3"]
    try:
        r = wrk_load(f"http://127.0.0.1:{server.server_port}", users, 1_700_000_000_123, clients=3, seconds=1)
    finally:
        server.shutdown()
    assert r["requests"] >= 10 and seen
    for body in seen:
        assert any(body == _body(users[k % 3], f"bench-{k % 3}-{k % 7}", 1_700_000_000_123) for k in range(3 * 7)), body
    assert r["codes"].get(503, 0) >= 1 and r["non_2xx"] == r["codes"][503]
    assert r["served_by"]["two_stage"] == r["codes"][200]
    assert r["pipeline_p50"] == pytest.approx(1.25)
    assert r["client_cpu_s"] >= 0 and r["p50"] <= r["p99"]
