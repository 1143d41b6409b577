"""Open-loop HTTP load for bench/ranking.py: requests at a fixed arrival rate, from a process of its own.

    .venv/bin/python bench/open_loop.py --base http://127.0.0.1:3000 --rate 60 --seconds 10 --users users.txt \\
        --now-ms 1700000000000

Request i is *scheduled* at t0 + i / rate whatever the server does; its latency is measured from that scheduled
time (no coordinated omission), and the generator's own lateness — when it actually wrote the request vs when it
was due — is kept per request (`send_lag`), so a late client is told apart from a slow server: the figure is only
the server's if the send lag stays small. One asyncio loop (uvloop when installed) on raw HTTP/1.1 keep-alive
connections, a new connection whenever none is idle: ~0.1 ms of CPU a request, no client threads contending for
an interpreter, and no large heap (bench/ranking.py's process holds the models: its collector would pause the
clock). The same bodies as bench/ranking.py `_body` (user users[i % len(users)], session f"open-{i % 13}").

Per request it also reads the server's `server-timing` header (serving/service.py: `wait`, the time the request
queued for its worker's one pipeline slot, from the handler's entry, and `app`, the pipeline itself), so the
slowest requests' latency splits into client send lag, wait for the slot, pipeline, and the rest (the request
waiting for its worker's event loop, HTTP parse and validation, the network). Prints one JSON line (MARK + JSON) with the percentiles and that split.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MARK = "KAIROS_OPEN_LOOP_JSON "
_TIMING = re.compile(rb"(\w+);dur=([0-9.]+)")
_SERVED = re.compile(rb'"served_by":"([^"]*)"')
IDLE_S = 2.0  # a keep-alive connection idle longer than this is closed rather than reused


def _body(user: str, session: str, now_ms: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from bench.ranking import _body as body

    return body(user, session, now_ms)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


async def run(base: str, users: list[str], now_ms: int, rate: float, seconds: float, timeout_s: float = 10.0) -> dict:
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    n = int(rate * seconds)
    bodies = [json.dumps(_body(users[i % len(users)], f"open-{i % 13}", now_ms), separators=(",", ":")).encode()
              for i in range(n)]
    # idle keep-alive connections with when each went idle: one idle longer than IDLE_S is closed, not reused (the
    # server drops it after its keep-alive timeout, uvicorn's 5 s: a request written to it would fail)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    opened = 0
    lat = np.full(n, np.nan)
    lag = np.full(n, np.nan)
    wait = np.full(n, np.nan)
    app = np.full(n, np.nan)
    codes: dict[int, int] = {}
    served: dict[str, int] = {}

    async def one(i: int, due: float) -> None:
        nonlocal opened
        head = (f"POST /v1/personalize HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(bodies[i])}\r\n\r\n").encode()
        conn = None
        while idle and conn is None:
            reader, writer, since = idle.pop()
            if time.perf_counter() - since < IDLE_S and not reader.at_eof():
                conn = (reader, writer)
            else:
                writer.close()
        try:
            if conn is None:
                opened += 1
                conn = await asyncio.open_connection(host, port)
            reader, writer = conn
            lag[i] = (time.perf_counter() - due) * 1000
            writer.write(head + bodies[i])
            status, headers, body = await asyncio.wait_for(_read_response(reader), timeout_s)
            lat[i] = (time.perf_counter() - due) * 1000
            for name, dur in _TIMING.findall(headers.get(b"server-timing", b"")):
                if name == b"wait":
                    wait[i] = float(dur)
                elif name == b"app":
                    app[i] = float(dur)
            m = _SERVED.search(body) if status == 200 else None
            path = m.group(1).decode() if m else f"http_{status}"
            idle.append((reader, writer, time.perf_counter()))
        except Exception as exc:  # noqa: BLE001 - a transport error is a failure, counted (599)
            status, path = 599, type(exc).__name__
            lat[i] = (time.perf_counter() - due) * 1000
            if conn is not None:
                conn[1].close()
        codes[status] = codes.get(status, 0) + 1
        served[path] = served.get(path, 0) + 1

    tasks = []
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)
    for _, writer, _ in idle:
        writer.close()
    return summarize(rate, lat, lag, wait, app, codes, served, opened)


def _pct(a: np.ndarray, q: float) -> float:
    a = a[~np.isnan(a)]
    return float(np.percentile(a, q)) if a.size else float("nan")


def summarize(rate: float, lat: np.ndarray, lag: np.ndarray, wait: np.ndarray, app: np.ndarray,
              codes: dict[int, int], served: dict[str, int], connections: int) -> dict:
    """Percentiles, and the mean split of the slowest 1% of requests (at or above the p99) into client send lag,
    wait for the worker's pipeline slot, the pipeline, and the rest."""
    out: dict = {"rate": rate, "requests": int(np.sum(~np.isnan(lat))), "connections": connections,
                 "codes": {str(k): v for k, v in codes.items()}, "served_by": served}
    for name, a in (("", lat), ("send_lag_", lag), ("wait_", wait), ("app_", app)):
        out.update({f"{name}p50": _pct(a, 50), f"{name}p95": _pct(a, 95), f"{name}p99": _pct(a, 99),
                    f"{name}max": float(np.nanmax(a)) if np.any(~np.isnan(a)) else float("nan")})
    p99 = out["p99"]
    tail = ~np.isnan(lat) & (lat >= p99)
    if tail.any():
        parts = {"send_lag": float(np.nanmean(lag[tail])), "wait": float(np.nanmean(wait[tail])) if np.any(~np.isnan(wait[tail])) else float("nan"),
                 "app": float(np.nanmean(app[tail])) if np.any(~np.isnan(app[tail])) else float("nan")}
        parts["rest"] = float(np.mean(lat[tail])) - sum(v for v in parts.values() if v == v)
        out["tail"] = {"n": int(tail.sum()), "latency": float(np.mean(lat[tail])), **parts}
    return out


def open_loop(base: str, users: list[str], now_ms: int, rate: float, seconds: float) -> dict:
    """Run this module as its own process at `rate` for `seconds`; its JSON summary plus `client_cpu_s` (the
    generator's user + system CPU time, from the kernel's rusage) and `wall_s`."""
    with tempfile.TemporaryDirectory(prefix="kairos-open-") as tmp:
        users_path = Path(tmp) / "users.json"
        users_path.write_text(json.dumps([str(u) for u in users]))
        out_path = Path(tmp) / "out.txt"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--base", base, "--rate", str(rate),
               "--seconds", str(seconds), "--users", str(users_path), "--now-ms", str(int(now_ms))]
        t = time.perf_counter()
        with open(out_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        text = out_path.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"open-loop generator failed: {' '.join(cmd)}\n{text[-2000:]}")
    for line in text.splitlines():
        if line.startswith(MARK):
            r = json.loads(line[len(MARK):])
            r["codes"] = {int(k): v for k, v in r["codes"].items()}
            return {**r, "client_cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall}
    raise RuntimeError(f"open-loop generator printed no {MARK.strip()} line:\n{text[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--users", type=Path, required=True, help="a JSON list of user ids")
    parser.add_argument("--now-ms", type=int, required=True)
    args = parser.parse_args()
    users = json.loads(args.users.read_text())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    r = asyncio.run(run(args.base, users, args.now_ms, args.rate, args.seconds))
    print(MARK + json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
