"""A loopback JSON endpoint for the load-driver tests (bench/open_loop.py, bench/wrk_load.py): it records every
POSTed body with its arrival time and answers what the test's `answer` says, so the driver's bodies, schedule and
counting are checked against a real HTTP server without starting the model server."""
from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

# answer(n, body) -> (status code, JSON-able answer, extra headers); n counts requests from 1
Answer = Callable[[int, dict], tuple[int, dict, dict[str, str]]]


@contextlib.contextmanager
def recording_server(answer: Answer) -> Iterator[tuple[str, list[tuple[float, dict]]]]:
    """Yields (base URL, [(perf_counter at arrival, body)]) while a threading HTTP/1.1 server runs on loopback."""
    seen: list[tuple[float, dict]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with lock:
                seen.append((time.perf_counter(), body))
                n = len(seen)
            code, payload, headers = answer(n, body)
            out = json.dumps(payload, separators=(",", ":")).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()
